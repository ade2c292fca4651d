"""Load WaveFT in a real ComfyUI, in-process: the host's ModelPatcher on the full-load and lowvram paths,
sliced keys, the stock LoRA loader, key maps, errors."""

import os

import pytest
import torch
from host_tools import patched_weights
from reference import reference_delta, rel_err

import waveft_core as wft
from waveft_core.convert.peft_io import peft_positions

UNET_LAYERS = {  # native name -> how many coefficients
    "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q": 2592,
    "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn2.to_k": 700,  # 320 x 768
    "diffusion_model.middle_block.1.transformer_blocks.0.ff.net.2": 900,
    "diffusion_model.input_blocks.1.1.proj_in": 400,  # a 1x1 conv in SD1.5
    "diffusion_model.input_blocks.1.0.in_layers.2": 500,  # a 3x3 conv
}
CLIP_LAYERS = {
    "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj": 1000,
    "text_encoders.clip_l.transformer.text_model.encoder.layers.11.mlp.fc2": 1000,
}


def state_key(native):
    """ComfyUI state-dict key of a native module name (model or CLIP)."""
    if native.startswith("diffusion_model."):
        return native + ".weight"
    return native[len("text_encoders.") :] + ".weight"


def make_adapter(model, clip, wavelet="db2", layers=None, seed=0, base="sd_v1"):
    layers = layers or {**UNET_LAYERS, **CLIP_LAYERS}
    msd = model.model.state_dict()
    csd = clip.cond_stage_model.state_dict()
    g = torch.Generator().manual_seed(seed)
    out = {}
    for name, p in layers.items():
        key = state_key(name)
        shape = tuple((msd if name.startswith("diffusion_model.") else csd)[key].shape)
        std = float((msd if name.startswith("diffusion_model.") else csd)[key].float().std())
        out[name] = wft.Layer(
            spectrum=torch.randn(p, generator=g) * std * 0.02,
            indices=peft_positions(shape, p, 777),
            shape=shape,
            scaling=25.0,
            wavelet=wavelet,
        )
    return wft.Adapter(layers=out, metadata={"ss_base_model_version": base, "modelspec.title": "test"})


def clip_patched_weights(clip, keys):
    return patched_weights(clip.patcher, keys)


def test_pack_registers_nodes_folder_and_adapter_once(pack):
    import comfy.weight_adapter as wa
    import folder_paths

    import nodes

    ours = [n for n in nodes.NODE_CLASS_MAPPINGS if n.startswith("WaveFT")]
    assert len(ours) == 9
    for node in ours:
        spec = nodes.NODE_CLASS_MAPPINGS[node].INPUT_TYPES()
        for name, (kind, opts) in {**spec["required"], **spec.get("optional", {})}.items():
            assert opts.get("tooltip"), f"{node}.{name} has no tooltip"
    assert "waveft" in folder_paths.folder_names_and_paths
    assert ".safetensors" in folder_paths.folder_names_and_paths["waveft"][1]
    pack.nodes.host.register_adapter_class()  # a second registration (a reload) must not duplicate it
    assert [a.name for a in wa.adapters].count("waveft") == 1


