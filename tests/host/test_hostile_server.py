"""Hostile and unlucky input against a real ComfyUI server over HTTP (issue 22): an adapter rewritten in place
between Load WaveFT and the sampler, and filename prefixes that name the output folder itself.

The server gets one extra, test-only node pack: a gate that holds a MODEL until the test says go (so a file
can be rewritten after the loader ran and before the sampler patches), and a node that hands Save WaveFT an
adapter read from a path (Save WaveFT otherwise needs a training run)."""

import json
import os

import numpy as np
import pytest
from conftest import ROOT
from safetensors.torch import save_file
from test_server_e2e import txt2img

import waveft_core as wft

GATE_PACK = """
import os, sys, time
sys.path.insert(0, {root!r})

class HostileGate:
    @classmethod
    def INPUT_TYPES(cls):
        return {{"required": {{"model": ("MODEL",), "folder": ("STRING", {{"default": ""}})}}}}
    RETURN_TYPES = ("MODEL",)
    FUNCTION = "wait"
    CATEGORY = "testing"

    @classmethod
    def IS_CHANGED(cls, **kwargs):
        return float("nan")

    def wait(self, model, folder):
        open(os.path.join(folder, "reached"), "w").close()
        deadline = time.time() + 120
        while not os.path.exists(os.path.join(folder, "go")) and time.time() < deadline:
            time.sleep(0.05)
        return (model,)

class HostileAdapterFromPath:
    @classmethod
    def INPUT_TYPES(cls):
        return {{"required": {{"path": ("STRING", {{"default": ""}})}}}}
    RETURN_TYPES = ("WAVEFT",)
    FUNCTION = "read"
    CATEGORY = "testing"

    def read(self, path):
        import waveft_core
        return (waveft_core.load(path),)

NODE_CLASS_MAPPINGS = {{"HostileGate": HostileGate, "HostileAdapterFromPath": HostileAdapterFromPath}}
"""


@pytest.fixture(scope="module")
def hostile(tmp_path_factory, checkpoint_state):
    from host_tools import Server, adapter_for, merged, tiny_lora

    base = tmp_path_factory.mktemp("comfy_hostile")
    for d in ("models/checkpoints", "models/waveft", "models/loras", "custom_nodes", "input", "output"):
        (base / d).mkdir(parents=True)
    (base / "custom_nodes" / "ComfyUI-WaveFT").symlink_to(ROOT, target_is_directory=True)
    gate = base / "custom_nodes" / "waveft_hostile_gate"
    gate.mkdir()
    (gate / "__init__.py").write_text(GATE_PACK.format(root=str(ROOT)))
    adapter = adapter_for(checkpoint_state)
    wft.save(adapter, base / "models/waveft/victim.safetensors")
    wft.save(adapter, base / "adapter.safetensors")
    save_file(checkpoint_state, str(base / "models/checkpoints/tiny.safetensors"))
    save_file(merged(checkpoint_state, adapter, 0.8), str(base / "models/checkpoints/merged.safetensors"))
    save_file(tiny_lora(checkpoint_state), str(base / "models/loras/tiny_lora.safetensors"))
    srv = Server(base, base / "server.log")
    srv.adapter = adapter
    yield srv
    srv.stop()


def _image(server, hist):
    from PIL import Image

    info = hist["outputs"]["7"]["images"][0]
    path = server.base / "output" / info.get("subfolder", "") / info["filename"]
    return np.asarray(Image.open(path).convert("RGB")).astype(np.int16)


def _alive(server):
    assert server.proc.poll() is None, (server.base / "server.log").read_text()[-3000:]
    assert "system" in server.get("/system_stats")


def _queue(server, prompt):
    import time

    status, body = server.post("/prompt", {"prompt": prompt})
    assert status == 200, body
    return body["prompt_id"], time.time


def _wait(server, pid, timeout=300):
    import time

    deadline = time.time() + timeout
    while time.time() < deadline:
        if server.proc.poll() is not None:
            raise AssertionError("the server died: " + (server.base / "server.log").read_text()[-3000:])
        hist = server.get(f"/history/{pid}")
        if pid in hist and hist[pid].get("status", {}).get("status_str") in ("success", "error"):
            return hist[pid]
        time.sleep(0.2)
    raise TimeoutError(pid)


