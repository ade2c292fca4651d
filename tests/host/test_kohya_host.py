"""WaveFT files from another trainer (lora-scripts-next's kohya network `waveft_anima`) in a real ComfyUI:
Load WaveFT and the stock LoRA loader apply them exactly; 16-bit saves whose positions were rounded are
recovered exactly or refused; a WaveFT file the stock loader cannot apply fails the node, naming the file.

The Anima files are fixtures saved by their own module (tests/fixtures/kohya/README.md); ComfyUI 0.8 has no
Anima, so there the same layout is written for the tiny SD1.5 model by `kohya_layout` below (their save,
restated: (row, col) positions cast to the save precision with the seed, use_idwt and family code)."""

import shutil

import pytest
import torch
from host_tools import patched_weights
from reference import ROOT, reference_delta
from safetensors.torch import load_file, save_file

FIX = ROOT / "tests" / "fixtures" / "kohya"
# ComfyUI 0.33's Anima (comfy/ldm/cosmos/predict2.py + anima) at the fixtures' sizes: x 6, context 7, MLP 4099.
ANIMA = dict(
    image_model="anima",
    max_img_h=240,
    max_img_w=240,
    max_frames=128,
    in_channels=16,
    out_channels=16,
    patch_spatial=2,
    patch_temporal=1,
    model_channels=6,
    concat_padding_mask=True,
    crossattn_emb_channels=7,
    pos_emb_cls="rope3d",
    pos_emb_learnable=True,
    pos_emb_interpolation="crop",
    min_fps=1,
    max_fps=30,
    use_adaln_lora=True,
    adaln_lora_dim=4,
    num_blocks=1,
    num_heads=2,
    mlp_ratio=683.17,
    extra_per_block_abs_pos_emb=False,
    rope_h_extrapolation_ratio=4.0,
    rope_w_extrapolation_ratio=4.0,
    rope_t_extrapolation_ratio=1.0,
    extra_h_extrapolation_ratio=1.0,
    extra_w_extrapolation_ratio=1.0,
    extra_t_extrapolation_ratio=1.0,
)
CASES = [
    "kohya_anima_fp32",
    "kohya_anima_fp32_noidwt",
    "kohya_anima_fp16",
    "kohya_anima_bf16",
    "kohya_anima_fp32_comfy",
]


def _base():
    return load_file(str(FIX / "kohya_anima_base.safetensors"))


def _unet_keys():
    return ["diffusion_model." + k[len("unet.") :] for k in _base() if k.startswith("unet.")]


@pytest.fixture(scope="module")
def anima(pack):
    """A tiny Anima built by ComfyUI itself (detected class supported_models.Anima), its adapted blocks holding
    the fixtures' base weights (the rest, the 1024-wide LLM adapter included, stays unwritten)."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models

    base = _base()
    with torch.inference_mode():
        model = comfy.supported_models.Anima(ANIMA).get_model({})
        sd = model.diffusion_model.state_dict()
        for key, value in base.items():
            if key.startswith("unet."):
                sd[key[len("unet.") :]].copy_(value)
    return comfy.model_patcher.ModelPatcher(
        model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device()
    )


# their text encoder's modules inside ComfyUI 0.33's Anima text encoder (comfy/text_encoders/anima.py)
TE_IN_CLIP = "qwen3_06b.transformer.model."
# (base file prefix, weight key prefix, kohya prefix, prefix after their convert_anima_lora_to_comfy.py)
PARTS = {
    "unet": ("unet.", "diffusion_model.", "lora_unet_", "diffusion_model."),
    "te": ("te.", TE_IN_CLIP, "lora_te_", "text_encoders." + TE_IN_CLIP),
}


def _te_keys():
    return [TE_IN_CLIP + k[len("te.") :] for k in _base() if k.startswith("te.")]


def _expected(stem, part="unet"):
    """base + ΔW from the float64 reference, at the positions their fp32 save stored exactly (fp16, bf16 and the
    converted file share its seed and spectra: only the save precision differs) with the file's own spectra."""
    positions_file = "kohya_anima_fp32_noidwt" if stem == "kohya_anima_fp32_noidwt" else "kohya_anima_fp32"
    exact = load_file(str(FIX / f"{positions_file}.safetensors"))
    stored = load_file(str(FIX / f"{stem}.safetensors"))
    base = _base()
    base_prefix, key_prefix, kohya_prefix, converted_prefix = PARTS[part]
    out = {}
    for key in _unet_keys() if part == "unet" else _te_keys():
        module = key[len(key_prefix) : -len(".weight")]
        name = kohya_prefix + module.replace(".", "_")
        mine = name if f"{name}.waveft_spectrum" in stored else converted_prefix + module
        rows, cols = exact[f"{name}.waveft_indices"].to(torch.int64)
        weight = base[base_prefix + module + ".weight"].double()
        n = weight.shape[1]
        delta = reference_delta(
            rows * n + cols,
            stored[f"{mine}.waveft_spectrum"].double(),
            tuple(weight.shape),
            "db1",
            float(stored[f"{mine}.waveft_scaling"]),
            bool(stored[f"{mine}.waveft_use_idwt"]),
        )
        out[key] = weight + torch.as_tensor(delta)
    return out


