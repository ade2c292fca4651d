"""The stock Load LoRA path (ComfyUI's LoraLoader / LoraLoaderModelOnly) and Load WaveFT apply one weight change
per file, or both refuse it (issue 22, items 5 and 6): settings tensors that disagree with the file's metadata, and
one weight under two spellings, fail the stock node naming the file and the key or both layers."""

import shutil

import pytest
import torch
from host_tools import patched_weights
from safetensors import safe_open
from safetensors.torch import load_file, save_file

NATIVE = "diffusion_model.middle_block.1.proj_in"
KOHYA = "lora_unet_mid_block_attentions_0_proj_in"  # the same weight, as the host's key map spells it
DIFFUSERS = "unet.mid_block.attentions.0.proj_in"


def _layer(shape, seed=0, count=30):
    import waveft_core as wft
    from waveft_core.convert.peft_io import peft_positions

    return wft.Layer(
        spectrum=torch.randn(count, generator=torch.Generator().manual_seed(seed)) * 0.01,
        indices=peft_positions(shape, count),
        shape=shape,
        wavelet="db2",
    )


def _read(path):
    with safe_open(str(path), "pt") as f:
        metadata = f.metadata()
    return load_file(str(path)), metadata


@pytest.fixture
def saved(pack, sd15, waveft_dir, loras_dir):
    """A normal native file (metadata and its settings tensors agree) in both folders, and its weight key."""
    import waveft_core as wft

    model, _, _ = sd15
    shape = tuple(model.model.state_dict()[NATIVE + ".weight"].shape)
    wft.save(wft.Adapter({NATIVE: _layer(shape)}), loras_dir / "good.safetensors")
    shutil.copy(loras_dir / "good.safetensors", waveft_dir / "good.safetensors")
    return NATIVE + ".weight"


def test_a_normal_file_applies_the_same_weights_through_both_loaders(pack, sd15, saved):
    import nodes

    model, clip, _ = sd15
    node = patched_weights(
        pack.nodes.loader.WaveFTLoader().load(model, clip, "good.safetensors", 0.8, 1.0)["result"][0], [saved]
    )[saved]
    stock = patched_weights(nodes.LoraLoader().load_lora(model, clip, "good.safetensors", 0.8, 1.0)[0], [saved])[saved]
    assert not torch.equal(stock, model.model.state_dict()[saved].float())
    assert torch.allclose(node, stock, atol=1e-6)


@pytest.mark.parametrize(
    "key,mirror",
    [
        ("waveft.scaling", torch.tensor([1e4])),
        ("waveft.wavelet", torch.tensor(list(b"db4"), dtype=torch.uint8)),
        ("waveft.use_idwt", torch.tensor([False])),
    ],
)
def test_settings_tensors_that_disagree_with_the_metadata_fail_the_stock_node(
    pack, sd15, saved, waveft_dir, loras_dir, key, mirror
):
    """The stock loader sees the tensors only; it used to apply a scaling of 1e4 where the metadata (the reference,
    what Load WaveFT applies) says 25: 400 times the change. Now both refuse, naming the file and the key."""
    import nodes

    model, clip, _ = sd15
    tensors, metadata = _read(loras_dir / "good.safetensors")
    assert key in tensors and key in metadata or key == "waveft.use_idwt"
    tensors[key] = mirror.to(tensors[key].dtype) if key != "waveft.wavelet" else mirror
    save_file(tensors, str(loras_dir / "mirror.safetensors"), metadata)
    shutil.copy(loras_dir / "mirror.safetensors", waveft_dir / "mirror.safetensors")
    for load in (
        lambda: nodes.LoraLoader().load_lora(model, clip, "mirror.safetensors", 1.0, 1.0),
        lambda: nodes.LoraLoaderModelOnly().load_lora_model_only(model, "mirror.safetensors", 1.0),
    ):
        with pytest.raises(ValueError) as e:
            load()
        msg = str(e.value)
        assert "mirror.safetensors" in msg and f"'{key}'" in msg and "the metadata says" in msg, msg
    with pytest.raises(ValueError, match=key.replace(".", r"\.")):
        pack.nodes.loader.WaveFTLoader().load(model, clip, "mirror.safetensors", 1.0, 1.0)

    # the settings tensors alone (metadata stripped on the way) are all there is to apply: the stock node applies them
    save_file(tensors, str(loras_dir / "bare.safetensors"))
    patched = nodes.LoraLoaderModelOnly().load_lora_model_only(model, "bare.safetensors", 1.0)[0]
    assert set(patched.patches) == {saved}


