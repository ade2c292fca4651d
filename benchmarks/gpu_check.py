"""One run that answers what only a GPU machine can: do WaveFT's per-forward paths hold up there, are they exact
there, and does the pack work end to end in ComfyUI there. Writes one report (JSON + text).

    COMFYUI_PATH=~/comfyui-host-0.33.0/ComfyUI ~/comfyui-host-0.33.0/venv/bin/python benchmarks/gpu_check.py \\
        [--device cuda] [--out DIR] [--quick]

Run it with the Python of the ComfyUI it should check (the venv beside the checkout). Sections:
1. exactness on the device against PyWavelets in float64 on the CPU (tests/reference.py): the merge into fp32
   and bf16 weights, the bypass h(x) in fp32 and bf16, for db1, db4 and sym8, Linear and 3x3 conv;
2. the apply benchmarks against LoRA of equal parameters (benchmarks/per_forward.py): merge on load (fp32 weight),
   the per-forward merge of low-VRAM / dynamic-VRAM / GGUF loads (bf16 weight), the bypass;
3. a txt2img through Load WaveFT in a real ComfyUI server (tiny SD1.5-layout models made in code, nothing
   downloaded; on CUDA with --enable-dynamic-vram, the default loader there), against the same graph without it;
4. a few bf16 training steps of WaveFT layers on a stack of the host's own Flux blocks (comfy.ldm.flux.layers:
   double and single stream), checking that the loss is finite and the coefficients move.
`--device cpu --quick` runs all of it on a CPU in a few minutes (tests/host/test_gpu_check_host.py does).
A section that cannot run says why in the report; the exit status is 1 when any check failed.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "benchmarks"))

import per_forward

import waveft_core as wft
from waveft_core.hosts.weight_adapter import adapter_class
from waveft_core.keys import DEFAULT_COEFFICIENTS, META_BASE_MODEL

WaveFTAdapter = adapter_class(object)
TOLERANCE = {torch.float32: 2e-6, torch.bfloat16: 6e-3}


# --- 1. exactness on the device -------------------------------------------------------------------------------


def _layer(shape, p, wavelet, seed):
    g = torch.Generator().manual_seed(seed)
    m = shape[0]
    n = int(torch.tensor(shape[1:]).prod())
    return wft.Layer(
        spectrum=torch.randn(p, generator=g),
        indices=torch.randperm(m * n, generator=g)[:p],
        shape=shape,
        wavelet=wavelet,
        scaling=2.0,
    )


def exactness(device) -> list[dict]:
    import torch.nn.functional as F
    from reference import reference_delta, rel_err

    rows = []
    for wavelet in ("db1", "db4", "sym8"):
        for kind, shape in (("linear", (300, 250)), ("conv3x3", (48, 40, 3, 3))):
            layer = _layer(shape, 1500, wavelet, seed=len(rows))
            reference = torch.from_numpy(
                reference_delta(layer.indices, layer.spectrum.double(), shape, wavelet, layer.scaling)
            )  # float64, CPU
            for dtype in (torch.float32, torch.bfloat16):
                adapter = WaveFTAdapter.from_layer(layer)
                weight = torch.randn(shape, generator=torch.Generator().manual_seed(3)).to(device, dtype)
                before = weight.double().cpu()
                adapter.calculate_weight(weight, "k", 1.0, 1.0, None, None)
                err = rel_err(weight.double().cpu() - before, reference)
                # bf16: the change is W + ΔW rounded once, so it is exact up to the rounding of W + ΔW
                tol = TOLERANCE[dtype] if dtype == torch.float32 else 2.0**-8 * float(before.norm() / reference.norm())
                rows.append(
                    {
                        "check": "merge",
                        "wavelet": wavelet,
                        "layer": kind,
                        "dtype": str(dtype)[6:],
                        "rel_err": err,
                        "tolerance": tol,
                        "ok": err <= tol,
                    }
                )
                hooked = WaveFTAdapter.from_layer(layer)
                spectrum, plan_tensors, kept = hooked.weights
                hooked.weights = (spectrum.to(device, dtype), plan_tensors, kept)  # as the bypass hook moves them
                hooked.multiplier = 0.8
                if kind == "linear":
                    hooked.is_conv, hooked.kw_dict = False, {}
                    x = torch.randn(4, 500, shape[1], generator=torch.Generator().manual_seed(4))
                    expect = x.to(dtype).double() @ (0.8 * reference).t()
                else:
                    hooked.is_conv, hooked.conv_dim, hooked.kernel_size = True, 2, (3, 3)
                    hooked.kw_dict = {"stride": (1, 1), "padding": (1, 1), "dilation": (1, 1), "groups": 1}
                    x = torch.randn(2, shape[1], 24, 24, generator=torch.Generator().manual_seed(4))
                    expect = F.conv2d(x.to(dtype).double(), 0.8 * reference, padding=1)
                spectrum_error = rel_err(spectrum.to(dtype).double(), spectrum.double())  # the hook's cast
                got = hooked.h(x.to(device, dtype), None).double().cpu()
                err = rel_err(got, expect)
                tol = TOLERANCE[dtype] + spectrum_error
                rows.append(
                    {
                        "check": "bypass",
                        "wavelet": wavelet,
                        "layer": kind,
                        "dtype": str(dtype)[6:],
                        "rel_err": err,
                        "tolerance": tol,
                        "ok": err <= tol,
                    }
                )
    return rows


# --- 3. txt2img in a real ComfyUI ---------------------------------------------------------------------------


def _import_comfy(comfy_path: str, device) -> None:
    """ComfyUI's folder first on sys.path (its nodes.py and the pack's nodes/ share a name); on a CPU run, as
    `main.py --cpu`, set before comfy.model_management is imported."""
    if comfy_path in sys.path:
        sys.path.remove(comfy_path)
    sys.path.insert(0, comfy_path)
    from comfy.cli_args import args

    if device.type == "cpu":
        args.cpu = True


def _tiny_files(base: Path):
    """The tiny SD1.5-layout checkpoint (tests/host/tiny_models.py) and a WaveFT file on its attention."""
    sys.path.insert(0, str(ROOT / "tests" / "host"))
    import safetensors.torch
    from tiny_models import make_checkpoint_state

    ckpt = make_checkpoint_state()
    (base / "models" / "checkpoints").mkdir(parents=True)
    (base / "models" / "waveft").mkdir(parents=True)
    safetensors.torch.save_file(ckpt, str(base / "models" / "checkpoints" / "tiny.safetensors"))
    g = torch.Generator().manual_seed(7)
    layers = {}
    for key, w in ckpt.items():
        if key.startswith("model.diffusion_model.") and key.endswith(("attn1.to_q.weight", "attn2.to_out.0.weight")):
            shape = tuple(w.shape)
            layers[key[len("model.") : -len(".weight")]] = wft.Layer(
                spectrum=torch.randn(DEFAULT_COEFFICIENTS, generator=g) * float(w.float().std()) * 0.3,
                shape=shape,
                indices=torch.randperm(shape[0] * shape[1], generator=g)[:DEFAULT_COEFFICIENTS],
                wavelet="db4",
            )
    wft.save(
        wft.Adapter(layers=layers, metadata={META_BASE_MODEL: "sd_v1"}),
        base / "models" / "waveft" / "check.safetensors",
    )
    return len(layers)


def _graph(waveft: str | None):
    g = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny.safetensors"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a cat", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {
            "class_type": "KSampler",
            "inputs": {
                "model": ["1", 0],
                "positive": ["2", 0],
                "negative": ["3", 0],
                "latent_image": ["4", 0],
                "seed": 42,
                "steps": 4,
                "cfg": 5.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
            },
        },
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "plain"}},
    }
    if waveft:
        g["8"] = {
            "class_type": "WaveFTLoaderModelOnly",
            "inputs": {"model": ["1", 0], "waveft_name": waveft, "strength_model": 1.0},
        }
        g["5"]["inputs"]["model"] = ["8", 0]
        g["7"]["inputs"]["filename_prefix"] = "waveft"
    return g


def txt2img(device, comfy_path: str | None, keep: Path) -> dict:
    """Two prompts over HTTP (without, then with Load WaveFT): both succeed, the pictures differ."""
    import urllib.request

    import numpy as np
    from PIL import Image

    if not comfy_path or not (Path(comfy_path) / "main.py").exists():
        return {"ok": False, "skipped": "COMFYUI_PATH does not point at a ComfyUI checkout"}
    base = Path(tempfile.mkdtemp(prefix="waveft_gpu_check_"))
    (base / "custom_nodes").mkdir()
    os.symlink(ROOT, base / "custom_nodes" / "ComfyUI-WaveFT")
    _import_comfy(comfy_path, device)
    result = {"layers": _tiny_files(base)}
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    flags = ["--cpu"] if device.type == "cpu" else ["--enable-dynamic-vram"]
    log_path = keep / "comfyui.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [
                sys.executable,
                "main.py",
                "--listen",
                "127.0.0.1",
                "--port",
                str(port),
                "--base-directory",
                str(base),
                "--database-url",
                "sqlite:///:memory:",
                "--disable-auto-launch",
                *flags,
            ],
            cwd=comfy_path,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.time() + 300
            while True:
                if proc.poll() is not None or time.time() > deadline:
                    return {**result, "ok": False, "error": f"ComfyUI did not come up; log: {log_path}"}
                try:
                    urllib.request.urlopen(url + "/system_stats", timeout=5).read()
                    break
                except OSError:
                    time.sleep(0.5)
            images = {}
            for name in (None, "check.safetensors"):
                body = json.dumps({"prompt": _graph(name)}).encode()
                req = urllib.request.Request(url + "/prompt", data=body, headers={"Content-Type": "application/json"})
                pid = json.loads(urllib.request.urlopen(req, timeout=30).read())["prompt_id"]
                start = time.time()
                while True:
                    hist = json.loads(urllib.request.urlopen(f"{url}/history/{pid}", timeout=30).read())
                    status = hist.get(pid, {}).get("status", {})
                    if status.get("completed") is not None and status.get("status_str") in ("success", "error"):
                        break
                    if time.time() - start > 600:
                        return {**result, "ok": False, "error": "the prompt did not finish in 600 s"}
                    time.sleep(0.2)
                seconds = time.time() - start
                if status["status_str"] != "success":
                    return {**result, "ok": False, "error": json.dumps(status)[:2000]}
                info = hist[pid]["outputs"]["7"]["images"][0]
                path = base / "output" / info.get("subfolder", "") / info["filename"]
                images[name or "plain"] = np.asarray(Image.open(path).convert("RGB")).astype(np.int16)
                result[f"seconds_{'waveft' if name else 'plain'}"] = round(seconds, 3)
            difference = float(np.abs(images["plain"] - images["check.safetensors"]).mean())
            log_text = log_path.read_text(errors="replace")
            result.update(
                {
                    "mean_pixel_difference": difference,
                    "import_failed": "IMPORT FAILED" in log_text,
                    "dynamic_vram_flag": flags[0],
                }
            )
            result["ok"] = difference > 0.5 and not result["import_failed"]
            return result
        finally:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
            shutil.rmtree(base, ignore_errors=True)


# --- 4. bf16 training steps on the host's Flux blocks --------------------------------------------------------


def dit_training(device, comfy_path: str | None, steps: int, hidden: int = 128) -> dict:
    if not comfy_path or not (Path(comfy_path) / "comfy").is_dir():
        return {"ok": False, "skipped": "COMFYUI_PATH does not point at a ComfyUI checkout"}
    _import_comfy(comfy_path, device)
    import comfy.ops
    from comfy.ldm.flux.layers import DoubleStreamBlock, EmbedND, SingleStreamBlock

    from waveft_core.training.trainable import TrainableLayer

    torch.manual_seed(0)
    dtype, heads = torch.bfloat16, 2
    ops = comfy.ops.disable_weight_init
    blocks = torch.nn.ModuleList(
        [DoubleStreamBlock(hidden, heads, 2.0, qkv_bias=True, operations=ops) for _ in range(2)]
        + [SingleStreamBlock(hidden, heads, 2.0, operations=ops) for _ in range(2)]
    )
    for p in blocks.parameters():
        torch.nn.init.normal_(p, std=0.02)
        p.requires_grad_(False)
    blocks.to(device, dtype)
    trainables = {}
    for name, module in blocks.named_modules():
        if isinstance(module, torch.nn.Linear):
            m, n = module.weight.shape
            t = TrainableLayer((m, n), min(m * n // 4, 2 * (m + n)), "db4").to(device)
            trainables[name] = t

            def forward(x, module=module, t=t):  # W + ΔW(coefficients) in the compute dtype, as the trainer does
                return torch.nn.functional.linear(x, t(module.weight), module.bias)

            module.forward = forward
        elif isinstance(module, torch.nn.LayerNorm):
            # the blocks add into their own input after normalizing it (x += ...), but the norm's backward needs
            # that input as it was: the norm keeps a copy (what a checkpointing trainer must do too)
            module.forward = lambda x, norm=module.forward: norm(x.clone())
    params = [p for t in trainables.values() for p in t.parameters()]
    before = [p.detach().clone() for p in params]
    rope = EmbedND(
        dim=hidden // heads,
        theta=10000,
        axes_dim=[hidden // heads // 4, hidden // heads // 8 * 3, hidden // heads // 8 * 3],
    )
    g = torch.Generator().manual_seed(1)
    img0 = torch.randn(1, 16, hidden, generator=g).to(device, dtype)
    txt0 = torch.randn(1, 8, hidden, generator=g).to(device, dtype)
    vec = torch.randn(1, hidden, generator=g).to(device, dtype)
    target = torch.randn(1, 24, hidden, generator=g).to(device, dtype)
    ids = torch.zeros(1, 24, 3)
    ids[0, 8:, 1] = torch.arange(16) // 4
    ids[0, 8:, 2] = torch.arange(16) % 4
    pe = rope(ids).to(device)
    import comfy.model_management as mm

    # the host's training switch (0.33): its rope then runs the differentiable torch path, not comfy-kitchen's
    # inference kernel (which has no backward)
    was_training = getattr(mm, "in_training", None)
    mm.in_training = True
    try:
        losses, seconds = _train_steps(blocks, params, img0, txt0, vec, pe, target, steps, device)
    finally:
        mm.in_training = was_training
    moved = sum(float((p.detach() - b).abs().sum()) for p, b in zip(params, before))
    ok = all(math.isfinite(v) for v in losses) and moved > 0
    return {
        "ok": ok,
        "layers": len(trainables),
        "coefficients": sum(p.numel() for p in params),
        "losses": losses,
        "seconds_per_step": seconds,
        "coefficient_change": moved,
        "dtype": "bfloat16",
    }


def _train_steps(blocks, params, img0, txt0, vec, pe, target, steps, device):
    opt = torch.optim.AdamW(params, lr=1e-3)
    losses, seconds = [], []
    for _ in range(steps):
        start = time.time()
        img, txt = img0.clone(), txt0.clone()  # the blocks add into their inputs
        for block in blocks[:2]:
            img, txt = block(img=img, txt=txt, vec=vec, pe=pe)
        x = torch.cat((txt, img), 1)
        for block in blocks[2:]:
            x = block(x, vec=vec, pe=pe)
        loss = torch.nn.functional.mse_loss(x.float(), target.float())
        opt.zero_grad()
        loss.backward()
        opt.step()
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        seconds.append(time.time() - start)
        losses.append(float(loss.detach()))
    return losses, seconds


# --- the report -------------------------------------------------------------------------------------------------


def _section(report, name, fn):
    try:
        report[name] = fn()
    except Exception as e:  # noqa: BLE001 - a section that breaks is reported, the others still run
        report[name] = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()}


def text_report(report: dict) -> str:
    verdict = "all checks passed" if report["ok"] else "FAILED"
    lines = [
        (
            f"WaveFT GPU check on {report['device']} ({report.get('gpu', report['cpu'])}), torch {report['torch']}, "
            f"ComfyUI at {report['comfyui'] or 'none'}; {verdict}"
        ),
        "",
    ]
    ex = report["exactness"]
    if isinstance(ex, list):
        lines.append("Exactness against PyWavelets float64 (CPU):")
        lines += [
            f"  {r['check']:6} {r['wavelet']:4} {r['layer']:7} {r['dtype']:8} rel err {r['rel_err']:.2e} "
            f"(tolerance {r['tolerance']:.1e}) {'ok' if r['ok'] else 'FAIL'}"
            for r in ex
        ]
    else:
        lines.append(f"Exactness: {ex}")
    bench = report["benchmarks"]
    if "runs" in bench:
        import io

        out = io.StringIO()
        per_forward.print_tables(bench, out)
        lines.append(out.getvalue())
        if "merge_on_load" in bench:
            lines.append("Merge on load into an fp32 weight (ms, median):")
            lines += [
                f"  {r['shape']} {r['wavelet']}: WaveFT {r['waveft']['median'] if r['waveft'] else 'n/a'}, "
                f"LoRA {r['lora']['median'] if r['lora'] else 'n/a'}"
                for r in bench["merge_on_load"]
            ]
    else:
        lines.append(f"Benchmarks: {bench}")
    for name in ("txt2img", "dit_training"):
        lines.append(f"{name}: {json.dumps({k: v for k, v in report[name].items() if k != 'traceback'})}")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument(
        "--out",
        default=os.environ.get("OUT") or str(Path(tempfile.gettempdir()) / "waveft_gpu_check"),
        help="folder for gpu_check.json/.txt (default: $OUT, else a folder in the temp directory)",
    )
    ap.add_argument("--quick", action="store_true", help="tiny sizes and few repeats (a CPU smoke run)")
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    comfy_path = os.environ.get("COMFYUI_PATH")
    report = {
        "device": str(device),
        "torch": torch.__version__,
        "cpu": platform.processor() or platform.machine(),
        "comfyui": comfy_path,
        "quick": args.quick,
    }
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(device)
    repeats = args.repeats or (2 if args.quick else 9)
    shapes = [(320, 256), (640, 640)] if args.quick else per_forward.SHAPES
    threads = ("all",) if device.type == "cuda" or args.quick else ("1", "all")

    def benchmarks():
        results = per_forward.run(device, repeats, threads, shapes, tokens=256 if args.quick else per_forward.TOKENS)
        results["merge_on_load"] = per_forward.merge_rows(device, repeats, shapes, dtype=torch.float32)
        return results

    _section(report, "exactness", lambda: exactness(device))
    _section(report, "benchmarks", benchmarks)
    _section(report, "txt2img", lambda: txt2img(device, comfy_path, out))
    _section(
        report,
        "dit_training",
        lambda: dit_training(device, comfy_path, steps=3 if args.quick else 10, hidden=64 if args.quick else 512),
    )
    ex = report["exactness"]
    report["ok"] = (
        isinstance(ex, list)
        and all(r["ok"] for r in ex)
        and "runs" in report["benchmarks"]
        and report["txt2img"].get("ok")
        and report["dit_training"].get("ok")
    ) or False
    (out / "gpu_check.json").write_text(json.dumps(report, indent=1, default=str))
    text = text_report(report)
    (out / "gpu_check.txt").write_text(text)
    print(text)
    print(f"report: {out / 'gpu_check.json'} and {out / 'gpu_check.txt'}")
    return 0 if report["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
