"""Train WaveFT against ComfyUI's own Train LoRA node: same model, data, steps and (about) the same number
of trainable parameters; time per step and peak memory, each run in a fresh process.

    COMFYUI_PATH=<ComfyUI> <its python> benchmarks/comfy_train.py      (./dev bench runs it when COMFYUI_PATH is set)

Both train every 2-D and conv weight of the tiny SD1.5 UNet (the Train LoRA node has no target choice; it
also trains norm and bias offsets, which WaveFT does not). LoRA rank 1; WaveFT gets the same parameter
count spread evenly over the layers. Time per step = (T(25 steps) - T(5 steps)) / 20, which cancels set-up; memory = the highest resident
memory while the node runs minus what the process held before (model loaded), sampled every 10 ms.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
COMFY = os.environ.get("COMFYUI_PATH")


def child(method: str, steps: int, dtype: str):
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
    from tiny_models import make_checkpoint_state

    model, clip, _, _ = comfy.sd.load_state_dict_guess_config(make_checkpoint_state())
    cond = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of sks cat"))
    latents = {"samples": torch.randn(4, 4, 16, 16, generator=torch.Generator().manual_seed(0)) * 0.5}
    shapes = [tuple(v.shape) for k, v in model.model.state_dict().items()
              if k.startswith("diffusion_model.") and k.endswith(".weight") and v.dim() >= 2]
    lora_params = sum(s[0] + int(torch.Size(s[1:]).numel()) for s in shapes)  # rank 1
    import threading

    import psutil

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
    if method == "lora":
        from comfy_extras.nodes_train import TrainLoraNode

        TrainLoraNode.execute(model=[model], latents=[latents], positive=[cond], batch_size=[1],
                              grad_accumulation_steps=[1], steps=[steps], learning_rate=[1e-4], rank=[1],
                              optimizer=["AdamW"], loss_function=["MSE"], seed=[0], training_dtype=[dtype],
                              lora_dtype=["fp32"], algorithm=["LoRA"], gradient_checkpointing=[True],
                              existing_lora=["[None]"], bucket_mode=[False])
        params = lora_params
    else:
        link = Path(os.environ["WAVEFT_TMP"]) / "ComfyUI-WaveFT"
        if not link.exists():
            link.symlink_to(ROOT, target_is_directory=True)
        asyncio.run(nodes.load_custom_node(str(link)))
        pack = sys.modules[str(link).replace(".", "_x_")]
        per_layer = lora_params // len(shapes)
        kw = dict(steps=steps, learning_rate=1e-4, batch_size=1, grad_accumulation_steps=1,
                  n_coefficients=per_layer, scaling=25.0, wavelet="db1", targets="all linear + conv", seed=0,
                  optimizer="AdamW", lr_schedule="constant", warmup_steps=0, training_dtype=dtype,
                  gradient_checkpointing=True, save_every_n_steps=0, filename_prefix="bench", resume_from="none")
        _, adapter, _, _ = pack.nodes.train_nodes.WaveFTTrain().train([model], [latents], [cond],
                                                                         **{k: [v] for k, v in kw.items()})
        params = adapter.n_parameters
    elapsed = time.perf_counter() - t
    done.set()
    sampler.join()
    print(json.dumps({"time": elapsed, "params": params, "layers": len(shapes),
                      "train_peak_mb": (peak[0] - rss_start) / 2**20}))


def run(method, steps, dtype, tmp):
    env = dict(os.environ, WAVEFT_TMP=tmp)
    r = subprocess.run([sys.executable, __file__, "--child", method, str(steps), dtype], capture_output=True,
                       text=True, env=env, timeout=1800)
    if r.returncode != 0:
        raise RuntimeError(r.stderr[-3000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


def main():
    import tempfile

    if not COMFY:
        sys.exit("set COMFYUI_PATH to a ComfyUI checkout (and run with its Python)")
    print("Training on the tiny SD1.5 UNet, 4 latents of 16x16, batch 1, gradient checkpointing on, one fresh "
          "process per run\n")
    print("| dtype | method | trainable params | s/step | peak memory during training (MB over the loaded model) | "
          "WaveFT / LoRA time | WaveFT / LoRA memory |")
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        (Path(tmp) / "models").mkdir()
        for dtype in ("bf16", "fp32"):
            res = {}
            for method in ("lora", "waveft"):
                short, long = run(method, 5, dtype, tmp), run(method, 25, dtype, tmp)
                res[method] = {"step": (long["time"] - short["time"]) / 20, "rss": long["train_peak_mb"],
                               "params": long["params"]}
            for method, label in (("lora", "Train LoRA (rank 1)"), ("waveft", "Train WaveFT (db1)")):
                r = res[method]
                ratios = ("", "") if method == "lora" else (
                    f"{r['step'] / res['lora']['step']:.2f}x", f"{r['rss'] / res['lora']['rss']:.2f}x")
                print(f"| {dtype} | {label} | {r['params']:,} | {r['step']:.3f} | {r['rss']:.0f} | {ratios[0]} | "
                      f"{ratios[1]} |")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--child":
        child(sys.argv[2], int(sys.argv[3]), sys.argv[4])
    else:
        main()
