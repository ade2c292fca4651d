"""diffusers/PEFT <-> ComfyUI-native layer names (the host test compares with ComfyUI's own map)."""

import pytest

from waveft_core.names.families import diffusers_unet_to_ldm, ldm_unet_to_diffusers, split_component, to_native, to_peft

PAIRS = [
    ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q", "input_blocks.4.1.transformer_blocks.0.attn1.to_q"),
    (
        "down_blocks.2.attentions.1.transformer_blocks.9.attn2.to_out.0",
        "input_blocks.8.1.transformer_blocks.9.attn2.to_out.0",
    ),
    ("down_blocks.0.resnets.1.conv1", "input_blocks.2.0.in_layers.2"),
    ("down_blocks.0.resnets.0.time_emb_proj", "input_blocks.1.0.emb_layers.1"),
    ("down_blocks.1.resnets.0.conv_shortcut", "input_blocks.4.0.skip_connection"),
    ("down_blocks.0.downsamplers.0.conv", "input_blocks.3.0.op"),
    ("mid_block.attentions.0.proj_in", "middle_block.1.proj_in"),
    ("mid_block.resnets.1.conv2", "middle_block.2.out_layers.3"),
    ("up_blocks.0.resnets.2.norm1", "output_blocks.2.0.in_layers.0"),
    (
        "up_blocks.1.attentions.2.transformer_blocks.0.ff.net.0.proj",
        "output_blocks.5.1.transformer_blocks.0.ff.net.0.proj",
    ),
    ("conv_in", "input_blocks.0.0"),
    ("time_embedding.linear_2", "time_embed.2"),
    ("add_embedding.linear_1", "label_emb.0.0"),
    ("conv_out", "out.2"),
]


@pytest.mark.parametrize("diffusers,ldm", PAIRS)
def test_unet_names_both_ways(diffusers, ldm):
    assert diffusers_unet_to_ldm(diffusers) == ldm
    assert ldm_unet_to_diffusers(ldm) == diffusers


def test_upsamplers_map_back_from_either_index():
    # Levels without attention put the upsampler at index 1 (SD1.5's first up level), others at 2.
    assert ldm_unet_to_diffusers("output_blocks.2.1.conv") == "up_blocks.0.upsamplers.0.conv"
    assert ldm_unet_to_diffusers("output_blocks.5.2.conv") == "up_blocks.1.upsamplers.0.conv"
    assert diffusers_unet_to_ldm("up_blocks.1.upsamplers.0.conv") is None  # ambiguous without the model


def test_to_native_and_back():
    assert (
        to_native("base_model.model.down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k")
        == "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_k"
    )
    assert to_native("unet.up_blocks.1.attentions.0.proj_out") == "diffusion_model.output_blocks.3.1.proj_out"
    assert (
        to_native("text_encoder.text_model.encoder.layers.3.mlp.fc1")
        == "text_encoders.clip_l.transformer.text_model.encoder.layers.3.mlp.fc1"
    )
    assert (
        to_native("text_encoder_2.text_model.encoder.layers.3.mlp.fc1")
        == "text_encoders.clip_g.transformer.text_model.encoder.layers.3.mlp.fc1"
    )
    assert to_native("base_model.model.text_model.encoder.layers.0.self_attn.q_proj", clip="clip_g").startswith(
        "text_encoders.clip_g."
    )
    # an unknown model keeps PEFT's names, minus the wrapper prefix
    assert to_native("base_model.model.model.layers.0.self_attn.q_proj") == "model.layers.0.self_attn.q_proj"
    assert to_peft("diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_k") == (
        "unet",
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_k",
    )
    assert to_peft("text_encoders.clip_g.transformer.text_model.encoder.layers.3.mlp.fc1") == (
        "text_encoder_2",
        "text_model.encoder.layers.3.mlp.fc1",
    )
    assert split_component("base_model.model.unet.conv_in") == ("unet", "conv_in")