def test_adapter_rewritten_in_place_between_load_and_sampler(hostile, tmp_path):
    """A re-download over the file while the queue runs: the server stays up and samples with what it loaded
    (on a mapped file the sampler would read the new bytes, or die of SIGBUS where the file got shorter)."""
    victim = hostile.base / "models/waveft/victim.safetensors"
    gate = tmp_path / "gate"
    gate.mkdir()
    graph = txt2img("tiny.safetensors", "rewritten", waveft="victim.safetensors")
    graph["9"] = {"class_type": "HostileGate", "inputs": {"model": ["8", 0], "folder": str(gate)}}
    graph["5"]["inputs"]["model"] = ["9", 0]
    pid, _ = _queue(hostile, graph)
    import time

    deadline = time.time() + 120
    while not (gate / "reached").exists():
        assert time.time() < deadline and hostile.proc.poll() is None, "the gate was never reached"
        time.sleep(0.05)
    # rewritten in place, as a download tool writes over a file: truncated, then a smaller file written
    small = next(iter(hostile.adapter.layers))
    smaller = wft.Adapter(layers={small: hostile.adapter.layers[small]}, metadata={})
    wft.save(smaller, tmp_path / "smaller.safetensors")
    with open(victim, "r+b") as f:
        f.truncate(0)
        f.write((tmp_path / "smaller.safetensors").read_bytes())
    (gate / "go").touch()
    hist = _wait(hostile, pid)
    _alive(hostile)
    assert hist["status"]["status_str"] == "success", json.dumps(hist["status"])[:2000]
    merged = _image(hostile, hostile.run(txt2img("merged.safetensors", "merged_ref")))
    # the picture is the one of the adapter as it was loaded, not of the bytes written later
    assert np.abs(_image(hostile, hist) - merged).max() <= 3


def _prefix_graphs(prefix, base):
    return {
        "WaveFT to LoRA": {
            "1": {
                "class_type": "WaveFTToLoRA",
                "inputs": {"waveft_name": "victim.safetensors", "rank": 2, "filename_prefix": prefix},
            }
        },
        "LoRA to WaveFT": {
            "1": {
                "class_type": "WaveFTFromLoRA",
                "inputs": {
                    "lora_name": "tiny_lora.safetensors",
                    "n_coefficients": 16,
                    "wavelet": "db1",
                    "filename_prefix": prefix,
                },
            }
        },
        "Merge": {
            "1": {
                "class_type": "WaveFTMergeCheckpoint",
                "inputs": {
                    "ckpt_name": "tiny.safetensors",
                    "waveft_name": "victim.safetensors",
                    "strength": 0.5,
                    "filename_prefix": prefix,
                },
            }
        },
        "Save WaveFT": {
            "1": {"class_type": "HostileAdapterFromPath", "inputs": {"path": str(base / "adapter.safetensors")}},
            "2": {
                "class_type": "WaveFTSave",
                "inputs": {
                    "waveft": ["1", 0],
                    "filename_prefix": prefix,
                    "title": "",
                    "trigger_words": "",
                    "description": "",
                },
            },
        },
    }


def _files(base):
    return sorted(
        str(p.relative_to(base))
        for p in base.rglob("*")
        if p.is_file() and "custom_nodes" not in p.parts and "output" not in p.parts and p.suffix == ".safetensors"
    )


@pytest.mark.parametrize("prefix", [".", "./", "sub/..", " . ", "a/", "sub/../.."])
def test_prefix_naming_the_folder_itself_is_refused_by_every_writer(hostile, prefix):
    before = _files(hostile.base)
    for node, graph in _prefix_graphs(prefix, hostile.base).items():
        hist = hostile.run(graph)
        messages = json.dumps(hist["status"]["messages"])
        assert hist["status"]["status_str"] == "error", (node, prefix, messages[:1500])
        assert "filename_prefix" in messages, (node, messages[:1500])
        assert _files(hostile.base) == before, (node, prefix, sorted(set(_files(hostile.base)) - set(before)))
    _alive(hostile)


