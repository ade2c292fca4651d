"""Forge: the patch calculator and the Forge versions of August 2024 (not bundled: their call signatures are
reproduced; never skipped), then WaveFT files through the real Forge Lora extension and backend.patcher
(FORGE_PATH, see conftest.py)."""

from __future__ import annotations

import sys
import types

import pytest
import torch
from manager_readers import addnet_hash  # what the webuis show as a LoRA's hash
from webui_fakes import (
    CLIP_G_FC2,
    CLIP_G_PROJ,
    CLIP_G_Q,
    CLIP_G_V,
    CLIP_L_Q,
    D_G,
    SDXL_UNET_CONFIG,
    TOL,
    UNET_K2,
    UNET_Q,
    ForgeObjects,
    make_layer,
    plain_xl_delta,
    put,
    rel_err,
    save_adapter,
    sdxl_layers,
    zero_,
)

import waveft_core as wft
from a1111 import forge_hooks, webui


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
            forge_objects=ForgeObjects(unet, clip),
            forge_objects_original=ForgeObjects(unet, clip),
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
