"""The target presets on real diffusers models (tiny configs): "attention q/k/v/out" selects exactly the linears
inside diffusers' attention modules (their processors' q/k/v/out projections, both streams), plus the fused
output of Flux's single blocks; "+ feed-forward" adds exactly the blocks' feed-forward linears."""

import pytest
import torch

from waveft_core.training.trainable import is_target

diffusers = pytest.importorskip("diffusers")


def _flux():
    return diffusers.FluxTransformer2DModel(
        patch_size=1,
        in_channels=4,
        num_layers=1,
        num_single_layers=1,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        pooled_projection_dim=8,
        axes_dims_rope=(2, 2, 4),
    )


def _wan():
    return diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=2,
        attention_head_dim=8,
        in_channels=4,
        out_channels=4,
        text_dim=16,
        freq_dim=16,
        ffn_dim=32,
        num_layers=1,
        rope_max_seq_len=32,
    )


def _sd3():
    return diffusers.SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        num_layers=2,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=8,
        out_channels=4,
    )


def _ltx():
    return diffusers.LTXVideoTransformer3DModel(
        in_channels=8,
        out_channels=8,
        num_attention_heads=2,
        attention_head_dim=8,
        cross_attention_dim=16,
        num_layers=1,
        caption_channels=16,
    )


def _linears(model):
    return {n: m for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


def _attention_linears(model):
    """Linears whose parent is one of diffusers' attention modules (class name ends in Attention)."""
    out = set()
    for name, module in model.named_modules():
        if type(module).__name__.endswith("Attention"):
            out |= {f"{name}.{n}" for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)}
    return out


@pytest.mark.parametrize("build", [_flux, _wan, _sd3, _ltx], ids=["flux", "wan", "sd3", "ltx"])
def test_attention_preset_is_every_attention_projection_of_a_diffusers_model(build):
    model = build()
    linears = _linears(model)
    chosen = {n for n, m in linears.items() if is_target(n, tuple(m.weight.shape), "attention q/k/v/out")}
    expected = _attention_linears(model)
    if build is _flux:  # the fused attention-out + MLP-out of single blocks trains whole, as natively linear2
        expected |= {n for n in linears if n.startswith("single_transformer_blocks.") and n.endswith(".proj_out")}
    assert expected and chosen == expected
    with_ff = {n for n, m in linears.items() if is_target(n, tuple(m.weight.shape), "attention + feed-forward")}
    feed_forward = with_ff - chosen
    assert feed_forward and all(".ff" in n or "proj_mlp" in n for n in feed_forward), sorted(feed_forward)
    assert not any("norm" in n or "embed" in n or n.startswith(("time", "proj_out")) for n in with_ff)


def test_an_unknown_preset_is_refused():
    with pytest.raises(ValueError, match="unknown targets 'attn'"):
        is_target("blocks.0.attn.q", (4, 4), "attn")
