"""Train WaveFT against ComfyUI's own Train LoRA node: same model, data and (about) the same number of trainable
parameters; time per step and peak memory, each run in a fresh process, repeated, with min/median/max.

    COMFYUI_PATH=<ComfyUI> <its python> benchmarks/comfy_train.py                 (the tiny UNet, 16x16 latents)
    COMFYUI_PATH=<ComfyUI> <its python> benchmarks/comfy_train.py --size sd15 --latent 64 --steps 2 --repeats 3
    COMFYUI_PATH=<ComfyUI> <its python> benchmarks/comfy_train.py --size sdxl --latent 64 --steps 1 --repeats 2

`--size sd15` builds the real SD1.5 UNet (860M parameters, ComfyUI's layout, random weights: nothing is
downloaded) and saves it once as a checkpoint every run loads. `--size sdxl` builds the SDXL base UNet (2.6B) the
same way as a UNet-only file, loaded in bf16 as Load Diffusion Model would, with random text conditioning (2048-wide
tokens and the 1280-wide pooled vector; no text encoder is needed to train the UNet).

Both methods train every 2-D and conv weight of the UNet (the Train LoRA node has no target choice; it also trains
norm and bias offsets, which WaveFT does not): LoRA rank 1, WaveFT the same parameter count spread evenly over the
layers (db1, scaling 25). `--recipe` adds WaveFT with the paper's recipe (attention q/k/v/out, 2592 coefficients
per layer), for its own figures.

`--size flux-blocks` is a DiT at real width: Flux.1's own blocks (width 3072, 24 heads, the real text and pooled
widths) built by ComfyUI with random weights, saved once as a bf16 diffusion-model file every run loads,
`--double`/`--single` of each (default 1 and 2), every
linear trained; LoRA at checkpoint depth 1 and 2.

Every size is timed the same way, inside each run: a timestamp at each optimizer step (both trainers step once per
training step), the first step a warm-up, the spread over the remaining steps of all runs; a step time that is
missing, zero or negative stops the benchmark instead of printing. (Timing a step as T(1 + steps) - T(1) across two
processes printed negative steps on a loaded machine.) Memory = the highest resident memory while the node runs
minus what the process held before (model loaded, both node packs imported), sampled every 10 ms.
Batch 1, gradient checkpointing on, AdamW.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMFY = os.environ.get("COMFYUI_PATH")


def child(method: str, steps: str, dtype: str, ckpt: str, latent: str, size: str):
    steps, latent = int(steps), int(latent)
    sys.path[:0] = [COMFY, str(ROOT / "tests" / "host")]
    import asyncio

    import torch
    from comfy.cli_args import args

    if not torch.cuda.is_available():
        args.cpu = True
    import comfy.sd
    import comfy.utils

    import nodes

    comfy.utils.PROGRESS_BAR_ENABLED = False
    stamps = []  # one per optimizer step: per-step times measured inside the run
    from torch.optim.optimizer import register_optimizer_step_post_hook

    register_optimizer_step_post_hook(lambda *_: stamps.append(time.perf_counter()))
    if size.startswith("flux-blocks"):
        model = comfy.sd.load_diffusion_model(ckpt, model_options={"dtype": torch.bfloat16})
        cond = flux_conditioning()
        latents = {"samples": torch.randn(4, 16, latent, latent, generator=torch.Generator().manual_seed(0)) * 0.5}
    elif size == "sdxl":
        model = comfy.sd.load_diffusion_model(ckpt, model_options={"dtype": torch.bfloat16})
        gen = torch.Generator().manual_seed(0)
        cond = [[torch.randn(1, 77, 2048, generator=gen), {"pooled_output": torch.randn(1, 1280, generator=gen)}]]
    else:
        model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(ckpt)
        cond = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of sks cat"))
    if not size.startswith("flux-blocks"):
        latents = {"samples": torch.randn(4, 4, latent, latent, generator=torch.Generator().manual_seed(0)) * 0.5}
    shapes = [
        tuple(v.shape)
        for k, v in model.model.state_dict().items()
        if k.startswith("diffusion_model.") and k.endswith(".weight") and v.dim() >= 2
    ]
    lora_params = sum(s[0] + int(torch.Size(s[1:]).numel()) for s in shapes)  # rank 1
    import inspect
    import threading

    import psutil
    from comfy_extras.nodes_train import TrainLoraNode

    # Both node packs are imported before the measurement starts, as a running ComfyUI has them.
    link = Path(os.environ["WAVEFT_TMP"]) / "ComfyUI-WaveFT"
    if not link.exists():
        link.symlink_to(ROOT, target_is_directory=True)
    asyncio.run(nodes.load_custom_node(str(link)))
    pack = sys.modules[str(link).replace(".", "_x_")]
    proc = psutil.Process()
    rss_start = proc.memory_info().rss
    peak = [rss_start]
    done = threading.Event()

    def sample_rss():  # the training's own peak, above what the loaded model already takes
        while not done.wait(0.01):
            peak[0] = max(peak[0], proc.memory_info().rss)

    sampler = threading.Thread(target=sample_rss, daemon=True)
    sampler.start()
    t = time.perf_counter()
    recipe = method == "waveft-recipe"
    if method.startswith("lora"):
        kw = dict(
            model=[model],
            latents=[latents],
            positive=[cond],
            batch_size=[1],
            grad_accumulation_steps=[1],
            steps=[steps],
            learning_rate=[1e-4],
            rank=[1],
            optimizer=["AdamW"],
            loss_function=["MSE"],
            seed=[0],
            training_dtype=[dtype],
            lora_dtype=["fp32"],
            algorithm=["LoRA"],
            gradient_checkpointing=[True],
            existing_lora=["[None]"],
            bucket_mode=[False],
        )
        # inputs newer hosts added, at the node's defaults (but for "lora-depth2": checkpoint each ResBlock and
        # transformer, as 0.8's node did and as Train WaveFT does; depth 1 checkpoints the whole UNet as one piece)
        newer = dict(
            quantized_backward=[False],
            checkpoint_depth=[2 if method == "lora-depth2" else 1],
            offloading=[False],
            bypass_mode=[False],
        )
        accepted = inspect.signature(TrainLoraNode.execute).parameters
        kw.update({k: v for k, v in newer.items() if k in accepted})
        TrainLoraNode.execute(**kw)
        params = lora_params
    else:
        keys = pack.waveft_core.keys
        per_layer = keys.DEFAULT_COEFFICIENTS if recipe else lora_params // len(shapes)
        kw = dict(
            steps=steps,
            learning_rate=1e-4,
            batch_size=1,
            grad_accumulation_steps=1,
            n_coefficients=per_layer,
            scaling=keys.DEFAULT_SCALING,
            wavelet=keys.DEFAULT_WAVELET,
            seed=0,
            targets="attention q/k/v/out"
            if recipe
            else "all linear"
            if size.startswith("flux-blocks")
            else "all linear + conv",
            optimizer="AdamW",
            lr_schedule="constant",
            warmup_steps=0,
            training_dtype=dtype,
            gradient_checkpointing=True,
            save_every_n_steps=0,
            filename_prefix="bench",
            resume_from="none",
        )
        _, adapter, *_ = pack.nodes.train_nodes.WaveFTTrain().train(
            [model], [latents], [cond], **{k: [v] for k, v in kw.items()}
        )
        params = adapter.n_parameters
    elapsed = time.perf_counter() - t
    done.set()
    sampler.join()
    print(
        json.dumps(
            {
                "time": elapsed,
                "params": params,
                "layers": len(shapes),
                "train_peak_mb": (peak[0] - rss_start) / 2**20,
                "step_times": [b - a for a, b in zip(stamps, stamps[1:])],
            }
        )
    )


FLUX_BLOCKS = dict(
    image_model="flux",
    guidance_embed=True,
    in_channels=16,
    out_channels=16,
    vec_in_dim=768,
    context_in_dim=4096,
    hidden_size=3072,
    mlp_ratio=4.0,
    num_heads=24,
    axes_dim=[16, 56, 56],
    theta=10000,
    patch_size=2,
    qkv_bias=True,
    txt_ids_dims=[],
)


def flux_blocks_state(size: str) -> dict:
    """Flux.1's diffusion model at full width with D double and S single blocks (size 'flux-blocks-D-S'), random
    weights, as a bf16 state dict that ComfyUI's Load Diffusion Model detects as Flux."""
    import comfy.supported_models as sm
    import torch

    double, single = (int(v) for v in size.split("-")[2:4])
    torch.manual_seed(0)
    unet = sm.Flux(dict(FLUX_BLOCKS, depth=double, depth_single_blocks=single)).get_model({})
    with torch.no_grad():
        for p in unet.parameters():  # comfy ops leave weights uninitialised; norms scale by 1
            p.normal_(0, 0.02) if p.dim() > 1 else p.fill_(1.0)
    return {k: v.to(torch.bfloat16).contiguous() for k, v in unet.diffusion_model.state_dict().items()}


