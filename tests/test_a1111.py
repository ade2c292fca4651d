"""WaveFT in AUTOMATIC1111 and the Forge family (Forge, reForge, Forge Classic): the a1111/ extension.

Without a checkout (never skipped): the name mapping (a1111/keymap.py), A1111 target resolution on a model named by
A1111's rule, the Forge patch calculator, version detection from metadata, file routing, the root entry script and
install.py, and the Forge versions of August 2024 (not bundled: their call signatures are reproduced).

With A1111_PATH, FORGE_PATH, REFORGE_PATH, FORGE_CLASSIC_PATH (./dev test unpacks all four from ../shared/webui,
and under CI a missing one fails): the extension is cloned into extensions/ and loaded by the webui's own
modules.script_loading; the webui's real Lora extension (network.py, networks.py, and in A1111 network_*.py,
lyco_helpers, extra_networks_lora), its real patchers (A1111's network_apply_weights / network_forward; Forge's
backend.patcher; reForge's and Forge Classic's ldm_patched ModelPatcher and CLIP), its modules.errors,
modules.extra_networks, modules.cache and modules.hashes (caching into a temp folder) and the real
read_metadata_from_safetensors (compiled from modules/sd_models.py alone) load WaveFT files, and the weights they
change must equal Layer.delta * multiplier. Stubbed, as they need a GPU, a model download or the UI:
modules.shared (opts, cmd_opts, walk_files, sd_model), modules.devices, the rest of modules.sd_models,
modules.scripts, modules.sd_hijack, modules.textual_inversion, modules.models.sd3.mmdit (an isinstance check),
modules.paths, gradio; PIL, sentencepiece, torchvision and diffusers.configuration_utils where they cannot import
beside the CPU torch. The models are small torch module trees with each webui's attribute layout (A1111:
model.diffusion_model, cond_stage_model.wrapped / conditioner.embedders[i].wrapped with CLIP-G in OpenCLIP layout;
the Forge family: ComfyUI's diffusion_model.* and clip_l/clip_g.transformer.* parameters).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.machinery
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from manager_readers import addnet_hash  # noqa: E402  (what the webuis show as a LoRA's hash)

import waveft_core as wft  # noqa: E402
from a1111 import a1111_hooks, forge_hooks, keymap, webui  # noqa: E402
from waveft_core.files import metadata as shared_keys  # noqa: E402
from waveft_core.names.families import to_native  # noqa: E402

WAVELET = "db2"  # a 4-tap filter: the deltas are not the Haar special case
TOL = 1e-6


def rel_err(a, b) -> float:
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def make_layer(shape, p, seed, scaling=2.5):
    g = torch.Generator().manual_seed(seed)
    m, n = shape[0], int(torch.tensor(shape[1:]).prod())
    idx = torch.randperm(m * n, generator=g)[:p]
    return wft.Layer(
        spectrum=torch.randn(p, generator=g), indices=idx, shape=tuple(shape), scaling=scaling, wavelet=WAVELET
    )


def save_adapter(path, layers: dict, base: str):
    wft.save(wft.Adapter(layers=layers, metadata={"ss_base_model_version": base}), path)
    return wft.load(path)  # the reference: what the file holds


def put(root: torch.nn.Module, path: str, module: torch.nn.Module):
    node = root
    parts = path.split(".")
    for part in parts[:-1]:
        child = node._modules.get(part)
        if child is None:
            child = torch.nn.Module()
            node.add_module(part, child)
        node = child
    node.add_module(parts[-1], module)
    return module


def get(root, path):
    for part in path.split("."):
        root = root._modules[part]
    return root


def zero_(model):
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    return model


# Layers of the test files: native name -> (shape, model path in the fake A1111 model)
UNET_Q = "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q"
UNET_CONV = "diffusion_model.input_blocks.0.0"
UNET_K2 = "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k"
CLIP_L_Q = "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj"
CLIP_L_FC1 = "text_encoders.clip_l.transformer.text_model.encoder.layers.0.mlp.fc1"
CLIP_L_EMB = "text_encoders.clip_l.transformer.text_model.embeddings.token_embedding"
CLIP_G = "text_encoders.clip_g.transformer.text_model.encoder.layers.1."
CLIP_G_Q, CLIP_G_V, CLIP_G_FC2 = CLIP_G + "self_attn.q_proj", CLIP_G + "self_attn.v_proj", CLIP_G + "mlp.fc2"
CLIP_G_PROJ = "text_encoders.clip_g.transformer.text_projection"
D_G = 48  # CLIP-G width of the fake model


def sd1_layers():
    return {
        UNET_Q: make_layer((32, 32), 200, 1),
        UNET_CONV: make_layer((32, 4, 3, 3), 150, 2, scaling=7.0),  # a per-layer scaling
        CLIP_L_Q: make_layer((64, 64), 300, 3),
        CLIP_L_FC1: make_layer((128, 64), 300, 4),
        CLIP_L_EMB: make_layer((100, 64), 50, 5),  # A1111 never patches embeddings: skipped with a message
    }


def sdxl_layers():
    return {
        UNET_K2: make_layer((32, 40), 200, 11),
        CLIP_L_Q: make_layer((64, 64), 300, 12),
        CLIP_G_Q: make_layer((D_G, D_G), 300, 13),
        CLIP_G_V: make_layer((D_G, D_G), 300, 14, scaling=4.0),
        CLIP_G_FC2: make_layer((D_G, 4 * D_G), 300, 15),
        CLIP_G_PROJ: make_layer((D_G, D_G), 40, 16),  # a bare Parameter in OpenCLIP: skipped in A1111
    }


def a1111_sd1_model():
    m = torch.nn.Module()
    m.is_sdxl, m.is_sd2 = False, False
    put(m, "model." + UNET_Q, torch.nn.Linear(32, 32, bias=False))
    put(m, "model." + UNET_CONV, torch.nn.Conv2d(4, 32, 3, padding=1))
    te = "cond_stage_model.wrapped.transformer.text_model."
    put(m, te + "encoder.layers.0.self_attn.q_proj", torch.nn.Linear(64, 64))
    put(m, te + "encoder.layers.0.mlp.fc1", torch.nn.Linear(64, 128))
    put(m, te + "embeddings.token_embedding", torch.nn.Embedding(100, 64))
    return zero_(m)


def a1111_sdxl_model():
    m = torch.nn.Module()
    m.is_sdxl, m.is_sd2 = True, False
    put(m, "model." + UNET_K2, torch.nn.Linear(40, 32, bias=False))
    e0, e1 = torch.nn.Module(), torch.nn.Module()
    put(e0, "wrapped.transformer.text_model.encoder.layers.0.self_attn.q_proj", torch.nn.Linear(64, 64))
    blk = "wrapped.model.transformer.resblocks.1."
    put(e1, blk + "attn", torch.nn.MultiheadAttention(D_G, 4))
    put(e1, blk + "mlp.c_fc", torch.nn.Linear(D_G, 4 * D_G))
    put(e1, blk + "mlp.c_proj", torch.nn.Linear(4 * D_G, D_G))
    e1.wrapped.model.text_projection = torch.nn.Parameter(torch.zeros(D_G, D_G))
    put(m, "conditioner.embedders", torch.nn.ModuleList([e0, e1]))
    return zero_(m)


def a1111_mapping(model) -> dict:
    """A1111's naming rule (networks.assign_network_names_to_compvis_modules), for the tests without a checkout."""
    out = {}
    if model.is_sdxl:
        for i, emb in enumerate(model.conditioner.embedders):
            out.update({f"{i}_{n.replace('.', '_')}": mod for n, mod in emb.wrapped.named_modules()})
    else:
        out.update({n.replace(".", "_"): mod for n, mod in model.cond_stage_model.wrapped.named_modules()})
    out.update({n.replace(".", "_"): mod for n, mod in model.model.named_modules()})
    return out


# ----------------------------------------------------------------------------------------------------------------
# Without a checkout
# ----------------------------------------------------------------------------------------------------------------