@pytest.mark.parametrize("wavelet", ["db1", "db4"])
def test_full_load_adds_exactly_strength_times_delta(pack, sd15, waveft_dir, wavelet):
    model, clip, _ = sd15
    ad = make_adapter(model, clip, wavelet)
    wft.save(ad, waveft_dir / "a.safetensors")
    loader = pack.nodes.loader.WaveFTLoader()
    out = loader.load(model, clip, "a.safetensors", 0.8, -0.5)
    new_model, new_clip = out["result"]
    assert "7 of 7 layers matched (5 model, 2 text encoder)" in out["ui"]["text"][0]
    assert new_model is not model and new_clip is not clip and not model.patches and not clip.patcher.patches

    ukeys = [state_key(n) for n in UNET_LAYERS]
    ckeys = [state_key(n) for n in CLIP_LAYERS]
    before = {k: v.clone() for k, v in model.model.state_dict().items() if k in ukeys}
    cbefore = {k: v.clone() for k, v in clip.cond_stage_model.state_dict().items() if k in ckeys}
    after = patched_weights(new_model, ukeys)
    cafter = clip_patched_weights(new_clip, ckeys)
    for name, strength, b, a in [(n, 0.8, before, after) for n in UNET_LAYERS] + [
        (n, -0.5, cbefore, cafter) for n in CLIP_LAYERS
    ]:
        layer = ad.layers[name]
        ref = torch.from_numpy(
            reference_delta(layer.indices, layer.spectrum.double(), layer.shape, wavelet, strength * 25.0)
        )
        k = state_key(name)
        if b[k].dtype == torch.float32:
            assert rel_err(a[k] - b[k].float(), ref) < 1e-5, name
        else:  # stored in fp16 (the CLIP here): ComfyUI computes in fp32 and rounds back once
            expect = (b[k].double() + ref).to(b[k].dtype).float()
            torch.testing.assert_close(a[k], expect, rtol=2**-10, atol=1e-7)
            assert rel_err(a[k] - b[k].float(), ref) < 2e-2, name
    # the input model is untouched and unpatched weights stay the same
    assert torch.equal(model.model.state_dict()[ukeys[0]], before[ukeys[0]])


def test_strength_zero_is_bit_identical_and_inputs_pass_through(pack, sd15, waveft_dir):
    model, clip, _ = sd15
    wft.save(make_adapter(model, clip), waveft_dir / "z.safetensors")
    loader = pack.nodes.loader.WaveFTLoader()
    m2, c2 = loader.load(model, clip, "z.safetensors", 0.0, 0.0)["result"]
    assert m2 is model and c2 is clip
    m3, _ = loader.load(model, clip, "z.safetensors", 0.0, 1.0)["result"]
    assert m3 is model  # model strength 0: the model is not even cloned


def test_lowvram_patch_recomputes_in_compute_dtype(pack, sd15, waveft_dir):
    """Partial loads call the patch on every forward with the weight already in the compute dtype."""
    from comfy.model_patcher import LowVramPatch

    model, clip, _ = sd15
    ad = make_adapter(model, clip, "db4")
    wft.save(ad, waveft_dir / "lv.safetensors")
    new_model, _ = pack.nodes.loader.WaveFTLoader().load(model, clip, "lv.safetensors", 1.5, 1.0)["result"]
    name = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q"
    key = state_key(name)
    w = model.model.state_dict()[key]
    for dtype in (torch.float16, torch.bfloat16):
        got = LowVramPatch(key, new_model.patches)(w.to(dtype).clone())
        expect = (w.to(dtype).float() + ad.layers[name].delta(torch.float32, strength=1.5)).to(dtype)
        assert got.dtype == dtype
        # The per-forward merge may form ΔW through the separable filters (waveft_core/separable.py): another fp32
        # summation order than Layer.delta, so a sum on a rounding boundary of `dtype` may land one step away.
        # Rounded once all the same: every entry within one step of the reference, nearly all equal to it.
        step = (torch.nextafter(expect.abs(), torch.tensor(float("inf"), dtype=dtype)) - expect.abs()).float()
        assert torch.all((got.float() - expect.float()).abs() <= step)
        assert (got != expect).float().mean() < 0.01
    # and a real partial load attaches it as the layer's weight function, giving the merged result
    import comfy.model_management as mm

    mm.unload_all_models()
    new_model.patch_model(device_to=torch.device("cpu"), lowvram_model_memory=1)
    try:
        module = new_model.model.diffusion_model.input_blocks[1][1].transformer_blocks[0].attn1.to_q
        assert any(isinstance(f, LowVramPatch) for f in module.weight_function)
        x = torch.randn(2, 5, w.shape[1])
        y = module(x)
        merged = w.float() + ad.layers[name].delta(torch.float32, strength=1.5)
        assert torch.allclose(y.float(), torch.nn.functional.linear(x, merged), atol=1e-4)
    finally:
        new_model.unpatch_model(device_to=torch.device("cpu"))


