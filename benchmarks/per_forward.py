"""What WaveFT costs on every forward, against a LoRA of equal parameters, printed as the README's tables.

    nice python benchmarks/per_forward.py [--device cuda] [--repeats 7] [--threads 1,all] [--json out.json]

1. Per-forward merge: a bf16 weight gets strength·ΔW added in place, as ComfyUI's low-VRAM and dynamic-VRAM loads
   (LowVramPatch) and ComfyUI-GGUF do for every layer on every forward. WaveFT goes through its adapter's
   calculate_weight (the path it picks for the shape is shown); the LoRA as the host computes it there:
   up @ down in the weight's dtype, scaled, added.
2. Bypass (Load LoRA (Bypass), the host's bypass hook): h(x) for 2 x 1024 tokens. WaveFT's h as the hook drives it;
   the LoRA's as the host's LoRA adapter computes it (linear(linear(x, down), up) · scale). Beside each row the
   operation-count floor: LoRA does T·r·(m+n) multiply-adds, the separable WaveFT product T·(p + L·(m+n)).

Every adapter has p = r·(m + n) coefficients for the LoRA's rank r = max(1, round(2592 / (m + n))): equal
parameters. Methods run interleaved (one call of each in turn, the order rotating), min / median / max of the
repeats. A time that is not positive and finite (a broken timer on a loaded machine) is measured again; if it stays
impossible the cell says so instead of printing a number.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import waveft_core as wft
from waveft_core.hosts.weight_adapter import adapter_class
from waveft_core.keys import DEFAULT_COEFFICIENTS
from waveft_core.separable import filtered_merge_is_cheaper, structured_is_cheaper
from waveft_core.wavelets import reconstruction_filters

SHAPES = [(640, 640), (1280, 1280), (640, 2048), (1280, 2048), (5120, 1280), (3072, 3072), (3072, 12288)]
WAVELETS = ("db1", "db4")
PAPER_P = DEFAULT_COEFFICIENTS
TOKENS = 2 * 1024
WaveFTAdapter = adapter_class(object)


def equal_parameters(m: int, n: int) -> tuple[int, int]:
    """(LoRA rank, WaveFT coefficients) of equal parameter count."""
    rank = max(1, min(round(PAPER_P / (m + n)), m * n // (2 * (m + n))))  # small test shapes: at most half filled
    return rank, rank * (m + n)


def make_layer(shape, p, wavelet, seed=0) -> wft.Layer:
    g = torch.Generator().manual_seed(seed)
    m, n = shape
    idx = torch.randperm(m * n, generator=g)[:p]
    return wft.Layer(spectrum=torch.randn(p, generator=g) * 1e-3, indices=idx, shape=shape, wavelet=wavelet)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def interleaved(methods: dict, device, repeats: int) -> dict:
    """name -> list of seconds (or None where the timer gave an impossible figure three times running)."""
    for fn in methods.values():  # warm-up: plans, allocator, kernels
        fn()
    _sync(device)
    names = list(methods)
    times = {name: [] for name in names}
    for rep in range(repeats):
        order = names[rep % len(names) :] + names[: rep % len(names)]
        for name in order:
            for _attempt in range(3):
                _sync(device)
                start = time.perf_counter()
                methods[name]()
                _sync(device)
                took = time.perf_counter() - start
                if math.isfinite(took) and took > 0:
                    times[name].append(took)
                    break
            else:
                times[name].append(None)
    return times


def summary(samples) -> dict | None:
    """min / median / max in ms of the valid samples; None when none was valid."""
    valid = [s for s in samples if s is not None]
    if not valid:
        return None
    return {
        "min": min(valid) * 1e3,
        "median": statistics.median(valid) * 1e3,
        "max": max(valid) * 1e3,
        "flagged": len(samples) - len(valid),
    }


def ratio(a, b, of="median") -> float | None:
    if a is None or b is None or not (a[of] > 0 and b[of] > 0):
        return None
    return a[of] / b[of]


def merge_rows(device, repeats, shapes=SHAPES, wavelets=WAVELETS, dtype=torch.bfloat16):
    return [merge_row(device, repeats, shape, wavelet, dtype) for wavelet in wavelets for shape in shapes]


def merge_row(device, repeats, shape, wavelet, dtype) -> dict:
    m, n = shape
    rank, p = equal_parameters(m, n)
    adapter = WaveFTAdapter.from_layer(make_layer((m, n), p, wavelet))
    g = torch.Generator().manual_seed(1)
    weight = torch.randn(m, n, generator=g).to(device, dtype)
    up = (torch.randn(m, rank, generator=g) * 1e-3).to(device)
    down = (torch.randn(rank, n, generator=g) * 1e-3).to(device)
    alpha = float(rank)

    def waveft():
        adapter.calculate_weight(weight, "w", 1.0, 1.0, None, None)

    def lora():  # comfy.lora's LoRA branch with intermediate_dtype = the weight's (LowVramPatch.__call__)
        diff = torch.mm(up.to(dtype), down.to(dtype))
        weight.add_(((1.0 * alpha / rank) * diff).type(weight.dtype))

    times = interleaved({"waveft": waveft, "lora": lora}, device, repeats)
    w, lo = summary(times["waveft"]), summary(times["lora"])
    size = reconstruction_filters(wavelet)[0].size
    path = "filters" if dtype != torch.float32 and filtered_merge_is_cheaper(m, n, p, size) else "scatter"
    return {
        "shape": f"{m}x{n}",
        "wavelet": wavelet,
        "rank": rank,
        "p": p,
        "path": path,
        "waveft": w,
        "lora": lo,
        "ratio": ratio(w, lo),
        "ratio_of_mins": ratio(w, lo, "min"),
    }


def bypass_rows(device, repeats, shapes=SHAPES, wavelets=WAVELETS, dtype=torch.bfloat16, tokens=TOKENS):
    return [bypass_row(device, repeats, shape, wavelet, dtype, tokens) for wavelet in wavelets for shape in shapes]


def bypass_row(device, repeats, shape, wavelet, dtype, tokens) -> dict:
    m, n = shape
    size = reconstruction_filters(wavelet)[0].size
    rank, p = equal_parameters(m, n)
    adapter = WaveFTAdapter.from_layer(make_layer((m, n), p, wavelet))
    spectrum, plan_tensors, kept = adapter.weights
    adapter.weights = (spectrum.to(device, dtype), plan_tensors, kept)  # what the bypass hook does
    adapter.multiplier, adapter.is_conv, adapter.kw_dict = 1.0, False, {}
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, tokens // 2, n, generator=g).to(device, dtype)
    up = (torch.randn(m, rank, generator=g) * 1e-3).to(device, dtype)
    down = (torch.randn(rank, n, generator=g) * 1e-3).to(device, dtype)

    def waveft():
        return adapter.h(x, None)

    def lora():  # the host's LoRA adapter h(): up(down(x)) * alpha / rank * multiplier
        return F.linear(F.linear(x, down), up) * 1.0

    times = interleaved({"waveft": waveft, "lora": lora}, device, repeats)
    w, lo = summary(times["waveft"]), summary(times["lora"])
    floor = (p + size * (m + n)) / (rank * (m + n))
    path = "structured" if structured_is_cheaper(tokens, m, n, p, size) else "dense"
    return {
        "shape": f"{m}x{n}",
        "wavelet": wavelet,
        "rank": rank,
        "p": p,
        "path": path,
        "waveft": w,
        "lora": lo,
        "ratio": ratio(w, lo),
        "ratio_of_mins": ratio(w, lo, "min"),
        "floor": floor,
    }


def _cell(s) -> str:
    if s is None:
        return "impossible timer reading, not shown"
    flag = f" ({s['flagged']} flagged)" if s["flagged"] else ""
    return f"{s['median']:.3f} ({s['min']:.3f}-{s['max']:.3f}){flag}"


def _ratio_cell(row) -> str:
    """The ratio of medians, and of minimums (the least disturbed runs on a shared machine)."""
    if row["ratio"] is None:
        return "-"
    low = row.get("ratio_of_mins")
    return f"{row['ratio']:.2f}x" + (f" ({low:.2f}x)" if low is not None else "")


def print_tables(results: dict, out=sys.stdout):
    for run in results["runs"]:
        threads = run["threads"]
        print(
            f"\nPer-forward merge into a {run['merge_dtype']} weight, {threads} thread(s) (ms, median (min-max) of "
            f"{results['repeats']}; ratio of medians (of minimums))\n",
            file=out,
        )
        print("| shape | wavelet | p (LoRA rank) | WaveFT (path) | LoRA | WaveFT / LoRA | goal |", file=out)
        print("|---|---|---|---|---|---|---|", file=out)
        for r in run["merge"]:
            goal = 1.0 if r["wavelet"] == "db1" else 1.5
            met = "-" if r["ratio"] is None else ("met" if r["ratio"] <= goal else "missed")
            print(
                f"| {r['shape']} | {r['wavelet']} | {r['p']} (r={r['rank']}) | {_cell(r['waveft'])} {r['path']} | "
                f"{_cell(r['lora'])} | {_ratio_cell(r)} | ≤{goal}x {met} |",
                file=out,
            )
        print(
            f"\nBypass h(x), {results['tokens']} tokens in {run['bypass_dtype']}, {threads} thread(s) (ms; ratio of "
            "medians (of minimums); floor = WaveFT's operation count over LoRA's)\n",
            file=out,
        )
        print(
            "| shape | wavelet | p (LoRA rank) | WaveFT (path) | LoRA | WaveFT / LoRA | op-count floor | goal |",
            file=out,
        )
        print("|---|---|---|---|---|---|---|---|", file=out)
        for r in run["bypass"]:
            goal = 4.0 if r["wavelet"] == "db1" else 12.0
            met = "-" if r["ratio"] is None else ("met" if r["ratio"] <= goal else "missed")
            print(
                f"| {r['shape']} | {r['wavelet']} | {r['p']} (r={r['rank']}) | {_cell(r['waveft'])} {r['path']} | "
                f"{_cell(r['lora'])} | {_ratio_cell(r)} | {r['floor']:.1f}x | ≤{goal:g}x {met} |",
                file=out,
            )


def run(
    device="cpu",
    repeats=7,
    threads=("1", "all"),
    shapes=SHAPES,
    wavelets=WAVELETS,
    tokens=TOKENS,
    merge_dtype=torch.bfloat16,
    bypass_dtype=torch.bfloat16,
) -> dict:
    device = torch.device(device)
    all_threads = torch.get_num_threads()
    results = {
        "device": str(device),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "repeats": repeats,
        "tokens": tokens,
        "runs": [],
    }
    if device.type == "cuda":
        results["gpu"] = torch.cuda.get_device_name(device)
    for setting in threads:
        count = all_threads if setting == "all" else int(setting)
        torch.set_num_threads(count)
        try:
            results["runs"].append(
                {
                    "threads": count,
                    "merge_dtype": str(merge_dtype).replace("torch.", ""),
                    "bypass_dtype": str(bypass_dtype).replace("torch.", ""),
                    "merge": merge_rows(device, repeats, shapes, wavelets, merge_dtype),
                    "bypass": bypass_rows(device, repeats, shapes, wavelets, bypass_dtype, tokens),
                }
            )
        finally:
            torch.set_num_threads(all_threads)
    return results


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", default="1,all", help="comma-separated thread counts; 'all' = torch's default")
    ap.add_argument("--shapes", default=",".join(f"{m}x{n}" for m, n in SHAPES))
    ap.add_argument("--wavelets", default=",".join(WAVELETS))
    ap.add_argument("--tokens", type=int, default=TOKENS)
    ap.add_argument("--bypass-dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--json", help="also write the figures here")
    args = ap.parse_args(argv)
    shapes = [tuple(int(v) for v in s.split("x")) for s in args.shapes.split(",")]
    results = run(
        args.device,
        args.repeats,
        args.threads.split(","),
        shapes,
        args.wavelets.split(","),
        args.tokens,
        bypass_dtype=getattr(torch, args.bypass_dtype),
    )
    print(
        f"device {results['device']}{' (' + results['gpu'] + ')' if 'gpu' in results else ''}, torch "
        f"{results['torch']}, {results['cpu']}; LoRA rank r = max(1, round(2592/(m+n))), WaveFT p = r·(m+n)"
    )
    print_tables(results)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
