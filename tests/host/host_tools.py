"""Shared host-test tools: a real ComfyUI server process for the HTTP tests, the weights ComfyUI merges on
load, and the models and data the server tests use."""

import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import torch
from conftest import COMFY

import waveft_core as wft
from waveft_core.convert.peft_io import peft_positions

# Train WaveFT's inputs for the tiny models: fp32, no accumulation, no checkpoints; each test file overrides
# what it is about (steps, learning rate, coefficients, checkpointing, its file names).
TRAIN_INPUTS = dict(
    steps=2,
    learning_rate=2e-3,
    batch_size=1,
    grad_accumulation_steps=1,
    n_coefficients=300,
    scaling=25.0,
    wavelet="db1",
    targets="attention q/k/v/out",
    seed=3,
    optimizer="AdamW",
    lr_schedule="constant",
    warmup_steps=0,
    training_dtype="fp32",
    gradient_checkpointing=False,
    save_every_n_steps=0,
    filename_prefix="waveft",
    resume_from="none",
)


def train_inputs(**overrides) -> dict:
    """Train WaveFT's inputs as ComfyUI's executor hands them to the node (INPUT_IS_LIST: one list each)."""
    unknown = [k for k in overrides if k not in TRAIN_INPUTS and not k.startswith("preview_")]  # a typo
    assert not unknown, f"not inputs of Train WaveFT: {sorted(unknown)}"
    return {k: [v] for k, v in {**TRAIN_INPUTS, **overrides}.items()}


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, base, log_path):
        self.base = base
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [
                sys.executable,
                os.path.join(COMFY, "main.py"),
                "--cpu",
                "--listen",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--base-directory",
                str(base),
                "--database-url",
                "sqlite:///:memory:",
                "--disable-auto-launch",
            ],
            cwd=COMFY,
            stdout=self.log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.time() + 180
        while time.time() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited early; log: {log_path}")
            try:
                self.get("/system_stats")
                return
            except OSError:
                time.sleep(0.5)
        raise RuntimeError(f"ComfyUI did not come up in time; log: {log_path}")

    def get(self, path):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path, body):
        req = urllib.request.Request(
            self.url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read())

    def run(self, prompt, timeout=300):
        status, body = self.post("/prompt", {"prompt": prompt})
        assert status == 200, body
        pid = body["prompt_id"]
        deadline = time.time() + timeout
        while time.time() < deadline:
            hist = self.get(f"/history/{pid}")
            if pid in hist and hist[pid].get("status", {}).get("completed") is not None:
                if hist[pid]["status"].get("status_str") in ("success", "error"):
                    return hist[pid]
            time.sleep(0.2)
        raise TimeoutError(pid)

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
        self.log.close()


ATTN = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_out.0", "ff.net.2")


def adapter_for(ckpt):
    """Strong enough to change the picture: every attention projection and the CLIP's last layers."""
    g = torch.Generator().manual_seed(7)
    layers = {}
    for key, w in ckpt.items():
        if not key.endswith(".weight"):
            continue
        if key.startswith("model.diffusion_model.") and key[: -len(".weight")].endswith(ATTN):
            name = key[len("model.") : -len(".weight")]
        elif key.startswith("cond_stage_model.transformer.text_model.encoder.layers.1") and "self_attn" in key:
            name = "text_encoders.clip_l.transformer." + key[len("cond_stage_model.transformer.") : -len(".weight")]
        else:
            continue
        shape = tuple(w.shape)
        p = 2592
        spec = torch.randn(p, generator=g) * float(w.float().std()) * 0.15
        layers[name] = wft.Layer(spectrum=spec, indices=peft_positions(shape, p, 777), shape=shape, wavelet="db1")
    return wft.Adapter(layers=layers, metadata={"ss_base_model_version": "sd_v1", "modelspec.title": "e2e"})