def test_sliced_keys_update_only_their_slice(pack):
    """A fused qkv weight (SD3/Flux) is patched through a narrowed view: only the slice may change."""
    import comfy.lora

    hidden = 24
    fused = torch.randn(3 * hidden, hidden)
    layer = wft.Layer(
        spectrum=torch.randn(50),
        indices=peft_positions((hidden, hidden), 50, 777),
        shape=(hidden, hidden),
        wavelet="db2",
    )
    adapter = pack.nodes.host.WaveFTAdapter.from_layer(layer)
    patches = [(0.7, adapter, 1.0, (0, hidden, hidden), None)]  # the k slice
    out = comfy.lora.calculate_weight(patches, fused.clone(), "x.qkv.weight")
    assert torch.equal(out[:hidden], fused[:hidden]) and torch.equal(out[2 * hidden :], fused[2 * hidden :])
    assert torch.allclose(out[hidden : 2 * hidden], fused[hidden : 2 * hidden] + layer.delta(strength=0.7), atol=1e-6)


def test_delta_function_is_applied(pack):
    """Keys with a function (swap_scale_shift on a DiT's final modulation) get the transformed delta."""
    import comfy.lora
    import comfy.utils

    w = torch.randn(8, 6)
    layer = wft.Layer(spectrum=torch.randn(10), indices=peft_positions((8, 6), 10, 777), shape=(8, 6), wavelet="db1")
    adapter = pack.nodes.host.WaveFTAdapter.from_layer(layer)
    out = comfy.lora.calculate_weight([(1.0, adapter, 1.0, None, comfy.utils.swap_scale_shift)], w.clone(), "k")
    assert torch.allclose(out, w + comfy.utils.swap_scale_shift(layer.delta()), atol=1e-6)


def test_stock_lora_loader_understands_waveft_files(pack, sd15, waveft_dir):
    import comfy.sd
    import comfy.utils

    model, clip, _ = sd15
    ad = make_adapter(model, clip, "sym3")
    path = wft.save(ad, waveft_dir / "stock.safetensors")
    sd = comfy.utils.load_torch_file(str(path), safe_load=True)
    m_stock, c_stock = comfy.sd.load_lora_for_models(model, clip, sd, 0.9, 0.9)
    m_node, c_node = pack.nodes.loader.WaveFTLoader().load(model, clip, "stock.safetensors", 0.9, 0.9)["result"]
    keys = [state_key(n) for n in UNET_LAYERS]
    a, b = patched_weights(m_stock, keys), patched_weights(m_node, keys)
    for k in keys:
        assert torch.equal(a[k], b[k]), k
    ck = [state_key(n) for n in CLIP_LAYERS]
    assert all(
        torch.equal(x, y)
        for x, y in zip(clip_patched_weights(c_stock, ck).values(), clip_patched_weights(c_node, ck).values())
    )


def test_stacks_with_loras_and_other_waveft(pack, sd15, waveft_dir):
    model, clip, _ = sd15
    a1 = make_adapter(model, clip, "db1", seed=1)
    a2 = make_adapter(model, clip, "db3", seed=2)
    wft.save(a1, waveft_dir / "one.safetensors")
    wft.save(a2, waveft_dir / "two.safetensors")
    loader = pack.nodes.loader.WaveFTLoader()
    m1, c1 = loader.load(model, clip, "one.safetensors", 1.0, 1.0)["result"]
    m2, _ = loader.load(m1, c1, "two.safetensors", -0.5, 1.0)["result"]
    # a LoRA on the same layer, through the stock path
    name = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q"
    key = state_key(name)
    w = model.model.state_dict()[key].float()
    up, down = torch.randn(w.shape[0], 2) * 0.01, torch.randn(2, w.shape[1]) * 0.01
    import comfy.sd

    m3, _ = comfy.sd.load_lora_for_models(
        m2,
        None,
        {
            "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_up.weight": up,
            "lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q.lora_down.weight": down,
        },
        1.0,
        0.0,
    )
    got = patched_weights(m3, [key])[key]
    expect = w + a1.layers[name].delta() - 0.5 * a2.layers[name].delta() + up @ down
    assert torch.allclose(got, expect, atol=1e-5)
    assert not model.patches and len(m1.patches) == len(UNET_LAYERS)


