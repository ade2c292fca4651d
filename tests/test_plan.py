"""The rules every host shares: what kind of file a path is (files/kinds.kind_of), a long list in a message
(files/printable.short_list) and the patch plan (hosts/plan.py)."""

import json

import pytest
import torch
from safetensors.torch import save_file

import waveft_core as wft
from waveft_core.files import (
    KOHYA,
    NATIVE,
    SPECTRA,
    WaveFTFileError,
    is_waveft_file,
    kind_of,
    short_list,
    stores_positions,
)
from waveft_core.hosts import PatchPlan, plan_patches


def test_short_list_keeps_every_form_of_the_messages():
    names = [f"l{i}" for i in range(7)]
    assert short_list(names, 5) == "l0, l1, l2, l3, l4 and 2 more"
    assert short_list(names, 7) == short_list(names, 9) == "l0, l1, l2, l3, l4, l5, l6"
    assert short_list(names, 3, "; ") == "l0; l1; l2 and 4 more"
    assert short_list(names, 5, "; ", " (and {n} more)") == "l0; l1; l2; l3; l4 (and 2 more)"
    assert short_list(names, 6, more=", and {n} more") == "l0, l1, l2, l3, l4, l5, and 1 more"
    assert short_list(names, 6, more=" ...") == "l0, l1, l2, l3, l4, l5 ..."
    assert short_list((n for n in names[:2]), 3) == "l0, l1"  # any iterable
    assert short_list([], 3) == ""


def test_kind_of_reads_the_header_only(tmp_path):
    layer = wft.Layer(spectrum=torch.ones(4), indices=torch.tensor([0, 3, 5, 9]), shape=(4, 4))
    native = wft.save(wft.Adapter(layers={"diffusion_model.a": layer}), tmp_path / "native.safetensors")
    spectra = tmp_path / "pytorch_lora_weights.safetensors"
    save_file({"unet.a.waveft_spectrum": torch.ones(4)}, str(spectra))
    kohya = tmp_path / "kohya.safetensors"
    save_file(
        {"lora_unet_a.waveft_spectrum": torch.ones(4), "lora_unet_a.waveft_random_loc_seed": torch.ones(1)}, kohya
    )
    lora = tmp_path / "lora.safetensors"
    save_file({"lora_unet_a.lora_up.weight": torch.ones(4, 1)}, str(lora))
    damaged = tmp_path / "damaged.safetensors"
    damaged.write_bytes(b"\xff" * 16)
    folder = tmp_path / "peft"
    folder.mkdir()
    (folder / "adapter_config.json").write_text(json.dumps({"peft_type": "WAVEFT"}))

    assert kind_of(native) == NATIVE and stores_positions(native)
    assert kind_of(spectra) == SPECTRA and not stores_positions(spectra)
    assert kind_of(kohya) == KOHYA and not stores_positions(kohya)  # positions, but no shapes
    assert kind_of(folder) == kind_of(folder / "adapter_config.json") == SPECTRA
    assert kind_of(tmp_path / "missing") == SPECTRA  # the PEFT reader says what is missing
    assert kind_of(lora) == kind_of(damaged) == NATIVE  # the native reader says what is wrong
    assert is_waveft_file(native) and is_waveft_file(spectra) and is_waveft_file(kohya)
    assert not is_waveft_file(lora) and not is_waveft_file(damaged) and not is_waveft_file(folder)


class Shaped:
    def __init__(self, shape):
        self.shape = shape


def test_plan_places_skips_and_words_the_lines():
    layers = {"a": Shaped((4, 4)), "b": Shaped((4, 8)), "c": Shaped((2, 2)), "d": Shaped((4, 4)), "e": Shaped((1,))}
    weights = {"a": (4, 4), "b": (4, 8), "d": (4, 4)}

    def place(name, layer):
        if name not in weights:
            return None, "no such layer"
        return ("w", name), ""

    plan = plan_patches(layers, place, "x.safetensors", "sdxl")
    assert list(plan.targets) == ["a", "b", "d"] and plan.skipped == ["c: no such layer", "e: no such layer"]
    assert plan.not_applied_line("x") == "x: 2 of 5 layers not applied: c: no such layer; e: no such layer"
    assert plan.not_applied_note() == "; 2 not applied: c: no such layer; e: no such layer"
    assert not plan.none_fit

    nothing = plan_patches(layers, lambda name, layer: (None, "no"), "x.safetensors")
    assert nothing.none_fit and not nothing.targets
    assert nothing.none_fit_line("x") == (
        "x: none of its 5 layers fit the loaded model (the file is for an unknown base model): "
        "a: no; b: no; c: no and 2 more"
    )


def test_plan_refuses_two_layers_on_one_weight():
    layers = {"native.a": Shaped((4, 4)), "lora_unet_a": Shaped((4, 4))}
    with pytest.raises(WaveFTFileError, match=r"x\.safetensors: the layers 'native\.a' and 'lora_unet_a' both adapt"):
        plan_patches(
            layers, lambda name, layer: ({"key": "a.weight"}, ""), "x.safetensors", weight_of=lambda t: t["key"]
        )


def test_comfyui_lines():
    plan = PatchPlan(total=3, base_model="sd15", targets={"a": 1, "b": 2}, skipped=["c"])
    assert plan.refusal("f", "SDXL") is None
    assert plan.summary("f", 1, 1, "3 layers renamed", 0) == (
        "f: 2 of 3 layers matched (1 model, 1 text encoder); read as: 3 layers renamed; "
        "1 did not match (names in the log)"
    )
    assert plan.summary("f", 1, 1, unused_clip=1).endswith("; 1 text-encoder layers unused (no CLIP connected)")
    assert PatchPlan(total=2).refusal("f", "SDXL") == (
        "f: none of its 2 layers match this model. The file was made for an unknown base model; the model is SDXL. "
        "Pick the adapter made for this model."
    )
    wrong = PatchPlan(total=2, base_model="sd15", targets={"a": 1}, wrong_shape=[("b", (4, 4), (8, 8))])
    assert wrong.refusal("f", "SDXL").startswith("f: 1 layer(s) have another shape than the model's weights, e.g. b:")
    assert (
        wrong.match_lines("SDXL")
        == "\nmatches this model (SDXL): 1 of 2 layers\nwrong shape: 1 (e.g. b: [4, 4] vs [8, 8])"
    )