def test_keymap_unet_and_clip_l_names():
    T = keymap.A1111Target
    assert keymap.a1111_targets(UNET_Q) == [
        T(
            "diffusion_model_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
            "diffusion_model_input_blocks_4_1_transformer_blocks_0_attn1_to_q",
        )
    ]
    assert (
        keymap.a1111_targets("diffusion_model.output_blocks.2.1.conv")[0].lookup
        == "diffusion_model_output_blocks_2_1_conv"
    )
    assert [t.lookup for t in keymap.a1111_targets(CLIP_L_Q)] == [
        "0_transformer_text_model_encoder_layers_0_self_attn_q_proj",  # SDXL: embedder 0
        "transformer_text_model_encoder_layers_0_self_attn_q_proj",  # SD1
    ]
    assert all(t.part is None and t.lookup == t.module_key for t in keymap.a1111_targets(CLIP_L_FC1))
    assert keymap.a1111_targets(CLIP_L_EMB) == []
    assert "embedding" in keymap.unsupported_reason(CLIP_L_EMB)


def test_keymap_openclip_fused_attention():
    T = keymap.A1111Target
    blk = "1_model_transformer_resblocks_1"
    assert keymap.a1111_targets(CLIP_G_Q)[0] == T(f"{blk}_attn", f"{blk}_attn_q_proj", "q")
    assert keymap.a1111_targets(CLIP_G + "self_attn.k_proj")[0] == T(f"{blk}_attn", f"{blk}_attn_k_proj", "k")
    assert keymap.a1111_targets(CLIP_G_V)[0].part == "v"
    out = keymap.a1111_targets(CLIP_G + "self_attn.out_proj")[0]
    assert out == T(f"{blk}_attn_out_proj", f"{blk}_attn_out_proj", "out") and out.mha_key == f"{blk}_attn"
    assert keymap.a1111_targets(CLIP_G_Q)[0].mha_key == f"{blk}_attn"
    assert keymap.a1111_targets(CLIP_G + "mlp.fc1")[0] == T(f"{blk}_mlp_c_fc", f"{blk}_mlp_c_fc")
    assert keymap.a1111_targets(CLIP_G_FC2)[0] == T(f"{blk}_mlp_c_proj", f"{blk}_mlp_c_proj")
    # the SDXL refiner has CLIP-G as embedder 0; SD2's CLIP-H has no prefix
    assert [t.lookup for t in keymap.a1111_targets(CLIP_G_Q)] == [f"{blk}_attn", "0_model_transformer_resblocks_1_attn"]
    h = "text_encoders.clip_h.transformer.text_model.encoder.layers.5.self_attn.v_proj"
    assert keymap.a1111_targets(h) == [
        T("model_transformer_resblocks_5_attn", "model_transformer_resblocks_5_attn_v_proj", "v")
    ]
    assert keymap.a1111_targets(CLIP_G_PROJ) == []
    assert "text_projection" in keymap.unsupported_reason(CLIP_G_PROJ)
    assert keymap.a1111_targets("text_encoders.t5xxl.transformer.encoder.block.0.layer.0.SelfAttention.q") == []


def test_keymap_agrees_with_peft_names():
    """A PEFT/diffusers name, made native by waveft_core, lands where A1111's kohya converter puts the same layer."""
    assert keymap.a1111_targets(to_native("text_encoder_2.text_model.encoder.layers.3.self_attn.q_proj"))[
        0
    ] == keymap.A1111Target("1_model_transformer_resblocks_3_attn", "1_model_transformer_resblocks_3_attn_q_proj", "q")
    # A1111's convert_diffusers_name_to_compvis: lora_unet_down_blocks_1_attentions_0_..._to_q -> input_blocks_4_1_...
    native = to_native("unet.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q")
    assert keymap.a1111_targets(native)[0].lookup == "diffusion_model_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    native = to_native("unet.up_blocks.1.resnets.2.conv1")
    assert keymap.a1111_targets(native)[0].lookup == "diffusion_model_output_blocks_5_0_in_layers_2"


def test_keymap_forge_keys():
    assert keymap.forge_key(UNET_Q) == ("unet", UNET_Q + ".weight")
    assert keymap.forge_key(CLIP_G_Q) == ("clip", CLIP_G_Q[len("text_encoders.") :] + ".weight")
    assert keymap.forge_key(CLIP_G_PROJ) == ("clip", "clip_g.transformer.text_projection.weight")
    assert keymap.forge_key("lora_unet_x") is None


@pytest.mark.parametrize(
    "metadata, expected",
    [
        ({"ss_network_module": "waveft", "ss_base_model_version": "sd_v1"}, "SD1"),
        ({"ss_network_module": "waveft", "ss_base_model_version": "sdxl_base_v1-0"}, "SDXL"),
        ({"ss_network_module": "waveft", "modelspec.architecture": "stable-diffusion-xl-v1-base/waveft"}, "SDXL"),
        ({"ss_network_module": "waveft", "modelspec.architecture": "stable-diffusion-v1/waveft"}, "SD1"),
        ({"ss_network_module": "waveft", "ss_base_model_version": "sd_v2"}, "SD2"),
        ({"ss_network_module": "waveft", "ss_base_model_version": "flux1"}, "Flux"),
        ({"ss_network_module": "waveft"}, "Unknown"),
        ({"ss_network_module": "networks.lora", "ss_base_model_version": "sd_v1"}, None),
        ({}, None),
    ],
)
def test_sd_version_from_metadata(metadata, expected):
    assert keymap.sd_version(metadata) == expected


def test_is_waveft_file(tmp_path):
    from safetensors.torch import save_file

    native = tmp_path / "a.safetensors"
    save_adapter(native, {UNET_Q: make_layer((32, 32), 10, 0)}, "sd_v1")
    peft = tmp_path / "adapter_model.safetensors"
    save_file({"base_model.model.x.waveft_spectrum": torch.zeros(3)}, str(peft))
    lora = tmp_path / "lora.safetensors"
    save_file(
        {"lora_unet_x.lora_up.weight": torch.zeros(2, 2)}, str(lora), metadata={"ss_network_module": "networks.lora"}
    )
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file at all")
    ckpt = tmp_path / "x.ckpt"
    ckpt.write_bytes(b"PK")
    assert keymap.is_waveft_file(native) and keymap.is_waveft_file(peft)
    assert not keymap.is_waveft_file(lora) and not keymap.is_waveft_file(junk) and not keymap.is_waveft_file(ckpt)
    assert keymap.is_waveft_file(ckpt, {"ss_network_module": "waveft"})  # the host's cached metadata also counts
    from waveft_core.files.storage import peek_header

    header = peek_header(native)
    assert UNET_Q + ".waveft_spectrum" in header.tensors and header.metadata["ss_network_module"] == "waveft"
    assert peek_header(junk) is None and peek_header(ckpt) is None


def test_resolve_on_a1111_names():
    """The hooks' resolution against a model named by A1111's rule: right layer, right slice shape, clear refusals."""
    mapping = a1111_mapping(a1111_sdxl_model())
    target, module, expected = a1111_hooks.resolve(CLIP_G_Q, mapping)
    assert isinstance(module, torch.nn.MultiheadAttention) and expected == (D_G, D_G) and target.part == "q"
    target, module, expected = a1111_hooks.resolve(CLIP_G + "self_attn.out_proj", mapping)
    assert isinstance(module, torch.nn.Linear) and module is mapping[target.mha_key].out_proj
    target, module, expected = a1111_hooks.resolve(CLIP_G_FC2, mapping)
    assert expected == (D_G, 4 * D_G) and target.lookup == "1_model_transformer_resblocks_1_mlp_c_proj"
    target, module, expected = a1111_hooks.resolve(CLIP_L_Q, mapping)
    assert target.lookup.startswith("0_transformer_") and expected == (64, 64)
    target, module, reason = a1111_hooks.resolve(CLIP_G_PROJ, mapping)
    assert target is None and "text_projection" in reason
    target, module, reason = a1111_hooks.resolve(UNET_Q, mapping)  # an SD1 layer the SDXL model lacks
    assert target is None and "no such layer" in reason
    sd1 = a1111_mapping(a1111_sd1_model())
    assert a1111_hooks.resolve(CLIP_L_Q, sd1)[0].lookup == "transformer_text_model_encoder_layers_0_self_attn_q_proj"
    assert a1111_hooks.resolve(UNET_CONV, sd1)[2] == (32, 4, 3, 3)
    assert a1111_hooks.shape_fits((320, 4, 3, 3), (320, 9, 3, 3))  # inpainting conv_in: A1111 pads the update
    assert not a1111_hooks.shape_fits((320, 4, 3, 3), (320, 8, 3, 3))
    assert not a1111_hooks.shape_fits((32, 32), (32, 40))


