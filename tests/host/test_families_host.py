"""Layer names of every supported family, resolved through the host's own key maps on tiny models that
ComfyUI builds itself: Flux and SD3 (q/k/v slices of fused weights, the swap_scale_shift modulation),
an SDXL-layout UNet, and SDXL's two text encoders."""

import pytest
import torch
from host_tools import FLUX, SD3, SDXL, patched_weights, patcher_for

import waveft_core as wft
from waveft_core.convert.peft_io import peft_positions


def layers_for(shapes: dict) -> wft.Adapter:
    g = torch.Generator().manual_seed(0)
    return wft.Adapter(
        layers={
            name: wft.Layer(
                spectrum=torch.randn(60, generator=g),
                shape=shape,
                wavelet="db2",
                indices=peft_positions(shape, 60, 777),
                scaling=2.0,
            )
            for name, shape in shapes.items()
        }
    )


def test_flux_peft_names_patch_slices_of_fused_weights(pack):
    import comfy.supported_models as sm
    import comfy.utils

    mp = patcher_for(sm.Flux, FLUX)
    h = FLUX["hidden_size"]
    ad = layers_for(
        {
            "transformer.transformer_blocks.0.attn.to_k": (h, h),  # middle third of img_attn.qkv
            "transformer.transformer_blocks.0.attn.add_v_proj": (h, h),  # last third of txt_attn.qkv
            "transformer.single_transformer_blocks.0.attn.to_q": (h, h),  # first rows of linear1
            "transformer.single_transformer_blocks.0.proj_mlp": (4 * h, h),  # the MLP rows of linear1
            "transformer.transformer_blocks.0.attn.to_out.0": (h, h),  # img_attn.proj, whole
            "transformer.norm_out.linear": (2 * h, h),  # final modulation: swap_scale_shift
        }
    )
    before = {k: v.float().clone() for k, v in mp.model.state_dict().items()}
    out, _, summary = pack.nodes.loader.apply_adapter(ad, mp, None, 1.0, 0.0, "flux test")
    assert "6 of 6 layers matched" in summary
    keys = [
        "diffusion_model.double_blocks.0.img_attn.qkv.weight",
        "diffusion_model.double_blocks.0.txt_attn.qkv.weight",
        "diffusion_model.single_blocks.0.linear1.weight",
        "diffusion_model.double_blocks.0.img_attn.proj.weight",
        "diffusion_model.final_layer.adaLN_modulation.1.weight",
    ]
    after = patched_weights(out, keys)
    d = {n: layer.delta() for n, layer in ad.layers.items()}
    qkv = before[keys[0]].clone()
    qkv[h : 2 * h] += d["transformer.transformer_blocks.0.attn.to_k"]
    torch.testing.assert_close(after[keys[0]], qkv, atol=1e-5, rtol=0)
    txt = before[keys[1]].clone()
    txt[2 * h :] += d["transformer.transformer_blocks.0.attn.add_v_proj"]
    torch.testing.assert_close(after[keys[1]], txt, atol=1e-5, rtol=0)
    lin1 = before[keys[2]].clone()
    lin1[:h] += d["transformer.single_transformer_blocks.0.attn.to_q"]
    lin1[3 * h : 7 * h] += d["transformer.single_transformer_blocks.0.proj_mlp"]
    torch.testing.assert_close(after[keys[2]], lin1, atol=1e-5, rtol=0)
    torch.testing.assert_close(
        after[keys[3]], before[keys[3]] + d["transformer.transformer_blocks.0.attn.to_out.0"], atol=1e-5, rtol=0
    )
    expect = before[keys[4]] + comfy.utils.swap_scale_shift(d["transformer.norm_out.linear"])
    torch.testing.assert_close(after[keys[4]], expect, atol=1e-5, rtol=0)


