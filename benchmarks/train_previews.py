"""What a sample preview costs in Train WaveFT, against a training step, in one run: a preview after every step,
the time between previews is the step, the time inside one is the preview.

    COMFYUI_PATH=<ComfyUI> <its python> benchmarks/train_previews.py                          (the tiny UNet)
    COMFYUI_PATH=<ComfyUI> <its python> benchmarks/train_previews.py --size sd15 --latent 32 --preview-steps 20

`--size sd15` is the real SD1.5 UNet (random weights, built as benchmarks/comfy_train.py builds it); the VAE of
these test checkpoints is TAESD, so a real VAE's decode (larger at 512 px) is not in the figure. Training: batch 1,
grad accumulation 1, bf16, gradient checkpointing on, the paper's targets; previews at cfg 6 with a negative
prompt (two model calls per sampler step, batched), euler."""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMFY = os.environ.get("COMFYUI_PATH")
sys.path.insert(0, str(Path(__file__).resolve().parent))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--size", choices=("tiny", "sd15"), default="tiny")
    ap.add_argument("--latent", type=int, default=16, help="training latent side (pixels / 8); previews the same")
    ap.add_argument("--steps", type=int, default=3, help="training steps, each followed by a preview")
    ap.add_argument("--preview-steps", type=int, default=20)
    args = ap.parse_args()
    from comfy_train import make_checkpoint

    tmp = Path(tempfile.mkdtemp(prefix="waveft_previews_"))
    ckpt = tmp / "model.safetensors"
    make_checkpoint(args.size, ckpt)
    sys.path[:0] = [COMFY, str(ROOT / "tests" / "host")]
    import torch
    from comfy.cli_args import args as comfy_args

    comfy_args.cpu = not torch.cuda.is_available()
    import comfy.sd
    import comfy.utils

    import nodes

    comfy.utils.PROGRESS_BAR_ENABLED = False
    model, clip, vae, _ = comfy.sd.load_checkpoint_guess_config(str(ckpt))
    link = tmp / "ComfyUI-WaveFT"
    link.symlink_to(ROOT, target_is_directory=True)
    asyncio.run(nodes.load_custom_node(str(link)))
    pack = sys.modules[str(link).replace(".", "_x_")]
    previews = pack.nodes.previews
    keys = pack.waveft_core.keys
    marks = []

    class Timed(previews.Previewer):
        def __call__(self, run):
            started = time.perf_counter()
            out = super().__call__(run)
            marks.append((started, time.perf_counter()))
            return out

    original = previews.Previewer.from_inputs
    previews.Previewer.from_inputs = classmethod(lambda cls, kw, seed: Timed(**vars(original(kw, seed))))
    with torch.inference_mode():
        cond = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of sks cat"))
        negative = clip.encode_from_tokens_scheduled(clip.tokenize("blurry"))
    side = args.latent * 8
    kw = dict(
        steps=args.steps,
        learning_rate=1e-4,
        batch_size=1,
        grad_accumulation_steps=1,
        n_coefficients=keys.DEFAULT_COEFFICIENTS,
        scaling=keys.DEFAULT_SCALING,
        wavelet=keys.DEFAULT_WAVELET,
        targets="attention q/k/v/out",
        seed=0,
        optimizer="AdamW",
        lr_schedule="constant",
        warmup_steps=0,
        training_dtype="bf16",
        gradient_checkpointing=True,
        save_every_n_steps=0,
        filename_prefix="bench",
        resume_from="none",
        preview_vae=vae,
        preview_positive=cond,
        preview_negative=negative,
        preview_every_n_steps=1,
        preview_width=side,
        preview_height=side,
        preview_steps=args.preview_steps,
        preview_cfg=6.0,
    )
    latents = {"samples": torch.randn(1, 4, args.latent, args.latent, generator=torch.Generator().manual_seed(0))}
    import folder_paths

    folder_paths.folder_names_and_paths["waveft"] = ([str(tmp)], {".safetensors"})
    with torch.inference_mode():
        pack.nodes.train_nodes.WaveFTTrain().train([model], [latents], [cond], **{k: [v] for k, v in kw.items()})
    steps = [b[0] - a[1] for a, b in zip(marks, marks[1:])]  # between the end of one preview and the next
    shown = [b - a for a, b in marks]
    step, preview = statistics.median(steps), statistics.median(shown)
    print(
        f"{args.size}, {side}x{side} px, {args.preview_steps} preview steps: training step {step:.2f} s, "
        f"preview {preview:.2f} s = {preview / step:.1f} steps (medians of {len(steps)} and {len(shown)})"
    )


if __name__ == "__main__":
    main()
