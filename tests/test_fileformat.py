"""The native file v1: round trip, every refusal rule of FORMAT.md section 3, atomic writes, no pickles."""

import os
import pickle
import struct

import pytest
import torch
from reference import random_layer, reference_delta
from safetensors.torch import load_file, save_file

import waveft_core as wft
from waveft_core.files import fileformat
from waveft_core.files.fileformat import read_tensors_and_metadata

NAME = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q"


def make_adapter(**meta):
    a = wft.Adapter(
        layers={
            NAME: random_layer((32, 48), 100, "db2", scaling=25.0, seed=1),
            "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj": random_layer(
                (24, 24), 50, "db2", scaling=25.0, seed=2
            ),
        },
        metadata={"ss_base_model_version": "sd_v1", **meta},
    )
    return a


def write_raw(path, tensors, metadata):
    save_file(tensors, str(path), metadata=metadata)
    return path


def valid_raw(tmp_path):
    path = wft.save(make_adapter(), tmp_path / "ok.safetensors")
    return read_tensors_and_metadata(path)


def test_round_trip_keeps_everything(tmp_path):
    a = make_adapter(**{"modelspec.title": "Cat", "custom.key": "kept"})
    a.layers[NAME].scaling = 10.0  # a per-layer scaling different from the file default
    path = wft.save(a, tmp_path / "a.safetensors")
    b = wft.load(path)
    assert set(b.layers) == set(a.layers)
    for k in a.layers:
        assert torch.equal(b.layers[k].spectrum, a.layers[k].spectrum)
        assert torch.equal(b.layers[k].indices.long(), a.layers[k].indices.long())
        assert b.layers[k].shape == a.layers[k].shape
        assert b.layers[k].scaling == a.layers[k].scaling
        assert torch.allclose(b.layers[k].delta(), a.layers[k].delta())
    md = b.metadata
    assert md["waveft.format_version"] == "1" and md["waveft.wavelet"] == "db2"
    assert md["ss_network_module"] == "waveft" and md["modelspec.sai_model_spec"] == "1.0.0"
    assert md["modelspec.architecture"] == "stable-diffusion-v1/waveft"
    assert md["custom.key"] == "kept" and md["modelspec.title"] == "Cat"
    raw = load_file(str(path))
    assert raw[f"{NAME}.waveft_indices"].dtype == torch.int32
    assert raw[f"{NAME}.waveft_shape"].dtype == torch.int64
    per_layer = [k for k in raw if k.endswith(".waveft_scaling")]
    assert len(per_layer) == 1 and raw[per_layer[0]].dtype == torch.float32  # the other uses the file's default


def test_unknown_extra_keys_are_kept_and_ignored(tmp_path):
    tensors, md = valid_raw(tmp_path)
    tensors["some.other_tensor"] = torch.ones(3)
    md["future.key"] = "x"
    p = write_raw(tmp_path / "extra.safetensors", tensors, md)
    a = wft.load(p)
    assert len(a.layers) == 2 and a.metadata["future.key"] == "x"
    wft.save(a, tmp_path / "again.safetensors")
    assert "some.other_tensor" in load_file(str(tmp_path / "again.safetensors"))


def test_fp16_spectrum_and_int64_indices_are_accepted(tmp_path):
    tensors, md = valid_raw(tmp_path)
    tensors[f"{NAME}.waveft_spectrum"] = tensors[f"{NAME}.waveft_spectrum"].half()
    tensors[f"{NAME}.waveft_indices"] = tensors[f"{NAME}.waveft_indices"].long()
    a = wft.load(write_raw(tmp_path / "h.safetensors", tensors, md))
    assert a.layers[NAME].spectrum.dtype == torch.float16


def broken(tmp_path, change):
    tensors, md = valid_raw(tmp_path)
    change(tensors, md)
    return write_raw(tmp_path / "bad.safetensors", tensors, md)


def _set(key, value):
    def change(t, md):
        t[key] = value(t[key]) if callable(value) else value

    return change