@pytest.mark.parametrize("spellings", [(NATIVE, KOHYA), (KOHYA, DIFFUSERS), (NATIVE, KOHYA, DIFFUSERS)])
def test_one_weight_under_two_spellings_fails_the_stock_node_naming_both(pack, sd15, saved, loras_dir, spellings):
    """The host's loader keeps the last layer of a weight and drops the others silently ('3 of 3 layers matched',
    one applied); Load WaveFT refuses such a file naming both layers, and so does the stock node now."""
    import comfy.lora

    import nodes
    import waveft_core as wft

    model, clip, _ = sd15
    kmap = comfy.lora.model_lora_keys_unet(model.model, {})
    assert all(kmap.get(name, NATIVE + ".weight" if name == NATIVE else None) == saved for name in spellings)
    shape = tuple(model.model.state_dict()[saved].shape)
    wft.save(
        wft.Adapter({name: _layer(shape, seed=i) for i, name in enumerate(spellings)}), loras_dir / "twice.safetensors"
    )
    for load in (
        lambda: nodes.LoraLoader().load_lora(model, clip, "twice.safetensors", 1.0, 1.0),
        lambda: nodes.LoraLoaderModelOnly().load_lora_model_only(model, "twice.safetensors", 1.0),
    ):
        with pytest.raises(ValueError) as e:
            load()
        msg = str(e.value)
        assert "twice.safetensors" in msg and saved in msg and "two spellings" in msg, msg
        assert sum(f"'{name}'" in msg for name in spellings) == 2, msg


def test_overlapping_slices_of_a_fused_weight_fail_the_stock_node_and_disjoint_ones_apply(pack, loras_dir):
    """Flux's fused img_attn.qkv: its native name (the whole weight) beside the diffusers to_k (its middle third)
    write the same rows twice; to_q and to_k are disjoint thirds and both apply."""
    import comfy.supported_models as sm
    from host_tools import FLUX, patcher_for

    import nodes
    import waveft_core as wft

    model = patcher_for(sm.Flux, FLUX)
    h, qkv = FLUX["hidden_size"], "diffusion_model.double_blocks.0.img_attn.qkv"
    to_q, to_k = "transformer.transformer_blocks.0.attn.to_q", "transformer.transformer_blocks.0.attn.to_k"
    wft.save(wft.Adapter({qkv: _layer((3 * h, h)), to_k: _layer((h, h), seed=1)}), loras_dir / "fused.safetensors")
    with pytest.raises(ValueError) as e:
        nodes.LoraLoaderModelOnly().load_lora_model_only(model, "fused.safetensors", 1.0)
    msg = str(e.value)
    assert "fused.safetensors" in msg and f"'{qkv}'" in msg and f"'{to_k}'" in msg and qkv + ".weight" in msg, msg
    with pytest.raises(ValueError, match="both adapt the weight"):  # Load WaveFT: the same rule (it applied both)
        pack.nodes.loader.apply_adapter(wft.load(loras_dir / "fused.safetensors"), model, None, 1.0, 0.0, "fused")

    wft.save(wft.Adapter({to_q: _layer((h, h)), to_k: _layer((h, h), seed=1)}), loras_dir / "thirds.safetensors")
    patched = nodes.LoraLoaderModelOnly().load_lora_model_only(model, "thirds.safetensors", 1.0)[0]
    assert len(patched.patches[qkv + ".weight"]) == 2  # one patch per third
    out, _, summary = pack.nodes.loader.apply_adapter(
        wft.load(loras_dir / "thirds.safetensors"), model, None, 1.0, 0.0, "thirds"
    )
    assert "2 of 2 layers matched" in summary and len(out.patches[qkv + ".weight"]) == 2
