"""The weight-adapter contract of today's ComfyUI, driven through the host's own code on every patch kind the
pack makes (Linear, 3x3 conv, a 1x1 conv given an m x n layer, a slice of a fused q/k/v weight, a patch with a
function, an adapter from Train WaveFT), in fp32, fp16 and bf16, against PyWavelets in float64.

- Adapter rebuild (ComfyUI >= 0.21): `comfy.lora.prefetch_prepared_value` rebuilds each adapter as
  type(v)(v.loaded_keys, <v.weights moved into a gathered buffer>); `LowVramPatch.memory_required()`,
  `.prepare(buffer, stream, copy=True)` and `__call__` go through it, as dynamic VRAM (the default on NVIDIA)
  does at the first sampling step.
- Bypass mode: the host's BypassForwardHook moves and casts adapter.weights and adds h(x) to the output, and
  `comfy.sd.load_bypass_lora_for_models` (the 'Load LoRA (Bypass)' node) takes a WaveFT file.

Tests of a feature the running host lacks are deselected, not skipped (see conftest)."""

import pytest
import torch
from host_tools import FLUX, patcher_for, train_inputs
from reference import reference_delta, rel_err

import waveft_core as wft
from waveft_core.convert.peft_io import peft_positions
from waveft_core.hosts.weight_adapter import packed

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
SD15_WAVELET = "db4"  # one wavelet per native file; db4's 8x8 patches also clip at every edge
SD15_LAYERS = {  # kind -> (module, stored layer shape or None for the weight's own, coefficients)
    "linear": ("diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q", None, 2592),
    "conv3x3": ("diffusion_model.input_blocks.1.0.in_layers.2", None, 900),
    "conv1x1_as_matrix": ("diffusion_model.input_blocks.1.1.proj_in", (320, 320), 700),
}
FLUX_LAYERS = {  # kind -> (PEFT name, the host key it patches)
    "fused_qkv_slice": ("transformer.transformer_blocks.0.attn.to_k", "diffusion_model.double_blocks.0.img_attn.qkv"),
    "with_function": ("transformer.norm_out.linear", "diffusion_model.final_layer.adaLN_modulation.1"),
}
KINDS = [*SD15_LAYERS, *FLUX_LAYERS, "trained"]


def _flat_tensors(value):
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _flat_tensors(v)]
    return []


@pytest.fixture(scope="module")
def patched(pack, sd15, tmp_path_factory):
    """kind -> (ModelPatcher holding WaveFT patches, weight key), each made the way users make them."""
    import folder_paths

    model, clip, _ = sd15
    out = {}
    sd = model.model.state_dict()
    g = torch.Generator().manual_seed(5)
    layers = {}
    for kind, (name, shape, p) in SD15_LAYERS.items():
        w = sd[name + ".weight"]
        shape = shape or tuple(w.shape)
        layers[name] = wft.Layer(
            spectrum=torch.randn(p, generator=g) * float(w.std()) * 0.2,
            shape=shape,
            indices=peft_positions(shape, p, 777),
            wavelet=SD15_WAVELET,
        )
    folder = tmp_path_factory.mktemp("contract_waveft")
    wft.save(wft.Adapter(layers=layers, metadata={"ss_base_model_version": "sd_v1"}), folder / "kinds.safetensors")
    paths, exts = folder_paths.folder_names_and_paths["waveft"]
    folder_paths.folder_names_and_paths["waveft"] = ([str(folder)] + list(paths), exts)
    folder_paths.filename_list_cache.clear()
    try:  # through the Load WaveFT (model only) node, at a strength other than 1
        loaded = pack.nodes.loader.WaveFTLoaderModelOnly().load(model, "kinds.safetensors", 0.7)["result"][0]
    finally:
        folder_paths.folder_names_and_paths["waveft"] = (paths, exts)
        folder_paths.filename_list_cache.clear()
    for kind, (name, *_rest) in SD15_LAYERS.items():
        out[kind] = (loaded, name + ".weight")

    import comfy.supported_models as sm

    flux = patcher_for(sm.Flux, FLUX)
    h = FLUX["hidden_size"]
    shapes = {"transformer.transformer_blocks.0.attn.to_k": (h, h), "transformer.norm_out.linear": (2 * h, h)}
    flux_layers = {
        n: wft.Layer(
            spectrum=torch.randn(80, generator=g) * 0.01,
            indices=peft_positions(s, 80, 777),
            shape=s,
            wavelet="db3",
            scaling=2.0,
        )
        for n, s in shapes.items()
    }
    flux_out, _, summary = pack.nodes.loader.apply_adapter(wft.Adapter(layers=flux_layers), flux, None, 1.3, 0.0, "f")
    assert "2 of 2 layers matched" in summary
    for kind, (_, key) in FLUX_LAYERS.items():
        out[kind] = (flux_out, key + ".weight")

    cond = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of sks cat"))
    latent = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(2))}
    settings = train_inputs(
        steps=2,
        learning_rate=1e-2,
        n_coefficients=300,
        wavelet="db2",
        seed=1,
        gradient_checkpointing=False,
        filename_prefix="contract",
    )
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        trained = pack.nodes.train_nodes.WaveFTTrain().train([model], [latent], [cond], **settings)[0]
    out["trained"] = (trained, "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_v.weight")
    return out


