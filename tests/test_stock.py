"""FORMAT.md extension 4: the layers ComfyUI's own Train LoRA node trains and saves with algorithm "WaveFT"
(waveft_core/hosts/stock.py), without a host: the same math as Train WaveFT, a layout that survives every float dtype
the node casts to, and files every reader (and `waveft info`) takes, or refuses naming the key."""

import subprocess
import sys

import pytest
import torch
from reference import ROOT, reference_delta
from safetensors.torch import save_file

import waveft_core as wft
from waveft_core.convert.peft_io import peft_positions
from waveft_core.files import fileformat
from waveft_core.hosts.stock import StockTrainable, as_native, coefficient_count, decode_layout, stock_layer
from waveft_core.training.trainable import TrainableLayer


def trained(shape, rank, seed=0):
    layer = StockTrainable.create(torch.zeros(shape), rank)
    with torch.no_grad():
        layer.spectrum.copy_(torch.randn(layer.spectrum.shape, generator=torch.Generator().manual_seed(seed)) * 0.01)
    return layer


def stock_dict(layers: dict, dtype=torch.bfloat16) -> dict:
    """What Save LoRA Weights writes: `<module>.<parameter>` in lora_dtype, plus the node's bias diffs."""
    out = {}
    for name, layer in layers.items():
        for pname, p in layer.to(dtype).named_parameters():
            out[f"{name}.{pname}"] = p.detach().clone()
        out[f"{name}.diff_b"] = torch.full((layer.shape[0],), 0.5, dtype=dtype)
    return out


def test_coefficients_are_a_lora_ranks_parameter_count_capped_at_the_weight():
    assert coefficient_count((320, 768), 4) == 4 * (320 + 768)
    assert coefficient_count((320, 320, 3, 3), 1) == 320 + 2880  # a conv is its out x in*kh*kw matrix
    assert coefficient_count((8, 4), 16) == 32


@pytest.mark.parametrize("shape", [(24, 40), (16, 6, 3, 3)])
def test_same_math_as_train_waveft(shape):
    """Positions, ΔW and its gradient are Train WaveFT's for db1, scaling 25, seed 777 (and PyWavelets')."""
    stock = trained(shape, 2)
    p = stock.spectrum.numel()
    native = TrainableLayer(shape, p, "db1", 25.0, 777, spectrum=stock.spectrum.detach())
    assert torch.equal(stock.indices, native.indices) and torch.equal(stock.indices, peft_positions(shape, p, 777))
    w = torch.randn(shape, dtype=torch.float64)
    torch.testing.assert_close(
        stock(w) - w,
        torch.from_numpy(
            reference_delta(stock.indices.numpy(), stock.spectrum.detach().double().numpy(), shape, "db1", 25.0)
        ),
        rtol=1e-12,
        atol=1e-12,
    )
    w32 = w.float()
    assert torch.equal(stock(w32), native(w32))
    stock(w32).square().sum().backward()
    native(w32).square().sum().backward()
    assert torch.equal(stock.spectrum.grad, native.spectrum.grad)
    assert stock.waveft_layout.grad is None  # the optimizers of the stock node skip it


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_layout_survives_the_casts_of_the_stock_node(dtype):
    shape = (1280, 1280, 3, 3)  # 14.7 million entries: every digit used
    layer = StockTrainable((1280, 1280, 3, 3), 3, spectrum=torch.ones(3))
    cast = layer.to(dtype).waveft_layout.detach()
    assert cast.dtype == dtype
    got_shape, checksum = decode_layout(cast, "x.waveft_layout")
    assert got_shape == shape and checksum == int((layer.indices.long() * torch.arange(1, 4)).sum() % 2**32)


def test_a_saved_file_reads_as_a_native_adapter_and_info_describes_it(tmp_path):
    layers = {"diffusion_model.a.to_q": trained((24, 40), 1, 1), "diffusion_model.b.conv": trained((16, 6, 3, 3), 1, 2)}
    tensors = stock_dict(layers)
    path = tmp_path / "stock_4_steps_00001_.safetensors"
    save_file(tensors, str(path))
    adapter = wft.load(path)
    assert set(adapter.layers) == set(layers)
    for name, layer in adapter.layers.items():
        assert (layer.wavelet, layer.scaling, layer.use_idwt) == ("db1", 25.0, True)
        assert torch.equal(layer.indices, layers[name].indices)
        assert torch.equal(layer.spectrum, tensors[f"{name}.spectrum"])  # as stored (bf16), applied as stored
    assert torch.equal(adapter.extra_tensors["diffusion_model.a.to_q.diff_b"], tensors["diffusion_model.a.to_q.diff_b"])
    r = subprocess.run(
        [sys.executable, "-m", "waveft_core", "info", str(path), "--layers"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert r.returncode == 0, r.stderr
    for words in (
        "layers: 2",
        f"parameters: {24 + 40 + 16 + 54}",
        "wavelet: db1",
        "scaling: 25",
        "Train LoRA node, algorithm WaveFT",
        "2 full diffs of biases and norms",
        "[16, 6, 3, 3]",
    ):
        assert words in r.stdout, (words, r.stdout)
    # and re-saved natively it keeps its positions (and the diffs, as extra tensors)
    again = wft.load(wft.save(adapter, tmp_path / "native.safetensors"))
    assert torch.equal(again.layers["diffusion_model.b.conv"].indices, layers["diffusion_model.b.conv"].indices)


def test_damaged_stock_files_are_refused_naming_the_key(tmp_path):
    tensors = stock_dict({"m.q": trained((24, 40), 1)})
    no_spectrum = {k: v for k, v in tensors.items() if not k.endswith(".spectrum")}
    with pytest.raises(wft.WaveFTFileError, match=r"f\.safetensors, key 'm\.q\.spectrum': missing"):
        as_native(no_spectrum, {}, "f.safetensors")
    bad = dict(tensors)
    bad["m.q.waveft_layout"] = tensors["m.q.waveft_layout"].float() + 0.5
    with pytest.raises(wft.WaveFTFileError, match=r"key 'm\.q\.waveft_layout'.*small whole numbers"):
        stock_layer("m.q", bad, "f.safetensors")
    newer = dict(tensors)
    newer["m.q.waveft_layout"] = tensors["m.q.waveft_layout"].clone()
    newer["m.q.waveft_layout"][1] = 2
    with pytest.raises(wft.WaveFTFileError, match="Update ComfyUI-WaveFT"):
        stock_layer("m.q", newer, "f.safetensors")
    nan = dict(tensors)
    nan["m.q.spectrum"] = tensors["m.q.spectrum"].clone()
    nan["m.q.spectrum"][0] = float("nan")
    with pytest.raises(wft.WaveFTFileError, match="NaN"):
        fileformat.adapter_from_tensors(nan, {}, "f.safetensors")


def test_only_layers_that_follow_the_rule_can_be_continued_by_the_stock_node():
    own = wft.Layer(spectrum=torch.ones(5), indices=torch.arange(5, dtype=torch.int32), shape=(8, 8))
    with pytest.raises(ValueError, match="resume_from"):
        StockTrainable.from_layer(own)
    ruled = wft.Layer(spectrum=torch.ones(5), indices=peft_positions((8, 8), 5, 777), shape=(8, 8))
    assert torch.equal(StockTrainable.from_layer(ruled).spectrum.detach(), torch.ones(5))