def test_plain_prefixes_still_write_inside_the_folder(hostile):
    before = set(_files(hostile.base))
    for node, graph in _prefix_graphs("hostile_ok/x", hostile.base).items():
        hist = hostile.run(graph)
        assert hist["status"]["status_str"] == "success", (node, json.dumps(hist["status"])[:1500])
    new = set(_files(hostile.base)) - before
    assert {os.path.dirname(p) for p in new} == {
        "models/loras/hostile_ok",
        "models/waveft/hostile_ok",
        "models/checkpoints/hostile_ok",
    }, new
    assert len(new) == 4, new


def test_prefix_rules_in_process(pack, tmp_path):
    """The final path is checked: './name' stays the plain name it always was; what names the folder or leaves it
    is refused."""
    free_path = pack.nodes.host.free_path
    assert free_path(str(tmp_path), "./x") == os.path.join(os.path.realpath(tmp_path), "x.safetensors")
    assert free_path(str(tmp_path), "sub/x").endswith(os.path.join("sub", "x.safetensors"))
    for bad in (".", "./", " . ", "./ ", "a/", "sub/..", "../x", "sub/../..", "/abs"):
        with pytest.raises(ValueError, match="filename_prefix"):
            free_path(str(tmp_path), bad)
    assert sorted(os.listdir(tmp_path)) == ["sub"]


# --- in-process: the host's own key map and loaders ---------------------------------------------------------

Q = "input_blocks.1.1.transformer_blocks.0.attn1.to_q"


def _layer(shape, seed=0, p=200):
    import torch

    from waveft_core.convert.peft_io import peft_positions

    g = torch.Generator().manual_seed(seed)
    return wft.Layer(
        spectrum=torch.randn(p, generator=g) * 1e-3, indices=peft_positions(shape, p, 777), shape=shape, wavelet="db2"
    )


def test_one_weight_under_two_spellings_is_refused_naming_both(pack, sd15, waveft_dir):
    model, clip, _ = sd15
    shape = tuple(model.model.state_dict()[f"diffusion_model.{Q}.weight"].shape)
    kohya = "lora_unet_" + Q.replace(".", "_")
    wft.save(
        wft.Adapter(layers={f"diffusion_model.{Q}": _layer(shape, 1), kohya: _layer(shape, 2)}),
        waveft_dir / "twice.safetensors",
    )
    with pytest.raises(ValueError) as e:
        pack.nodes.loader.WaveFTLoader().load(model, clip, "twice.safetensors", 1.0, 1.0)
    msg = str(e.value)
    assert "twice.safetensors" in msg and f"diffusion_model.{Q}" in msg and kohya in msg, msg


def test_a_layer_equal_only_in_entry_count_is_refused(pack, sd15, waveft_dir):
    """[320, 32, 10] has the 320 x 320 entries of attn1.to_q but is another weight."""
    model, clip, _ = sd15
    m, n = model.model.state_dict()[f"diffusion_model.{Q}.weight"].shape
    assert n % 10 == 0
    wft.save(wft.Adapter(layers={f"diffusion_model.{Q}": _layer((m, n // 10, 10))}), waveft_dir / "folded.safetensors")
    with pytest.raises(ValueError, match="another shape"):
        pack.nodes.loader.WaveFTLoader().load(model, clip, "folded.safetensors", 1.0, 1.0)


def test_layer_names_from_a_file_reach_the_log_escaped(pack, sd15, waveft_dir, caplog):
    import logging

    model, clip, _ = sd15
    shape = tuple(model.model.state_dict()[f"diffusion_model.{Q}.weight"].shape)
    evil = "diffusion_model.nowhere\x1b]0;pwned\x07\x1b[2J"
    wft.save(
        wft.Adapter(layers={f"diffusion_model.{Q}": _layer(shape), evil: _layer((8, 8), p=4)}),
        waveft_dir / "evil.safetensors",
    )
    with caplog.at_level(logging.INFO, logger="ComfyUI-WaveFT"):
        pack.nodes.loader.WaveFTLoader().load(model, clip, "evil.safetensors", 1.0, 1.0)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "nowhere" in logged and "\x1b" not in logged and "\\x1b]0;pwned\\x07" in logged, repr(logged)
