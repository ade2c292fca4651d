"""The command line (`python -m waveft_core`) and the embedded default job."""

import os
import subprocess
import sys

import pytest
import torch
from reference import ROOT, random_layer

import waveft_core as wft
from waveft_core.demo import run


def cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "waveft_core", *map(str, args)], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


def test_demo_learns_saves_loads_and_applies(tmp_path):
    r = run(out=tmp_path / "demo.safetensors", steps=150, log=lambda *a: None)
    assert r["loss_after"] < 0.85 * r["loss_before"]
    assert r["loss_after"] < r["loss_by_strength"][0.5] < r["loss_before"]  # half the change, half the way
    assert r["loss_by_strength"][0.0] == pytest.approx(r["loss_before"], rel=1e-6)
    assert r["loss_by_strength"][1.0] == pytest.approx(r["loss_after"], rel=1e-3)
    assert (tmp_path / "demo.safetensors").stat().st_size == r["file_size"] and r["layers"] == 2


def test_info_and_bad_input(tmp_path):
    layer = random_layer((16, 16), 20, "db2", scaling=25.0)
    path = wft.save(
        wft.Adapter(
            layers={"diffusion_model.x": layer},
            metadata={"ss_base_model_version": "sdxl_base_v1-0", "modelspec.trigger_phrase": "sks dog"},
        ),
        tmp_path / "a.safetensors",
    )
    r = cli("info", path)
    assert r.returncode == 0
    for words in ("layers: 1", "parameters: 20", "wavelet: db2", "scaling: 25", "sdxl_base_v1-0", "sks dog"):
        assert words in r.stdout
    (tmp_path / "junk.safetensors").write_bytes(b"not a file at all")
    r = cli("info", tmp_path / "junk.safetensors")
    assert r.returncode == 1 and r.stdout == ""
    assert len(r.stderr.strip().splitlines()) == 1 and "junk.safetensors" in r.stderr


def test_convert_native_to_peft_and_back(tmp_path):
    from waveft_core.convert.peft_io import peft_positions

    shape = (24, 40)
    name = "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q"
    layer = wft.Layer(spectrum=torch.randn(60), indices=peft_positions(shape, 60, 777), shape=shape, wavelet="db3")
    described = {
        "modelspec.title": "My dog",
        "modelspec.description": "sks dog, 500 steps",
        "modelspec.trigger_phrase": "sks dog",
    }
    src = wft.save(wft.Adapter(layers={name: layer}, metadata=dict(described)), tmp_path / "n.safetensors")
    r = cli("convert", src, tmp_path / "peft")
    assert r.returncode == 0, r.stderr
    from safetensors.torch import save_file

    save_file({f"model.{name}.weight": torch.zeros(shape)}, str(tmp_path / "base.safetensors"))
    r = cli("convert", tmp_path / "peft", tmp_path / "back.safetensors", "--base", tmp_path / "base.safetensors")
    assert r.returncode == 0, r.stderr
    back = wft.load(tmp_path / "back.safetensors")
    assert torch.allclose(back.layers[name].delta(), layer.delta())
    assert {k: back.metadata.get(k) for k in described} == described  # the round trip keeps what describes it
    import os

    assert os.stat(tmp_path / "back.safetensors").st_mode & 0o777 == 0o666 & ~_umask()  # readable like any file
    # no --base: one clear line, nothing written
    r = cli("convert", tmp_path / "peft", tmp_path / "nobase.safetensors")
    assert r.returncode == 1 and "--base" in r.stderr and not (tmp_path / "nobase.safetensors").exists()


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def test_cli_help_to_lora_rank_and_info_layout(tmp_path):
    """--help shows defaults; to-lora records the rank it stored, not one the layers cannot hold; info's layer
    list has its own heading; messages give full paths; the demo says where its file is and what to try next."""
    assert "(default: 8)" in cli("to-lora", "--help").stdout
    layer = random_layer((12, 20), 40, "db2")
    src = wft.save(wft.Adapter(layers={"diffusion_model.x": layer}), tmp_path / "a.safetensors")
    r = cli("to-lora", src, tmp_path / "l.safetensors", "--rank", "100000")
    assert r.returncode == 0 and "rank-12 LoRA" in r.stdout and "asked 100000" in r.stdout
    from safetensors import safe_open

    with safe_open(str(tmp_path / "l.safetensors"), "pt") as f:
        assert f.metadata()["ss_network_dim"] == "12" and f.get_tensor("lora_unet_x.lora_down.weight").shape[0] == 12
    out = cli("info", src, "--layers").stdout
    assert out.index("layers:\n") > out.index("metadata:") and "  diffusion_model.x: [12, 20]" in out
    r = cli("info", tmp_path / "missing.safetensors")
    assert r.returncode == 1 and str(tmp_path / "missing.safetensors") in r.stderr


def test_demo_says_where_its_file_is_and_what_next(tmp_path):
    lines = []
    run(out=tmp_path / "d.safetensors", steps=5, log=lines.append)
    text = "\n".join(lines)
    assert str((tmp_path / "d.safetensors").resolve()) in text and "python -m waveft_core info" in text
