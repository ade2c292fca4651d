"""ΔW against PyWavelets in float64 (FORMAT.md section 1), the in-place add, gradients."""

import pytest
import torch
from reference import random_layer, reference_delta, rel_err

import waveft_core as wft
from waveft_core.delta import make_plan, weight_plus_delta
from waveft_core.wavelets import SUPPORTED_WAVELETS, reconstruction_filters

SHAPES = [(7, 5), (16, 24), (33, 18), (1, 9)]


@pytest.mark.parametrize("wavelet", SUPPORTED_WAVELETS)
def test_every_family_matches_pywavelets(wavelet):
    for i, shape in enumerate(SHAPES):
        m, n = shape
        layer = random_layer(shape, min(40, m * n), wavelet, seed=i)
        ref = reference_delta(layer.indices, layer.spectrum.double(), shape, wavelet, layer.scaling)
        assert rel_err(layer.delta(torch.float32), ref) < 1e-6, (wavelet, shape)
        assert rel_err(layer.delta(torch.float64), ref) < 1e-12, (wavelet, shape)
        w = torch.zeros(shape)
        layer.add_to_(w)
        assert rel_err(w, ref) < 1e-6, (wavelet, shape)


def test_filter_lengths_follow_format():
    def length(name):
        return len(reconstruction_filters(name)[0])

    assert length("haar") == length("db1") == 2
    assert length("db4") == 8 and length("sym20") == 40 and length("coif17") == 102


@pytest.mark.parametrize("wavelet", ["db1", "db3", "coif2"])
def test_conv_weight_is_viewed_as_out_by_in_times_kernel(wavelet):
    shape = (12, 5, 3, 3)
    layer = random_layer(shape, 60, wavelet)
    ref = reference_delta(layer.indices, layer.spectrum.double(), shape, wavelet, layer.scaling)
    assert layer.delta().shape == shape
    assert rel_err(layer.delta(), ref) < 1e-6
    w = torch.randn(shape)
    expect = w.double() + torch.from_numpy(ref)
    layer.add_to_(w)
    assert rel_err(w, expect) < 1e-6


def test_use_idwt_false_places_scaled_values():
    layer = random_layer((9, 11), 30, "db4", use_idwt=False)
    d = layer.delta(torch.float64).reshape(-1)
    expect = torch.zeros(99, dtype=torch.float64)
    expect[layer.indices] = layer.spectrum.double() * layer.scaling
    assert torch.equal(d, expect)


def test_haar_closed_form_and_shared_blocks_add():
    # A, H, V, D coefficients of the same (i, j) all land in one 2x2 block: a scatter must add.
    m, n = 6, 8
    i, j = 1, 2
    h2, w2 = m // 2, n // 2
    positions = [(i, j), (i, j + w2), (i + h2, j), (i + h2, j + w2)]
    idx = torch.tensor([r * n + c for r, c in positions])
    a, h, v, d = 1.0, 2.0, 3.0, 4.0
    layer = wft.Layer(spectrum=torch.tensor([a, h, v, d]), indices=idx, shape=(m, n), scaling=1.0, wavelet="haar")
    expect = torch.zeros(m, n, dtype=torch.float64)
    for r in (0, 1):
        for c in (0, 1):
            expect[2 * i + r, 2 * j + c] = 0.5 * (a + (-1) ** r * h + (-1) ** c * v + (-1) ** (r + c) * d)
    assert torch.allclose(layer.delta(torch.float64), expect, atol=1e-12)
    w = torch.zeros(m, n)
    layer.add_to_(w)
    assert torch.allclose(w.double(), expect, atol=1e-6)


def test_odd_edges_are_cropped():
    # Haar on 5 x 3: the last block's second row/column fall outside and must vanish, not wrap.
    m, n = 5, 3
    idx = torch.tensor([2 * n + 1])  # cA at (2, 1): block rows 4..5, cols 2..3
    layer = wft.Layer(spectrum=torch.tensor([1.0]), indices=idx, shape=(m, n), scaling=1.0, wavelet="haar")
    d = layer.delta(torch.float64)
    assert d[4, 2] == pytest.approx(0.5) and float(d.abs().sum()) == pytest.approx(0.5)