def test_sd3_peft_names_patch_joint_block_slices(pack):
    import comfy.supported_models as sm

    mp = patcher_for(sm.SD3, SD3)
    width = 64 * SD3["depth"]
    ad = layers_for(
        {
            "base_model.model.transformer_blocks.0.attn.to_q": (width, width),
            "transformer.transformer_blocks.1.attn.add_k_proj": (width, width),
        }
    )
    key_x = "diffusion_model.joint_blocks.0.x_block.attn.qkv.weight"
    key_c = "diffusion_model.joint_blocks.1.context_block.attn.qkv.weight"
    before = {k: v.float().clone() for k, v in mp.model.state_dict().items() if k in (key_x, key_c)}
    out, _, summary = pack.nodes.loader.apply_adapter(ad, mp, None, 0.5, 0.0, "sd3 test")
    assert "2 of 2 layers matched" in summary
    after = patched_weights(out, [key_x, key_c])
    x = before[key_x].clone()
    x[:width] += 0.5 * ad.layers["base_model.model.transformer_blocks.0.attn.to_q"].delta()
    c = before[key_c].clone()
    c[width : 2 * width] += 0.5 * ad.layers["transformer.transformer_blocks.1.attn.add_k_proj"].delta()
    torch.testing.assert_close(after[key_x], x, atol=1e-5, rtol=0)
    torch.testing.assert_close(after[key_c], c, atol=1e-5, rtol=0)


def test_sdxl_unet_names_in_every_spelling(pack):
    import comfy.supported_models as sm

    mp = patcher_for(sm.SDXL, SDXL)
    target = "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k"
    shape = tuple(mp.model.state_dict()[target + ".weight"].shape)
    for spelling in (
        "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k",  # native
        "base_model.model.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",  # PEFT
        "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",  # diffusers pipeline
        "lora_unet_input_blocks_4_1_transformer_blocks_0_attn2_to_k",  # kohya
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k",
    ):
        report = pack.nodes.host.match(layers_for({spelling: shape}).layers, mp, None)
        assert [t.key for t in report.targets.values()] == [target + ".weight"], spelling


class FakeSDXLClip(torch.nn.Module):
    """The key layout of SDXL's two text encoders in ComfyUI, at toy width (model_lora_keys_clip reads keys)."""

    def __init__(self):
        super().__init__()
        for name, width in (("clip_l", 8), ("clip_g", 12)):
            enc = torch.nn.Module()
            layers = torch.nn.ModuleList()
            for _ in range(2):
                layer = torch.nn.Module()
                layer.self_attn = torch.nn.Module()
                layer.self_attn.q_proj = torch.nn.Linear(width, width)
                layers.append(layer)
            enc.transformer = torch.nn.Module()
            enc.transformer.text_model = torch.nn.Module()
            enc.transformer.text_model.encoder = torch.nn.Module()
            enc.transformer.text_model.encoder.layers = layers
            setattr(self, name, enc)


@pytest.mark.parametrize(
    "spelling,encoder",
    [
        ("text_encoders.clip_g.transformer.text_model.encoder.layers.1.self_attn.q_proj", "clip_g"),
        ("text_encoder_2.text_model.encoder.layers.1.self_attn.q_proj", "clip_g"),
        ("lora_te2_text_model_encoder_layers_1_self_attn_q_proj", "clip_g"),
        ("text_encoder.text_model.encoder.layers.1.self_attn.q_proj", "clip_l"),
        ("lora_te1_text_model_encoder_layers_1_self_attn_q_proj", "clip_l"),
    ],
)
def test_sdxl_text_encoder_names(pack, spelling, encoder):
    import comfy.lora

    from waveft_core.names.matching import match_layers

    clip = FakeSDXLClip()
    kmap = comfy.lora.model_lora_keys_clip(clip, {})
    shapes = {k: tuple(v.shape) for k, v in clip.state_dict().items()}
    width = 12 if encoder == "clip_g" else 8
    report = match_layers({spelling: (width, width)}, kmap, shapes.get)
    assert [t.key for t in report.targets.values()] == [
        f"{encoder}.transformer.text_model.encoder.layers.1.self_attn.q_proj.weight"
    ]
    # a PEFT name without its pipeline prefix finds the encoder whose shape fits
    bare = "text_model.encoder.layers.1.self_attn.q_proj"
    report = match_layers({bare: (width, width)}, kmap, shapes.get)
    assert next(iter(report.targets.values())).key.startswith(encoder)
