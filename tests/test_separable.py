"""The structured bypass (waveft_core/separable.py): x · ΔWᵀ through the synthesis filters and the sparse
coefficients, never forming ΔW, against PyWavelets in float64 (tests/reference.py).

The adapter is driven as ComfyUI's bypass hook drives it: multiplier, is_conv, conv_dim, kernel_size and kw_dict
set on it, the top-level tensors of `weights` (the spectrum) cast to the layer's dtype, and h(x, None) called
without the base output (a trainer upstream does that)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from reference import random_layer, reference_delta, rel_err

import waveft_core.separable as bypass
from waveft_core.hosts.weight_adapter import adapter_class

WaveFTAdapter = adapter_class(object)
# Output rounded once into the dtype (and the spectrum cast to it by the hook): about one rounding of each
TOLERANCE = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 1e-3, torch.bfloat16: 6e-3}


def _hooked(layer, dtype, multiplier, conv=None):
    """The adapter after ComfyUI's BypassForwardHook.inject(): attributes set, top-level tensors cast."""
    adapter = WaveFTAdapter.from_layer(layer)
    spectrum, plan_tensors, kept = adapter.weights
    adapter.weights = (spectrum.to(dtype), plan_tensors, kept)
    adapter.multiplier = multiplier
    adapter.is_conv = conv is not None
    adapter.conv_dim = 2 if conv is not None else 0
    adapter.kernel_size = tuple(layer.shape[2:]) if conv is not None else (1,)
    adapter.kw_dict = dict(conv or {})
    return adapter


def _reference_delta(layer, dtype, multiplier):
    spectrum = layer.spectrum.to(dtype).double()  # what the hook left in the weights
    return torch.from_numpy(
        reference_delta(
            layer.indices, spectrum, layer.shape, layer.wavelet, layer.scaling * multiplier, use_idwt=layer.use_idwt
        )
    )


@pytest.fixture
def spy(monkeypatch):
    """Counts the calls of the structured products (banded, or Haar's pairs), so a test knows which path h() took."""
    calls = []
    for name in ("structured_product", "haar_product"):
        if not hasattr(bypass, name):  # today's main: no structured path to count
            continue

        def counting(*args, _real=getattr(bypass, name), **kwargs):
            calls.append(args[0].shape)
            return _real(*args, **kwargs)

        monkeypatch.setattr(bypass, name, counting)
    return calls