def test_peft_folder_in_models_waveft(pack, sd15, waveft_dir):
    """A PEFT folder (diffusers names, no stored positions) lists as 'name/' and gets PEFT's positions for
    this model's shapes."""
    import json

    from safetensors.torch import save_file

    model, clip, _ = sd15
    folder = waveft_dir / "my_peft"
    folder.mkdir()
    # this tiny UNet has one res block per level, so its diffusers names must come from the host's own map
    # (the fixed SD1.x/SDXL rule would say output_blocks.3 here)
    spec = {
        "base_model.model.up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_v.waveft_spectrum": torch.randn(300)
        * 0.001
    }
    save_file(spec, str(folder / "adapter_model.safetensors"))
    (folder / "adapter_config.json").write_text(
        json.dumps(
            {
                "peft_type": "WAVEFT",
                "n_frequency": 300,
                "scaling": 25.0,
                "wavelet_family": "db1",
                "random_loc_seed": 777,
                "use_idwt": True,
            }
        )
    )
    assert "my_peft/" in pack.nodes.loader.list_adapters()
    out = pack.nodes.loader.WaveFTLoader().load(model, clip, "my_peft/", 1.0, 1.0)
    new_model = out["result"][0]
    assert "1 of 1 layers matched" in out["ui"]["text"][0]
    key = "diffusion_model.output_blocks.2.1.transformer_blocks.0.attn1.to_v.weight"
    w = model.model.state_dict()[key].float()
    got = patched_weights(new_model, [key])[key]
    idx = peft_positions(tuple(w.shape), 300, 777)
    ref = torch.from_numpy(reference_delta(idx, spec[next(iter(spec))].double(), tuple(w.shape), "db1", 25.0))
    assert rel_err(got - w, ref) < 1e-5