def flux_conditioning():
    import torch

    gen = torch.Generator().manual_seed(0)
    return [
        [
            torch.randn(1, 32, 4096, generator=gen),
            {"pooled_output": torch.randn(1, 768, generator=gen), "guidance": 3.5},
        ]
    ]


def run(method, steps, dtype, ckpt, latent, size, tmp):
    env = dict(os.environ, WAVEFT_TMP=tmp)
    r = subprocess.run(
        [sys.executable, __file__, "--child", method, str(steps), dtype, ckpt, str(latent), size],
        capture_output=True,
        text=True,
        env=env,
        timeout=7200,
    )
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def make_checkpoint(size: str, path: Path) -> None:
    """The checkpoint every run loads, built in a child with ComfyUI importable."""
    state = {
        "tiny": "t.make_checkpoint_state(unet_config=t.UNET_CONFIG)",
        "sd15": "t.make_checkpoint_state(unet_config=t.SD15_UNET_CONFIG)",
        "sdxl": "t.make_unet_state(unet_config=t.SDXL_UNET_CONFIG)",
    }.get(size, f"b.flux_blocks_state({size!r})")
    code = (
        "import sys; sys.path[:0] = [%r, %r, %r]; import torch; from comfy.cli_args import args; "
        "args.cpu = not torch.cuda.is_available(); from safetensors.torch import save_file; "
        "import tiny_models as t; import comfy_train as b; save_file(%s, %r)"
        % (COMFY, str(ROOT / "tests" / "host"), str(ROOT / "benchmarks"), state, str(path))
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=3600)


