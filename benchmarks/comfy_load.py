"""Load-to-first-sample inside a real ComfyUI: WaveFT vs a LoRA of equal parameter count vs neither.

    COMFYUI_PATH=<ComfyUI> <its python> benchmarks/comfy_load.py      (./dev bench runs it when COMFYUI_PATH is set)
    COMFYUI_PATH=<ComfyUI> <its python> benchmarks/comfy_load.py --size sd15 --latent 64 --only-first-sample

1. Tiny SD1.5 checkpoint (tests/host/tiny_models.py; `--size sd15`: the real SD1.5 UNet, random weights): apply
   the adapter through the node / the stock LoRA loader, let ComfyUI load the model (patches merged), sample one
   image (4 steps; `--latent` sets its latent side). Every attention projection and feed-forward layer is
   adapted.
2. SDXL-sized attention weights (the 560 q/k/v/out projections of SDXL's 70 transformer blocks, fp16): the
   time ComfyUI's ModelPatcher takes to merge all patches on load, WaveFT db1/db4 vs LoRA.
3. (ComfyUI >= 0.21) One layer's patch as a low-VRAM or dynamic-VRAM forward computes it: the host's own
   LowVramPatch rebuilds the adapter into a gathered buffer (prepare) and adds it to the bf16 weight
   (__call__), per forward. Beside it, what building the layer's patch plan would cost if a rebuilt adapter
   had to recompute it (it does not: the plan travels in the adapter's weights).

Times are min / median / max over the repeats, so a noisy machine shows as noisy.
"""

from __future__ import annotations

import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMFY = os.environ.get("COMFYUI_PATH")
if not COMFY:
    sys.exit("set COMFYUI_PATH to a ComfyUI checkout (and run with its Python)")
sys.path[:0] = [COMFY, str(ROOT / "tests" / "host")]

import torch  # noqa: E402
from comfy.cli_args import args  # noqa: E402

if not torch.cuda.is_available():
    args.cpu = True
import asyncio  # noqa: E402

import comfy.model_management as mm  # noqa: E402
import comfy.model_patcher  # noqa: E402
import comfy.sd  # noqa: E402
import comfy.weight_adapter  # noqa: E402
import folder_paths  # noqa: E402

import nodes  # noqa: E402

sys.path.insert(1, str(ROOT))
import waveft_core as wft  # noqa: E402
from waveft_core.convert.peft_io import peft_positions  # noqa: E402
from waveft_core.keys import DEFAULT_COEFFICIENTS  # noqa: E402

P = DEFAULT_COEFFICIENTS
TARGETS = ("to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2")


def lora_rank(shape):
    m = shape[0]
    n = 1
    for s in shape[1:]:
        n *= s
    return max(1, round(P / (m + n)))


def timings(fn, repeat=5) -> list[float]:
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return times


def spread(times: list[float], scale: float = 1.0, digits: int = 3) -> str:
    """'median (min-max)' of `times` * scale."""
    lo, mid, hi = min(times) * scale, statistics.median(times) * scale, max(times) * scale
    return f"{mid:.{digits}f} ({lo:.{digits}f}-{hi:.{digits}f})"


def load_pack(tmp):
    link = Path(tmp) / "ComfyUI-WaveFT"
    if not link.exists():
        link.symlink_to(ROOT, target_is_directory=True)
    asyncio.run(nodes.load_custom_node(str(link)))
    return sys.modules[str(link).replace(".", "_x_")]


def tiny_model_bench(pack, tmp, wavelet, size="tiny", latent_side=8):
    import tiny_models

    config = tiny_models.SD15_UNET_CONFIG if size == "sd15" else tiny_models.UNET_CONFIG
    model, clip, vae, _ = comfy.sd.load_state_dict_guess_config(tiny_models.make_checkpoint_state(unet_config=config))
    sd = model.model.state_dict()
    g = torch.Generator().manual_seed(0)
    layers, lora = {}, {}
    for key, w in sd.items():
        name = key[: -len(".weight")]
        if not key.endswith(".weight") or not name.endswith(TARGETS):
            continue
        shape = tuple(w.shape)
        layers[name] = wft.Layer(
            spectrum=torch.randn(P, generator=g) * 1e-3, indices=peft_positions(shape, P), shape=shape, wavelet=wavelet
        )
        r = lora_rank(shape)
        kohya = "lora_unet_" + name[len("diffusion_model.") :].replace(".", "_")
        lora[kohya + ".lora_up.weight"] = torch.randn(shape[0], r, generator=g) * 1e-3
        lora[kohya + ".lora_down.weight"] = torch.randn(r, shape[1], generator=g) * 1e-3
    folder = Path(tmp) / "waveft"
    folder.mkdir(exist_ok=True)
    wft.save(wft.Adapter(layers=layers), folder / "bench.safetensors")
    paths, exts = folder_paths.folder_names_and_paths["waveft"]
    folder_paths.folder_names_and_paths["waveft"] = ([str(folder)] + list(paths), exts)
    folder_paths.filename_list_cache.clear()

    positive = clip.encode_from_tokens_scheduled(clip.tokenize("a cat"))
    negative = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    latent = torch.zeros(1, 4, latent_side, latent_side)

    def first_sample(m):
        mm.unload_all_models()
        noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(1))
        import comfy.sample

        comfy.sample.sample(m, noise, 4, 5.0, "euler", "normal", positive, negative, latent, seed=1, disable_pbar=True)

    def with_none():
        first_sample(model)

    def with_waveft():
        (m,) = pack.nodes.loader.WaveFTLoaderModelOnly().load(model, "bench.safetensors", 1.0)["result"]
        first_sample(m)

    def with_lora():
        m, _ = comfy.sd.load_lora_for_models(model, None, lora, 1.0, 0.0)
        first_sample(m)

    with_none(), with_waveft(), with_lora()  # warm up
    t = {"none": [], "waveft": [], "lora": []}
    for _ in range(5):  # interleaved, so a slow spell of the machine hits all three alike
        for label, fn in (("none", with_none), ("waveft", with_waveft), ("lora", with_lora)):
            t[label] += timings(fn, 1)
    return len(layers), t