@pytest.fixture(scope="module")
def anima_clip():
    """ComfyUI 0.33's own Anima text encoder (a Qwen3 0.6B, comfy/text_encoders/anima.py) built at the fixtures'
    sizes (6 wide, MLP 9, one layer, two heads of 3), holding the fixtures' base text-encoder weights."""
    import comfy.sd
    import comfy.text_encoders.anima
    import comfy.text_encoders.llama
    from comfy.supported_models_base import ClipTarget

    config = comfy.text_encoders.llama.Qwen3_06BConfig
    head_dim = config.head_dim  # a class constant of the config, not one of its fields
    config.head_dim = 3
    try:
        clip = comfy.sd.CLIP(
            target=ClipTarget(comfy.text_encoders.anima.AnimaTokenizer, comfy.text_encoders.anima.te()),
            model_options={
                "qwen3_06b_model_config": dict(
                    hidden_size=6,
                    intermediate_size=9,
                    num_hidden_layers=1,
                    num_attention_heads=2,
                    num_key_value_heads=2,
                    vocab_size=32,
                ),
                "dtype": torch.float32,
            },
        )
    finally:
        config.head_dim = head_dim
    sd = clip.cond_stage_model.state_dict()
    with torch.no_grad():
        for key, value in _base().items():
            if key.startswith("te."):
                sd[TE_IN_CLIP + key[len("te.") :]].copy_(value)
    return clip


def _max_diff(got, want):
    return max(float((got[k].double() - want[k].double()).abs().max()) for k in want)


@pytest.mark.host_feature("anima")
@pytest.mark.parametrize("stem", CASES)
def test_their_files_apply_exactly_through_load_waveft_and_the_stock_loader(pack, anima, waveft_dir, loras_dir, stem):
    import nodes

    shutil.copy(FIX / f"{stem}.safetensors", waveft_dir / f"{stem}.safetensors")
    shutil.copy(FIX / f"{stem}.safetensors", loras_dir / f"{stem}.safetensors")
    keys = _unet_keys()
    want = _expected(stem)
    out = pack.nodes.loader.WaveFTLoaderModelOnly().load(anima, f"{stem}.safetensors", 1.0)
    report = out["ui"]["text"][0]
    assert "10 of 10 layers matched" in report and "kohya-style WaveFT file from another trainer" in report
    if stem in ("kohya_anima_fp16", "kohya_anima_bf16"):
        assert "recovered from seed 777" in report
    node = patched_weights(out["result"][0], keys)
    stock = patched_weights(
        nodes.LoraLoaderModelOnly().load_lora_model_only(anima, f"{stem}.safetensors", 1.0)[0], keys
    )
    assert _max_diff(node, want) < 1e-6
    assert _max_diff(stock, want) < 1e-6
    if stem in ("kohya_anima_fp32", "kohya_anima_fp32_noidwt"):  # their own merge of the same file
        theirs = load_file(str(FIX / f"{stem}.their_merge.safetensors"))
        assert _max_diff(node, {k: theirs["unet." + k[len("diffusion_model.") :]] for k in keys}) < 1e-6