@pytest.mark.parametrize("wavelet", ["db1", "db4", "sym5"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("count", [300, 1500])  # sparse: mostly lone patches; dense: mostly overlapping ones
def test_low_precision_weights_are_rounded_once(wavelet, dtype, count):
    layer = random_layer((40, 52), count, wavelet)
    w = torch.randn(40, 52).to(dtype)
    expect = (w.float() + layer.delta(torch.float32, strength=0.7)).to(dtype)
    out = layer.add_to_(w, 0.7)
    assert out is w
    assert torch.equal(w, expect)


def test_fp32_add_equals_dense_add_to_rounding():
    layer = random_layer((64, 80), 800, "db2")
    w = torch.randn(64, 80)
    expect = w.double() + layer.delta(torch.float64, strength=-1.3)
    layer.add_to_(w, -1.3)
    assert float((w.double() - expect).abs().max()) < 1e-5


def test_strength_zero_is_bit_identical_even_for_negative_zero():
    layer = random_layer((8, 8), 20)
    w = torch.randn(8, 8)
    w[0, 0] = -0.0
    before = w.clone()
    layer.add_to_(w, 0.0)
    assert torch.equal(w.view(torch.int32), before.view(torch.int32))


def test_non_contiguous_weight_slice_is_updated_in_place():
    # ComfyUI narrows fused weights (qkv) and updates the view; a column slice is not contiguous.
    full = torch.randn(10, 30)
    view = full[:, 10:20]
    layer = random_layer((10, 10), 25, "db2")
    expect = full.clone()
    expect[:, 10:20] += layer.delta()
    layer.add_to_(view)
    assert torch.allclose(full, expect, atol=1e-6)
    assert torch.equal(full[:, :10], expect[:, :10]) and torch.equal(full[:, 20:], expect[:, 20:])


def test_shape_mismatch_is_refused():
    layer = random_layer((8, 8), 10)
    with pytest.raises(ValueError, match="does not match"):
        layer.add_to_(torch.zeros(8, 9))


def test_gradient_is_the_adjoint_of_the_delta():
    layer = random_layer((12, 14), 30, "db3")
    spec = layer.spectrum.double().requires_grad_(True)
    plan = make_plan(layer.indices, layer.shape, "db3")
    from waveft_core.delta import dense_delta

    g = torch.randn(12, 14, dtype=torch.float64)
    (dense_delta(plan, spec, 2.0, torch.float64) * g).sum().backward()
    # ΔW is linear in the spectrum: d/dv_j <G, ΔW> = <G, ΔW(e_j)> with ΔW(e_j) from PyWavelets.
    expect = [
        float((g * torch.from_numpy(reference_delta(layer.indices[j : j + 1], [1.0], (12, 14), "db3", 2.0))).sum())
        for j in range(30)
    ]
    assert torch.allclose(spec.grad, torch.tensor(expect, dtype=torch.float64), atol=1e-10)


def test_weight_plus_delta_matches_and_differentiates():
    layer = random_layer((20, 24), 50, "db2")
    plan = make_plan(layer.indices, layer.shape, "db2")
    w = torch.randn(20, 24, requires_grad=True)
    spec = layer.spectrum.clone().requires_grad_(True)
    out = weight_plus_delta(w, plan, spec, layer.scaling)
    assert torch.allclose(out, w + layer.delta(), atol=1e-6)
    out.square().sum().backward()
    w2 = w.detach().clone().requires_grad_(True)
    spec2 = layer.spectrum.clone().requires_grad_(True)
    from waveft_core.delta import dense_delta

    (w2 + dense_delta(plan, spec2, layer.scaling, torch.float32)).square().sum().backward()
    assert torch.allclose(spec.grad, spec2.grad, atol=1e-4)
    assert torch.allclose(w.grad, w2.grad, atol=1e-5)


def test_plans_are_cached_and_strength_scales_linearly():
    layer = random_layer((30, 30), 100, "db4")
    d1 = layer.delta(torch.float64)
    d2 = layer.delta(torch.float64, strength=-2.0)
    assert torch.allclose(d2, -2.0 * d1)
    assert layer.plan() is layer.plan()


def test_loaded_and_trainable_layers_build_their_plan_once_and_keep_one_per_device_and_dtype(monkeypatch):
    """One plan cache (delta.PlanCache) for both kinds of layer: the CPU plan is built once, each (device,
    dtype) asked for is kept, and every plan it hands out gives the same ΔW."""
    from waveft_core import delta
    from waveft_core.training.trainable import TrainableLayer

    built = []
    real = delta.make_plan
    monkeypatch.setattr(delta, "make_plan", lambda *a: built.append(a) or real(*a))
    layer = random_layer((24, 20), 50, "db2")
    trainable = TrainableLayer(
        (24, 20), 50, wavelet="db2", scaling=layer.scaling, indices=layer.indices, spectrum=layer.spectrum
    )
    for owner in (layer, trainable):
        assert owner.plan("cpu", torch.float32) is owner.plan(torch.device("cpu"), torch.float32)
        assert owner.plan("cpu", torch.float64) is not owner.plan("cpu", torch.float32)
        assert owner.plan("cpu", torch.float64).kernels.dtype == torch.float64
    assert layer.plan() is layer.plan("cpu", torch.float32)
    assert len(built) == 2  # one per layer, whatever was asked for
    with torch.no_grad():
        trained = trainable(torch.zeros(24, 20, dtype=torch.float64))
    assert torch.equal(layer.delta(torch.float64), trained)


def test_unknown_wavelet_is_refused():
    with pytest.raises(wft.UnknownWaveletError, match="bior"):
        random_layer((4, 4), 3, "bior1.3")


def test_a_packed_layer_computes_from_the_tensors_it_is_given():
    """weight_adapter.packed(layer) is what a host that moves adapter tensors itself holds (ComfyUI's adapter
    rebuild): the spectrum and the plan as tensors, and the layer as a plain value. unpack() uses the tensors
    handed back, not the layer's own, and falls back to the layer's plan only when a host has cast the plan's
    tensors."""
    from waveft_core.delta import add_into
    from waveft_core.hosts.weight_adapter import packed, unpack

    layer = random_layer((21, 34), 60, "db3")
    spectrum, plan_tensors, same = packed(layer)
    assert same is layer and spectrum is layer.spectrum and len(plan_tensors) == 7
    # a host's copies (as prefetch_prepared_value makes them): new storage, same values
    moved = (spectrum.clone() * 2, tuple(t.clone() for t in plan_tensors), layer)
    got_layer, got_spectrum, plan = unpack(moved, "cpu")
    assert got_layer is layer and got_spectrum is moved[0]
    assert all(a is b for a, b in zip(plan.tensors(), moved[1]))  # the plan is not rebuilt, its tensors are used
    w = torch.zeros(21, 34)
    add_into(w, plan, got_spectrum, layer.scaling)
    ref = reference_delta(layer.indices, 2 * layer.spectrum.double(), (21, 34), "db3", layer.scaling)
    assert rel_err(w, ref) < 1e-6
    # positions cast to a float type (as a bypass hook casts top-level weights) are not positions any more
    cast = (spectrum, tuple(t.to(torch.bfloat16) for t in plan_tensors), layer)
    assert unpack(cast, "cpu")[2] is layer.plan("cpu", torch.float32)
    assert layer.plan().with_tensors(plan_tensors[:-1]) is None
    with pytest.raises(TypeError, match="packed WaveFT layer"):
        unpack((spectrum, plan_tensors), "cpu")


def test_training_state_round_trips_through_its_checkpoint(tmp_path):
    """A run's checkpoint holds its layers, steps, seed, settings and optimizer moments; loading it back and
    restoring the optimizer continues exactly where the run stopped."""
    from waveft_core.training.trainable import TrainableLayer, TrainingState, make_optimizer

    def fresh():
        return {"a": TrainableLayer((12, 20), 30, "db2", seed=5), "b": TrainableLayer((8, 8, 3, 3), 40, "db2", seed=5)}

    def steps(trainables, optimizer, n):
        for _ in range(n):
            loss = sum((t(torch.ones(t.shape)) - 2).square().sum() for t in trainables.values())
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()

    layers = fresh()
    opt = make_optimizer("AdamW", [t.spectrum for t in layers.values()], 1e-2)
    names = {t.spectrum: n for n, t in layers.items()}
    steps(layers, opt, 3)
    state = TrainingState(layers, step=3, seed=5, metadata={"modelspec.title": "t"})
    state.capture(opt, names)
    path = state.save(tmp_path / "run_00003.safetensors")
    steps(layers, opt, 2)  # the straight run goes on

    back = TrainingState.load(path)
    assert back.step == 3 and back.seed == 5 and back.metadata.get("modelspec.title") == "t"
    assert wft.load(path).layers["b"].shape == (8, 8, 3, 3)  # and it is an ordinary adapter file too
    opt2 = make_optimizer("AdamW", [t.spectrum for t in back.trainables.values()], 1e-2)
    assert back.restore(opt2, {t.spectrum: n for n, t in back.trainables.items()})
    steps(back.trainables, opt2, 2)
    for name in layers:
        torch.testing.assert_close(back.trainables[name].spectrum, layers[name].spectrum, rtol=1e-6, atol=1e-8)
    with pytest.raises(ValueError, match="trained on another model or other targets: 1 of its layers"):
        back.check_fits({"a": (12, 20)}, "x.safetensors")
    # optimizer state for other parameters is not forced on: the moments start afresh
    other = {"a": TrainableLayer((12, 21), 31)}
    assert not back.restore(make_optimizer("AdamW", [other["a"].spectrum], 1e-2), {other["a"].spectrum: "a"})
