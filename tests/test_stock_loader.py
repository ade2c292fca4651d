"""The stock LoRA loader's blind spot: WaveFT layers its key map cannot place (waveft_core/hosts/stock_loader.py)."""

from waveft_core.hosts.stock_loader import (
    is_text_encoder_layer,
    only_text_encoder_layers,
    unclaimed_layers,
    unclaimed_message,
)

MODEL_MAP = {
    "lora_unet_blocks_0_mlp_layer1": "diffusion_model.blocks.0.mlp.layer1.weight",
    "diffusion_model.blocks.0.qkv": ("diffusion_model.blocks.0.qkv.weight", (0, 0, 6)),
}
CLIP_MAP = {"lora_te_layers_0_self_attn_q_proj": "qwen3_06b.transformer.model.layers.0.self_attn.q_proj.weight"}
FILE = [
    "lora_unet_blocks_0_mlp_layer1.waveft_spectrum",
    "lora_unet_blocks_0_mlp_layer1.waveft_indices",
    "diffusion_model.blocks.0.qkv.waveft_spectrum",
    "lora_unet_blocks_9_mlp_layer1.waveft_spectrum",
    "lora_te_layers_0_self_attn_q_proj.waveft_spectrum",
    "lora_te_layers_7_mlp_up_proj.waveft_spectrum",
    "lora_unet_blocks_0_mlp_layer2.lora_up.weight",
]


def test_only_the_components_the_map_covers_are_expected():
    assert unclaimed_layers(FILE, MODEL_MAP) == ["lora_unet_blocks_9_mlp_layer1"]  # a model-only load
    assert unclaimed_layers(FILE, CLIP_MAP) == ["lora_te_layers_7_mlp_up_proj"]  # a text-encoder hook
    assert unclaimed_layers(FILE, {**MODEL_MAP, **CLIP_MAP}) == [
        "lora_unet_blocks_9_mlp_layer1",
        "lora_te_layers_7_mlp_up_proj",
    ]
    assert unclaimed_layers(FILE, {}) == []
    assert unclaimed_layers([k for k in FILE if "lora_up" in k], MODEL_MAP) == []  # a LoRA: none of its business
    assert not only_text_encoder_layers(FILE) and not only_text_encoder_layers([])
    assert only_text_encoder_layers([k for k in FILE if k.startswith("lora_te")])


def test_text_encoder_spellings():
    for name in (
        "lora_te_layers_0_mlp_up_proj",
        "lora_te2_text_model_encoder_layers_0_mlp_fc1",
        "lora_prior_te_text_model_encoder_layers_0_mlp_fc1",
        "text_encoders.clip_l.transformer.x",
        "text_encoder_2.text_model.encoder.layers.0.mlp.fc1",
    ):
        assert is_text_encoder_layer(name), name
    for name in ("lora_unet_blocks_0_mlp_layer1", "diffusion_model.blocks.0.qkv", "transformer.blocks.0.attn"):
        assert not is_text_encoder_layer(name), name


def test_message_names_the_file_the_layers_shortened_and_what_to_do():
    msg = unclaimed_message("/m/loras/x.safetensors", [f"layer_{i}" for i in range(8)], 10, "anima")
    assert msg.startswith("WaveFT: /m/loras/x.safetensors: the model has no weight for 8 of its 10 WaveFT layers")
    assert "layer_4 and 3 more" in msg and "layer_5" not in msg
    assert "'Load WaveFT'" in msg and "'anima'" in msg


def test_layers_on_one_weight_or_overlapping_slices_are_refused_naming_both():
    import pytest

    from waveft_core.hosts.stock_loader import refuse_layers_on_one_weight
    from waveft_core.names.matching import SharedTargetError

    qkv = "diffusion_model.blocks.0.qkv.weight"
    kmap = {
        "a": qkv,
        "q": (qkv, (0, 0, 6)),
        "k": (qkv, (0, 6, 6)),
        "k2": (qkv, (0, 10, 4)),
        "cols": (qkv, (1, 0, 2)),
        "scaled": (qkv, None, abs),
        "other": "diffusion_model.x.weight",
    }

    def spectra(*names):
        return [f"{n}.waveft_spectrum" for n in names]

    refuse_layers_on_one_weight(spectra("q", "k", "other") + ["a.lora_up.weight", "b.waveft_spectrum"], kmap)
    for pair in (("a", "q"), ("k", "k2"), ("q", "cols"), ("scaled", "k"), ("q", "k", "k2")):
        with pytest.raises(SharedTargetError) as e:
            refuse_layers_on_one_weight(spectra(*pair), kmap)
        assert f"'{pair[-2]}' and '{pair[-1]}'" in str(e.value) and qkv in str(e.value)


def test_settings_tensors_are_checked_against_the_metadata_they_mirror():
    import pytest
    import torch

    from waveft_core.files.storage import WaveFTFileError
    from waveft_core.hosts.stock_loader import check_mirrors_against_metadata

    mirrors = {
        "waveft.wavelet": torch.tensor(list(b"db2"), dtype=torch.uint8),
        "waveft.scaling": torch.tensor([25.0]),
        "waveft.use_idwt": torch.tensor([True]),
    }
    metadata = {"waveft.wavelet": "db2", "waveft.scaling": "25.0", "waveft.use_idwt": "true"}
    check_mirrors_against_metadata("f.safetensors", mirrors, metadata)
    check_mirrors_against_metadata("f.safetensors", mirrors, {})  # stripped metadata: the mirrors are all there is
    check_mirrors_against_metadata("f.safetensors", {}, metadata)  # a kohya file: no mirrors
    for key, value in (("waveft.scaling", "10000"), ("waveft.wavelet", "db4"), ("waveft.use_idwt", "false")):
        with pytest.raises(WaveFTFileError) as e:
            check_mirrors_against_metadata("f.safetensors", mirrors, {**metadata, key: value})
        assert "f.safetensors" in str(e.value) and f"'{key}'" in str(e.value)
    with pytest.raises(WaveFTFileError, match="'waveft.scaling'.*not a number"):
        check_mirrors_against_metadata("f.safetensors", mirrors, {**metadata, "waveft.scaling": "abc"})
    # use_idwt left out of the metadata reads as true, as every reader does
    with pytest.raises(WaveFTFileError, match="waveft.use_idwt"):
        check_mirrors_against_metadata(
            "f.safetensors",
            {**mirrors, "waveft.use_idwt": torch.tensor([False])},
            {"waveft.wavelet": "db2", "waveft.scaling": "25"},
        )