@pytest.mark.host_feature("anima")
@pytest.mark.parametrize("stem", ["kohya_anima_fp32", "kohya_anima_bf16", "kohya_anima_fp32_comfy"])
def test_their_text_encoder_layers_apply_exactly_through_load_lora(pack, anima, anima_clip, loras_dir, stem):
    """ComfyUI 0.33's key map sends their lora_te_* names (and the converted text_encoders.* ones) to Anima's Qwen3
    text encoder: Load LoRA applies all 17 layers, the 7 text-encoder ones as exactly as the 10 of the DiT."""
    import nodes

    shutil.copy(FIX / f"{stem}.safetensors", loras_dir / f"{stem}.safetensors")
    model, clip = nodes.LoraLoader().load_lora(anima, anima_clip, f"{stem}.safetensors", 1.0, 1.0)
    te = patched_weights(clip.patcher, _te_keys())
    assert _max_diff(te, _expected(stem, "te")) < 1e-6
    assert _max_diff(patched_weights(model, _unet_keys()), _expected(stem)) < 1e-6
    if stem == "kohya_anima_fp32":  # their own merge of the same file
        theirs = load_file(str(FIX / f"{stem}.their_merge.safetensors"))
        assert _max_diff(te, {k: theirs["te." + k[len(TE_IN_CLIP) :]] for k in te}) < 1e-6


def _lost_fp16(path):
    """Their fp16 file with one rounded position changed to another rounded value no seed draws: what a save
    whose positions cannot be recovered looks like."""
    t = load_file(str(FIX / "kohya_anima_fp16.safetensors"))
    key = "lora_unet_blocks_0_mlp_layer1.waveft_indices"
    rows = t[key][0]
    big = int(torch.nonzero(rows >= 2048)[0])
    taken = set(zip(t[key][0].tolist(), t[key][1].tolist()))
    for candidate in range(2048, 4098, 2):
        if (float(candidate), float(t[key][1][big])) not in taken:
            break
    t[key] = t[key].clone()
    t[key][0, big] = candidate
    save_file(
        t,
        str(path),
        metadata={"ss_network_args": '{"waveft_use_idwt": "true"}', "ss_network_module": "networks.waveft_anima"},
    )


@pytest.mark.host_feature("anima")
def test_lost_16_bit_positions_are_refused_never_applied(pack, anima, waveft_dir, loras_dir):
    import nodes

    _lost_fp16(waveft_dir / "lost.safetensors")
    shutil.copy(waveft_dir / "lost.safetensors", loras_dir / "lost.safetensors")
    with pytest.raises(ValueError) as e:
        pack.nodes.loader.WaveFTLoaderModelOnly().load(anima, "lost.safetensors", 1.0)
    msg = str(e.value)
    assert "lost.safetensors" in msg and "save_precision fp16: positions lost" in msg and "float" in msg
    # the stock loader nodes fail too, before anything is patched: their model gives the shape the positions need
    from comfy_extras.nodes_lora_debug import LoraLoaderBypassModelOnly  # 0.33, as Anima

    for loader in (nodes.LoraLoaderModelOnly(), LoraLoaderBypassModelOnly()):
        with pytest.raises(ValueError) as e:
            loader.load_lora_model_only(anima, "lost.safetensors", 1.0)
        assert "lost.safetensors" in str(e.value) and "positions lost" in str(e.value)


