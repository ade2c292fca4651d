"""reForge and Forge Classic (REFORGE_PATH, FORGE_CLASSIC_PATH, see conftest.py): the Forge family on
ldm_patched, ComfyUI's code as Forge had it before August 2024."""

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
    ForgeObjects,
    plain_xl_delta,
    put,
    rel_err,
    zero_,
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
            forge_objects=ForgeObjects(unet, clip),
            forge_objects_original=ForgeObjects(unet, clip),
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