class AttentionStack(torch.nn.Module):
    """The 560 attention projections of SDXL (10 blocks at 640, 60 at 1280 wide), named as in ComfyUI."""

    def __init__(self, dtype=torch.float16):
        super().__init__()
        self.blocks = torch.nn.ModuleList()
        for width in [640] * 10 + [1280] * 60:
            block = torch.nn.Module()
            for attn, kv_in in (("attn1", width), ("attn2", 2048)):
                a = torch.nn.Module()
                a.to_q = torch.nn.Linear(width, width, bias=False, dtype=dtype)
                a.to_k = torch.nn.Linear(kv_in, width, bias=False, dtype=dtype)
                a.to_v = torch.nn.Linear(kv_in, width, bias=False, dtype=dtype)
                a.to_out = torch.nn.Linear(width, width, bias=False, dtype=dtype)
                setattr(block, attn, a)
            self.blocks.append(block)


def sdxl_attention_bench(pack, repeat):
    net = AttentionStack()
    with torch.no_grad():
        for p in net.parameters():
            p.normal_(0, 0.02)
    patcher = comfy.model_patcher.ModelPatcher(
        net, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device()
    )
    keys = {k: tuple(v.shape) for k, v in net.state_dict().items()}
    g = torch.Generator().manual_seed(0)
    out = {}
    spectra = {k: torch.randn(P, generator=g) * 1e-3 for k in keys}
    for label in ("waveft db1", "waveft db4", "lora"):
        patches = {}
        for k, shape in keys.items():
            if label == "lora":
                r = lora_rank(shape)
                up = torch.randn(shape[0], r, generator=g) * 1e-3
                down = torch.randn(r, shape[1], generator=g) * 1e-3
                patches[k] = comfy.weight_adapter.LoRAAdapter(set(), (up, down, None, None, None, None))
            else:
                layer = wft.Layer(
                    spectrum=spectra[k], indices=peft_positions(shape, P), shape=shape, wavelet=label.split()[1]
                )
                patches[k] = pack.nodes.host.WaveFTAdapter.from_layer(layer)
        m = patcher.clone()
        m.add_patches(patches, 1.0)

        def apply():
            m.patch_model(device_to=mm.get_torch_device(), lowvram_model_memory=0)
            m.unpatch_model(device_to=mm.unet_offload_device())

        apply()
        out[label] = timings(apply, repeat)
    base = patcher.clone()

    def apply_none():
        base.patch_model(device_to=mm.get_torch_device(), lowvram_model_memory=0)
        base.unpatch_model(device_to=mm.unet_offload_device())

    out["none"] = timings(apply_none, repeat)
    return len(keys), out


LOWVRAM_SHAPES = ((1280, 1280), (640, 2048), (5120, 1280))


