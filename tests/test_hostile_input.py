"""Hostile and unlucky input (issue 22): each case ends in a clear refusal naming the file and the key, or in a
correct result; nothing crashes, nothing is written outside its folder, memory stays bounded.

The refusals of FORMAT.md's rules are in test_fileformat.py (CASES); this file holds the rest, and the README's
"Hostile and damaged files" table lists both."""

import json
import os
import subprocess
import sys
import time

import pytest
import torch
from reference import ROOT, random_layer, reference_delta
from safetensors.torch import save_file

import waveft_core as wft
from waveft_core import cli, delta
from waveft_core.convert import sources
from waveft_core.convert.peft_io import import_source
from waveft_core.files import storage
from waveft_core.hosts import cache
from waveft_core.names.matching import match_layers

NAME = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q"


def native_file(path, layer=None, **metadata):
    layer = layer or random_layer((32, 48), 100, "db2", scaling=25.0, seed=1)
    return wft.save(wft.Adapter(layers={NAME: layer}, metadata=metadata), path)


# --- 1. tensors are copied out of the file --------------------------------------------------------------


def _overwrite_data_in_place(path):
    """Rewrite every tensor byte of a safetensors file in place (same size, same inode, as some download
    tools and editors do)."""
    header = storage.read_header(path)
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(header.data_start)
        f.write(b"\x7f" * (size - header.data_start))


def test_a_loaded_native_adapter_does_not_follow_its_file(tmp_path):
    path = native_file(tmp_path / "a.safetensors")
    adapter = wft.load(path)
    before = adapter.layers[NAME].spectrum.clone(), adapter.layers[NAME].indices.clone()
    _overwrite_data_in_place(path)
    assert torch.equal(adapter.layers[NAME].spectrum, before[0])
    assert torch.equal(adapter.layers[NAME].indices, before[1])


def test_loaded_peft_and_diffusers_spectra_do_not_follow_their_file(tmp_path):
    spectrum = torch.randn(40)
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file({"unet.down_blocks.0.attn.to_q.waveft_spectrum": spectrum}, str(path))
    source = sources.read_source(path)
    _overwrite_data_in_place(path)
    assert torch.equal(next(iter(source.parts[0].spectra.values())), spectrum)


