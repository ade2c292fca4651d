"""The stock LoRA loader's blind spot: WaveFT layers its key map cannot place (waveft_core/stock_loader.py)."""
from waveft_core.stock_loader import (is_text_encoder_layer, only_text_encoder_layers, unclaimed_layers,
                                      unclaimed_message)

MODEL_MAP = {"lora_unet_blocks_0_mlp_layer1": "diffusion_model.blocks.0.mlp.layer1.weight",
             "diffusion_model.blocks.0.qkv": ("diffusion_model.blocks.0.qkv.weight", (0, 0, 6))}
CLIP_MAP = {"lora_te_layers_0_self_attn_q_proj": "qwen3_06b.transformer.model.layers.0.self_attn.q_proj.weight"}
FILE = ["lora_unet_blocks_0_mlp_layer1.waveft_spectrum", "lora_unet_blocks_0_mlp_layer1.waveft_indices",
        "diffusion_model.blocks.0.qkv.waveft_spectrum", "lora_unet_blocks_9_mlp_layer1.waveft_spectrum",
        "lora_te_layers_0_self_attn_q_proj.waveft_spectrum", "lora_te_layers_7_mlp_up_proj.waveft_spectrum",
        "lora_unet_blocks_0_mlp_layer2.lora_up.weight"]


def test_only_the_components_the_map_covers_are_expected():
    assert unclaimed_layers(FILE, MODEL_MAP) == ["lora_unet_blocks_9_mlp_layer1"]  # a model-only load
    assert unclaimed_layers(FILE, CLIP_MAP) == ["lora_te_layers_7_mlp_up_proj"]  # a text-encoder hook
    assert unclaimed_layers(FILE, {**MODEL_MAP, **CLIP_MAP}) == ["lora_unet_blocks_9_mlp_layer1",
                                                                "lora_te_layers_7_mlp_up_proj"]
    assert unclaimed_layers(FILE, {}) == []
    assert unclaimed_layers([k for k in FILE if "lora_up" in k], MODEL_MAP) == []  # a LoRA: none of its business
    assert not only_text_encoder_layers(FILE) and not only_text_encoder_layers([])
    assert only_text_encoder_layers([k for k in FILE if k.startswith("lora_te")])


def test_text_encoder_spellings():
    for name in ("lora_te_layers_0_mlp_up_proj", "lora_te2_text_model_encoder_layers_0_mlp_fc1",
                 "lora_prior_te_text_model_encoder_layers_0_mlp_fc1", "text_encoders.clip_l.transformer.x",
                 "text_encoder_2.text_model.encoder.layers.0.mlp.fc1"):
        assert is_text_encoder_layer(name), name
    for name in ("lora_unet_blocks_0_mlp_layer1", "diffusion_model.blocks.0.qkv", "transformer.blocks.0.attn"):
        assert not is_text_encoder_layer(name), name


def test_message_names_the_file_the_layers_shortened_and_what_to_do():
    msg = unclaimed_message("/m/loras/x.safetensors", [f"layer_{i}" for i in range(8)], 10, "anima")
    assert msg.startswith("WaveFT: /m/loras/x.safetensors: the model has no weight for 8 of its 10 WaveFT layers")
    assert "layer_4 and 3 more" in msg and "layer_5" not in msg
    assert "'Load WaveFT'" in msg and "'anima'" in msg