def test_forge_calculator_and_patches(capsys):
    layers = sdxl_layers()
    ad = wft.Adapter(layers=layers)
    unet_params = {UNET_K2 + ".weight": torch.zeros(32, 40)}
    clip_params = {
        "clip_g.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight": torch.zeros(D_G, D_G),
        "clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": torch.zeros(9, 9),
    }
    unet, clip, skipped = forge_hooks.build_patches(ad, unet_params, clip_params, "x.safetensors")
    assert list(unet) == [UNET_K2 + ".weight"]
    assert list(clip) == ["clip_g.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight"]
    assert len(skipped) == 4 and any("shape [64, 64]" in s for s in skipped)
    patch_type, payload = unet[UNET_K2 + ".weight"]
    assert patch_type == "waveft"
    w = torch.zeros(32, 40)
    out = forge_hooks.weight_calculator(w, 0.75, payload)
    assert out is w and rel_err(w, layers[UNET_K2].delta(strength=0.75)) < TOL
    bad = torch.zeros(8, 8)
    assert forge_hooks.weight_calculator(bad, 1.0, payload) is bad and not bad.any()
    assert "not applied" in capsys.readouterr().err


def test_forge_of_mid_august_2024_keeps_its_loras(tmp_path, capsys):
    """Forge 2024-08-13..29: load_lora_for_models has no online_mode; an ordinary LoRA must reach it with exactly the
    arguments it takes, and a WaveFT file must be applied with add_patches' own arguments. Forge 2024-08-02..12 has
    no extra_weight_calculators: nothing is hooked, one console line says why, ordinary LoRAs are untouched."""
    calls = []

    def old_loader(model, clip, lora, strength_model, strength_clip, filename="default"):
        calls.append(filename)
        return "model", "clip"

    class Patcher:  # a UNet patcher whose add_patches has no online_mode either
        def __init__(self):
            self.model = torch.nn.Module()
            put(self.model, "diffusion_model.x", torch.nn.Linear(6, 4, bias=False))
            self.added = []

        def clone(self):
            return self

        def add_patches(self, *, filename, patches, strength_patch=1.0, strength_model=1.0):
            self.added.append((filename, sorted(patches), strength_patch))

    networks = types.SimpleNamespace(load_lora_for_models=old_loader)
    forge_hooks.install(networks, None, types.SimpleNamespace(extra_weight_calculators={}))
    assert networks.load_lora_for_models(
        None, None, {"x.lora_up.weight": 1}, 1.0, 1.0, filename="plain.safetensors"
    ) == ("model", "clip") and calls == ["plain.safetensors"]
    path = str(tmp_path / "w.safetensors")
    save_adapter(path, {"diffusion_model.x": make_layer((4, 6), 5, 0)}, "sd_v1")
    unet = Patcher()
    out, _ = networks.load_lora_for_models(unet, None, forge_hooks._WaveFTFile(path), 0.7, 1.0, filename=path)
    assert out.added == [(path, ["diffusion_model.x.weight"], 0.7)]
    capsys.readouterr()

    untouched = types.SimpleNamespace(load_lora_for_models=old_loader)
    sys.modules["networks"], sys.modules["network"] = untouched, None
    try:
        import a1111.webui as webui_module

        original = webui_module._import
        webui_module._import = lambda name: types.SimpleNamespace() if name == "backend.patcher.lora" else None
        try:
            assert webui.install() == ""
        finally:
            webui_module._import = original
    finally:
        del sys.modules["networks"], sys.modules["network"]
    err = capsys.readouterr().err
    assert err.count("[WaveFT]") == 1 and "no extra_weight_calculators" in err and "ordinary LoRAs are untouched" in err
    assert untouched.load_lora_for_models is old_loader


def test_webui_install_without_host_is_harmless(capsys):
    saved = {k: sys.modules.pop(k) for k in ("networks", "network") if k in sys.modules}
    try:
        assert webui.install(defer=False) == ""
        assert "Lora extension is not loaded" in capsys.readouterr().err
    finally:
        sys.modules.update(saved)


def _fake_clone(tmp_path):
    """A repo clone as A1111 makes it: the root files in place, a1111/ and waveft_core/ beside them."""
    ext = tmp_path / "extensions" / "ComfyUI-WaveFT"
    (ext / "scripts").mkdir(parents=True)
    (ext / "scripts" / "waveft_webui.py").write_text((ROOT / "scripts" / "waveft_webui.py").read_text())
    (ext / "install.py").write_text((ROOT / "install.py").read_text())
    (ext / "requirements.txt").write_text((ROOT / "requirements.txt").read_text())
    for name in ("a1111", "waveft_core"):
        (ext / name).symlink_to(ROOT / name, target_is_directory=True)
    return ext