def test_a_file_truncated_after_loading_does_not_kill_the_process(tmp_path):
    """Reading a mapped tensor whose file got shorter is SIGBUS: run in a child so the test sees the death."""
    path = native_file(tmp_path / "a.safetensors")
    code = f"""
import sys; sys.path.insert(0, {str(ROOT)!r})
import waveft_core as wft
a = wft.load({str(path)!r})
open({str(path)!r}, "r+b").truncate(0)
layer = next(iter(a.layers.values()))
print(float(layer.spectrum.abs().sum()) > 0, float(layer.delta().abs().sum()) > 0)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0 and done.stdout.split() == ["True", "True"], (done.returncode, done.stderr[-2000:])


# --- 2. the patch plan and the patching keep memory bounded ---------------------------------------------


PEAK = """
import resource, sys
sys.path.insert(0, {root!r})
import torch
import waveft_core as wft
m = n = 320
idx = torch.randperm(m * n, generator=torch.Generator().manual_seed(0))[:3000]
layer = wft.Layer(spectrum=torch.randn(3000) * 1e-3, indices=idx, shape=(m, n), wavelet="coif17")
weight = torch.zeros(m, n, dtype=torch.float16)
torch.ones(1) + 1  # the allocator and torch's kernels in memory before the baseline
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
layer.add_to_(weight)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
print((after - before) // 1024)
"""


def test_patch_plan_and_patching_of_a_long_filter_layer_stay_small():
    """3000 coif17 coefficients (L = 102) on one 320 x 320 layer: 31 million patch entries. The plan and the
    fp16 patch used ~1.2 GB (33 bytes an entry); now a chunk at a time. Peak RSS growth measured in a child."""
    done = subprocess.run(
        [sys.executable, "-c", PEAK.format(root=str(ROOT))], capture_output=True, text=True, timeout=600, check=False
    )
    assert done.returncode == 0, done.stderr[-2000:]
    grown_mb = int(done.stdout.split()[-1])
    assert grown_mb < 250, f"plan + patch grew the peak memory by {grown_mb} MB"


@pytest.mark.parametrize("wavelet", ["db1", "db4", "coif1"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32])
def test_chunked_plans_and_patches_give_the_same_weights(monkeypatch, wavelet, dtype):
    """With a tiny chunk every bounded path runs (dense overlap count, pieces, dense fp32 sums); the result
    is PyWavelets' ΔW, and fp16 weights are still rounded once per entry."""
    layer = random_layer((40, 52), 1500, wavelet, scaling=0.7)
    w = torch.randn(40, 52).to(dtype)
    expect = w.double() + torch.as_tensor(
        reference_delta(layer.indices, layer.spectrum.double(), (40, 52), wavelet, scaling=0.7)
    )
    rounded_once = (w.float() + layer.delta(torch.float32)).to(dtype)
    monkeypatch.setattr(delta, "CHUNK", 50)
    chunked = random_layer((40, 52), 1500, wavelet, scaling=0.7)  # a fresh plan, made in chunks
    out = chunked.add_to_(w.clone())
    assert torch.allclose(out.double(), expect, atol=1e-2 if dtype == torch.float16 else 1e-5)
    if dtype == torch.float16:
        assert torch.equal(out, rounded_once)
    assert torch.allclose(
        chunked.delta(torch.float64),
        torch.as_tensor(reference_delta(layer.indices, layer.spectrum.double(), (40, 52), wavelet, scaling=0.7)),
        atol=1e-12,
    )


# --- 7. no dense work above the budget; sizes refused with the file named ---------------------------------


def test_waveft_to_lora_refuses_a_huge_declared_layer_naming_file_and_key(tmp_path, capsys):
    big = wft.Layer(spectrum=torch.ones(4), indices=torch.arange(4), shape=(60000, 60000), wavelet="db1")
    path = native_file(tmp_path / "tiny_but_huge.safetensors", big)
    assert os.path.getsize(path) < 4096
    assert cli.main(["to-lora", str(path), str(tmp_path / "out.safetensors")]) == 1
    err = capsys.readouterr().err
    assert "tiny_but_huge.safetensors" in err and f"{NAME}.waveft_shape" in err and "60000 x 60000" in err, err
    assert not (tmp_path / "out.safetensors").exists()


def test_lora_to_waveft_refuses_huge_vectors_before_multiplying(tmp_path, capsys):
    path = tmp_path / "long_vectors.safetensors"
    prefix = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"
    save_file(
        {
            f"{prefix}.lora_up.weight": torch.ones(100_000, 1, dtype=torch.float16),
            f"{prefix}.lora_down.weight": torch.ones(1, 100_000, dtype=torch.float16),
        },
        str(path),
    )
    assert cli.main(["extract", str(tmp_path / "out.safetensors"), "--lora", str(path)]) == 1
    err = capsys.readouterr().err
    assert "long_vectors.safetensors" in err and f"{prefix}.lora_up.weight" in err and "100000 x 100000" in err, err


def test_a_shape_past_any_weight_is_refused_not_a_traceback(tmp_path, capsys):
    tensors, md = storage_roundtrip(tmp_path)
    tensors[f"{NAME}.waveft_shape"] = torch.tensor([2**62, 4])
    path = tmp_path / "huge_shape.safetensors"
    save_file(tensors, str(path), metadata=md)
    assert cli.main(["info", str(path)]) == 1
    err = capsys.readouterr().err
    assert "huge_shape.safetensors" in err and f"{NAME}.waveft_shape" in err and "more than any" in err, err


def storage_roundtrip(tmp_path):
    from waveft_core.files.fileformat import read_tensors_and_metadata

    return read_tensors_and_metadata(native_file(tmp_path / "ok.safetensors"))


# --- 4. PEFT settings: finite, and read as PEFT reads them, or refused -------------------------------------


def peft_folder(tmp_path, **config):
    folder = tmp_path / "peft"
    folder.mkdir()
    cfg = {"peft_type": "WAVEFT", "n_frequency": 30, "wavelet_family": "db1", "random_loc_seed": 777, **config}
    (folder / "adapter_config.json").write_text(json.dumps(cfg))  # json writes NaN as NaN, as Python's json reads
    save_file(
        {"base_model.model.layer.waveft_spectrum": torch.randn(30) * 0.01}, str(folder / "adapter_model.safetensors")
    )
    return folder


def import_peft(folder):
    return import_source(sources.read_source(folder), lambda peft_name, native: (16, 24), native_names=False)


@pytest.mark.parametrize(
    "config, words",
    [
        ({"scaling": float("nan")}, "not a finite float32 number"),
        ({"scaling": 1e300}, "not a finite float32 number"),
        ({"scaling": "abc"}, "'abc' is not a number"),
        ({"use_idwt": "on"}, "'on' is not true or false"),
        ({"scaling": 1e9}, "float16"),
    ],
)
def test_peft_settings_that_cannot_be_right_are_refused(tmp_path, config, words):
    folder = peft_folder(tmp_path, **config)
    with pytest.raises(wft.WaveFTFileError) as e:
        import_peft(folder)
    msg = str(e.value)
    assert words in msg and str(folder) in msg, msg
    assert e.value.key in ("scaling", "use_idwt", "base_model.model.layer.waveft_spectrum")


@pytest.mark.parametrize(
    "value, expected", [(True, True), (False, False), ("false", False), ("true", True), (0, False)]
)
def test_peft_use_idwt_values_peft_writes_still_read(tmp_path, value, expected):
    layer = import_peft(peft_folder(tmp_path, use_idwt=value)).layers["layer"]
    assert layer.use_idwt is expected


# --- 6. one weight under two spellings -----------------------------------------------------------------


def test_two_layers_on_one_weight_are_refused_naming_both():
    from waveft_core.names.matching import SharedTargetError

    key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    kohya = "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q"
    key_map = {NAME: key, kohya: key}
    with pytest.raises(SharedTargetError) as e:
        match_layers({NAME: (32, 48), kohya: (32, 48)}, key_map, lambda k: (32, 48))
    assert NAME in str(e.value) and kohya in str(e.value) and key in str(e.value)
    # slices of one fused weight are different targets
    fused = {"a": ("w", (0, 0, 16)), "b": ("w", (0, 16, 16))}
    report = match_layers({"a": (16, 48), "b": (16, 48)}, fused, lambda k: (32, 48))
    assert report.matched == 2


# --- 10. shapes equal up to trailing 1s --------------------------------------------------------------------


def test_layer_fits_a_weight_only_when_shapes_agree_up_to_trailing_ones():
    key_map = {"a": "a.weight"}
    assert match_layers({"a": (320, 320)}, key_map, lambda k: (320, 320, 1, 1)).matched == 1
    report = match_layers({"a": (320, 32, 10)}, key_map, lambda k: (320, 320))
    assert report.matched == 0 and report.wrong_shape == [("a", (320, 32, 10), (320, 320))]


# --- 9. a same-size replacement that keeps the mtime --------------------------------------------------------


def test_same_size_same_mtime_replacement_is_read_again(tmp_path):
    path = native_file(tmp_path / "a.safetensors", random_layer((32, 48), 100, "db2", scaling=25.0, seed=1))
    st = os.stat(path)
    key = cache.fingerprint(path)
    adapters = cache.AdapterCache(4)
    first = adapters.get(key, lambda: wft.load(path))
    other = tmp_path / "b.safetensors"
    native_file(other, random_layer((32, 48), 100, "db2", scaling=25.0, seed=2))
    assert os.path.getsize(other) == st.st_size
    os.replace(other, path)  # as `cp -p` or an unpacked archive leaves it: same size, same mtime
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    again = adapters.get(cache.fingerprint(path), lambda: wft.load(path))
    assert cache.fingerprint(path) != key
    assert not torch.equal(again.layers[NAME].spectrum, first.layers[NAME].spectrum)


# --- 8. text from a file never drives a terminal -----------------------------------------------------------

ESCAPES = "\x1b]0;pwned\x07\x1b[2J\x1b]52;c;ZWNobyBoaQ==\x07\u202e"


def test_cli_info_and_errors_escape_control_characters(tmp_path, capsys):
    path = native_file(
        tmp_path / "a.safetensors", **{"modelspec.title": f"cat{ESCAPES}", "modelspec.description": f"line\n{ESCAPES}"}
    )
    assert cli.main(["info", str(path), "--layers"]) == 0
    out = capsys.readouterr().out
    assert "cat" in out and "\x1b" not in out and "\x07" not in out and "\u202e" not in out, repr(out)
    assert "\\x1b]0;pwned\\x07" in out
    bad = tmp_path / "bad.safetensors"
    tensors, md = storage_roundtrip(tmp_path)
    md["waveft.wavelet"] = f"db1{ESCAPES}"
    save_file(tensors, str(bad), metadata=md)
    assert cli.main(["info", str(bad)]) == 1
    err = capsys.readouterr().err
    assert "waveft.wavelet" in err and "\x1b" not in err and "\\x1b" in err, repr(err)


def test_webui_console_lines_escape_control_characters(capsys):
    sys.path.insert(0, str(ROOT))
    from a1111 import common

    common.log(f"layer diffusion_model.{ESCAPES}: not applied")
    err = capsys.readouterr().err
    assert "not applied" in err and "\x1b" not in err and "\u202e" not in err and "\\u202e" in err, repr(err)


# --- 10. temporary files: short enough, and none left behind -------------------------------------------------


def test_a_legal_long_name_is_written(tmp_path):
    path = tmp_path / ("a" * 240 + ".safetensors")  # 252 bytes: legal; '.<name>.<12 hex>.tmp' would be 270
    native_file(path)
    assert wft.load(path).layers and [p.name for p in tmp_path.iterdir()] == [path.name]


def test_temporary_files_a_killed_writer_left_are_removed(tmp_path):
    stale = tmp_path / ".old.safetensors.0123456789ab.tmp"
    fresh = tmp_path / ".busy.safetensors.ba9876543210.tmp"
    mine = tmp_path / "notes.tmp"
    for p in (stale, fresh, mine):
        p.write_bytes(b"x")
    old = time.time() - 7 * 3600
    os.utime(stale, (old, old))
    os.utime(mine, (old, old))
    native_file(tmp_path / "new.safetensors")
    assert not stale.exists() and fresh.exists() and mine.exists()


def test_listings_read_each_peft_config_once(tmp_path, monkeypatch):
    root = tmp_path / "models"
    folder = root / "mine"
    folder.mkdir(parents=True)
    config = {"peft_type": "WAVEFT", "target_modules": ["x" * 100] * 5000}  # ~500 KB, as bloated ones are
    (folder / "adapter_config.json").write_text(json.dumps(config))
    reads = []
    real_open = open

    def counting_open(file, *args, **kwargs):
        reads.append(str(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(sources, "open", counting_open, raising=False)
    monkeypatch.setattr(
        type(folder),
        "read_text",
        lambda self, *a, **k: reads.append(str(self)) or real_open(self, encoding="utf-8").read(),
    )
    for _ in range(3):
        assert sources.adapter_folders(root) == ["mine"]
    assert len(reads) == 1, reads
