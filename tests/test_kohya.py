"""Kohya-style WaveFT files from another trainer (lora-scripts-next's networks.waveft_anima): read exactly,
16-bit saves recovered only when every stored index is reproduced, damage refused by name, and the command
line. The files are fixtures saved by their own module (tests/fixtures/kohya/README.md)."""

import subprocess
import sys

import pytest
import torch
from reference import ROOT, reference_delta
from safetensors.torch import load_file, save_file

import waveft_core as wft
from waveft_core.files import fileformat, kinds, kohya
from waveft_core.files.fileformat import read_tensors_and_metadata

FIX = ROOT / "tests" / "fixtures" / "kohya"
SAME_DRAW = ["kohya_anima_fp32", "kohya_anima_fp16", "kohya_anima_bf16"]  # one seed, one spectrum draw


def _base():
    return load_file(str(FIX / "kohya_anima_base.safetensors"))


def _weight_key(name):
    """Their stored name -> the base file's key (unet./te. + module path)."""
    base = _base()
    head, part = ("lora_unet_", "unet.") if name.startswith("lora_unet_") else ("lora_te_", "te.")
    return next(
        k for k in base if k.startswith(part) and k[len(part) : -len(".weight")].replace(".", "_") == name[len(head) :]
    )


def _read(stem, metadata=True):
    tensors, md = read_tensors_and_metadata(FIX / f"{stem}.safetensors")
    return kohya.read(tensors, md if metadata else {}, FIX / f"{stem}.safetensors")


def _adapter(stem, metadata=True):
    base = _base()
    return kohya.to_adapter(_read(stem, metadata), lambda name: tuple(base[_weight_key(name)].shape))


def test_kinds_tell_the_layouts_apart(tmp_path):
    tensors, md = read_tensors_and_metadata(FIX / "kohya_anima_fp32.safetensors")
    assert kinds.file_kind(tensors, md) == kinds.KOHYA
    converted, md2 = read_tensors_and_metadata(FIX / "kohya_anima_fp32_comfy.safetensors")
    assert kinds.file_kind(converted, md2) == kinds.KOHYA
    assert kinds.file_kind(["a.waveft_spectrum", "a.waveft_indices", "a.waveft_shape"], {}) == kinds.NATIVE
    assert kinds.file_kind(["base_model.model.a.waveft_spectrum"], {}) == kinds.SPECTRA
    assert kinds.file_kind(["lora_unet_a.lora_up.weight", "lora_unet_a.lora_down.weight"], {}) == kinds.LORA
    assert kinds.is_waveft(tensors, md) and not kinds.is_waveft(["lora_unet_a.lora_up.weight"], {})


@pytest.mark.parametrize(
    "stem", ["kohya_anima_fp32", "kohya_anima_fp32_noidwt", "kohya_anima_fp16", "kohya_anima_bf16"]
)
def test_their_files_equal_the_float64_reference_at_their_exact_positions(stem):
    """Positions from their float32 save (exact there); fp16/bf16 saves must come back to the same ones."""
    exact = load_file(
        str(FIX / (("kohya_anima_fp32_noidwt" if "noidwt" in stem else "kohya_anima_fp32") + ".safetensors"))
    )
    stored = load_file(str(FIX / f"{stem}.safetensors"))
    ad = _adapter(stem)
    assert len(ad.layers) == 17  # 10 DiT + 7 text-encoder (lora_te_) layers
    for name, layer in ad.layers.items():
        rows, cols = exact[f"{name}.waveft_indices"].to(torch.int64)
        n = layer.matrix_shape[1]
        assert torch.equal(layer.indices.to(torch.int64), rows * n + cols), name
        want = reference_delta(
            rows * n + cols,
            stored[f"{name}.waveft_spectrum"].double(),
            layer.shape,
            "db1",
            float(stored[f"{name}.waveft_scaling"]),
            bool(stored[f"{name}.waveft_use_idwt"]),
        )
        assert float((layer.delta(torch.float64) - torch.as_tensor(want)).abs().max()) < 1e-12, name
        assert layer.use_idwt == ("noidwt" not in stem)


@pytest.mark.parametrize("stem", ["kohya_anima_fp32", "kohya_anima_fp32_noidwt"])
def test_float_saves_match_their_own_merge(stem):
    base, theirs = _base(), load_file(str(FIX / f"{stem}.their_merge.safetensors"))
    for name, layer in _adapter(stem).layers.items():
        key = _weight_key(name)
        ours = base[key].double() + layer.delta(torch.float64)
        assert float((ours - theirs[key].double()).abs().max()) < 1e-6, name


