"""Parity with the real `peft` package (FORMAT.md section 2): ΔW, positions, import and export."""

import json

import pytest
import torch
from reference import reference_delta, rel_err

import waveft_core as wft
from waveft_core.convert.peft_io import peft_positions

peft = pytest.importorskip("peft", reason="the real PEFT package is the reference; pip install peft")
from peft import PeftModel, WaveFTConfig, get_peft_model  # noqa: E402


class Net(torch.nn.Module):
    """Odd and non-square layers, named like a diffusers UNet and a plain model."""

    def __init__(self):
        super().__init__()
        self.proj_a = torch.nn.Linear(37, 23)  # odd both ways
        self.proj_b = torch.nn.Linear(64, 48)  # non-square
        self.proj_c = torch.nn.Linear(31, 31)


def peft_model(wavelet="db1", use_idwt=True, n=120, seed=777, pattern=None, scaling=3.0):
    torch.manual_seed(0)
    base = Net()
    state = {k: v.clone() for k, v in base.state_dict().items()}
    cfg = WaveFTConfig(
        n_frequency=n,
        target_modules=["proj_a", "proj_b", "proj_c"],
        wavelet_family=wavelet,
        scaling=scaling,
        init_weights=False,
        use_idwt=use_idwt,
        random_loc_seed=seed,
        n_frequency_pattern=pattern or {},
    )
    model = get_peft_model(base, cfg)
    with torch.no_grad():  # make the spectra clearly non-trivial
        for name, p in model.named_parameters():
            if "waveft_spectrum" in name:
                p.copy_(torch.randn(p.shape))
    return model, state


def peft_delta(model, name):
    return getattr(model.base_model.model, name).get_delta_weight("default").detach().double()


@pytest.mark.parametrize("wavelet", ["db1", "db2", "db4", "sym4", "coif1"])
def test_delta_matches_peft(tmp_path, wavelet):
    model, state = peft_model(wavelet)
    model.save_pretrained(tmp_path)
    ad = wft.load(tmp_path, base=state)
    assert set(ad.layers) == {"proj_a", "proj_b", "proj_c"}
    for name in ad.layers:
        assert rel_err(ad.layers[name].delta(torch.float64), peft_delta(model, name)) < 1e-6, name


def test_use_idwt_false_matches_peft(tmp_path):
    model, state = peft_model("db4", use_idwt=False)
    model.save_pretrained(tmp_path)
    ad = wft.load(tmp_path, base=state)
    for name in ad.layers:
        assert rel_err(ad.layers[name].delta(torch.float64), peft_delta(model, name)) < 1e-6


def test_positions_are_peft_positions():
    model, _ = peft_model("db2", seed=1234)
    layer = model.base_model.model.proj_b
    rows, cols = layer.waveft_indices["default"]
    assert torch.equal(rows * 64 + cols, peft_positions((48, 64), 120, 1234).long())
    # drawn in int32 to save memory: the same permutation as PEFT's int64 draw, also for large layers
    for size, seed in ((1280 * 2048, 777), (320 * 2880, 5)):
        g = torch.Generator().manual_seed(seed)
        assert torch.equal(torch.randperm(size, generator=g)[:2592], peft_positions((size, 1), 2592, seed).long())


@pytest.mark.parametrize("wavelet", ["coif4", "coif5"])
def test_where_peft_filters_are_wrong_we_follow_pywavelets(tmp_path, wavelet):
    model, state = peft_model(wavelet)
    model.save_pretrained(tmp_path)
    ad = wft.load(tmp_path, base=state)
    layer = ad.layers["proj_b"]
    ref = reference_delta(layer.indices, layer.spectrum.double(), layer.shape, wavelet, layer.scaling)
    assert rel_err(layer.delta(torch.float64), ref) < 1e-12
    theirs = peft_delta(model, "proj_b")  # PEFT's bundled coefficients differ (coif5: even the crop breaks)
    assert theirs.shape != ref.shape or rel_err(theirs, ref) > 1e-3


def test_n_frequency_pattern_and_round_trip_through_peft(tmp_path):
    model, state = peft_model("db2", pattern={"proj_c": 77})
    src = tmp_path / "src"
    model.save_pretrained(src)
    ad = wft.load(src, base=state)
    assert ad.layers["proj_c"].n_coefficients == 77
    native = wft.save(ad, tmp_path / "native.safetensors")
    back = wft.load(native)
    out = tmp_path / "out"
    wft.save_peft(back, out)
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "WAVEFT" and cfg["n_frequency_pattern"] == {"proj_c": 77}

    torch.manual_seed(0)
    fresh = Net()
    fresh.load_state_dict(state)
    reloaded = PeftModel.from_pretrained(fresh, out)
    merged_back = reloaded.merge_and_unload().state_dict()
    merged_orig = model.merge_and_unload().state_dict()
    for k in merged_orig:
        assert torch.equal(merged_back[k], merged_orig[k]), k


def test_export_refuses_positions_peft_cannot_reproduce(tmp_path):
    layer = wft.Layer(spectrum=torch.ones(5), indices=torch.tensor([0, 1, 2, 3, 4]), shape=(8, 8), wavelet="db1")
    with pytest.raises(ValueError, match="not the ones PEFT draws"):
        wft.save_peft(wft.Adapter(layers={"x": layer}), tmp_path / "o")
    assert not (tmp_path / "o" / "adapter_config.json").exists()


def test_import_needs_a_base_and_names_missing_layers(tmp_path):
    model, state = peft_model()
    model.save_pretrained(tmp_path)
    with pytest.raises(wft.WaveFTFileError, match="stores no coefficient positions"):
        wft.load(tmp_path)
    del state["proj_b.weight"]
    with pytest.raises(wft.WaveFTFileError, match="proj_b"):
        wft.load(tmp_path, base=state)


def test_diffusers_unet_names_become_native(tmp_path):
    """A PEFT adapter on diffusers UNet names imports with ComfyUI-native names and shapes from a
    single-file checkpoint (model.diffusion_model.* keys)."""

    class Block(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.to_q = torch.nn.Linear(40, 40)

    class Unet(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.down_blocks = torch.nn.ModuleList([torch.nn.Module(), torch.nn.Module()])
            attn = torch.nn.ModuleList([torch.nn.Module()])
            tb = torch.nn.ModuleList([torch.nn.Module()])
            tb[0].attn1 = Block()
            attn[0].transformer_blocks = tb
            self.down_blocks[1].attentions = attn

    model = get_peft_model(Unet(), WaveFTConfig(n_frequency=50, target_modules=["to_q"], init_weights=False))
    model.save_pretrained(tmp_path)
    checkpoint_shapes = {"model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight": (40, 40)}
    ad = wft.load(tmp_path, base=checkpoint_shapes)
    assert list(ad.layers) == ["diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q"]