def spread(values, fmt):
    return f"{fmt(min(values))} / {fmt(statistics.median(values))} / {fmt(max(values))}"


def main():
    import tempfile

    if not COMFY:
        sys.exit("set COMFYUI_PATH to a ComfyUI checkout (and run with its Python)")
    ap = argparse.ArgumentParser(description="Train WaveFT against ComfyUI's Train LoRA node")
    ap.add_argument(
        "--size",
        choices=("tiny", "sd15", "sdxl", "flux-blocks"),
        default="tiny",
        help="the tiny test UNet, the real SD1.5 one, the SDXL base UNet, or full-width Flux blocks",
    )
    ap.add_argument("--double", type=int, default=1, help="flux-blocks: double blocks")
    ap.add_argument("--single", type=int, default=2, help="flux-blocks: single blocks")
    ap.add_argument("--latent", type=int, default=16, help="latent side (64 = 512 px, 128 = 1024 px)")
    ap.add_argument("--steps", type=int, default=20, help="steps timed per run (after one warm-up step)")
    ap.add_argument("--repeats", type=int, default=3, help="runs per method, each in a fresh process")
    ap.add_argument("--dtypes", default="bf16,fp32", help="training dtypes, comma-separated")
    ap.add_argument("--recipe", action="store_true", help="also WaveFT with the paper's recipe (attention, 2592)")
    args = ap.parse_args()
    # Hosts whose Train LoRA node has checkpoint_depth (0.33) default to 1: the whole UNet as one checkpoint, which
    # saves nothing at the peak. The per-block setting runs beside it, so WaveFT meets LoRA at its best too.
    has_depth = "checkpoint_depth" in (Path(COMFY) / "comfy_extras" / "nodes_train.py").read_text()
    loras = ["lora"] + (["lora-depth2"] if has_depth else [])
    methods = loras + ["waveft"] + (["waveft-recipe"] if args.recipe else [])
    labels = {
        "lora": "Train LoRA (rank 1, every layer" + (", checkpoint_depth 1: the node's default)" if has_depth else ")"),
        "lora-depth2": "Train LoRA (rank 1, every layer, checkpoint_depth 2: each block)",
        "waveft": "Train WaveFT (same count, every layer)",
        "waveft-recipe": "Train WaveFT (paper: attention q/k/v/out, 2592)",
    }
    size = f"flux-blocks-{args.double}-{args.single}" if args.size == "flux-blocks" else args.size
    if args.size == "flux-blocks":
        what = f"Flux.1 blocks at full width ({args.double} double, {args.single} single; width 3072, 24 heads)"
    else:
        what = f"the {args.size} UNet"
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "models").mkdir()
        ckpt = Path(tmp) / f"{size}.safetensors"
        make_checkpoint(size, ckpt)
        print(
            f"Training {what} on 4 latents of {args.latent}x{args.latent}, batch 1, gradient checkpointing on; "
            f"{args.repeats} fresh process(es) per method, {args.steps} steps timed inside each run after a warm-up "
            "step; min / median / max\n"
        )
        against = " (median; against each LoRA row)" if len(loras) > 1 else " (median)"
        print(
            f"| dtype | method | trainable params | s/step | peak MB over the loaded model | WaveFT / LoRA time"
            f"{against} | WaveFT / LoRA memory{against} |"
        )
        print("|---|---|---|---|---|---|---|")
        for dtype in args.dtypes.split(","):
            res = {m: {"step": [], "rss": [], "params": 0} for m in methods}
            for _ in range(args.repeats):
                for method in methods:  # interleaved, so a busy spell hits every method
                    r = run(method, 1 + args.steps, dtype, str(ckpt), args.latent, size, tmp)
                    res[method]["step"] += checked_step_times(r["step_times"], args.steps, method)
                    res[method]["rss"].append(r["train_peak_mb"])
                    res[method]["params"] = r["params"]
                    print(
                        f"# {dtype} {method}: steps {', '.join(f'{v:.3f}' for v in r['step_times'])} s, "
                        f"{r['train_peak_mb']:.0f} MB",
                        file=sys.stderr,
                        flush=True,
                    )

            def ratio(r, key):
                return ", ".join(f"{statistics.median(r[key]) / statistics.median(res[b][key]):.2f}x" for b in loras)

            for method in methods:
                r = res[method]
                ratios = ("", "") if method in loras else (ratio(r, "step"), ratio(r, "rss"))
                print(
                    f"| {dtype} | {labels[method]} | {r['params']:,} | {spread(r['step'], lambda v: f'{v:.3f}')} | "
                    f"{spread(r['rss'], lambda v: f'{v:.0f}')} | {ratios[0]} | {ratios[1]} |",
                    flush=True,
                )


def checked_step_times(times: list, expected: int, method: str) -> list:
    """Per-step times measured inside one run. A figure no clock can give (none, or a step of zero or negative
    time) stops the benchmark rather than reach a table."""
    if len(times) != expected or any(t <= 0 for t in times):
        raise RuntimeError(
            f"{method}: {len(times)} step time(s) {times} where {expected} positive ones were expected (one optimizer "
            "step per training step): not a measurement, not printed"
        )
    return times


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(*sys.argv[2:8])
    else:
        main()