def test_16_bit_saves_really_lost_positions_and_are_recovered_with_a_note():
    fp32 = load_file(str(FIX / "kohya_anima_fp32.safetensors"))
    base = _base()
    for stem in ("kohya_anima_fp16", "kohya_anima_bf16"):
        stored = load_file(str(FIX / f"{stem}.safetensors"))
        moved = sum(
            int((stored[k].to(torch.int64) != fp32[k].to(torch.int64)).any(0).sum())
            for k in stored
            if k.endswith("waveft_indices")
        )
        assert moved > 5, stem  # the fixture shows the damage: their own merge of it is wrong
        theirs = load_file(str(FIX / f"{stem}.their_merge.safetensors"))
        ad = _adapter(stem)
        key = _weight_key("lora_unet_blocks_0_mlp_layer1")
        ours = base[key].double() + ad.layers["lora_unet_blocks_0_mlp_layer1"].delta(torch.float64)
        assert float((ours - theirs[key].double()).abs().max()) > 1e-3
        notes = ad.metadata["waveft.import_notes"]
        assert "kohya-style WaveFT file from another trainer" in notes and "recovered from seed 777" in notes
    assert (
        float(
            load_file(str(FIX / "kohya_anima_bf16.safetensors"))["lora_unet_blocks_0_mlp_layer1.waveft_random_loc_seed"]
        )
        == 776.0
    )  # bf16 rounded the seed


def test_bf16_recovers_without_metadata_from_the_rounded_seed():
    """The stock loader gets no metadata: the seeds that round to the stored 776 are tried; only 777 reproduces."""
    fp32 = _adapter("kohya_anima_fp32")
    ad = _adapter("kohya_anima_bf16", metadata=False)
    for name, layer in ad.layers.items():
        assert torch.equal(layer.indices.to(torch.int64), fp32.layers[name].indices.to(torch.int64))


def _edited(tmp_path, stem, edit, metadata=None):
    t = load_file(str(FIX / f"{stem}.safetensors"))
    edit(t)
    path = tmp_path / "edited.safetensors"
    save_file(t, str(path), metadata=metadata)
    tensors, md = read_tensors_and_metadata(path)
    base = _base()
    return lambda: kohya.to_adapter(kohya.read(tensors, md, path), lambda name: tuple(base[_weight_key(name)].shape))


def test_rounded_positions_no_seed_reproduces_are_refused(tmp_path):
    key = "lora_unet_blocks_0_mlp_layer1.waveft_indices"

    def edit(t):
        rows = t[key][0]
        i = int(torch.nonzero(rows >= 2048)[0])
        t[key] = t[key].clone()
        t[key][0, i] = 4000.0 if float(rows[i]) != 4000.0 else 4002.0

    with pytest.raises(wft.WaveFTFileError) as e:
        _edited(tmp_path, "kohya_anima_fp16", edit)()
    msg = str(e.value)
    assert "edited.safetensors" in msg and "save_precision fp16: positions lost" in msg and key in msg
    assert "save_precision float" in msg