def test_root_entry_script_loads_outside_a_webui(tmp_path):
    ext = _fake_clone(tmp_path)
    # as A1111 loads it: by path, as a module named after the file, with no repo root on sys.path
    code = (
        "import importlib.util, sys; p = sys.argv[1]; "
        "s = importlib.util.spec_from_file_location('waveft_webui.py', p); m = importlib.util.module_from_spec(s); "
        "s.loader.exec_module(m); import waveft_a1111.webui as w; print('loaded', w.__name__); "
        "assert all(not x.endswith('ComfyUI-WaveFT') for x in sys.path)"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, str(ext / "scripts" / "waveft_webui.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "loaded waveft_a1111.webui" in r.stdout
    assert "not running inside AUTOMATIC1111 or Forge" in r.stderr
    # install.py with every requirement present: nothing to do, says so, exits cleanly
    r = subprocess.run(
        [sys.executable, str(ext / "install.py")], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0 and "nothing installed" in r.stdout, r.stderr
    # run by a webui at every start (its root, launch.py beside modules/, on PYTHONPATH): not a word when done
    webui_root = tmp_path / "webui"
    (webui_root / "modules").mkdir(parents=True)
    (webui_root / "launch.py").write_text("")
    r = subprocess.run(
        [sys.executable, str(ext / "install.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(webui_root)},
    )
    assert r.returncode == 0 and r.stdout == "", r.stdout + r.stderr


# ----------------------------------------------------------------------------------------------------------------
# Host sandbox: stub modules, then import a host's real Lora code; everything is undone afterwards
# ----------------------------------------------------------------------------------------------------------------


@contextlib.contextmanager
def sandbox(paths, argv=None):
    saved_modules = dict(sys.modules)
    saved_path, saved_argv = list(sys.path), list(sys.argv)
    for name in ("network", "networks", "lora", "lora_logger", "lora_patches", "lyco_helpers", "extra_networks_lora"):
        sys.modules.pop(name, None)
    sys.path[:0] = [str(p) for p in paths]
    if argv is not None:
        sys.argv = argv
    roots = [str(Path(p).resolve()) for p in paths]
    try:
        yield
    finally:
        sys.path[:], sys.argv[:] = saved_path, saved_argv
        for name in list(sys.modules):
            if name in saved_modules:
                continue
            # the host's code, the stubs (no file) and the extension go; third-party packages imported for the
            # first time stay (torch registers native operators once per process)
            file = getattr(sys.modules[name], "__file__", None)
            if (
                file is None
                or name.startswith("waveft_a1111")
                or any(str(Path(file).resolve()).startswith(r) for r in roots)
            ):
                del sys.modules[name]
        sys.modules.update(saved_modules)


def stub(name, **attrs):
    module = types.ModuleType(name)
    module.__spec__ = importlib.machinery.ModuleSpec(name, loader=None)  # find_spec() must not fail on a stub
    module.__dict__.update(attrs)
    sys.modules[name] = module
    parent, _, child = name.rpartition(".")
    if parent and parent in sys.modules:
        setattr(sys.modules[parent], child, module)
    return module


def _walk_files(path, allowed_extensions=None):
    for root, _, files in os.walk(path):
        for f in sorted(files):
            if allowed_extensions is None or os.path.splitext(f)[1].lower() in allowed_extensions:
                yield os.path.join(root, f)


def host_function(source: Path, name: str, namespace: dict):
    """One function of a host module, compiled from the host's own source, for modules too heavy to import whole
    (modules/sd_models.py loads every model class): the real code of that function, nothing else."""
    import ast

    tree = ast.parse(source.read_text(encoding="utf-8"))
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    scope = dict(namespace)
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(source), "exec"), scope)
    return scope[name]


def host_value(source: Path, name: str, namespace: dict):
    """A module-level constant of a host module (e.g. a compiled regex), evaluated from the host's own source."""
    import ast

    tree = ast.parse(source.read_text(encoding="utf-8"))
    node = next(
        n
        for n in tree.body
        if isinstance(n, ast.Assign) and any(isinstance(t, ast.Name) and t.id == name for t in n.targets)
    )
    return eval(compile(ast.Expression(node.value), str(source), "eval"), dict(namespace))


def _read_state_dict(filename, *args, **kwargs):
    from safetensors.torch import load_file

    return load_file(filename)


def stub_host_modules(host_root: Path, lora_dir: Path):
    """The host modules the Lora code imports that play no part in the math (see the module docstring)."""
    modules_pkg = stub("modules")
    modules_pkg.__path__ = [str(host_root / "modules")]  # modules.errors, modules.extra_networks: real
    opts = types.SimpleNamespace(
        lora_preferred_name="Alias from file",
        lora_in_memory_limit=0,
        lora_not_found_warning_console=False,
        lora_not_found_gradio_warning=False,
        lora_add_hashes_to_infotext=False,
        lora_functional=False,
        lora_bundled_ti_to_infotext=False,
        sd_lora="None",
        extra_networks_default_multiplier=1.0,
    )
    shared = stub(
        "modules.shared",
        opts=opts,
        sd_model=None,
        walk_files=_walk_files,
        cmd_opts=types.SimpleNamespace(
            lora_dir=str(lora_dir), lyco_dir_backcompat=str(lora_dir / "lyco"), no_hashing=False
        ),
    )
    stub(
        "modules.devices",
        cpu=torch.device("cpu"),
        device=torch.device("cpu"),
        dtype=torch.float32,
        torch_gc=lambda: None,
        cond_cast_unet=lambda x: x,
    )
    from modules import errors  # the host's own

    read_metadata = host_function(
        host_root / "modules" / "sd_models.py",
        "read_metadata_from_safetensors",
        {"errors": errors, "json": json, "os": os},
    )
    stub(
        "modules.sd_models",
        read_metadata_from_safetensors=read_metadata,
        read_state_dict=_read_state_dict,
        model_data=types.SimpleNamespace(get_sd_model=lambda: None),
    )
    # modules.cache and modules.hashes are the host's own, caching into this run's temporary folder
    data = lora_dir.parent / f"{lora_dir.name}_data"
    data.mkdir(exist_ok=True)
    os.environ["SD_WEBUI_CACHE_FILE"] = str(data / "cache.json")
    os.environ["SD_WEBUI_CACHE_DIR"] = str(data / "cache")
    stub("modules.paths", data_path=str(data), script_path=str(host_root), models_path=str(data / "models"))
    stub("modules.scripts")
    db = types.SimpleNamespace(
        word_embeddings={},
        expected_shape=-1,
        skipped_embeddings={},
        register_embedding=lambda *a: None,
        register_embedding_by_name=lambda *a: None,
    )
    stub("modules.sd_hijack", model_hijack=types.SimpleNamespace(embedding_db=db, comments=[]))
    stub("modules.textual_inversion")
    stub("modules.textual_inversion.textual_inversion", create_embedding_from_data=lambda *a, **k: None)
    stub("modules.models")
    stub("modules.models.sd3")
    stub("modules.models.sd3.mmdit", QkvLinear=type("QkvLinear", (torch.nn.Linear,), {}))
    stub("gradio", Warning=lambda *a, **k: None)
    for name, attrs in (("einops", {"rearrange": None}),):
        try:
            importlib.import_module(name)
        except ImportError:
            stub(name, **attrs)
    return shared


def load_extension(host_root: Path, tmp: Path):
    """The extension as the webui loads it: a clone in extensions/, its scripts/*.py run by the webui's own
    modules.script_loading.load_module. Returns the hooks package the entry script registered."""
    ext = _fake_clone(tmp)
    from modules import script_loading

    assert Path(script_loading.__file__).resolve().is_relative_to(host_root.resolve())
    script_loading.load_module(str(ext / "scripts" / "waveft_webui.py"))
    return types.SimpleNamespace(
        webui=sys.modules["waveft_a1111.webui"],
        forge_hooks=sys.modules.get("waveft_a1111.forge_hooks"),
        a1111_hooks=sys.modules.get("waveft_a1111.a1111_hooks"),
    )


def stub_torchvision():
    """PyPI's torchvision does not import beside a CPU torch; ldm_patched imports it at module level (for models
    never built here). transformers is asked first, so it remembers that torchvision is missing."""
    try:
        importlib.import_module("torchvision")
        return
    except Exception:
        pass
    import transformers.utils.import_utils as import_utils

    import_utils.is_torchvision_available()
    for name in (
        "torchvision",
        "torchvision.transforms",
        "torchvision.transforms.functional",
        "torchvision.ops",
        "torchvision.models",
    ):
        stub(name).__path__ = []


def write_files(lora_dir: Path):
    lora_dir.mkdir(parents=True, exist_ok=True)
    refs = {
        "wft_sd1": save_adapter(lora_dir / "wft_sd1.safetensors", sd1_layers(), "sd_v1"),
        "wft_sdxl": save_adapter(lora_dir / "wft_sdxl.safetensors", sdxl_layers(), "sdxl_base_v1-0"),
        "wft_xl_unet": save_adapter(
            lora_dir / "wft_xl_unet.safetensors", {UNET_K2: make_layer((32, 40), 50, 21)}, "sdxl_base_v1-0"
        ),
    }
    # a damaged file: a repeated position
    from safetensors.torch import save_file

    bad = {
        UNET_Q + ".waveft_spectrum": torch.ones(2),
        UNET_Q + ".waveft_indices": torch.tensor([3, 3], dtype=torch.int32),
        UNET_Q + ".waveft_shape": torch.tensor([32, 32]),
    }
    save_file(
        bad,
        str(lora_dir / "bad.safetensors"),
        metadata={
            "waveft.format_version": "1",
            "waveft.wavelet": "db1",
            "waveft.scaling": "25.0",
            "ss_network_module": "waveft",
        },
    )
    # one weight under two spellings that A1111's names ('.' -> '_') make the same (issue 22)
    twin = "diffusion_model." + UNET_Q[len("diffusion_model.") :].replace(".", "_")
    wft.save(
        wft.Adapter(
            layers={UNET_Q: make_layer((32, 32), 20, 31), twin: make_layer((32, 32), 20, 32)},
            metadata={"ss_base_model_version": "sd_v1"},
        ),
        lora_dir / "twice.safetensors",
    )
    # an ordinary kohya LoRA for SD1, which must still go to the host's own loader
    key = "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn1_to_q"
    save_file(
        {
            f"{key}.lora_up.weight": torch.ones(32, 4),
            f"{key}.lora_down.weight": torch.ones(4, 32),
            f"{key}.alpha": torch.tensor(4.0),
        },
        str(lora_dir / "plain_lora.safetensors"),
        metadata={"ss_network_module": "networks.lora", "ss_base_model_version": "sd_v1"},
    )
    # and one on the SDXL UNet layer of the Forge-family models, spelled the LDM way every key map knows
    g = torch.Generator().manual_seed(5)
    key = "lora_unet_" + UNET_K2[len("diffusion_model.") :].replace(".", "_")
    save_file(
        {
            f"{key}.lora_up.weight": torch.randn(32, 4, generator=g),
            f"{key}.lora_down.weight": torch.randn(4, 40, generator=g),
            f"{key}.alpha": torch.tensor(2.0),
        },
        str(lora_dir / "plain_xl_lora.safetensors"),
        metadata={"ss_network_module": "networks.lora", "ss_base_model_version": "sdxl_base_v1-0"},
    )
    return refs


# ----------------------------------------------------------------------------------------------------------------
# AUTOMATIC1111
# ----------------------------------------------------------------------------------------------------------------


def _checkout(var, probe):
    """The webui checkout named by `var`; the tests skip without one, or fail under WAVEFT_REQUIRE_WEBUIS (CI)."""
    skip = pytest.fail if os.environ.get("WAVEFT_REQUIRE_WEBUIS", "") not in ("", "0") else pytest.skip
    path = os.environ.get(var)
    if not path:
        skip(
            f"{var} is not set: point it at a checkout to test against the real Lora code "
            "(./dev test unpacks them from ../shared/webui)"
        )
    root = Path(path)
    if not (root / probe).is_file():
        skip(f"{var}={path} has no {probe}")
    return root


@pytest.fixture(scope="class")
def a1111(tmp_path_factory):
    root = _checkout("A1111_PATH", "extensions-builtin/Lora/networks.py")
    lora_dir = tmp_path_factory.mktemp("a1111_loras")
    refs = write_files(lora_dir)
    with sandbox([root / "extensions-builtin" / "Lora", root]):
        shared = stub_host_modules(root, lora_dir)
        import extra_networks_lora
        import network
        import networks

        assert Path(networks.__file__).resolve().is_relative_to(root.resolve())
        networks.extra_network_lora = extra_networks_lora.ExtraNetworkLora()
        hooks = load_extension(root, tmp_path_factory.mktemp("a1111_clone"))
        assert getattr(networks, "_waveft_hooked", False)
        yield types.SimpleNamespace(
            root=root, shared=shared, network=network, networks=networks, refs=refs, lora_dir=lora_dir, hooks=hooks
        )


def apply_weights(networks, layer):
    """What A1111's patched forward does first; generation runs under torch.no_grad (processing.process_images)."""
    with torch.no_grad():
        networks.network_apply_weights(layer)


class TestA1111:
    def _use(self, a1111, model):
        a1111.shared.sd_model = model
        a1111.networks.assign_network_names_to_compvis_modules(model)
        return model

    def test_hooks_are_installed_once(self, a1111):
        assert a1111.hooks.webui.install() == "a1111"  # a second call (the UI-built retry) changes nothing
        names = [type(t).__name__ for t in a1111.networks.module_types]
        assert names.count("ModuleTypeWaveFT") == 1 and names[0] == "ModuleTypeLora"
        assert a1111.networks.load_network._waveft_original is not None

    def test_lora_tab_versions(self, a1111):
        nets, SdVersion = a1111.networks, a1111.network.SdVersion
        # listed when networks was imported (before the hooks), re-detected by install()
        assert nets.available_networks["wft_sd1"].sd_version == SdVersion.SD1
        assert nets.available_networks["wft_sdxl"].sd_version == SdVersion.SDXL
        nets.list_available_networks()
        assert nets.available_networks["wft_sdxl"].sd_version == SdVersion.SDXL
        assert nets.available_networks["wft_sd1"].sd_version == SdVersion.SD1
        assert nets.available_networks["plain_lora"].sd_version == SdVersion.SD1

    def test_sd1_delta_equals_layer_delta(self, a1111, capsys):
        nets, ref = a1111.networks, a1111.refs["wft_sd1"]
        model = self._use(a1111, a1111_sd1_model())
        nets.load_networks(["wft_sd1"], [0.5], [0.8], [None])  # <lora:wft_sd1:0.5:0.8>: te 0.5, unet 0.8
        assert [n.name for n in nets.loaded_networks] == ["wft_sd1"]
        net = nets.loaded_networks[0]
        assert "1 of 5 layers not applied" in capsys.readouterr().err  # the token embedding
        cases = [
            (UNET_Q, "model." + UNET_Q, "diffusion_model_input_blocks_4_1_transformer_blocks_0_attn1_to_q", 0.8),
            (UNET_CONV, "model." + UNET_CONV, "diffusion_model_input_blocks_0_0", 0.8),
            (
                CLIP_L_Q,
                "cond_stage_model.wrapped.transformer.text_model.encoder.layers.0.self_attn.q_proj",
                "transformer_text_model_encoder_layers_0_self_attn_q_proj",
                0.5,
            ),
            (
                CLIP_L_FC1,
                "cond_stage_model.wrapped.transformer.text_model.encoder.layers.0.mlp.fc1",
                "transformer_text_model_encoder_layers_0_mlp_fc1",
                0.5,
            ),
        ]
        assert sorted(net.modules) == sorted(c[2] for c in cases)
        for native, path, key, mult in cases:
            layer = get(model, path)
            expected = ref.layers[native].delta(strength=mult)
            module = net.modules[key]
            assert type(module).__name__ == "NetworkModuleWaveFT"
            updown, ex_bias = module.calc_updown(torch.randn(layer.weight.shape))  # what A1111's module computes
            assert ex_bias is None and rel_err(updown, expected) < TOL
            apply_weights(nets, layer)  # what A1111 does before the layer's forward
            assert rel_err(layer.weight.detach(), expected) < TOL, native
        assert ref.layers[UNET_CONV].scaling == 7.0
        nets.load_networks([], [], [], [])  # prompt without the tag: A1111 restores its backup
        for _, path, _, _ in cases:
            layer = get(model, path)
            apply_weights(nets, layer)
            assert not layer.weight.any()

    def test_sdxl_fused_clip_g_slices(self, a1111, capsys):
        nets, ref = a1111.networks, a1111.refs["wft_sdxl"]
        model = self._use(a1111, a1111_sdxl_model())
        nets.load_networks(["wft_sdxl"], [0.7], [0.9], [None])
        net = nets.loaded_networks[0]
        err = capsys.readouterr().err
        assert "1 of 6 layers not applied" in err and "text_projection" in err
        blk = "1_model_transformer_resblocks_1_attn"
        assert {f"{blk}_{p}_proj" for p in ("q", "k", "v", "out")} <= set(net.modules)
        mha = model.conditioner.embedders[1].wrapped.model.transformer.resblocks._modules["1"].attn
        apply_weights(nets, mha)
        w = mha.in_proj_weight.detach()
        assert rel_err(w[:D_G], ref.layers[CLIP_G_Q].delta(strength=0.7)) < TOL
        assert not w[D_G : 2 * D_G].any()  # k: not in the file, zero update
        assert rel_err(w[2 * D_G :], ref.layers[CLIP_G_V].delta(strength=0.7)) < TOL
        assert not mha.out_proj.weight.any()
        for native, path, mult in [
            (CLIP_G_FC2, "conditioner.embedders.1.wrapped.model.transformer.resblocks.1.mlp.c_proj", 0.7),
            (CLIP_L_Q, "conditioner.embedders.0.wrapped.transformer.text_model.encoder.layers.0.self_attn.q_proj", 0.7),
            (UNET_K2, "model." + UNET_K2, 0.9),
        ]:
            layer = get(model, path)
            apply_weights(nets, layer)
            assert rel_err(layer.weight.detach(), ref.layers[native].delta(strength=mult)) < TOL, native
        nets.load_networks([], [], [], [])
        apply_weights(nets, mha)
        assert not mha.in_proj_weight.any()

    def test_partial_qkv_as_webui_before_1_9_hands_it(self, a1111):
        """A1111 1.5-1.8 pass every part of a fused MultiheadAttention the whole (3d, d) in_proj_weight: each part's
        update, the stand-ins for k and out included, must still have that part's own shape."""
        nets, ref = a1111.networks, a1111.refs["wft_sdxl"]
        model = self._use(a1111, a1111_sdxl_model())
        nets.load_networks(["wft_sdxl"], [0.7], [0.9], [None])
        net = nets.loaded_networks[0]
        mha = model.conditioner.embedders[1].wrapped.model.transformer.resblocks._modules["1"].attn
        blk = "1_model_transformer_resblocks_1_attn"
        for part in ("q", "k", "v"):
            updown, _ = net.modules[f"{blk}_{part}_proj"].calc_updown(mha.in_proj_weight)
            assert tuple(updown.shape) == (D_G, D_G), part
        assert (
            rel_err(
                net.modules[f"{blk}_q_proj"].calc_updown(mha.in_proj_weight)[0],
                ref.layers[CLIP_G_Q].delta(strength=0.7),
            )
            < TOL
        )
        updown, _ = net.modules[f"{blk}_out_proj"].calc_updown(mha.out_proj.weight)
        assert tuple(updown.shape) == tuple(mha.out_proj.weight.shape) and not updown.any()
        nets.load_networks([], [], [], [])

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float32], ids=str)
    def test_old_method_in_half_precision(self, a1111, dtype):
        """The 'use old method' setting (lora_functional) runs each update as a layer on the input: with fp16/bf16
        models it must compute in the input's dtype, through A1111's own network_forward."""
        nets, ref = a1111.networks, a1111.refs["wft_sd1"]
        model = self._use(a1111, a1111_sd1_model())
        a1111.shared.opts.lora_functional = True
        try:
            nets.load_networks(["wft_sd1"], [0.5], [0.8], [None])
            for native, path, mult in ((UNET_Q, "model." + UNET_Q, 0.8), (UNET_CONV, "model." + UNET_CONV, 0.8)):
                layer = get(model, path).to(dtype)
                with torch.no_grad():
                    layer.weight.normal_(0, 0.1)
                    x = torch.randn((2, 4, 6, 6) if isinstance(layer, torch.nn.Conv2d) else (3, 32)).to(dtype)
                    y = nets.network_forward(layer, x, type(layer).forward)
                assert y.dtype == dtype
                merged = layer.weight.double() + ref.layers[native].delta(torch.float64, strength=mult)
                bias = layer.bias.double() if layer.bias is not None else None
                if isinstance(layer, torch.nn.Conv2d):
                    expect = torch.nn.functional.conv2d(x.double(), merged, bias, layer.stride, layer.padding)
                else:
                    expect = torch.nn.functional.linear(x.double(), merged, bias)
                tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 2e-2}[dtype]
                assert rel_err(y, expect) < tol, native
        finally:
            a1111.shared.opts.lora_functional = False
            nets.load_networks([], [], [], [])

    def test_sdxl_file_on_sd1_model_says_so(self, a1111, capsys):
        self._use(a1111, a1111_sd1_model())
        a1111.networks.load_networks(["wft_xl_unet"], [1.0], [1.0], [None])
        assert "none of its 1 layers fit the loaded model (the file is for sdxl_base_v1-0)" in capsys.readouterr().err
        assert a1111.networks.loaded_networks[0].modules == {}

    def test_bad_file_is_reported_not_raised(self, a1111, capsys):
        self._use(a1111, a1111_sd1_model())
        a1111.networks.extra_network_lora.errors.clear()
        a1111.networks.load_networks(["bad"], [1.0], [1.0], [None])
        err = capsys.readouterr().err
        assert "[WaveFT] cannot use" in err and "bad.safetensors" in err and "appears more than once" in err
        assert a1111.networks.loaded_networks == []
        assert a1111.networks.extra_network_lora.errors == {"bad": 1}

    def test_one_weight_under_two_names_is_reported_not_applied_twice(self, a1111, capsys):
        self._use(a1111, a1111_sd1_model())
        a1111.networks.extra_network_lora.errors.clear()
        a1111.networks.load_networks(["twice"], [1.0], [1.0], [None])
        err = capsys.readouterr().err
        assert "twice.safetensors" in err and "both adapt the weight" in err and UNET_Q in err, err
        assert a1111.networks.loaded_networks == []
        assert a1111.networks.extra_network_lora.errors == {"twice": 1}

    def test_plain_lora_still_uses_a1111_loader(self, a1111):
        model = self._use(a1111, a1111_sd1_model())
        a1111.networks.load_networks(["plain_lora"], [1.0], [0.5], [None])
        (module,) = a1111.networks.loaded_networks[0].modules.values()
        assert type(module).__name__ == "NetworkModuleLora"
        layer = get(model, "model." + UNET_Q)
        apply_weights(a1111.networks, layer)  # applied by A1111's own LoRA code: 0.5 * alpha / rank * up @ down
        assert torch.allclose(layer.weight.detach(), torch.full((32, 32), 0.5 * 4.0 / 4 * 4.0))
        a1111.networks.load_networks([], [], [], [])

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
    def test_half_precision_weights_round_once(self, a1111, dtype):
        nets, ref = a1111.networks, a1111.refs["wft_sd1"]
        model = self._use(a1111, a1111_sd1_model())
        layer = get(model, "model." + UNET_Q).to(dtype)
        nets.load_networks(["wft_sd1"], [0.5], [0.8], [None])
        apply_weights(nets, layer)
        assert layer.weight.dtype == dtype
        assert torch.equal(layer.weight.detach(), ref.layers[UNET_Q].delta(torch.float32, strength=0.8).to(dtype))
        nets.load_networks([], [], [], [])

    def test_hash_and_cache_are_the_hosts(self, a1111):
        """The Lora entry's hash (shown in the infotext): the one the file carries (A1111 takes sshs_model_hash as
        it is), equal to what A1111's own modules.hashes computes from the bytes; metadata cached by modules.cache."""
        from modules import hashes

        self._use(a1111, a1111_sd1_model())
        a1111.networks.load_networks(["wft_sd1"], [1.0], [1.0], [None])
        entry = a1111.networks.available_networks["wft_sd1"]
        with open(entry.filename, "rb") as f:
            assert entry.hash == hashes.addnet_hash_safetensors(f) == addnet_hash(entry.filename)
        assert entry.hash == entry.metadata["sshs_model_hash"] and entry.shorthash == entry.hash[:12]
        assert Path(os.environ["SD_WEBUI_CACHE_DIR"]).is_dir()
        a1111.networks.load_networks([], [], [], [])

    def test_lora_tab_lists_the_trigger_words_first(self, a1111):
        """The tags A1111's Lora tab offers (build_tags, compiled from the host's ui_edit_user_metadata.py, on the
        metadata its own reader parsed) start with the words Save WaveFT was given."""
        import re

        source = a1111.root / "extensions-builtin" / "Lora" / "ui_edit_user_metadata.py"
        scope = {"re": re, "re_word": host_value(source, "re_word", {"re": re})}
        scope["is_non_comma_tagset"] = host_function(source, "is_non_comma_tagset", scope)
        build_tags = host_function(source, "build_tags", scope)
        md = shared_keys.with_trigger_words(
            {
                "ss_base_model_version": "sd_1.5",
                "ss_tag_frequency": shared_keys.tag_frequency(["a cat, sitting", "a cat, on grass", "a cat, sitting"]),
            },
            "sks cat, ohwx",
        )
        wft.save(wft.Adapter(layers=sd1_layers(), metadata=md), a1111.lora_dir / "wft_tags.safetensors")
        a1111.networks.list_available_networks()
        entry = a1111.networks.available_networks["wft_tags"]
        tags = [tag for tag, _ in build_tags(entry.metadata)]
        assert tags[:2] == ["sks cat", "ohwx"] and set(tags[2:]) == {"a cat", "sitting", "on grass"}
        assert entry.sd_version == a1111.network.SdVersion.SD1