def test_errors_name_the_file_and_what_to_do(pack, sd15, waveft_dir):
    model, clip, _ = sd15
    loader = pack.nodes.loader.WaveFTLoader()
    # layers of another model
    other = wft.Adapter(
        layers={
            "diffusion_model.joint_blocks.0.x_block.attn.qkv": wft.Layer(
                spectrum=torch.ones(4), indices=torch.arange(4), shape=(96, 32)
            )
        },
        metadata={"ss_base_model_version": "sd3"},
    )
    wft.save(other, waveft_dir / "sd3.safetensors")
    with pytest.raises(ValueError, match=r"sd3.safetensors: none of its 1 layers match.*made for sd3.*SD15"):
        loader.load(model, clip, "sd3.safetensors", 1.0, 1.0)
    # a layer whose shape differs from the model's
    bad = make_adapter(model, clip, layers={"diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q": 10})
    bad.layers["diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q"].shape = (320, 321)
    wft.save(bad, waveft_dir / "shape.safetensors")
    with pytest.raises(ValueError, match=r"shape.safetensors: 1 layer\(s\) have another shape.*\[320, 321\]"):
        loader.load(model, clip, "shape.safetensors", 1.0, 1.0)
    # a damaged file
    (waveft_dir / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(ValueError, match="broken.safetensors"):
        loader.load(model, clip, "broken.safetensors", 1.0, 1.0)
    # a partial match loads what matches and says how much
    part = make_adapter(model, clip, layers={"diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q": 10})
    part.layers["diffusion_model.nowhere.to_q"] = wft.Layer(
        spectrum=torch.ones(2), indices=torch.arange(2), shape=(4, 4), wavelet="db2"
    )
    wft.save(part, waveft_dir / "part.safetensors")
    out = loader.load(model, clip, "part.safetensors", 1.0, 1.0)
    assert "1 of 2 layers matched" in out["ui"]["text"][0] and "1 did not match" in out["ui"]["text"][0]


def test_edited_file_reloads(pack, sd15, waveft_dir):
    model, clip, _ = sd15
    loader_cls = pack.nodes.loader.WaveFTLoader
    wft.save(make_adapter(model, clip, seed=1), waveft_dir / "e.safetensors")
    f1 = loader_cls.IS_CHANGED("e.safetensors")
    st = os.stat(waveft_dir / "e.safetensors")
    wft.save(make_adapter(model, clip, seed=2), waveft_dir / "e.safetensors")
    os.utime(waveft_dir / "e.safetensors", ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    assert loader_cls.IS_CHANGED("e.safetensors") != f1


def test_info_node_reports_metadata_and_matches(pack, sd15, waveft_dir):
    model, clip, _ = sd15
    ad = make_adapter(model, clip)
    ad.metadata["modelspec.trigger_phrase"] = "sks cat"
    wft.save(ad, waveft_dir / "info.safetensors")
    text = pack.nodes.loader.WaveFTInfo().info("info.safetensors", model=model, clip=clip)["result"][0]
    for words in (
        "layers: 7",
        "wavelet: db2",
        "scaling: 25",
        "base model: sd_v1",
        "trigger words: sks cat",
        "matches this model (SD15): 7 of 7 layers",
    ):
        assert words in text, text


def test_waveft_files_among_loras_are_listed(pack, tmp_path):
    import folder_paths

    loras = tmp_path / "loras"
    loras.mkdir()
    layer = wft.Layer(spectrum=torch.ones(3), indices=torch.arange(3), shape=(4, 4))
    wft.save(wft.Adapter(layers={"diffusion_model.x": layer}), loras / "wave.safetensors")
    from safetensors.torch import save_file

    save_file({"a.lora_up.weight": torch.ones(2, 2)}, str(loras / "plain_lora.safetensors"))
    paths, exts = folder_paths.folder_names_and_paths["loras"]
    folder_paths.folder_names_and_paths["loras"] = ([str(loras)], exts)
    try:
        names = pack.nodes.loader.list_adapters()
    finally:
        folder_paths.folder_names_and_paths["loras"] = (paths, exts)
    assert "loras/wave.safetensors" in names and "loras/plain_lora.safetensors" not in names


def test_our_unet_names_agree_with_comfyui_for_sd15_and_sdxl():
    """waveft_core's fixed diffusers->LDM rule (used offline) against ComfyUI's own map for real configs."""
    import comfy.supported_models
    import comfy.utils

    from waveft_core.names.families import diffusers_unet_to_ldm

    sd15 = dict(
        comfy.supported_models.SD15.unet_config,
        num_res_blocks=[2] * 4,
        channel_mult=[1, 2, 4, 4],
        transformer_depth=[1, 1, 1, 1, 1, 1, 0, 0],
        transformer_depth_output=[1] * 9 + [0] * 3,
        transformer_depth_middle=1,
        num_heads=8,
        num_head_channels=-1,
        in_channels=4,
        out_channels=4,
    )
    sdxl = dict(
        comfy.supported_models.SDXL.unet_config,
        num_res_blocks=[2] * 3,
        channel_mult=[1, 2, 4],
        transformer_depth=[0, 0, 2, 2, 10, 10],
        transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
        transformer_depth_middle=10,
        num_heads=-1,
        num_head_channels=64,
        in_channels=4,
        out_channels=4,
    )
    for config in (sd15, sdxl):
        checked = 0
        for diffusers_key, ldm_key in comfy.utils.unet_to_diffusers(config).items():
            if not diffusers_key.endswith(".weight") or "upsamplers" in diffusers_key:
                continue
            mine = diffusers_unet_to_ldm(diffusers_key[: -len(".weight")])
            if mine is None:
                continue
            assert mine + ".weight" == ldm_key, diffusers_key
            checked += 1
        assert checked > 100


def test_bypass_mode_h_adds_the_delta_output(pack):
    """Newer ComfyUI's bypass mode calls h(x, base_out) instead of merging: it must equal x @ (s·ΔW)^T, and
    the conv form for conv layers."""
    lin = wft.Layer(spectrum=torch.randn(30), indices=peft_positions((12, 20), 30, 777), shape=(12, 20), wavelet="db2")
    adapter = pack.nodes.host.WaveFTAdapter.from_layer(lin)
    adapter.multiplier = 0.7
    x = torch.randn(3, 5, 20)
    assert torch.allclose(adapter.h(x, None), torch.nn.functional.linear(x, lin.delta(strength=0.7)), atol=1e-6)
    conv = wft.Layer(spectrum=torch.randn(40), indices=peft_positions((6, 4, 3, 3), 40, 777), shape=(6, 4, 3, 3))
    adapter = pack.nodes.host.WaveFTAdapter.from_layer(conv)
    adapter.multiplier, adapter.is_conv, adapter.conv_dim, adapter.kw_dict = 1.5, True, 2, {"padding": 1}
    x = torch.randn(2, 4, 9, 9)
    expect = torch.nn.functional.conv2d(x, conv.delta(strength=1.5), padding=1)
    assert torch.allclose(adapter.h(x, None), expect, atol=1e-5)
    assert adapter.g(x) is x


def test_merge_node_writes_a_checkpoint_comfyui_loads(pack, sd15, checkpoint_state, waveft_dir, tmp_path):
    """Merge WaveFT into Checkpoint: the new file holds W + s·ΔW, ComfyUI loads it, nothing else changes."""
    import comfy.sd
    import folder_paths
    from safetensors.torch import load_file, save_file

    model, clip, _ = sd15
    ad = make_adapter(model, clip, "db1")
    wft.save(ad, waveft_dir / "m.safetensors")
    ckpts = tmp_path / "checkpoints"
    ckpts.mkdir()
    save_file(checkpoint_state, str(ckpts / "base.safetensors"))
    paths, exts = folder_paths.folder_names_and_paths["checkpoints"]
    folder_paths.folder_names_and_paths["checkpoints"] = ([str(ckpts)], exts)
    folder_paths.filename_list_cache.clear()
    try:
        out = pack.nodes.convert_nodes.WaveFTMergeCheckpoint().merge("base.safetensors", "m.safetensors", 0.5, "merged")
    finally:
        folder_paths.folder_names_and_paths["checkpoints"] = (paths, exts)
        folder_paths.filename_list_cache.clear()
    assert out["result"][0] == "merged.safetensors" and "7 layers merged" in out["ui"]["text"][0]
    merged = load_file(str(ckpts / "merged.safetensors"))
    name = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q"
    key = "model." + name + ".weight"
    w = checkpoint_state[key]
    assert torch.equal(merged[key], (w.float() + ad.layers[name].delta(strength=0.5)).to(w.dtype))
    untouched = "model.diffusion_model.out.2.weight"
    assert torch.equal(merged[untouched], checkpoint_state[untouched])
    with torch.inference_mode():
        m2, _, _, _ = comfy.sd.load_checkpoint_guess_config(str(ckpts / "merged.safetensors"))
    assert type(m2.model.model_config).__name__ == "SD15"


def test_host_tests_run_from_a_checkout_named_like_a_user_install(tmp_path):
    """Users clone into custom_nodes/ComfyUI-WaveFT, a folder name that is no Python identifier; the host
    tests (and pytest collecting the pack's root __init__.py) must work from there too."""
    import shutil
    import subprocess
    import sys

    from conftest import COMFY, ROOT

    copy = tmp_path / "ComfyUI-WaveFT"
    shutil.copytree(ROOT, copy, ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", ".pytest_cache"))
    run = subprocess.run(
        [
            sys.executable,
            "-m",
            "pytest",
            "-q",
            "-p",
            "no:cacheprovider",
            "tests/host/test_loader_host.py::test_pack_registers_nodes_folder_and_adapter_once",
            "tests/host/test_loader_host.py::test_sliced_keys_update_only_their_slice",
        ],
        cwd=copy,
        env={**os.environ, "COMFYUI_PATH": COMFY, "WAVEFT_REQUIRE_HOST": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0 and "2 passed" in run.stdout, run.stdout[-3000:] + run.stderr[-2000:]


def test_a_diffusers_file_among_loras_loads_through_the_node(pack, sd15, tmp_path):
    """A pipeline's save_lora_weights file (unet./text_encoder. prefixes, a transformers-5 text-encoder name,
    per-component settings in lora_adapter_metadata) dropped into models/loras: listed, and applied exactly
    with positions drawn for the connected model's and CLIP's shapes."""
    import json

    import folder_paths
    from safetensors.torch import save_file

    model, clip, _ = sd15
    unet_name, te_name = "up_blocks.1.attentions.0.transformer_blocks.0.attn1.to_v", "encoder.layers.0.self_attn.q_proj"
    g = torch.Generator().manual_seed(4)
    spectra = {
        f"unet.{unet_name}.waveft_spectrum": torch.randn(300, generator=g) * 1e-3,
        f"text_encoder.{te_name}.waveft_spectrum": torch.randn(200, generator=g) * 1e-2,
    }
    settings = {
        "unet.wavelet_family": "db2",
        "unet.scaling": 10.0,
        "unet.random_loc_seed": 5,
        "unet.use_idwt": True,
        "text_encoder.wavelet_family": "db1",
        "text_encoder.scaling": 3.0,
        "text_encoder.random_loc_seed": 9,
    }
    loras = tmp_path / "loras"
    loras.mkdir()
    save_file(
        spectra,
        str(loras / "from_diffusers.safetensors"),
        metadata={"format": "pt", "lora_adapter_metadata": json.dumps(settings)},
    )
    paths, exts = folder_paths.folder_names_and_paths["loras"]
    folder_paths.folder_names_and_paths["loras"] = ([str(loras)], exts)
    folder_paths.filename_list_cache.clear()
    try:
        assert "loras/from_diffusers.safetensors" in pack.nodes.loader.list_adapters()
        out = pack.nodes.loader.WaveFTLoader().load(model, clip, "loras/from_diffusers.safetensors", 1.0, 0.5)
    finally:
        folder_paths.folder_names_and_paths["loras"] = (paths, exts)
        folder_paths.filename_list_cache.clear()
    report = out["ui"]["text"][0]
    assert "2 of 2 layers matched (1 model, 1 text encoder)" in report
    assert "PEFT's defaults used: use_idwt True" in report and "layers go to clip_l" in report
    new_model, new_clip = out["result"]
    ukey = "diffusion_model.output_blocks.2.1.transformer_blocks.0.attn1.to_v.weight"
    ckey = "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    w = model.model.state_dict()[ukey]
    cw = clip.cond_stage_model.state_dict()[ckey]
    ref = reference_delta(
        peft_positions(tuple(w.shape), 300, 5),
        spectra[f"unet.{unet_name}.waveft_spectrum"].double(),
        tuple(w.shape),
        "db2",
        10.0,
    )
    assert rel_err(patched_weights(new_model, [ukey])[ukey] - w.float(), torch.from_numpy(ref)) < 1e-5
    te_spectrum = spectra[f"text_encoder.{te_name}.waveft_spectrum"].double()
    cref = reference_delta(peft_positions(tuple(cw.shape), 200, 9), te_spectrum, tuple(cw.shape), "db1", 0.5 * 3.0)
    expect = (cw.double() + torch.from_numpy(cref)).to(cw.dtype).float()
    torch.testing.assert_close(clip_patched_weights(new_clip, [ckey])[ckey], expect, rtol=2**-10, atol=1e-7)