def _weight(patcher, key):
    import comfy.utils

    return comfy.utils.get_attr(patcher.model, key).detach().float().clone()


def _reference(patches, weight: torch.Tensor) -> torch.Tensor:
    """W + Σ strength·function(ΔW) on each patch's slice, in float64 from PyWavelets (the layers are read
    from the patches the pack made, the math from the independent reference)."""
    out = weight.double().clone()
    for strength, adapter, strength_model, offset, function in patches:
        assert strength_model == 1.0
        view = out.narrow(*offset) if offset is not None else out
        layer = adapter.weights[2]
        delta = torch.from_numpy(
            reference_delta(
                layer.indices,
                layer.spectrum.double(),
                layer.shape,
                layer.wavelet,
                layer.scaling * strength,
                layer.use_idwt,
            )
        ).reshape(view.shape)
        view += function(delta) if function is not None else delta
    return out


def _assert_rounded_once(got: torch.Tensor, expect: torch.Tensor, base: torch.Tensor):
    """fp32: the change equals the reference's to 1e-5; fp16/bf16: every entry is the float64 W + ΔW rounded
    once: within one unit in the last place (subnormals included), plus what forming the sum in fp32 (not fp64)
    can cost where W and ΔW cancel."""
    if got.dtype == torch.float32:
        assert rel_err(got.double() - base.double(), expect - base.double()) < 1e-5
        return
    base = base.double()
    info = torch.finfo(got.dtype)
    bound = info.eps * expect.abs().clamp_min(info.tiny) + 2 * torch.finfo(torch.float32).eps * (
        base.abs() + (expect - base).abs()
    )
    excess = (got.double() - expect).abs() - bound
    assert bool((excess <= 0).all()), f"off by {float(excess.max()):.3g} beyond one rounding"
    assert not torch.equal(got.double(), base), "the weight did not change"


@pytest.mark.host_feature("adapter_rebuild")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", KINDS)
def test_adapter_survives_the_hosts_rebuild(pack, patched, kind, dtype):
    """LowVramPatch: memory_required counts every tensor, prepare() rebuilds our adapters from the tensors it
    moved into the buffer, and __call__ computes W + ΔW from those tensors, rounded once."""
    import comfy.lora
    from comfy.model_patcher import LowVramPatch

    patcher, key = patched[kind]
    patches = patcher.patches[key]
    assert patches and all(type(p[1]) is pack.nodes.host.WaveFTAdapter for p in patches)
    base = _weight(patcher, key).to(dtype)
    expect = _reference(patches, base)

    assert comfy.lora.calculate_shape(patches, base, key) == base.shape
    lowvram = LowVramPatch(key, patcher.patches)
    need = lowvram.memory_required()
    owned = [t for p in patches for t in _flat_tensors(p[1].weights)]
    assert len(owned) == 8 * len(patches)  # the spectrum and the seven plan tensors travel with the adapter
    assert need >= sum(t.numel() * t.element_size() for t in owned)
    buffer = torch.zeros(need, dtype=torch.uint8)
    prepared = lowvram.prepare(buffer, None, copy=True)
    start, end = buffer.data_ptr(), buffer.data_ptr() + need
    for original, rebuilt in zip(patches, prepared):
        assert type(rebuilt[1]) is pack.nodes.host.WaveFTAdapter and rebuilt[1] is not original[1]
        moved = _flat_tensors(rebuilt[1].weights)
        assert len(moved) == 8 and all(start <= t.data_ptr() < end for t in moved if t.numel())

    got = lowvram(base.clone())
    assert got.dtype == dtype
    _assert_rounded_once(got, expect, base)

    if dtype == torch.float32 and len(patches) == 1:
        # it really computes from the tensors it was handed: doubling the coefficients in the host's buffer
        # doubles the change
        prepared[0][1].weights[0].mul_(2)
        doubled = lowvram(base.clone())
        assert rel_err(doubled.double() - base.double(), 2 * (expect - base.double())) < 1e-5