# ----------------------------------------------------------------------------------------------------------------
# Forge
# ----------------------------------------------------------------------------------------------------------------

# The shape of SDXL's UNet, for the hosts' key maps (their diffusers <-> LDM name tables); the fake models hold
# only the layers under test.
SDXL_UNET_CONFIG = dict(
    num_res_blocks=[2, 2, 2],
    channel_mult=[1, 2, 4],
    transformer_depth=[0, 0, 2, 2, 10, 10],
    transformer_depth_output=[0, 0, 0, 2, 2, 2, 10, 10, 10],
    transformer_depth_middle=10,
)


def plain_xl_delta(_root, strength):
    """What the ordinary LoRA of write_files adds: strength * alpha / rank * up @ down."""
    g = torch.Generator().manual_seed(5)
    up, down = torch.randn(32, 4, generator=g), torch.randn(4, 40, generator=g)
    return strength * 2.0 / 4 * (up @ down)


class _ForgeObjects:
    def __init__(self, unet, clip):
        self.unet, self.clip = unet, clip

    def shallow_copy(self):
        return _ForgeObjects(self.unet, self.clip)


@pytest.fixture(scope="class")
def forge(tmp_path_factory):
    root = _checkout("FORGE_PATH", "backend/patcher/lora.py")
    lora_ext = root / "extensions-builtin" / "sd_forge_lora"
    if not (lora_ext / "networks.py").is_file():
        pytest.skip(f"FORGE_PATH={root} has no extensions-builtin/sd_forge_lora/networks.py")
    lora_dir = tmp_path_factory.mktemp("forge_loras")
    refs = write_files(lora_dir)
    with sandbox([lora_ext, root, root / "packages_3rdparty"], argv=["pytest", "--always-cpu"]):
        for name, attrs in (
            ("PIL", {}),
            ("PIL.Image", {}),
            ("sentencepiece", {"SentencePieceProcessor": type("SentencePieceProcessor", (), {})}),
        ):
            try:
                importlib.import_module(name)
            except ImportError:
                stub(name, **attrs)
        try:
            importlib.import_module("diffusers.configuration_utils")
        except ImportError:
            stub("diffusers")
            stub(
                "diffusers.configuration_utils", ConfigMixin=type("ConfigMixin", (), {}), register_to_config=lambda f: f
            )
        shared = stub_host_modules(root, lora_dir)
        import backend.patcher.lora as lora_backend
        import network
        import networks
        from backend.patcher.base import ModelPatcher
        from backend.patcher.clip import CLIP

        assert Path(networks.__file__).resolve().is_relative_to(root.resolve())
        hooks = load_extension(root, tmp_path_factory.mktemp("forge_clone"))
        assert hooks.webui.install() == "forge"
        yield types.SimpleNamespace(
            root=root,
            shared=shared,
            network=network,
            networks=networks,
            refs=refs,
            lora_backend=lora_backend,
            ModelPatcher=ModelPatcher,
            CLIP=CLIP,
            hooks=hooks,
        )


