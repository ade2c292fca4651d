"""End to end: a real ComfyUI server with the pack linked in, driven over HTTP like the browser does.

A txt2img graph through 'Load WaveFT' on the tiny SD1.5 checkpoint must give the same image (within fp16
rounding) as a checkpoint with the same deltas merged offline, and a visibly different one from no
adapter. Bad input must come back as a node error while the server keeps running."""
import json
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import numpy as np
import pytest
import torch

import waveft_core as wft
from waveft_core.peft_io import peft_positions

from conftest import COMFY, ROOT

ATTN = ("attn1.to_q", "attn1.to_k", "attn1.to_v", "attn1.to_out.0", "attn2.to_q", "attn2.to_out.0", "ff.net.2")


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _adapter_for(ckpt):
    """Strong enough to change the picture: every attention projection and the CLIP's last layers."""
    g = torch.Generator().manual_seed(7)
    layers = {}
    for key, w in ckpt.items():
        if not key.endswith(".weight"):
            continue
        if key.startswith("model.diffusion_model.") and key[: -len(".weight")].endswith(ATTN):
            name = key[len("model."): -len(".weight")]
        elif key.startswith("cond_stage_model.transformer.text_model.encoder.layers.1") and "self_attn" in key:
            name = "text_encoders.clip_l.transformer." + key[len("cond_stage_model.transformer."): -len(".weight")]
        else:
            continue
        shape = tuple(w.shape)
        p = 2592
        spec = torch.randn(p, generator=g) * float(w.float().std()) * 0.15
        layers[name] = wft.Layer(spectrum=spec, indices=peft_positions(shape, p, 777), shape=shape, wavelet="db1")
    return wft.Adapter(layers=layers, metadata={"ss_base_model_version": "sd_v1", "modelspec.title": "e2e"})


def _merged(ckpt, adapter, strength):
    out = dict(ckpt)
    for name, layer in adapter.layers.items():
        if name.startswith("diffusion_model."):
            key = "model." + name + ".weight"
        else:
            key = "cond_stage_model.transformer." + name.split(".transformer.", 1)[1] + ".weight"
        w = ckpt[key]
        out[key] = (w.float() + layer.delta(torch.float32, strength=strength)).to(w.dtype).contiguous()
    return out


class Server:
    def __init__(self, base, log_path):
        self.base = base
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(log_path, "w")
        self.proc = subprocess.Popen(
            [sys.executable, os.path.join(COMFY, "main.py"), "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
             "--base-directory", str(base), "--database-url", "sqlite:///:memory:", "--disable-auto-launch"],
            cwd=COMFY, stdout=self.log, stderr=subprocess.STDOUT)
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
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
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


@pytest.fixture(scope="module")
def server(tmp_path_factory, checkpoint_state):
    from safetensors.torch import save_file

    base = tmp_path_factory.mktemp("comfy_base")
    for d in ("models/checkpoints", "models/waveft", "custom_nodes", "input", "output"):
        (base / d).mkdir(parents=True)
    (base / "custom_nodes" / "ComfyUI-WaveFT").symlink_to(ROOT, target_is_directory=True)
    adapter = _adapter_for(checkpoint_state)
    wft.save(adapter, base / "models/waveft/e2e.safetensors")
    save_file(checkpoint_state, str(base / "models/checkpoints/tiny.safetensors"))
    save_file(_merged(checkpoint_state, adapter, 0.8), str(base / "models/checkpoints/merged.safetensors"))
    (base / "models/waveft/broken.safetensors").write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{\"a\": 1}")
    srv = Server(base, base / "server.log")
    srv.adapter = adapter
    yield srv
    srv.stop()


def txt2img(ckpt, prefix, waveft=None, strength=0.8, seed=42):
    g = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": "a photo of a cat", "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "blurry", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                   "latent_image": ["4", 0], "seed": seed, "steps": 4, "cfg": 5.0,
                                                   "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    }
    if waveft:
        g["8"] = {"class_type": "WaveFTLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "waveft_name": waveft,
                                                          "strength_model": strength, "strength_clip": strength}}
        g["2"]["inputs"]["clip"] = g["3"]["inputs"]["clip"] = ["8", 1]
        g["5"]["inputs"]["model"] = ["8", 0]
    return g


def _image(server, hist):
    from PIL import Image

    info = hist["outputs"]["7"]["images"][0]
    path = server.base / "output" / info.get("subfolder", "") / info["filename"]
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def test_pack_imports_and_lists_nodes(server):
    info = server.get("/object_info/WaveFTLoader")["WaveFTLoader"]
    assert info["display_name"] == "Load WaveFT" and info["category"] == "loaders/waveft"
    assert "e2e.safetensors" in info["input"]["required"]["waveft_name"][0]
    log = (server.base / "server.log").read_text()
    ours = [line for line in log.splitlines() if "ComfyUI-WaveFT" in line]
    assert ours and not any("IMPORT FAILED" in line for line in ours), "\n".join(ours)


def test_image_matches_offline_merge_and_differs_from_no_adapter(server):
    plain = _image(server, server.run(txt2img("tiny.safetensors", "plain")))
    adapted_hist = server.run(txt2img("tiny.safetensors", "waveft", waveft="e2e.safetensors"))
    assert adapted_hist["status"]["status_str"] == "success", adapted_hist["status"]
    adapted = _image(server, adapted_hist)
    merged = _image(server, server.run(txt2img("merged.safetensors", "merged")))
    # same deltas merged offline into the fp16 checkpoint: equal up to that rounding
    assert np.abs(adapted - merged).max() <= 3, np.abs(adapted - merged).max()
    # and clearly not the picture without the adapter
    assert np.abs(adapted - plain).mean() > 5, np.abs(adapted - plain).mean()
    summary = adapted_hist["outputs"]["8"]["text"][0]
    assert f"{len(server.adapter.layers)} of {len(server.adapter.layers)} layers matched" in summary


def test_bad_inputs_are_node_errors_and_the_server_keeps_running(server):
    status, body = server.post("/prompt", {"prompt": txt2img("tiny.safetensors", "x", waveft="e2e.safetensors",
                                                             strength=1000.0)})
    assert status == 400 and "8" in body["node_errors"]
    status, body = server.post("/prompt", {"prompt": txt2img("tiny.safetensors", "x", waveft="missing.safetensors")})
    assert status == 400 and "8" in body["node_errors"]
    hist = server.run(txt2img("tiny.safetensors", "x", waveft="broken.safetensors", seed=5))
    assert hist["status"]["status_str"] == "error"
    messages = json.dumps(hist["status"]["messages"])
    assert "broken.safetensors" in messages and "WaveFT" in messages
    ok = server.run(txt2img("tiny.safetensors", "after", waveft="e2e.safetensors", seed=6))
    assert ok["status"]["status_str"] == "success"
