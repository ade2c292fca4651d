"""The webui extension's names, without a checkout (never skipped): native layer names to A1111's module names
and Forge's keys (a1111/keymap.py), base-model detection from metadata, which files are WaveFT's, and the A1111
hooks' resolution on a model named by A1111's rule."""

from __future__ import annotations

import pytest
import torch
from webui_fakes import (
    CLIP_G,
    CLIP_G_FC2,
    CLIP_G_PROJ,
    CLIP_G_Q,
    CLIP_G_V,
    CLIP_L_EMB,
    CLIP_L_FC1,
    CLIP_L_Q,
    D_G,
    UNET_CONV,
    UNET_Q,
    a1111_mapping,
    a1111_sd1_model,
    a1111_sdxl_model,
    make_layer,
    save_adapter,
)

from a1111 import a1111_hooks, keymap
from waveft_core.names.families import to_native


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