class TestForge:
    def _sd(self, forge, sdxl=True, dtype=torch.float32):
        cpu = torch.device("cpu")
        unet_model = torch.nn.Module()
        unet_model.storage_dtype = dtype
        put(unet_model, UNET_K2 if sdxl else UNET_Q, torch.nn.Linear(40 if sdxl else 32, 32, bias=False))
        # what Forge's key map reads: diffusers names from the UNet's config, the family from the model's
        unet_model.diffusion_model.config = dict(SDXL_UNET_CONFIG)
        unet_model.config = types.SimpleNamespace(huggingface_repo="stabilityai/stable-diffusion-xl-base-1.0")
        clip_l = torch.nn.Module()
        put(clip_l, "transformer.text_model.encoder.layers.0.self_attn.q_proj", torch.nn.Linear(64, 64))
        models = {"clip_l": zero_(clip_l)}
        if sdxl:
            clip_g = torch.nn.Module()
            put(clip_g, "transformer.text_model.encoder.layers.1.self_attn.q_proj", torch.nn.Linear(D_G, D_G))
            put(clip_g, "transformer.text_model.encoder.layers.1.self_attn.v_proj", torch.nn.Linear(D_G, D_G))
            put(clip_g, "transformer.text_model.encoder.layers.1.mlp.fc2", torch.nn.Linear(4 * D_G, D_G))
            put(clip_g, "transformer.text_projection", torch.nn.Linear(D_G, D_G, bias=False))
            models["clip_g"] = zero_(clip_g)
        unet = forge.ModelPatcher(zero_(unet_model).to(dtype), load_device=cpu, offload_device=cpu)
        clip = forge.CLIP(model_dict={k: m.to(dtype) for k, m in models.items()}, tokenizer_dict={})
        sd = types.SimpleNamespace(
            forge_objects=_ForgeObjects(unet, clip),
            forge_objects_original=_ForgeObjects(unet, clip),
            current_lora_hash="",
            forge_objects_after_applying_lora=None,
        )
        sys.modules["modules.sd_models"].model_data = types.SimpleNamespace(get_sd_model=lambda: sd)
        return sd

    def test_hook_registered(self, forge):
        assert forge.lora_backend.extra_weight_calculators["waveft"] is forge.hooks.forge_hooks.weight_calculator
        assert forge.networks.load_lora_for_models._waveft_original is not None

    def test_lora_tab_versions(self, forge):
        nets, SdVersion = forge.networks, forge.network.SdVersion
        assert nets.available_networks["wft_sdxl"].sd_version == SdVersion.SDXL
        entry = nets.available_networks["wft_sd1"]
        assert entry.sd_version == SdVersion.SD1
        # Forge's own detection wants modelspec.architecture == 'stable-diffusion-v1/lora' for SD1
        assert type(entry).detect_version._waveft_original(entry) == SdVersion.Unknown

    def test_sdxl_delta_equals_layer_delta(self, forge, capsys):
        ref = forge.refs["wft_sdxl"]
        sd = self._sd(forge)
        forge.networks.load_networks(["wft_sdxl"], te_multipliers=[0.6], unet_multipliers=[0.9], dyn_dims=[None])
        err = capsys.readouterr().err
        assert "1 UNet layers at weight 0.9, 5 text-encoder layers at weight 0.6\n" in err
        unet, clip = sd.forge_objects.unet, sd.forge_objects.clip
        assert unet is not sd.forge_objects_original.unet  # patched clones, as Forge does for LoRAs
        unet.refresh_loras()
        clip.patcher.refresh_loras()
        params = dict(unet.model.named_parameters())
        assert rel_err(params[UNET_K2 + ".weight"], ref.layers[UNET_K2].delta(strength=0.9)) < TOL
        params = dict(clip.patcher.model.named_parameters())
        for native in (CLIP_L_Q, CLIP_G_Q, CLIP_G_V, CLIP_G_FC2, CLIP_G_PROJ):  # text_projection works in Forge
            key = native[len("text_encoders.") :] + ".weight"
            assert rel_err(params[key], ref.layers[native].delta(strength=0.6)) < TOL, native

    @pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
    def test_half_precision_weights_round_once(self, forge, dtype):
        ref = forge.refs["wft_sdxl"]
        sd = self._sd(forge, dtype=dtype)
        forge.networks.load_networks(["wft_sdxl"], te_multipliers=[0.6], unet_multipliers=[0.9], dyn_dims=[None])
        unet = sd.forge_objects.unet
        unet.refresh_loras()
        got = dict(unet.model.named_parameters())[UNET_K2 + ".weight"]
        assert got.dtype == dtype
        assert torch.equal(got.detach(), ref.layers[UNET_K2].delta(torch.float32, strength=0.9).to(dtype))

    def test_hash_is_the_hosts(self, forge):
        self._sd(forge)
        forge.networks.load_networks(["wft_sdxl"], te_multipliers=[1.0], unet_multipliers=[1.0], dyn_dims=[None])
        entry = forge.networks.available_networks["wft_sdxl"]
        # Forge takes the hash the file carries, as for kohya's LoRAs (without one it would hash the whole file:
        # its hashes.sha256 ignores use_addnet_hash), so the infotext names it the way A1111 and Civitai do
        assert entry.hash == entry.metadata["sshs_model_hash"] == addnet_hash(entry.filename)

    def test_ordinary_lora_passes_through(self, forge):
        """An ordinary kohya LoRA goes to Forge's own loader and is applied by Forge's own code, unchanged."""
        sd = self._sd(forge)
        forge.networks.load_networks(["plain_xl_lora"], te_multipliers=[1.0], unet_multipliers=[0.5], dyn_dims=[None])
        unet = sd.forge_objects.unet
        assert unet is not sd.forge_objects_original.unet
        unet.refresh_loras()
        assert rel_err(dict(unet.model.named_parameters())[UNET_K2 + ".weight"], plain_xl_delta(forge.root, 0.5)) < TOL

    def test_bad_file_and_wrong_model(self, forge, capsys):
        sd = self._sd(forge, sdxl=False)
        original = sd.forge_objects.unet
        forge.networks.load_networks(["bad"], te_multipliers=[1.0], unet_multipliers=[1.0], dyn_dims=[None])
        err = capsys.readouterr().err
        assert "[WaveFT] cannot use" in err and "appears more than once" in err
        assert sd.forge_objects.unet is original
        sd = self._sd(forge, sdxl=False)
        forge.networks.load_networks(["wft_xl_unet"], te_multipliers=[1.0], unet_multipliers=[1.0], dyn_dims=[None])
        assert "none of its 1 layers fit the loaded model" in capsys.readouterr().err
        assert sd.forge_objects.unet is sd.forge_objects_original.unet