@pytest.fixture
def structured_always(monkeypatch):
    """The exactness tests check the structured math at small sizes, where the op-count model would rightly pick
    the dense path: the choice itself is tested separately."""
    monkeypatch.setattr(bypass, "structured_is_cheaper", lambda *shape: True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("wavelet", ["db1", "db4", "sym8", "coif3", "off"])
@pytest.mark.parametrize("shape", [(97, 61), (64, 130), (33, 9)])
def test_linear_bypass_is_exact_without_forming_delta(shape, wavelet, dtype, spy, structured_always):
    use_idwt = wavelet != "off"
    layer = random_layer(
        shape, min(300, shape[0] * shape[1] // 3), wavelet="db1" if not use_idwt else wavelet, use_idwt=use_idwt, seed=3
    )
    adapter = _hooked(layer, dtype, multiplier=0.7)
    x = torch.randn(3, 70, shape[1], generator=torch.Generator().manual_seed(1)).to(dtype)
    got = adapter.h(x, None)
    assert spy, "h() must take the structured path"
    assert got.dtype == dtype and got.shape == (3, 70, shape[0])
    expect = x.double() @ _reference_delta(layer, dtype, 0.7).t()
    assert rel_err(got, expect) < TOLERANCE[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("wavelet", ["db1", "db4", "sym8"])
@pytest.mark.parametrize(
    "conv",
    [
        {"stride": (1, 1), "padding": (1, 1), "dilation": (1, 1), "groups": 1},
        {"stride": (2, 2), "padding": (0, 2), "dilation": (2, 1), "groups": 1},
    ],
    ids=["s1p1", "s2d2"],
)
def test_conv_bypass_is_exact_without_forming_delta(conv, wavelet, dtype, spy, structured_always):
    shape = (24, 10, 3, 3)  # out 24, in 10: a 24 x 90 matrix
    layer = random_layer(shape, 200, wavelet=wavelet, seed=4)
    adapter = _hooked(layer, dtype, multiplier=1.3, conv=conv)
    x = torch.randn(2, 10, 13, 11, generator=torch.Generator().manual_seed(2)).to(dtype)
    got = adapter.h(x, None)
    assert spy
    expect = F.conv2d(x.double(), _reference_delta(layer, dtype, 1.3), **conv)
    assert got.shape == expect.shape and got.dtype == dtype
    assert rel_err(got, expect) < TOLERANCE[dtype]


def test_small_inputs_take_the_dense_path_and_stay_exact(spy):
    """The choice comes from the shapes: a handful of tokens through a small layer is cheaper with ΔW formed."""
    layer = random_layer((24, 20), 40, wavelet="db4", seed=5)
    adapter = _hooked(layer, torch.float32, multiplier=1.0)
    x = torch.randn(2, 20, generator=torch.Generator().manual_seed(3))
    got = adapter.h(x, torch.zeros(2, 24))
    assert not spy
    assert rel_err(got, x.double() @ _reference_delta(layer, torch.float32, 1.0).t()) < TOLERANCE[torch.float32]


def test_a_real_layer_takes_the_structured_path_through_h(spy):
    """An SDXL-sized attention projection with 2 x 512 tokens: h() picks the structured product by itself."""
    layer = random_layer((640, 640), 1280, wavelet="db4", seed=8)
    adapter = _hooked(layer, torch.bfloat16, multiplier=0.8)
    x = torch.randn(2, 512, 640, generator=torch.Generator().manual_seed(5)).to(torch.bfloat16)
    got = adapter.h(x, None)
    assert spy == [(1024, 640)]
    expect = x.double() @ _reference_delta(layer, torch.bfloat16, 0.8).t()
    assert rel_err(got, expect) < TOLERANCE[torch.bfloat16]


def test_op_count_model_prefers_structured_for_real_layers():
    # SDXL attention, 2x1024 tokens, rank-1-sized adapters: the structured product is far cheaper
    assert bypass.structured_is_cheaper(2048, 1280, 1280, 2560, 8)
    assert bypass.structured_is_cheaper(2048, 5120, 1280, 6400, 2)
    assert bypass.structured_is_cheaper(1, 3072, 12288, 15360, 8)  # one token: building ΔW alone costs more
    assert not bypass.structured_is_cheaper(4, 16, 16, 30, 8)  # tiny: fixed costs dominate


def test_bypass_output_keeps_the_base_output_out_of_it():
    """h() reads neither the base output nor the layer's weight: the same x gives the same h whatever is passed."""
    layer = random_layer((80, 72), 150, wavelet="db4", seed=6)
    adapter = _hooked(layer, torch.float32, multiplier=1.0)
    x = torch.randn(900, 72, generator=torch.Generator().manual_seed(4))
    assert torch.equal(adapter.h(x, None), adapter.h(x, torch.full((900, 80), float("nan"))))


def test_separable_plan_matches_reference_for_every_band_and_edge():
    """Every coefficient position of a small grid at once (all four bands, every clipped edge): the structured
    operator applied to the identity is ΔWᵀ itself."""
    m, n = 13, 11
    for wavelet in ("db1", "db2", "sym5"):
        layer = random_layer((m, n), m * n, wavelet=wavelet, seed=7)
        sep = bypass.separable_plan(layer.plan(), wavelet, dtype=torch.float64)
        got = bypass.structured_product(torch.eye(n, dtype=torch.float64), sep, layer.spectrum.double(), 1.0)
        expect = reference_delta(layer.indices, layer.spectrum.double(), (m, n), wavelet, layer.scaling).T
        np.testing.assert_allclose(got.numpy(), expect / layer.scaling, rtol=0, atol=1e-12)


# --- the per-forward merge into fp16/bf16 weights -------------------------------------------------------------


def _rounded_once(got, weight, delta, dtype):
    """Every entry of `got` is W + ΔW (float64) rounded once into `dtype`: within half a unit in the last place,
    plus float32's own error on the sum."""
    expect = weight.double() + delta
    ulp = {torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}[dtype]
    bound = 0.5 * ulp * expect.abs() + 1e-6 * delta.abs().max() + 1e-30
    return bool(((got.double() - expect).abs() <= bound).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("wavelet", ["db2", "db4", "sym8", "coif3"])
@pytest.mark.parametrize("shape", [(97, 61), (130, 64), (40, 33, 3, 3)])
def test_filtered_merge_rounds_w_plus_delta_once(shape, wavelet, dtype, monkeypatch):
    calls = []
    real = bypass.add_through_filters
    monkeypatch.setattr(bypass, "add_through_filters", lambda *a: calls.append(1) or real(*a))
    monkeypatch.setattr(bypass, "filtered_merge_is_cheaper", lambda *shape: True)
    layer = random_layer(shape, 400, wavelet=wavelet, seed=9)
    adapter = WaveFTAdapter.from_layer(layer)
    weight = torch.randn(shape, generator=torch.Generator().manual_seed(6)).to(dtype)
    before = weight.clone()
    out = adapter.calculate_weight(weight, "k", 0.6, 1.0, None, None)
    assert calls and out is weight  # in place, through the filters
    delta = _reference_delta(layer, torch.float32, 0.6).reshape(shape)
    assert _rounded_once(weight, before, delta, dtype)
    assert not torch.equal(weight, before)


def test_merge_choice_follows_the_shapes():
    # db4 at SDXL's smallest attention projection: sorting 160k patch values costs more than the filters
    assert bypass.filtered_merge_is_cheaper(640, 640, 2560, 8)
    # a Flux MLP weight with a rank-1-sized adapter: the patches cover ~2% of it, the scatter wins
    assert not bypass.filtered_merge_is_cheaper(3072, 12288, 15360, 8)
    assert not bypass.filtered_merge_is_cheaper(640, 640, 2560, 2)  # Haar: lone 2x2 patches, no sorting


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_merge_at_a_real_shape_is_exact(dtype):
    """640 x 640 db4 through the adapter as a low-VRAM forward calls it (no forcing): the result is W + ΔW
    rounded once (bf16 takes the filters, fp32 the direct scatter)."""
    layer = random_layer((640, 640), 2560, wavelet="db4", seed=10)
    adapter = WaveFTAdapter.from_layer(layer)
    weight = torch.randn(640, 640, generator=torch.Generator().manual_seed(7)).to(dtype)
    before = weight.clone()
    adapter.calculate_weight(weight, "k", 1.0, 1.0, None, None)
    delta = _reference_delta(layer, torch.float32, 1.0)
    if dtype == torch.float32:
        assert rel_err(weight.double() - before.double(), delta) < 1e-6
    else:
        assert _rounded_once(weight, before, delta, dtype)


def test_strided_inputs_give_the_same_product(structured_always):
    """x as a transposed view (rows not contiguous): the window views must not read past it."""
    layer = random_layer((48, 64), 200, wavelet="db1", seed=11)
    adapter = _hooked(layer, torch.float32, multiplier=1.0)
    x = torch.randn(64, 300, generator=torch.Generator().manual_seed(8)).t()  # [300, 64], column-major
    expect = x.double() @ _reference_delta(layer, torch.float32, 1.0).t()
    assert rel_err(adapter.h(x, None), expect) < TOLERANCE[torch.float32]


# --- the Haar (db1) bypass: pairs of features and one CSR product ----------------------------------------------


@pytest.mark.parametrize("shape", [(13, 11), (12, 9), (7, 14), (2, 3)])
def test_haar_product_matches_reference_at_every_position(shape):
    """Every coefficient of an odd or even grid at once (all four bands, the cropped last row and the zero-padded
    last column): the Haar product applied to the identity is ΔWᵀ itself, in float64."""
    m, n = shape
    layer = random_layer(shape, m * n, wavelet="db1", seed=12)
    sep = bypass.separable_plan(layer.plan(), "db1", dtype=torch.float64)
    eye = torch.eye(n, dtype=torch.float64)
    got = bypass.haar_product(eye, sep, layer.spectrum.double(), 1.0, torch.float64, torch.float64)
    expect = reference_delta(layer.indices, layer.spectrum.double(), shape, "db1", layer.scaling).T
    np.testing.assert_allclose(got.numpy(), expect / layer.scaling, rtol=0, atol=1e-12)


@pytest.mark.parametrize(
    "wavelet, path", [("db1", "haar_product"), ("db4", "structured_product"), ("off", "structured_product")]
)
def test_only_haar_layers_take_the_pairs_path(wavelet, path, monkeypatch, structured_always):
    """db1 goes through the pairs of features; a longer filter keeps the banded product, and use_idwt false (the
    bare scatter) is untouched by the Haar path."""
    taken = []
    for name in ("haar_product", "structured_product"):
        monkeypatch.setattr(bypass, name, lambda *a, _n=name, _r=getattr(bypass, name): taken.append(_n) or _r(*a))
    use_idwt = wavelet != "off"
    layer = random_layer((30, 22), 90, wavelet=wavelet if use_idwt else "db1", use_idwt=use_idwt, seed=13)
    adapter = _hooked(layer, torch.float32, multiplier=0.9)
    x = torch.randn(140, 22, generator=torch.Generator().manual_seed(9))
    got = adapter.h(x, None)
    assert taken == [path]
    assert rel_err(got, x.double() @ _reference_delta(layer, torch.float32, 0.9).t()) < TOLERANCE[torch.float32]


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_haar_bypass_at_a_real_shape_is_exact(dtype, spy):
    """640 x 2048 (an SDXL MLP-sized projection), rank-1-equivalent p = m + n, 2 x 300 tokens (a partial last pass
    of tokens), no forcing: h() takes the Haar path by itself and stays within one rounding of float64."""
    layer = random_layer((640, 2048), 640 + 2048, wavelet="db1", seed=14)
    adapter = _hooked(layer, dtype, multiplier=1.1)
    x = torch.randn(2, 300, 2048, generator=torch.Generator().manual_seed(10)).to(dtype)
    got = adapter.h(x, None)
    assert spy == [(600, 2048)] and got.dtype == dtype
    assert rel_err(got, x.double() @ _reference_delta(layer, dtype, 1.1).t()) < TOLERANCE[dtype]