CASES = {
    "length mismatch": (_set(f"{NAME}.waveft_indices", lambda t: t[:-1]), f"{NAME}.waveft_spectrum", "positions"),
    "out of range": (
        _set(f"{NAME}.waveft_indices", lambda t: torch.cat([t[:-1], torch.tensor([32 * 48], dtype=t.dtype)])),
        f"{NAME}.waveft_indices",
        "outside",
    ),
    "negative": (
        _set(f"{NAME}.waveft_indices", lambda t: torch.cat([t[:-1], torch.tensor([-1], dtype=t.dtype)])),
        f"{NAME}.waveft_indices",
        "outside",
    ),
    "repeated": (
        _set(f"{NAME}.waveft_indices", lambda t: torch.cat([t[:-1], t[:1]])),
        f"{NAME}.waveft_indices",
        "more than once",
    ),
    "nan": (
        _set(f"{NAME}.waveft_spectrum", lambda t: torch.cat([t[:-1], torch.tensor([float("nan")])])),
        f"{NAME}.waveft_spectrum",
        "NaN",
    ),
    "inf scaling": (_set(f"{NAME}.waveft_scaling", torch.tensor(float("inf"))), f"{NAME}.waveft_scaling", "finite"),
    "float indices": (_set(f"{NAME}.waveft_indices", lambda t: t.float()), f"{NAME}.waveft_indices", "int32/int64"),
    "bad shape": (_set(f"{NAME}.waveft_shape", torch.tensor([32, 0])), f"{NAME}.waveft_shape", "below 1"),
    "missing shape": (lambda t, md: t.pop(f"{NAME}.waveft_shape"), f"{NAME}.waveft_shape", "missing"),
    "unknown wavelet": (lambda t, md: md.update({"waveft.wavelet": "bior2.2"}), "waveft.wavelet", "unknown wavelet"),
    "newer version": (lambda t, md: md.update({"waveft.format_version": "3"}), "waveft.format_version", "newer"),
    "missing scaling": (lambda t, md: md.pop("waveft.scaling"), "waveft.scaling", "missing"),
    "bad scaling": (lambda t, md: md.update({"waveft.scaling": "nan"}), "waveft.scaling", "finite"),
    "bad use_idwt": (lambda t, md: md.update({"waveft.use_idwt": "maybe"}), "waveft.use_idwt", "true or false"),
    "wrong network module": (
        lambda t, md: md.update({"ss_network_module": "networks.lora"}),
        "ss_network_module",
        "not 'waveft'",
    ),
    # issue 22: values finite in float64 but not in float32, a ΔW past float16, mirrors that disagree, sizes
    "scaling past float32": (lambda t, md: md.update({"waveft.scaling": "1e300"}), "waveft.scaling", "float32"),
    "scaling not a number": (lambda t, md: md.update({"waveft.scaling": "abc"}), "waveft.scaling", "not a number"),
    "layer scaling past float16": (
        _set(f"{NAME}.waveft_scaling", torch.tensor(3e38)),
        f"{NAME}.waveft_spectrum",
        "float16",
    ),
    "coefficients past float16": (
        _set(f"{NAME}.waveft_spectrum", lambda t: t * 1e30),
        f"{NAME}.waveft_spectrum",
        "float16",
    ),
    "scaling mirror disagrees": (
        _set("waveft.scaling", torch.tensor(1e4, dtype=torch.float64)),
        "waveft.scaling",
        "metadata says 25.0",
    ),
    "wavelet mirror disagrees": (
        _set("waveft.wavelet", torch.tensor(list(b"db4"), dtype=torch.uint8)),
        "waveft.wavelet",
        "metadata says 'db2'",
    ),
    "use_idwt mirror disagrees": (
        _set("waveft.use_idwt", torch.tensor(0, dtype=torch.uint8)),
        "waveft.use_idwt",
        "metadata says True",
    ),
    "shape past any weight": (
        _set(f"{NAME}.waveft_shape", torch.tensor([2**62, 4])),
        f"{NAME}.waveft_shape",
        "more than any",
    ),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_rule_is_enforced_with_file_and_key_named(tmp_path, case):
    change, key, words = CASES[case]
    path = broken(tmp_path, change)
    with pytest.raises(wft.WaveFTFileError) as e:
        wft.load(path)
    msg = str(e.value)
    assert "bad.safetensors" in msg and key in msg and words in msg, msg
    assert e.value.key == key


def test_pickles_are_never_unpickled(tmp_path):
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    for name in ("adapter.pt", "adapter.ckpt", "adapter.safetensors"):
        p = tmp_path / name
        p.write_bytes(pickle.dumps(Evil()))
        with pytest.raises(wft.WaveFTFileError) as e:
            wft.load(p)
        assert name in str(e.value)
        assert not marker.exists()


def test_truncated_file_is_refused_clearly(tmp_path):
    path = wft.save(make_adapter(), tmp_path / "t.safetensors")
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(wft.WaveFTFileError, match="t.safetensors"):
        wft.load(path)
    path.write_bytes(data[:100])
    with pytest.raises(wft.WaveFTFileError, match="truncated"):
        wft.load(path)


def test_header_claiming_more_than_the_file_holds(tmp_path):
    p = tmp_path / "h.safetensors"
    p.write_bytes(struct.pack("<Q", 10**6) + b'{"a":1}')
    with pytest.raises(wft.WaveFTFileError, match="truncated"):
        wft.load(p)


def test_lora_and_peft_weight_files_get_pointed_messages(tmp_path):
    lora = write_raw(tmp_path / "lora.safetensors", {"x.lora_up.weight": torch.ones(2, 2)}, {})
    with pytest.raises(wft.WaveFTFileError, match="not a WaveFT adapter"):
        wft.load(lora)
    # spectra without positions or settings (a PEFT weights file on its own): readable given the base model,
    # with PEFT's default settings, and the adapter says so
    peft_weights = write_raw(
        tmp_path / "adapter_model.safetensors", {"base_model.model.a.waveft_spectrum": torch.ones(3)}, {"format": "pt"}
    )
    with pytest.raises(wft.WaveFTFileError, match=r"stores no coefficient positions.*base=<"):
        wft.load(peft_weights)
    ad = wft.load(peft_weights, base={"a.weight": (4, 5)})
    assert ad.layers["a"].wavelet == "db1" and ad.layers["a"].scaling == 25.0
    assert "PEFT's defaults used" in ad.metadata["waveft.import_notes"]


def test_write_is_atomic_and_failure_keeps_the_old_file(tmp_path):
    path = wft.save(make_adapter(), tmp_path / "keep.safetensors")
    before = path.read_bytes()
    bad = make_adapter()
    bad.layers[NAME].spectrum = torch.full((100,), float("nan"))
    with pytest.raises(ValueError, match="NaN"):
        wft.save(bad, path)
    assert path.read_bytes() == before

    from waveft_core.files import storage

    def exploding(tmp, parts):  # the disk fills up after a first few bytes
        with open(tmp, "wb") as f:
            f.write(bytes(parts[0])[:10])
        raise OSError("disk full")

    real = storage.write_parts
    storage.write_parts = exploding
    try:
        with pytest.raises(OSError):
            wft.save(make_adapter(), path)
    finally:
        storage.write_parts = real
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path)) == ["keep.safetensors"]