# ----------------------------------------------------------------------------------------------------------------
# reForge and Forge Classic: the Forge family on ldm_patched (ComfyUI's code as Forge had it before August 2024)
# ----------------------------------------------------------------------------------------------------------------

LDM_WEBUIS = {"reforge": "REFORGE_PATH", "forge-classic": "FORGE_CLASSIC_PATH"}


@pytest.fixture(scope="class", params=sorted(LDM_WEBUIS))
def ldm_webui(request, tmp_path_factory):
    """reForge or Forge Classic: the real extensions-builtin/Lora (network.py, networks.py) and ldm_patched
    (ModelPatcher, CLIP, lora key maps and weight calculation); the extension loaded from extensions/ by the
    webui's own script loader."""
    kind = request.param
    root = _checkout(LDM_WEBUIS[kind], "ldm_patched/modules/model_patcher.py")
    lora_ext = root / "extensions-builtin" / "Lora"
    lora_dir = tmp_path_factory.mktemp(f"{kind}_loras")
    refs = write_files(lora_dir)
    with sandbox([lora_ext, root], argv=["pytest"]):
        shared = stub_host_modules(root, lora_dir)
        stub_torchvision()
        import ldm_patched.modules.args_parser as args_parser

        args_parser.args.always_cpu = True  # as --always-cpu: model_management must not look for CUDA
        import ldm_patched.modules.model_patcher as model_patcher
        import ldm_patched.modules.sd as sd_module
        import network
        import networks

        assert Path(networks.__file__).resolve().is_relative_to(root.resolve())
        hooks = load_extension(root, tmp_path_factory.mktemp(f"{kind}_clone"))
        assert hooks.webui.install() == kind
        yield types.SimpleNamespace(
            kind=kind,
            root=root,
            shared=shared,
            network=network,
            networks=networks,
            refs=refs,
            model_patcher=model_patcher,
            sd=sd_module,
            hooks=hooks,
        )


