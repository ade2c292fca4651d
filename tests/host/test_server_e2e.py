"""End to end: a real ComfyUI server with the pack linked in, driven over HTTP like the browser does.

A txt2img graph through 'Load WaveFT' on the tiny SD1.5 checkpoint must give the same image (within fp16
rounding) as a checkpoint with the same deltas merged offline, and a visibly different one from no
adapter. Bad input must come back as a node error while the server keeps running."""

import json

import numpy as np


def txt2img(ckpt, prefix, waveft=None, strength=0.8, seed=42):
    g = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": ckpt}},
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
                "seed": seed,
                "steps": 4,
                "cfg": 5.0,
                "sampler_name": "euler",
                "scheduler": "normal",
                "denoise": 1.0,
            },
        },
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": prefix}},
    }
    if waveft:
        g["8"] = {
            "class_type": "WaveFTLoader",
            "inputs": {
                "model": ["1", 0],
                "clip": ["1", 1],
                "waveft_name": waveft,
                "strength_model": strength,
                "strength_clip": strength,
            },
        }
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
    status, body = server.post(
        "/prompt", {"prompt": txt2img("tiny.safetensors", "x", waveft="e2e.safetensors", strength=1000.0)}
    )
    assert status == 400 and "8" in body["node_errors"]
    status, body = server.post("/prompt", {"prompt": txt2img("tiny.safetensors", "x", waveft="missing.safetensors")})
    assert status == 400 and "8" in body["node_errors"]
    hist = server.run(txt2img("tiny.safetensors", "x", waveft="broken.safetensors", seed=5))
    assert hist["status"]["status_str"] == "error"
    messages = json.dumps(hist["status"]["messages"])
    assert "broken.safetensors" in messages and "WaveFT" in messages
    ok = server.run(txt2img("tiny.safetensors", "after", waveft="e2e.safetensors", seed=6))
    assert ok["status"]["status_str"] == "success"


def test_web_script_help_pages_and_templates_are_served(server):
    """The status script, every node's help page and the workflows as templates, as the browser fetches them."""
    import urllib.request

    scripts = server.get("/extensions")
    assert any(s.endswith("/ComfyUI-WaveFT/waveft.js") for s in scripts), scripts
    info = server.get("/object_info")
    ours = [name for name in info if name.startswith("WaveFT")]
    assert len(ours) == 9
    for name in ours:
        with urllib.request.urlopen(f"{server.url}/extensions/ComfyUI-WaveFT/docs/{name}.md", timeout=30) as r:
            assert r.status == 200 and r.read().startswith(b"# ")
    templates = server.get("/workflow_templates")
    assert set(templates["ComfyUI-WaveFT"]) >= {
        "waveft_txt2img",
        "waveft_train",
        "waveft_with_lora",
        "waveft_strength_sweep",
        "waveft_export_lora",
    }