def lowvram_forward_bench(pack, repeat):
    """Per-forward cost of one patched layer on the low-VRAM / dynamic-VRAM path, through the host's own
    LowVramPatch: prepare() (the adapter rebuilt from its weights moved into a buffer) + __call__ on a bf16
    weight. Returns rows of (shape, label, prepare+call times, call-only times); None on hosts without it."""
    import comfy.lora

    if not hasattr(comfy.lora, "prefetch_prepared_value") or not hasattr(comfy.model_patcher.LowVramPatch, "prepare"):
        return None
    from waveft_core.delta import make_plan

    g = torch.Generator().manual_seed(0)
    rows = []
    for shape in LOWVRAM_SHAPES:
        weight = (torch.randn(shape, generator=g) * 0.02).to(torch.bfloat16)
        candidates = {}
        for wavelet in ("db1", "db4"):
            layer = wft.Layer(
                spectrum=torch.randn(P, generator=g) * 1e-3,
                indices=peft_positions(shape, P),
                shape=shape,
                wavelet=wavelet,
            )
            candidates[f"waveft {wavelet}"] = pack.nodes.host.WaveFTAdapter.from_layer(layer)
            indices = layer.indices
            rows.append(
                (
                    shape,
                    f"plan build, {wavelet} (not paid per forward)",
                    timings(lambda: make_plan(indices, shape, wavelet), repeat),
                    None,
                )
            )
        r = lora_rank(shape)
        candidates["lora"] = comfy.weight_adapter.LoRAAdapter(
            set(),
            (
                torch.randn(shape[0], r, generator=g) * 1e-3,
                torch.randn(r, shape[1], generator=g) * 1e-3,
                None,
                None,
                None,
                None,
            ),
        )
        for label, adapter in candidates.items():
            patch = comfy.model_patcher.LowVramPatch("w", {"w": [(1.0, adapter, 1.0, None, None)]})
            buffer = torch.empty(patch.memory_required(), dtype=torch.uint8, device=mm.get_torch_device())

            def forward():
                patch.prepare(buffer, None, copy=True)
                patch(weight.clone())

            def call_only():
                patch(weight.clone())

            forward(), call_only()  # warm up (per-device caches, allocator)
            both = timings(forward, repeat)
            patch.prepared_patches = None  # call-only: the patches as the classic low-VRAM path holds them
            rows.append((shape, label, both, timings(call_only, repeat)))
    return rows


def main():
    import argparse
    import tempfile

    ap = argparse.ArgumentParser(description="WaveFT inside ComfyUI: load to first sample, merge on load, low VRAM")
    ap.add_argument("--size", choices=("tiny", "sd15"), default="tiny", help="the UNet of the first table")
    ap.add_argument("--latent", type=int, default=8, help="latent side of the first table's sample")
    ap.add_argument("--only-first-sample", action="store_true", help="print the first table only")
    opts = ap.parse_args()
    device = mm.get_torch_device()
    print(
        f"ComfyUI {getattr(__import__('comfyui_version'), '__version__', '?')}, device {device}, torch "
        f"{torch.__version__}, {torch.get_num_threads()} threads; {P} WaveFT coefficients per layer, LoRA rank "
        "round(p/(m+n)) per layer; times are median (min-max) of 5\n"
    )
    with tempfile.TemporaryDirectory() as tmp:
        pack = load_pack(tmp)
        label = "SD1.5 (860M UNet)" if opts.size == "sd15" else "tiny SD1.5"
        print(
            f"| {label}, load + first sample at {opts.latent * 8}px (s) | none | WaveFT | LoRA | WaveFT overhead | "
            "LoRA overhead |"
        )
        print("|---|---|---|---|---|---|")
        for wavelet in ("db1", "db4"):
            n, t = tiny_model_bench(pack, tmp, wavelet, opts.size, opts.latent)
            mid = {k: statistics.median(v) for k, v in t.items()}
            print(
                f"| {n} layers, {wavelet} | {spread(t['none'])} | {spread(t['waveft'])} | {spread(t['lora'])} | "
                f"{mid['waveft'] - mid['none']:+.3f} | {mid['lora'] - mid['none']:+.3f} |"
            )
        if opts.only_first_sample:
            return
        n, t = sdxl_attention_bench(pack, 5)
        print(
            f"\n| SDXL attention weights ({n} layers, fp16): ModelPatcher merge on load (s) | time | "
            "overhead over no patches (medians) |"
        )
        print("|---|---|---|")
        for label in ("none", "waveft db1", "waveft db4", "lora"):
            print(
                f"| {label} | {spread(t[label])} | {statistics.median(t[label]) - statistics.median(t['none']):+.3f} |"
            )
        rows = lowvram_forward_bench(pack, 30)
        if rows is None:
            print("\n(no low-VRAM rebuild in this ComfyUI: the per-forward table needs 0.21 or newer)")
            return
        print(
            "\n| one bf16 layer per low-VRAM / dynamic-VRAM forward (ms, median (min-max) of 30) | "
            "LowVramPatch prepare + call | call only | prepare + call / LoRA's |"
        )
        print("|---|---|---|---|")
        lora = {shape: statistics.median(both) for shape, label, both, _ in rows if label == "lora"}
        for shape, label, both, call in rows:
            ratio = "" if call is None or label == "lora" else f"{statistics.median(both) / lora[shape]:.2f}x"
            print(
                f"| {shape[0]}x{shape[1]}, {label} | {spread(both, 1e3)} | "
                f"{spread(call, 1e3) if call is not None else ''} | {ratio} |"
            )


if __name__ == "__main__":
    main()