class TestLdmPatchedWebuis:
    """reForge and Forge Classic, each: WaveFT files apply exactly (fp32, fp16, bf16), an ordinary LoRA passes
    through the webui's own code unchanged, the Lora tab shows the right base model, a bad file is reported."""

    def _sd(self, env, dtype=torch.float32):
        cpu = torch.device("cpu")
        unet_model = torch.nn.Module()
        put(unet_model, UNET_K2, torch.nn.Linear(40, 32, bias=False))
        unet_model.model_config = types.SimpleNamespace(unet_config=dict(SDXL_UNET_CONFIG))
        clip_model = torch.nn.Module()
        clip_l, clip_g = torch.nn.Module(), torch.nn.Module()
        put(clip_l, "transformer.text_model.encoder.layers.0.self_attn.q_proj", torch.nn.Linear(64, 64))
        put(clip_g, "transformer.text_model.encoder.layers.1.self_attn.q_proj", torch.nn.Linear(D_G, D_G))
        put(clip_g, "transformer.text_model.encoder.layers.1.self_attn.v_proj", torch.nn.Linear(D_G, D_G))
        put(clip_g, "transformer.text_model.encoder.layers.1.mlp.fc2", torch.nn.Linear(4 * D_G, D_G))
        put(clip_g, "transformer.text_projection", torch.nn.Linear(D_G, D_G, bias=False))
        clip_model.clip_l, clip_model.clip_g = clip_l, clip_g
        unet = env.model_patcher.ModelPatcher(zero_(unet_model).to(dtype), load_device=cpu, offload_device=cpu)
        clip = env.sd.CLIP(no_init=True)
        clip.cond_stage_model = zero_(clip_model).to(dtype)
        clip.patcher = env.model_patcher.ModelPatcher(clip.cond_stage_model, load_device=cpu, offload_device=cpu)
        clip.tokenizer, clip.layer_idx = None, None
        clip.tokenizer_options, clip.use_clip_schedule, clip.apply_hooks_to_conds = {}, False, None  # reForge's
        sd = types.SimpleNamespace(
            forge_objects=_ForgeObjects(unet, clip),
            forge_objects_original=_ForgeObjects(unet, clip),
            current_lora_hash="",
            forge_objects_after_applying_lora=None,
        )
        sys.modules["modules.sd_models"].model_data = types.SimpleNamespace(get_sd_model=lambda: sd)
        return sd

    @staticmethod
    def _merged(patcher):
        """The weights as the webui's own patcher merges the patches (then restored)."""
        patcher.patch_model()
        try:
            return {k: v.detach().clone() for k, v in patcher.model.named_parameters()}
        finally:
            patcher.unpatch_model()

    def test_hooks(self, ldm_webui):
        nets = ldm_webui.networks
        assert nets.load_lora_for_models._waveft_original is not None
        if ldm_webui.kind == "forge-classic":
            calculators = ldm_webui.model_patcher.extra_weight_calculators
            assert calculators["waveft"] is ldm_webui.hooks.forge_hooks.weight_calculator
        else:
            import ldm_patched.modules.weight_adapter as weight_adapter

            assert [a.name for a in weight_adapter.adapters].count("waveft") == 1

    def test_lora_tab_versions(self, ldm_webui):
        nets, SdVersion = ldm_webui.networks, ldm_webui.network.SdVersion
        nets.list_available_networks()
        assert nets.available_networks["wft_sdxl"].sd_version == SdVersion.SDXL
        assert nets.available_networks["wft_sd1"].sd_version == SdVersion.SD1

    @pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
    def test_sdxl_delta_equals_layer_delta(self, ldm_webui, dtype, capsys):
        ref = ldm_webui.refs["wft_sdxl"]
        sd = self._sd(ldm_webui, dtype)
        ldm_webui.networks.load_networks(["wft_sdxl"], te_multipliers=[0.6], unet_multipliers=[0.9], dyn_dims=[None])
        assert "1 UNet layers at weight 0.9, 5 text-encoder layers at weight 0.6\n" in capsys.readouterr().err
        unet, clip = sd.forge_objects.unet, sd.forge_objects.clip
        assert unet is not sd.forge_objects_original.unet  # patched clones, as the webui does for LoRAs
        cases = [(UNET_K2, UNET_K2 + ".weight", 0.9, self._merged(unet))]
        clip_weights = self._merged(clip.patcher)
        cases += [
            (n, n[len("text_encoders.") :] + ".weight", 0.6, clip_weights)
            for n in (CLIP_L_Q, CLIP_G_Q, CLIP_G_V, CLIP_G_FC2, CLIP_G_PROJ)
        ]
        for native, key, strength, weights in cases:
            got = weights[key]
            assert got.dtype == dtype
            # a zero weight plus ΔW, summed in float32 and rounded once into the weight's dtype
            assert torch.equal(got, ref.layers[native].delta(torch.float32, strength=strength).to(dtype)), native
        # the original patchers are untouched
        assert not any(self._merged(sd.forge_objects_original.unet)[UNET_K2 + ".weight"].flatten().tolist())

    def test_hash_is_the_hosts(self, ldm_webui):
        self._sd(ldm_webui)
        ldm_webui.networks.load_networks(["wft_sdxl"], te_multipliers=[1.0], unet_multipliers=[1.0], dyn_dims=[None])
        entry = ldm_webui.networks.available_networks["wft_sdxl"]
        assert entry.hash == addnet_hash(entry.filename)

    def test_ordinary_lora_passes_through(self, ldm_webui):
        sd = self._sd(ldm_webui)
        ldm_webui.networks.load_networks(
            ["plain_xl_lora"], te_multipliers=[1.0], unet_multipliers=[0.5], dyn_dims=[None]
        )
        got = self._merged(sd.forge_objects.unet)[UNET_K2 + ".weight"]
        assert rel_err(got, plain_xl_delta(ldm_webui.root, 0.5)) < TOL

    def test_bad_file_and_wrong_model(self, ldm_webui, capsys):
        sd = self._sd(ldm_webui)
        original = sd.forge_objects.unet
        ldm_webui.networks.load_networks(["bad"], te_multipliers=[1.0], unet_multipliers=[1.0], dyn_dims=[None])
        err = capsys.readouterr().err
        assert "[WaveFT] cannot use" in err and "appears more than once" in err
        assert sd.forge_objects.unet is original
        # an SD1 file on this SDXL model: only its CLIP-L layer (the same in both) applies, the rest is listed
        sd = self._sd(ldm_webui)
        ldm_webui.networks.load_networks(["wft_sd1"], te_multipliers=[1.0], unet_multipliers=[1.0], dyn_dims=[None])
        err = capsys.readouterr().err
        assert "0 UNet layers at weight 1.0, 1 text-encoder layers" in err and "4 not applied" in err
        assert sd.forge_objects.unet is sd.forge_objects_original.unet
