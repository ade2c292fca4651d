"""A saved file's tensors are serialized once, for its content hashes and its bytes both (files/metadata.py
hashed_file, files/storage.py with_metadata), and the bytes are the ones safetensors itself writes for the same
tensors and metadata. safetensors orders the metadata as a hash map does (differently from one call to the
next), so whole files are compared as length, tensor data and parsed header; the header text is compared byte for
byte where only one metadata entry leaves no order to differ."""

import hashlib
import json

import manager_readers as readers
import pytest
import safetensors.torch as st
import torch

import waveft_core as wft
from waveft_core.convert import lora
from waveft_core.convert.peft_io import peft_positions
from waveft_core.files import fileformat, storage

BIG = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q"
SMALL = "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj"
AWKWARD = 'quote " backslash \\ newline \n tab \t nul \x00 bell \x07 del \x7f é 日本 \u2028 \U0001f600 </script>'


def adapter(**meta):
    g = torch.Generator().manual_seed(1)
    layers = {}
    # past 0x110000 bytes, so the legacy hash reads tensor data
    for name, shape, n in ((BIG, (640, 640), 300_000), (SMALL, (32, 32), 100)):
        layers[name] = wft.Layer(
            spectrum=torch.randn(n, generator=g), indices=peft_positions(shape, n, 777), shape=shape, wavelet="db1"
        )
    return wft.Adapter(layers=layers, metadata={"ss_base_model_version": "sd_1.5", **meta})


def split(data: bytes):
    length = int.from_bytes(data[:8], "little")
    return length, data[8 : 8 + length], data[8 + length :]


def assert_same_file(ours: bytes, reference: bytes):
    length, header, tensors = split(ours)
    ref_length, ref_header, ref_tensors = split(reference)
    assert length == ref_length and length % 8 == 0 and header.rstrip(b" ").endswith(b"}")
    assert tensors == ref_tensors
    ours_json, ref_json = json.loads(header), json.loads(ref_header)
    assert ours_json == ref_json
    assert list(ours_json) == list(ref_json)  # '__metadata__' first, then the tensors in their data order
    assert sorted(header) == sorted(ref_header)  # the same escapes, in whatever order the metadata comes


@pytest.mark.parametrize(
    "metadata",
    [{"k": AWKWARD}, {AWKWARD: "v"}, {}, {"ss_base_model_version": "sd_1.5"}],
    ids=["awkward-value", "awkward-key", "empty", "plain"],
)
def test_replacing_the_metadata_gives_the_bytes_safetensors_writes(metadata):
    tensors = {
        "b.weight": torch.randn(3, 5),
        "a.idx": torch.arange(7, dtype=torch.int32),
        "z.flag": torch.tensor(1, dtype=torch.uint8),
        "é.日本": torch.zeros(2, dtype=torch.bfloat16),
    }
    serialized = st.save(tensors, {"ss_other": "x" * 13})  # another header length: the padding must follow
    head, data = storage.with_metadata(serialized, metadata)
    assert head + bytes(data) == st.save(tensors, metadata)


def test_a_native_file_is_the_file_safetensors_writes_from_one_serialization(tmp_path, monkeypatch):
    ad = adapter(**{"modelspec.title": AWKWARD, "modelspec.description": "two\nlines"})
    tensors, metadata = fileformat.to_tensors_and_metadata(ad)  # the tensors and metadata as before
    reference = st.save(tensors, metadata)

    calls = []
    real_save = st.save
    monkeypatch.setattr(st, "save", lambda *a, **k: calls.append("save") or real_save(*a, **k))
    monkeypatch.setattr(st, "save_file", lambda *a, **k: calls.append("save_file") or pytest.fail("second copy"))
    path = wft.save(ad, tmp_path / "a.safetensors")
    assert calls == ["save"]

    data = path.read_bytes()
    assert_same_file(data, reference)
    md = readers.metadata(path)
    assert md == metadata
    # the hashes name these bytes, computed independently of metadata.py
    assert md["sshs_model_hash"] == hashlib.sha256(split(data)[2]).hexdigest() == readers.addnet_hash(path)
    assert md["modelspec.hash_sha256"] == "0x" + md["sshs_model_hash"]
    kohya_view = real_save(tensors, {k: v for k, v in metadata.items() if k.startswith("ss_")})
    assert md["sshs_legacy_hash"] == hashlib.sha256(kohya_view[0x100000:0x110000]).hexdigest()[:8]
    assert md["sshs_legacy_hash"] == readers.kohya_legacy_hash(path)
    assert wft.load(path).layers[BIG].spectrum.equal(ad.layers[BIG].spectrum)


def test_a_lora_export_is_written_from_one_serialization(tmp_path, monkeypatch):
    tensors, metadata, _ = lora.to_lora(adapter(**{"modelspec.title": AWKWARD}), rank=4)
    calls = []
    real_save = st.save
    monkeypatch.setattr(st, "save", lambda *a, **k: calls.append("save") or real_save(*a, **k))
    monkeypatch.setattr(st, "save_file", lambda *a, **k: pytest.fail("a second serialization"))
    path = lora.save_lora(tensors, metadata, tmp_path / "l.safetensors")
    assert calls == ["save"]
    md = readers.metadata(path)
    assert md["sshs_model_hash"] == readers.addnet_hash(path)
    assert md["sshs_legacy_hash"] == readers.kohya_legacy_hash(path)
    data = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    assert_same_file(path.read_bytes(), real_save(data, md))