@pytest.mark.host_feature("adapter_rebuild")
def test_prefetch_rebuilds_an_adapter_made_by_the_stock_lora_loader(pack, sd15, waveft_dir):
    """The stock Load LoRA path creates the pack's adapter through WaveFTAdapter.load; the host's own
    prefetch_prepared_value must be able to rebuild that one too."""
    import comfy.lora
    import comfy.sd
    import comfy.utils

    model, clip, _ = sd15
    name, _, p = SD15_LAYERS["linear"]
    wavelet = SD15_WAVELET
    w = model.model.state_dict()[name + ".weight"]
    layer = wft.Layer(
        spectrum=torch.randn(p) * 1e-3,
        indices=peft_positions(tuple(w.shape), p, 777),
        shape=tuple(w.shape),
        wavelet=wavelet,
    )
    path = wft.save(wft.Adapter(layers={name: layer}), waveft_dir / "stock.safetensors")
    patched_model, _ = comfy.sd.load_lora_for_models(model, clip, comfy.utils.load_torch_file(str(path)), 0.5, 0.5)
    adapter = patched_model.patches[name + ".weight"][0][1]
    counter = [0]  # without a destination the host only counts, but it rebuilds the adapter all the same
    assert type(comfy.lora.prefetch_prepared_value(adapter, counter, None, None, False)) is type(adapter)
    buffer = torch.zeros(counter[0], dtype=torch.uint8)
    rebuilt = comfy.lora.prefetch_prepared_value(adapter, [0], buffer, None, True)
    assert type(rebuilt) is type(adapter) and rebuilt.loaded_keys is adapter.loaded_keys
    out = comfy.lora.calculate_weight([(0.5, rebuilt, 1.0, None, None)], w.float().clone(), name + ".weight")
    ref = reference_delta(layer.indices, layer.spectrum.double(), layer.shape, wavelet, 0.5 * layer.scaling)
    assert rel_err(out.double() - w.double(), torch.from_numpy(ref)) < 1e-5


def _module(patcher, key):
    import comfy.utils

    return comfy.utils.get_attr(patcher.model, key[: -len(".weight")])


def _reference_forward(module, x, weight, bias):
    f = torch.nn.functional
    if weight.dim() == 4:
        return f.conv2d(
            x,
            weight,
            bias,
            stride=module.stride,
            padding=module.padding,
            dilation=module.dilation,
            groups=module.groups,
        )
    return f.linear(x, weight, bias)


@pytest.mark.host_feature("bypass")
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("kind", [*SD15_LAYERS, "trained"])
def test_bypass_hook_adds_h_with_the_weights_it_moved(pack, patched, kind, dtype):
    """The host's BypassForwardHook sets multiplier/is_conv/kw_dict, moves and casts adapter.weights, and calls
    g(f(x) + h(x)): the output equals the layer with W + s·ΔW merged, and h used the cast spectrum."""
    import copy

    from comfy.weight_adapter.bypass import BypassForwardHook

    patcher, key = patched[kind]
    ((strength, shared, _, offset, function),) = patcher.patches[key]
    assert offset is None and function is None
    module = copy.deepcopy(_module(patcher, key)).to(dtype)
    adapter = pack.nodes.host.WaveFTAdapter(shared.loaded_keys, shared.weights)  # the hook mutates its adapter
    hook = BypassForwardHook(module, adapter, multiplier=strength)
    hook.inject()
    try:
        assert adapter.weights[0].dtype == dtype  # the hook cast the spectrum to the layer's dtype
        in_features = module.weight.shape[1]
        shape = (2, in_features, 6, 6) if module.weight.dim() == 4 else (2, 5, in_features)
        x = torch.randn(shape, generator=torch.Generator().manual_seed(1)).to(dtype)
        with torch.no_grad():
            got = module(x)
    finally:
        hook.eject()
    weight = module.weight.double()
    merged = _reference(patcher.patches[key], weight)
    bias = module.bias.double() if module.bias is not None else None
    expect = _reference_forward(module, x.double(), merged, bias)
    tolerance = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 8e-3}[dtype]
    assert rel_err(got.double(), expect) < tolerance
    # and the adapter's part is really there: without it the output differs by much more than that
    assert rel_err(_reference_forward(module, x.double(), weight, bias), expect) > 5 * tolerance


