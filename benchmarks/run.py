"""Side-by-side timings, one run, printed as the README's markdown tables.

    ./dev bench                      # or: .venv/bin/python benchmarks/run.py [--device cuda] [--repeat 50]

1. Adding ΔW into an existing weight at the SDXL attention shapes, 2592 coefficients per layer:
   (a) waveft_core's sparse in-place add, (b) PEFT's WaveFT get_delta_weight + add, (c) ptwt.waverec2 on the
   padded coefficient grid + add, (d) a LoRA of equal parameter count, B@A then add as ComfyUI does it, and
   (d') the same LoRA fused into one addmm_. Ratios are against (d).
2. Forward + backward of one layer in training: WaveFT's trainable path against LoRA's.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import waveft_core as wft  # noqa: E402
from waveft_core.convert.peft_io import peft_positions  # noqa: E402
from waveft_core.keys import DEFAULT_COEFFICIENTS, DEFAULT_SCALING, DEFAULT_SEED  # noqa: E402
from waveft_core.training.trainable import TrainableLayer  # noqa: E402

SHAPES = [(640, 640), (1280, 1280), (640, 2048), (1280, 2048), (5120, 1280)]
P = DEFAULT_COEFFICIENTS


def timeit(fn, device, repeat):
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(3):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3


def lora_rank(m, n):
    return max(1, round(P / (m + n)))


def peft_layer(m, n, wavelet, device):
    from peft import WaveFTConfig, get_peft_model

    class One(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = torch.nn.Linear(n, m, bias=False)

    model = get_peft_model(
        One(), WaveFTConfig(n_frequency=P, target_modules=["proj"], wavelet_family=wavelet, init_weights=False)
    ).to(device)
    return model.base_model.model.proj


def ptwt_add(weight, idx, values, wavelet, scaling):
    import ptwt
    import pywt

    m, n = weight.shape
    red = pywt.Wavelet(wavelet).dec_len - 2
    hp, wp = m + red + (m + red) % 2, n + red + (n + red) % 2
    grid = torch.zeros(hp * wp, device=weight.device)
    r, c = idx // n + (hp - m) // 2, idx % n + (wp - n) // 2
    grid[r * wp + c] = values
    grid = grid.view(hp, wp)
    h2, w2 = hp // 2, wp // 2
    rec = ptwt.waverec2(
        (grid[None, :h2, :w2], (grid[None, :h2, w2:], grid[None, h2:, :w2], grid[None, h2:, w2:])),
        pywt.Wavelet(wavelet),
    )
    weight += scaling * rec[0, :m, :n]


def bench_apply(device, repeat, with_peft, with_ptwt):
    rows = []
    for wavelet in ("db1", "db4"):
        for m, n in SHAPES:
            g = torch.Generator().manual_seed(0)
            idx = peft_positions((m, n), P, DEFAULT_SEED)
            layer = wft.Layer(spectrum=torch.randn(P, generator=g), indices=idx, shape=(m, n), wavelet=wavelet)
            w = torch.randn(m, n, device=device)
            r = lora_rank(m, n)
            A = torch.randn(r, n, device=device)
            B = torch.randn(m, r, device=device)
            res = {"shape": f"{m}x{n}", "wavelet": wavelet, "rank": r}
            res["waveft"] = timeit(lambda: layer.add_to_(w, 1.0), device, repeat)

            def lora_comfy():
                w.add_((B @ A).reshape(w.shape).to(w.dtype))

            res["lora"] = timeit(lora_comfy, device, repeat)
            res["lora_fused"] = timeit(lambda: w.addmm_(B, A), device, repeat)
            if with_peft:
                pl = peft_layer(m, n, wavelet, device)
                res["peft"] = timeit(lambda: w.add_(pl.get_delta_weight("default")), device, max(5, repeat // 5))
            if with_ptwt:
                vals = layer.spectrum.to(device)
                idx_d = idx.to(device)
                res["ptwt"] = timeit(
                    lambda: ptwt_add(w, idx_d, vals, wavelet, DEFAULT_SCALING), device, max(5, repeat // 5)
                )
            rows.append(res)
    return rows


def bench_low_precision(device, repeat, shape=(1280, 2048)):
    """fp16/bf16 weights, as ComfyUI hands them to a patch on a modern GPU (and every forward in lowvram)."""
    m, n = shape
    rows = []
    for wavelet in ("db1", "db4"):
        layer = wft.Layer(
            spectrum=torch.randn(P), indices=peft_positions(shape, P, DEFAULT_SEED), shape=shape, wavelet=wavelet
        )
        for dtype in (torch.float16, torch.bfloat16):
            w = torch.randn(m, n, device=device).to(dtype)
            r = lora_rank(m, n)
            A = torch.randn(r, n, device=device)
            B = torch.randn(m, r, device=device)

            def lora():  # as ComfyUI: the product in fp32, then cast and add
                w.add_((B @ A).to(dtype))

            rows.append(
                {
                    "wavelet": wavelet,
                    "dtype": str(dtype).replace("torch.", ""),
                    "waveft": timeit(lambda: layer.add_to_(w, 1.0), device, repeat),
                    "lora": timeit(lora, device, repeat),
                }
            )
    return rows


def bench_train(device, repeat, tokens=256):
    rows = []
    for wavelet in ("db1", "db4"):
        for m, n in SHAPES:
            x = torch.randn(tokens, n, device=device)
            w = torch.randn(m, n, device=device)
            t = TrainableLayer((m, n), P, wavelet).to(device)
            with torch.no_grad():
                t.spectrum.normal_()

            def waveft_step():
                y = torch.nn.functional.linear(x, t(w))
                y.square().mean().backward()

            r = lora_rank(m, n)
            A = torch.nn.Parameter(torch.randn(r, n, device=device) * 0.01)
            B = torch.nn.Parameter(torch.randn(m, r, device=device) * 0.01)

            def lora_step():  # LoRA's usual training path: base output plus the low-rank branch
                y = torch.nn.functional.linear(x, w) + (x @ A.t()) @ B.t()
                y.square().mean().backward()

            def lora_weight_step():  # ComfyUI's Train LoRA path: w + B@A as a weight wrapper
                y = torch.nn.functional.linear(x, w + B @ A)
                y.square().mean().backward()

            rows.append(
                {
                    "shape": f"{m}x{n}",
                    "wavelet": wavelet,
                    "rank": r,
                    "waveft": timeit(waveft_step, device, repeat),
                    "lora": timeit(lora_step, device, repeat),
                    "lora_wrapper": timeit(lora_weight_step, device, repeat),
                }
            )
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeat", type=int, default=50)
    ap.add_argument("--no-peft", action="store_true")
    ap.add_argument("--no-ptwt", action="store_true")
    args = ap.parse_args()
    device = torch.device(args.device)
    cpu = platform.processor() or platform.machine()
    print(
        f"device {device}, torch {torch.__version__}, {torch.get_num_threads()} threads, {cpu}, "
        f"{P} coefficients per layer, median of {args.repeat}\n"
    )

    rows = bench_apply(device, args.repeat, not args.no_peft, not args.no_ptwt)
    print("Add ΔW into an existing fp32 weight (ms; ratio to LoRA as ComfyUI applies it)\n")
    print(
        "| shape | wavelet | WaveFT (this) | LoRA rank r, B@A + add | LoRA fused addmm_ | PEFT WaveFT | ptwt | "
        "this / LoRA | PEFT / this |"
    )
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        peft = f"{r['peft']:.3f}" if "peft" in r else "-"
        pt = f"{r['ptwt']:.3f}" if "ptwt" in r else "-"
        speedup = f"{r['peft'] / r['waveft']:.0f}x" if "peft" in r else "-"
        print(
            f"| {r['shape']} | {r['wavelet']} | {r['waveft']:.3f} | r={r['rank']}: {r['lora']:.3f} | "
            f"{r['lora_fused']:.3f} | {peft} | {pt} | {r['waveft'] / r['lora']:.2f}x | {speedup} |"
        )

    rows = bench_low_precision(device, args.repeat)
    print("\nAdd ΔW into an fp16/bf16 1280x2048 weight: summed in fp32, rounded once (ms)\n")
    print("| wavelet | weight dtype | WaveFT (this) | LoRA r=1, B@A + add | this / LoRA |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['wavelet']} | {r['dtype']} | {r['waveft']:.3f} | {r['lora']:.3f} | {r['waveft'] / r['lora']:.2f}x |"
        )

    rows = bench_train(device, max(10, args.repeat // 2))
    print("\nTraining: forward + backward of one layer, 256 tokens (ms; ratio to LoRA's branch path)\n")
    print("| shape | wavelet | WaveFT (this) | LoRA branch | LoRA as weight wrapper | this / LoRA branch |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['shape']} | {r['wavelet']} | {r['waveft']:.3f} | r={r['rank']}: {r['lora']:.3f} | "
            f"{r['lora_wrapper']:.3f} | {r['waveft'] / r['lora']:.2f}x |"
        )


if __name__ == "__main__":
    main()