def test_layers_keep_their_own_wavelet_and_use_idwt_in_format_2(tmp_path):
    """Per-layer wavelet/use_idwt tensors (FORMAT.md, format 2), written only when layers differ: a reader that
    knows only format 1 refuses such a file instead of applying those layers with the file's wavelet."""
    a = make_adapter()
    assert fileformat.to_tensors_and_metadata(a)[1]["waveft.format_version"] == "1"  # uniform: still v1
    a.layers["diffusion_model.other"] = random_layer((32, 48), 10, "db4", use_idwt=False)
    a.layers["diffusion_model.third"] = random_layer((20, 9), 12, "sym3")
    path = wft.save(a, tmp_path / "x.safetensors")
    back = wft.load(path)
    assert back.metadata["waveft.format_version"] == "2"
    for name, layer in a.layers.items():
        got = back.layers[name]
        assert (got.wavelet, got.use_idwt) == (layer.wavelet, layer.use_idwt), name
        want = reference_delta(
            layer.indices, layer.spectrum.double(), layer.shape, layer.wavelet, layer.scaling, layer.use_idwt
        )
        assert float((got.delta(torch.float64) - torch.as_tensor(want)).abs().max()) < 1e-10, name


def test_layers_sharing_one_positions_tensor_can_be_saved(tmp_path):
    from waveft_core.convert.peft_io import peft_positions

    shared = peft_positions((16, 16), 20, 777)  # equal-size layers get the very same tensor
    layers = {f"m{i}": wft.Layer(spectrum=torch.randn(20), indices=shared, shape=(16, 16)) for i in range(3)}
    path = wft.save(wft.Adapter(layers=layers), tmp_path / "shared.safetensors")
    back = wft.load(path)
    assert all(torch.equal(back.layers[n].indices.long(), shared.long()) for n in layers)