def merged(ckpt, adapter, strength):
    out = dict(ckpt)
    for name, layer in adapter.layers.items():
        if name.startswith("diffusion_model."):
            key = "model." + name + ".weight"
        else:
            key = "cond_stage_model.transformer." + name.split(".transformer.", 1)[1] + ".weight"
        w = ckpt[key]
        out[key] = (w.float() + layer.delta(torch.float32, strength=strength)).to(w.dtype).contiguous()
    return out


def tiny_lora(ckpt, rank=4):
    """A kohya-named LoRA on the tiny UNet's attention projections."""
    g = torch.Generator().manual_seed(3)
    out = {}
    for key, w in ckpt.items():
        if key.startswith("model.diffusion_model.") and key.endswith(("attn1.to_q.weight", "attn2.to_v.weight")):
            name = "lora_unet_" + key[len("model.diffusion_model.") : -len(".weight")].replace(".", "_")
            out[name + ".lora_up.weight"] = torch.randn(w.shape[0], rank, generator=g) * 0.05
            out[name + ".lora_down.weight"] = torch.randn(rank, w.shape[1], generator=g) * 0.05
            out[name + ".alpha"] = torch.tensor(float(rank))
    return out


def make_dataset(folder, count=3, size=64):
    """A few images with captions, the layout ComfyUI's dataset loader reads."""
    import numpy as np
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in range(count):
        pixels = (rng.random((size, size, 3)) * 255).astype("uint8")
        Image.fromarray(pixels).save(folder / f"img{i}.png")
        (folder / f"img{i}.txt").write_text(f"a photo of sks object number {i}")


def patched_weights(patcher, keys):
    """Weights as ComfyUI's own loader merges the patches (a full load), as fp32 copies; afterwards every
    model is unloaded again, which restores the original weights."""
    import comfy.model_management as mm

    mm.load_models_gpu([patcher], force_full_load=True)
    try:
        sd = patcher.model.state_dict()
        return {k: sd[k].detach().float().clone() for k in keys}
    finally:
        mm.unload_all_models()


# --- tiny models of other families, built by ComfyUI itself ---------------------------------------

FLUX = dict(
    image_model="flux",
    guidance_embed=True,
    in_channels=16,
    out_channels=16,
    vec_in_dim=32,
    context_in_dim=48,
    hidden_size=64,
    mlp_ratio=4.0,
    num_heads=2,
    depth=1,
    depth_single_blocks=1,
    axes_dim=[8, 12, 12],
    theta=10000,
    patch_size=2,
    qkv_bias=True,
    txt_ids_dims=[],
)
SD3 = dict(
    in_channels=16,
    out_channels=16,
    patch_size=2,
    depth=2,
    adm_in_channels=32,
    pos_embed_max_size=16,
    context_embedder_config={"target": "torch.nn.Linear", "params": {"in_features": 48, "out_features": 128}},
    input_size=None,
    num_patches=None,
    pos_embed_scaling_factor=None,
    qk_norm=None,
    x_block_self_attn_layers=[],
)
SDXL = dict(
    model_channels=32,
    use_linear_in_transformer=True,
    transformer_depth=[0, 0, 1, 1],
    transformer_depth_output=[0, 0, 0, 1, 1, 1],
    transformer_depth_middle=1,
    context_dim=64,
    adm_in_channels=48,
    use_temporal_attention=False,
    num_res_blocks=[2, 2],
    channel_mult=[1, 2],
    num_heads=-1,
    num_head_channels=16,
    in_channels=4,
    out_channels=4,
    image_size=32,
    use_spatial_transformer=True,
    legacy=False,
    num_classes="sequential",
    use_temporal_resblock=False,
)


def patcher_for(config_cls, unet_config):
    import comfy.model_management as mm
    import comfy.model_patcher

    with torch.inference_mode():  # as ComfyUI's loaders build models
        model = config_cls(unet_config).get_model({})
        for p in model.parameters():  # comfy ops leave weights uninitialised
            p.normal_(0, 0.02) if p.dim() > 1 else p.zero_()
    return comfy.model_patcher.ModelPatcher(
        model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device()
    )