@pytest.mark.parametrize(
    "edit,words",
    [
        (
            lambda t: t.__setitem__("lora_unet_blocks_0_self_attn_q_proj.waveft_family_code", torch.tensor(2.0)),
            "family code 2",
        ),
        (
            lambda t: t.__setitem__(
                "lora_unet_blocks_0_self_attn_q_proj.waveft_indices",
                torch.tensor([[6.0] + [0.0] * 29, list(range(30))], dtype=torch.float32) % 6,
            ),
            "appears more than once",
        ),
        (
            lambda t: t.__setitem__(
                "lora_unet_blocks_0_cross_attn_k_proj.waveft_indices",
                torch.stack((torch.arange(30.0) // 5, torch.arange(30.0) % 5 + 3)),
            ),
            "column 7 is outside the weight's 7 columns",
        ),
        (lambda t: t.pop("lora_unet_blocks_0_self_attn_q_proj.waveft_use_idwt"), "missing"),
        (lambda t: t.__setitem__("lora_unet_blocks_0_self_attn_q_proj.waveft_spectrum", torch.zeros(29)), "[2, 29]"),
    ],
)
def test_damage_is_refused_by_name(tmp_path, edit, words):
    with pytest.raises(wft.WaveFTFileError) as e:
        _edited(tmp_path, "kohya_anima_fp32", edit)()
    assert words in str(e.value) and "edited.safetensors" in str(e.value)


def test_rows_past_the_weight_are_refused_separately(tmp_path):
    """(row, col) = (6, 0) on a 6x6 weight: a flat row*n+col would wrap it into range; the row check refuses it."""

    def edit(t):
        t["lora_unet_blocks_0_self_attn_q_proj.waveft_indices"] = torch.stack(
            (
                torch.tensor([6.0] + [float(i // 6) for i in range(1, 30)]),
                torch.tensor([0.0] + [float(i % 6) for i in range(1, 30)]),
            )
        )

    with pytest.raises(wft.WaveFTFileError) as e:
        _edited(tmp_path, "kohya_anima_fp32", edit)()
    assert "row 6 is outside the weight's 6 rows" in str(e.value)


def test_the_native_reader_names_the_layout_instead_of_calling_it_damaged():
    with pytest.raises(wft.WaveFTFileError) as e:
        fileformat.read(FIX / "kohya_anima_fp32.safetensors")
    assert "kohya-style WaveFT file from another trainer" in str(e.value) and "damaged" not in str(e.value)


def cli(*args):
    return subprocess.run(
        [sys.executable, "-m", "waveft_core", *map(str, args)], capture_output=True, text=True, cwd=ROOT
    )


def _anima_base(tmp_path):
    """A checkpoint with Anima's own key spelling (`net.` DiT, `text_encoders.qwen3_06b…` encoder)."""
    out = {}
    for k, v in _base().items():
        out[
            ("net." + k[len("unet.") :])
            if k.startswith("unet.")
            else ("text_encoders.qwen3_06b.transformer.model." + k[len("te.") :])
        ] = v
    path = tmp_path / "anima.safetensors"
    save_file(out, str(path))
    return path


def test_cli_info_describes_and_convert_writes_a_native_file(tmp_path):
    r = cli("info", FIX / "kohya_anima_bf16.safetensors")
    assert r.returncode == 0, r.stderr
    for words in ("kohya-style WaveFT file from another trainer", "layers: 17", "bf16", "seed: 777"):
        assert words in r.stdout
    base = _anima_base(tmp_path)
    for stem in ("kohya_anima_bf16", "kohya_anima_fp32_comfy"):
        out = tmp_path / f"{stem}.native.safetensors"
        r = cli("convert", FIX / f"{stem}.safetensors", out, "--base", base)
        assert r.returncode == 0, r.stderr
        native = fileformat.read(out)
        fp32 = _adapter("kohya_anima_fp32")
        assert len(native.layers) == 17
        for name, layer in fp32.layers.items():
            module = _weight_key(name)[: -len(".weight")]
            native_name = (
                "diffusion_model." + module[len("unet.") :]
                if module.startswith("unet.")
                else "text_encoders.qwen3_06b.transformer.model." + module[len("te.") :]
            )
            assert torch.equal(native.layers[native_name].indices.to(torch.int64), layer.indices.to(torch.int64))
        assert native.metadata["modelspec.architecture"] == "anima-preview/waveft"


def test_cli_resaves_a_v1_file_without_settings_tensors(tmp_path):
    """The way out the stock loader's refusal names: `convert old new.safetensors` writes the settings tensors."""
    from reference import random_layer

    path = wft.save(wft.Adapter({"diffusion_model.x": random_layer((16, 16), 20, "db2")}), tmp_path / "a.safetensors")
    tensors, md = read_tensors_and_metadata(path)
    save_file({k: v for k, v in tensors.items() if not k.startswith("waveft.")}, str(tmp_path / "old.safetensors"), md)
    r = cli("convert", tmp_path / "old.safetensors", tmp_path / "new.safetensors")
    assert r.returncode == 0, r.stderr
    new, _ = read_tensors_and_metadata(tmp_path / "new.safetensors")
    assert bytes(new["waveft.wavelet"].tolist()) == b"db2"
    assert torch.equal(
        wft.load(tmp_path / "new.safetensors").layers["diffusion_model.x"].delta(),
        wft.load(path).layers["diffusion_model.x"].delta(),
    )


def test_the_webui_extension_says_how_to_use_their_file(tmp_path):
    """A1111/Forge do not run Anima and their loader takes a file only: the message names the kind of file and
    the one command that makes a file they can load."""
    from a1111.common import load_adapter

    with pytest.raises(wft.WaveFTFileError) as e:
        load_adapter(FIX / "kohya_anima_fp32.safetensors")
    msg = str(e.value)
    assert "kohya-style WaveFT file from another trainer" in msg and "waveft_core convert" in msg and "--base" in msg
