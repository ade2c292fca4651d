"""AUTOMATIC1111 (A1111_PATH, see conftest.py): WaveFT files through the webui's real Lora extension; the
weights they change equal Layer.delta * multiplier, ordinary LoRAs still take A1111's own path."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from manager_readers import addnet_hash  # what the webuis show as a LoRA's hash
from webui_fakes import (
    CLIP_G_FC2,
    CLIP_G_Q,
    CLIP_G_V,
    CLIP_L_FC1,
    CLIP_L_Q,
    D_G,
    TOL,
    UNET_CONV,
    UNET_K2,
    UNET_Q,
    a1111_sd1_model,
    a1111_sdxl_model,
    get,
    host_function,
    host_value,
    rel_err,
    sd1_layers,
)

import waveft_core as wft
from waveft_core.files import metadata as shared_keys


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