@pytest.mark.host_feature("anima")
def test_info_node_describes_their_file(pack, anima, waveft_dir):
    shutil.copy(FIX / "kohya_anima_bf16.safetensors", waveft_dir / "k.safetensors")
    text = pack.nodes.loader.WaveFTInfo().info("k.safetensors")["result"][0]
    assert "kohya-style WaveFT file from another trainer" in text and "bf16" in text and "layers: 17" in text
    text = pack.nodes.loader.WaveFTInfo().info("k.safetensors", model=anima)["result"][0]
    assert "matches this model" in text and "10 of 10" in text


# --- both hosts: the layout on the tiny SD1.5, and the v1 file without its settings tensors -------------

SD15_LAYERS = {
    "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q": 300,
    "lora_unet_mid_block_attentions_0_transformer_blocks_0_ff_net_2": 500,
}


def kohya_layout(shapes, counts, dtype=torch.float32, seed=777, scaling=25.0, use_idwt=True):
    """Their save_weights' layout for layers of these shapes: PEFT's positions split into (row, col), every
    tensor cast to the save precision."""
    g = torch.Generator().manual_seed(1)
    out = {}
    for name, (m, n) in shapes.items():
        p = counts[name]
        flat = torch.randperm(m * n, generator=torch.Generator().manual_seed(seed))[:p]
        for suffix, value in {
            "waveft_spectrum": torch.randn(p, generator=g) * 0.01,
            "waveft_indices": torch.stack((flat // n, flat % n)),
            "waveft_scaling": torch.tensor(scaling),
            "waveft_random_loc_seed": torch.tensor(seed),
            "waveft_use_idwt": torch.tensor(use_idwt),
            "waveft_family_code": torch.tensor(1),
            "alpha": torch.tensor(float(p)),
        }.items():
            out[f"{name}.{suffix}"] = value.to(dtype)
    return out


def test_the_layout_applies_exactly_on_sd15_through_both_loaders(pack, sd15, waveft_dir, loras_dir):
    import comfy.lora

    import nodes

    model, _, _ = sd15
    kmap = comfy.lora.model_lora_keys_unet(model.model, {})
    sd = model.model.state_dict()
    keys = {name: kmap[name] for name in SD15_LAYERS}
    shapes = {name: tuple(sd[key].shape) for name, key in keys.items()}
    tensors = kohya_layout(shapes, SD15_LAYERS)
    save_file(tensors, str(waveft_dir / "k.safetensors"), metadata={"ss_network_module": "networks.waveft_anima"})
    save_file(tensors, str(loras_dir / "k.safetensors"))
    out = pack.nodes.loader.WaveFTLoaderModelOnly().load(model, "k.safetensors", 0.7)
    assert "2 of 2 layers matched" in out["ui"]["text"][0]
    node = patched_weights(out["result"][0], list(keys.values()))
    stock = patched_weights(
        nodes.LoraLoaderModelOnly().load_lora_model_only(model, "k.safetensors", 0.7)[0], list(keys.values())
    )
    for name, key in keys.items():
        rows, cols = tensors[f"{name}.waveft_indices"].to(torch.int64)
        m, n = shapes[name]
        want = sd[key].double() + 0.7 * torch.as_tensor(
            reference_delta(rows * n + cols, tensors[f"{name}.waveft_spectrum"].double(), (m, n), "db1", 25.0)
        )
        assert float((node[key].double() - want).abs().max()) < 1e-6
        assert float((stock[key].double() - want).abs().max()) < 1e-6


def test_stock_loader_fails_on_a_v1_file_without_settings_tensors(pack, sd15, loras_dir):
    """A native file written before extension 1 (no 'waveft.wavelet' tensor): the stock loader gets no metadata,
    so it cannot apply it; the node fails naming the file and the node that can, instead of patching nothing."""
    import nodes
    import waveft_core as wft
    from waveft_core.convert.peft_io import peft_positions

    model, _, _ = sd15
    shape = tuple(model.model.state_dict()["diffusion_model.middle_block.1.proj_in.weight"].shape)
    layer = wft.Layer(spectrum=torch.randn(50), indices=peft_positions(shape, 50), shape=shape, wavelet="db2")
    wft.save(wft.Adapter({"diffusion_model.middle_block.1.proj_in": layer}), loras_dir / "old.safetensors")
    t = load_file(str(loras_dir / "old.safetensors"))
    from safetensors import safe_open

    with safe_open(str(loras_dir / "old.safetensors"), "pt") as f:
        metadata = f.metadata()
    save_file({k: v for k, v in t.items() if not k.startswith("waveft.")}, str(loras_dir / "old.safetensors"), metadata)
    with pytest.raises(ValueError) as e:
        nodes.LoraLoaderModelOnly().load_lora_model_only(model, "old.safetensors", 1.0)
    msg = str(e.value)
    assert "old.safetensors" in msg and "Load WaveFT" in msg and "settings tensors" in msg


def test_a_format_2_file_with_several_wavelets_applies_per_layer_through_both_loaders(
    pack, sd15, waveft_dir, loras_dir
):
    """Each layer's own wavelet and use_idwt (FORMAT.md format 2) reach the stock loader's adapter too."""
    import nodes
    import waveft_core as wft
    from waveft_core.convert.peft_io import peft_positions

    model, _, _ = sd15
    sd = model.model.state_dict()
    chosen = {
        "diffusion_model.middle_block.1.proj_in": ("db1", True),
        "diffusion_model.middle_block.1.transformer_blocks.0.attn1.to_q": ("db4", True),
        "diffusion_model.middle_block.1.transformer_blocks.0.ff.net.2": ("sym3", False),
    }
    layers = {}
    for i, (name, (wavelet, use_idwt)) in enumerate(chosen.items()):
        shape = tuple(sd[name + ".weight"].shape)
        layers[name] = wft.Layer(
            spectrum=torch.randn(40, generator=torch.Generator().manual_seed(i)) * 0.01,
            indices=peft_positions(shape, 40),
            shape=shape,
            wavelet=wavelet,
            use_idwt=use_idwt,
        )
    wft.save(wft.Adapter(layers), waveft_dir / "mixed.safetensors")
    shutil.copy(waveft_dir / "mixed.safetensors", loras_dir / "mixed.safetensors")
    keys = [n + ".weight" for n in chosen]
    node = patched_weights(
        pack.nodes.loader.WaveFTLoaderModelOnly().load(model, "mixed.safetensors", 1.0)["result"][0], keys
    )
    stock = patched_weights(nodes.LoraLoaderModelOnly().load_lora_model_only(model, "mixed.safetensors", 1.0)[0], keys)
    for name, layer in layers.items():
        want = sd[name + ".weight"].double() + torch.as_tensor(
            reference_delta(
                layer.indices, layer.spectrum.double(), layer.shape, layer.wavelet, layer.scaling, layer.use_idwt
            )
        )
        assert float((node[name + ".weight"].double() - want).abs().max()) < 1e-6, name
        assert float((stock[name + ".weight"].double() - want).abs().max()) < 1e-6, name


@pytest.mark.host_feature("anima")
@pytest.mark.host_feature("adapter_rebuild")
@pytest.mark.host_feature("bypass")
def test_their_layer_survives_the_hosts_rebuild_and_bypass(pack, anima):
    """0.33 rebuilds adapters from moved weights (the shape-less layer travels as a plain value) and its bypass
    mode calls h(x, base_out): both give their bf16 file's recovered ΔW."""
    import comfy.lora
    import comfy.utils

    sd = comfy.utils.load_torch_file(str(FIX / "kohya_anima_bf16.safetensors"), safe_load=True)
    name = "lora_unet_blocks_0_mlp_layer1"
    adapter = pack.nodes.host.WaveFTAdapter.load(name, sd, None, None, set())
    key = "diffusion_model.blocks.0.mlp.layer1.weight"
    w = anima.model.state_dict()[key].float().clone()
    want = _expected("kohya_anima_bf16")[key]
    counter = [0]
    comfy.lora.prefetch_prepared_value(adapter, counter, None, None, False)
    rebuilt = comfy.lora.prefetch_prepared_value(adapter, [0], torch.zeros(counter[0], dtype=torch.uint8), None, True)
    out = comfy.lora.calculate_weight([(1.0, rebuilt, 1.0, None, None)], w.clone(), key)
    assert float((out.double() - want).abs().max()) < 1e-6
    fresh = pack.nodes.host.WaveFTAdapter.load(name, sd, None, None, set())
    fresh.multiplier = 0.5
    x = torch.randn(3, w.shape[1])
    h = fresh.h(x, torch.zeros(3, w.shape[0]))
    assert float((h.double() - 0.5 * x.double() @ (want - w.double()).T).abs().max()) < 1e-5


def test_their_file_on_a_model_it_does_not_fit_is_refused_by_name(pack, sd15, waveft_dir):
    model, _, _ = sd15
    shutil.copy(FIX / "kohya_anima_fp32.safetensors", waveft_dir / "anima.safetensors")
    with pytest.raises(ValueError) as e:
        pack.nodes.loader.WaveFTLoaderModelOnly().load(model, "anima.safetensors", 1.0)
    msg = str(e.value)
    assert "anima.safetensors" in msg and "no weight for 17 of its 17 layers" in msg and "anima" in msg


def test_stock_loader_fails_on_spectra_without_positions(pack, sd15, loras_dir):
    """A file of spectra only (PEFT/diffusers style) whose names the stock loader's key map knows: the node fails,
    saying what the file is and what to do, instead of patching nothing."""
    import nodes

    model, _, _ = sd15
    save_file(
        {"diffusion_model.middle_block.1.proj_in.waveft_spectrum": torch.randn(30)},
        str(loras_dir / "spectra.safetensors"),
    )
    with pytest.raises(ValueError) as e:
        nodes.LoraLoaderModelOnly().load_lora_model_only(model, "spectra.safetensors", 1.0)
    msg = str(e.value)
    assert "spectra.safetensors" in msg and "stores no coefficient positions" in msg and "Load WaveFT" in msg


# --- both hosts: WaveFT layers the stock loader's key map cannot place fail the node -------------------


def _native_layer(shape, count=20, seed=0):
    import waveft_core as wft
    from waveft_core.convert.peft_io import peft_positions

    return wft.Layer(
        spectrum=torch.randn(count, generator=torch.Generator().manual_seed(seed)) * 0.01,
        indices=peft_positions(shape, count),
        shape=shape,
        wavelet="db1",
    )


def test_stock_loaders_fail_on_waveft_layers_the_model_lacks(pack, sd15, loras_dir):
    """The layers no entry of the key map asks for used to be 'lora key not loaded' lines only; now Load LoRA and
    Load LoRA (model only) fail naming the file, the layers (a shortened list) and what to do."""
    import nodes

    model, clip, _ = sd15
    name = "diffusion_model.middle_block.1.proj_in"
    shape = tuple(model.model.state_dict()[name + ".weight"].shape)
    kohya = kohya_layout(
        {f"lora_unet_no_such_block_{i}": shape[:2] for i in range(7)},
        {f"lora_unet_no_such_block_{i}": 20 for i in range(7)},
    )
    save_file(kohya, str(loras_dir / "elsewhere.safetensors"), metadata={"ss_base_model_version": "anima"})
    with pytest.raises(ValueError) as e:
        nodes.LoraLoaderModelOnly().load_lora_model_only(model, "elsewhere.safetensors", 1.0)
    msg = str(e.value)
    assert "elsewhere.safetensors" in msg and "no weight for 7 of its 7 WaveFT layers" in msg
    assert "lora_unet_no_such_block_0" in msg and "and 2 more" in msg and "lora_unet_no_such_block_6" not in msg
    assert "Load WaveFT" in msg and "'anima'" in msg

    # one matched native layer beside a text-encoder layer the CLIP's map lacks: fails with the CLIP given …
    import waveft_core as wft

    te_name = "lora_te_text_model_encoder_layers_99_self_attn_q_proj"
    wft.save(
        wft.Adapter({name: _native_layer(shape), te_name: _native_layer((32, 32), seed=1)}),
        loras_dir / "te_missing.safetensors",
    )
    with pytest.raises(ValueError) as e:
        nodes.LoraLoader().load_lora(model, clip, "te_missing.safetensors", 1.0, 1.0)
    assert "te_missing.safetensors" in str(e.value) and f"no weight for 1 of its 2 WaveFT layers ({te_name})" in str(
        e.value
    )
    # … while a model-only loader leaves text-encoder layers out by choice, and applies the model's layer
    patched = nodes.LoraLoaderModelOnly().load_lora_model_only(model, "te_missing.safetensors", 1.0)[0]
    assert set(patched.patches) == {name + ".weight"}
    # a file of text-encoder layers only would change nothing there: that fails, and Load LoRA applies it
    te_known = "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    te_key = pack.nodes.host.key_map(None, clip)[te_known]
    wft.save(
        wft.Adapter({te_known: _native_layer(tuple(clip.cond_stage_model.state_dict()[te_key].shape))}),
        loras_dir / "te_only.safetensors",
    )
    with pytest.raises(ValueError) as e:
        nodes.LoraLoaderModelOnly().load_lora_model_only(model, "te_only.safetensors", 1.0)
    assert "te_only.safetensors" in str(e.value) and "all 1 WaveFT layers" in str(e.value) and "CLIP" in str(e.value)
    _, te_patched = nodes.LoraLoader().load_lora(model, clip, "te_only.safetensors", 1.0, 1.0)
    assert set(te_patched.patcher.patches) == {te_key}


def test_lora_files_pass_the_guard_untouched(pack, sd15, loras_dir, caplog, monkeypatch):
    """The guard is installed once (a reload re-wraps the host's function, never its own wrapper), and a LoRA
    file goes through it as through the host alone: same patches, the same 'lora key not loaded' warning."""
    import logging

    import comfy.lora
    import comfy.sd

    import nodes

    pack.nodes.host.guard_stock_loaders()
    pack.nodes.host.guard_stock_loaders()
    host_load_lora = comfy.lora.load_lora.__waveft_original__
    assert host_load_lora.__module__ == "comfy.lora" and not hasattr(host_load_lora, "__waveft_original__")
    assert comfy.sd.load_lora_for_models.__waveft_original__.__module__ == "comfy.sd"

    model, clip, _ = sd15
    key = "diffusion_model.middle_block.1.proj_in.weight"
    out_features, in_features = model.model.state_dict()[key].shape[:2]
    lora = {
        "lora_unet_mid_block_attentions_0_proj_in.lora_up.weight": torch.randn(out_features, 2),
        "lora_unet_mid_block_attentions_0_proj_in.lora_down.weight": torch.randn(2, in_features),
        "lora_unet_no_such_block.lora_up.weight": torch.randn(4, 2),
        "lora_unet_no_such_block.lora_down.weight": torch.randn(2, 4),
    }
    save_file(lora, str(loras_dir / "plain_lora.safetensors"))
    with caplog.at_level(logging.WARNING):
        patched = nodes.LoraLoader().load_lora(model, clip, "plain_lora.safetensors", 0.5, 1.0)[0]
    assert "lora key not loaded: lora_unet_no_such_block.lora_up.weight" in caplog.text
    kmap = pack.nodes.host.key_map(model, clip)
    assert set(patched.patches) == set(host_load_lora(lora, kmap, log_missing=False)) == {key}
    got = patched_weights(patched, [key])[key]
    monkeypatch.setattr(comfy.lora, "load_lora", host_load_lora)  # the host alone
    host_only = comfy.sd.load_lora_for_models.__waveft_original__(model, clip, lora, 0.5, 1.0)[0]
    assert torch.equal(got, patched_weights(host_only, [key])[key])
    assert not torch.equal(got, model.model.state_dict()[key].float())