@pytest.mark.host_feature("bypass")
def test_load_lora_bypass_takes_waveft_files(pack, sd15, waveft_dir):
    """ComfyUI's own bypass loader ('Load LoRA (Bypass)') on a WaveFT file: the weights stay untouched and the
    forward of each patched layer equals the merged layer's."""
    import comfy.model_management as mm
    import comfy.sd
    import comfy.utils

    model, clip, _ = sd15
    sd = model.model.state_dict()
    g = torch.Generator().manual_seed(9)
    layers = {}
    for name, shape, p in SD15_LAYERS.values():
        w = sd[name + ".weight"]
        shape = shape or tuple(w.shape)
        layers[name] = wft.Layer(
            spectrum=torch.randn(p, generator=g) * float(w.std()) * 0.05,
            shape=shape,
            indices=peft_positions(shape, p, 777),
            wavelet=SD15_WAVELET,
        )
    path = wft.save(wft.Adapter(layers=layers), waveft_dir / "bypass.safetensors")
    bypassed, _ = comfy.sd.load_bypass_lora_for_models(model, clip, comfy.utils.load_torch_file(str(path)), 0.6, 0.6)
    assert not bypassed.patches, "WaveFT layers must go through the bypass hooks, not weight patches"
    mm.load_models_gpu([bypassed], force_full_load=True)
    try:
        for name, *_ in SD15_LAYERS.values():
            module = _module(bypassed, name + ".weight")
            weight = module.weight.detach().double()
            assert torch.equal(module.weight, sd[name + ".weight"])  # bypass never merges
            layer = layers[name]
            delta = torch.from_numpy(
                reference_delta(layer.indices, layer.spectrum.double(), layer.shape, layer.wavelet, 0.6 * layer.scaling)
            ).reshape(weight.shape)
            x = torch.randn((1, weight.shape[1], 6, 6) if weight.dim() == 4 else (1, 7, weight.shape[1]), generator=g)
            with torch.no_grad():
                got = module(x)
            bias = module.bias.detach().double() if module.bias is not None else None
            expect = _reference_forward(module, x.double(), weight + delta, bias)
            assert rel_err(got.double(), expect) < 1e-5, name
    finally:
        mm.unload_all_models()


def test_quantized_weights_are_refused_not_scattered_into(pack, caplog):
    """A comfy-kitchen weight (packed fp8/int8 with scales) is never written into: the layer is left as it
    was and the log names it."""
    import comfy.quant_ops as quant_ops

    if not getattr(quant_ops, "_CK_AVAILABLE", False):
        weight = torch.zeros(4, 4, dtype=torch.int8)  # integer storage stands for packed data on older hosts
        before = weight.clone()
    else:
        weight = quant_ops.QuantizedTensor.from_float(torch.randn(16, 12), "TensorCoreFP8E4M3Layout")
        before = weight.dequantize().clone()
    shape = tuple(weight.shape)
    layer = wft.Layer(spectrum=torch.ones(6), indices=peft_positions(shape, 6, 777), shape=shape)
    adapter = pack.nodes.host.WaveFTAdapter.from_layer(layer)
    import comfy.lora

    out = comfy.lora.calculate_weight([(1.0, adapter, 1.0, None, None)], weight, "diffusion_model.q.weight")
    after = out.dequantize() if hasattr(out, "_qdata") else out
    assert torch.equal(after, before)
    assert "diffusion_model.q.weight" in caplog.text and "quantized" in caplog.text


def test_adapter_needs_its_packed_weights(pack):
    """The constructor is the host's (loaded_keys, weights); anything else is a clear error at once."""
    layer = wft.Layer(spectrum=torch.ones(3), indices=torch.arange(3), shape=(4, 4))
    with pytest.raises(TypeError, match="packed WaveFT layer"):
        pack.nodes.host.WaveFTAdapter(set(), layer)
    adapter = pack.nodes.host.WaveFTAdapter(set(), packed(layer))
    assert adapter.calculate_shape("k") is None
