"""Tiny random DiTs of every family ComfyUI 0.33 trains, built by the host's own `comfy.supported_models`
classes (real block code, toy width: 64, two heads, one or two blocks of each kind), with a latent and a
conditioning of the shape each family's model takes."""

from dataclasses import dataclass, field

import torch
from host_tools import FLUX, SD3, patcher_for

_FLUX_LIKE = dict(FLUX, depth=2, depth_single_blocks=2)


@dataclass
class Family:
    name: str
    supported_model: str  # class name in comfy.supported_models
    unet_config: dict
    latent: tuple  # one latent's shape, batch included
    context: tuple = (1, 6, 48)  # the text encoder's hidden states
    extra: dict = field(default_factory=dict)  # other conditioning entries (pooled output, guidance...)
    rope: bool = True  # uses the host's shared rotary kernel (0.8's has no CPU backward)


FAMILIES = [
    Family("flux", "Flux", _FLUX_LIKE, (1, 16, 8, 8), extra={"pooled_output": (1, 32), "guidance": 3.5}),
    Family(
        "flux2",
        "Flux2",
        dict(
            image_model="flux2",
            in_channels=128,
            out_channels=128,
            vec_in_dim=None,
            context_in_dim=48,
            hidden_size=64,
            mlp_ratio=3.0,
            num_heads=2,
            depth=2,
            depth_single_blocks=2,
            axes_dim=[8, 8, 8, 8],
            theta=2000,
            patch_size=1,
            qkv_bias=False,
            guidance_embed=False,
            txt_ids_dims=[3],
            global_modulation=True,
            mlp_silu_act=True,
            ops_bias=False,
            default_ref_method="index",
            ref_index_scale=10.0,
        ),
        (1, 128, 4, 4),
        extra={"pooled_output": (1, 32)},
    ),  # unused by the model; 0.8's conditioning reads it
    Family(
        "chroma",
        "Chroma",
        dict(
            image_model="chroma",
            in_channels=64,
            out_channels=64,
            context_in_dim=48,
            hidden_size=64,
            mlp_ratio=4.0,
            num_heads=2,
            depth=2,
            depth_single_blocks=2,
            axes_dim=[8, 12, 12],
            theta=10000,
            patch_size=2,
            qkv_bias=True,
            in_dim=64,
            out_dim=64,
            hidden_dim=32,
            n_layers=2,
            txt_ids_dims=[],
            vec_in_dim=None,
        ),
        (1, 16, 8, 8),
        extra={"pooled_output": (1, 32)},
    ),
    Family("sd3", "SD3", SD3, (1, 16, 8, 8), context=(1, 6, 48), extra={"pooled_output": (1, 32)}, rope=False),
    Family(
        "lumina2",
        "Lumina2",
        dict(
            image_model="lumina2",
            patch_size=2,
            in_channels=16,
            dim=64,
            cap_feat_dim=48,
            n_layers=2,
            n_refiner_layers=1,
            n_heads=4,
            n_kv_heads=2,
            multiple_of=16,
            ffn_dim_multiplier=4.0,
            qk_norm=True,
            axes_dims=[4, 6, 6],
            axes_lens=[300, 512, 512],
            rope_theta=10000.0,
        ),
        (1, 16, 8, 8),
    ),
    # Z-Image's modulation is 256 wide whatever the model's width: its narrowest possible model
    Family(
        "z_image",
        "ZImage",
        dict(
            image_model="lumina2",
            patch_size=2,
            in_channels=16,
            dim=256,
            cap_feat_dim=48,
            n_layers=2,
            n_refiner_layers=1,
            n_heads=2,
            n_kv_heads=2,
            multiple_of=16,
            ffn_dim_multiplier=8.0 / 3.0,
            qk_norm=True,
            axes_dims=[32, 48, 48],
            axes_lens=[1536, 512, 512],
            rope_theta=256.0,
            z_image_modulation=True,
            time_scale=1000.0,
        ),
        (1, 16, 8, 8),
    ),
    Family(
        "qwen_image",
        "QwenImage",
        dict(
            image_model="qwen_image",
            patch_size=2,
            in_channels=64,
            out_channels=16,
            num_layers=2,
            attention_head_dim=32,
            num_attention_heads=2,
            joint_attention_dim=48,
            axes_dims_rope=(8, 12, 12),
        ),
        (1, 16, 8, 8),
    ),
    Family(
        "hidream",
        "HiDream",
        dict(
            image_model="hidream",
            patch_size=2,
            in_channels=16,
            out_channels=16,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=32,
            num_attention_heads=2,
            caption_channels=[48, 40],
            text_emb_dim=32,
            num_routed_experts=4,
            num_activated_experts=2,
            axes_dims_rope=[16, 8, 8],
            max_resolution=[16, 16],
            llama_layers=[0, 1],
        ),
        (1, 16, 8, 8),
        extra={"pooled_output": (1, 32), "conditioning_llama3": (1, 2, 6, 40)},
    ),
    Family(
        "hunyuan_video",
        "HunyuanVideo",
        dict(
            image_model="hunyuan_video",
            in_channels=16,
            out_channels=16,
            vec_in_dim=32,
            context_in_dim=48,
            hidden_size=64,
            mlp_ratio=4.0,
            num_heads=2,
            depth=2,
            depth_single_blocks=2,
            axes_dim=[8, 12, 12],
            theta=256,
            patch_size=[1, 2, 2],
            qkv_bias=True,
            guidance_embed=True,
            byt5=False,
            meanflow=False,
            use_cond_type_embedding=False,
            vision_in_dim=None,
            meanflow_sum=False,
        ),
        (1, 16, 1, 8, 8),
        extra={"pooled_output": (1, 32), "guidance": 6.0},
    ),
    Family(
        "wan21",
        "WAN21_T2V",
        dict(
            image_model="wan2.1",
            model_type="t2v",
            patch_size=(1, 2, 2),
            text_len=6,
            in_dim=16,
            dim=64,
            ffn_dim=128,
            freq_dim=32,
            text_dim=48,
            out_dim=16,
            num_heads=2,
            num_layers=2,
        ),
        (1, 16, 1, 8, 8),
    ),
    Family(
        "wan22",
        "WAN22_T2V",
        dict(
            image_model="wan2.1",
            model_type="t2v",
            patch_size=(1, 2, 2),
            text_len=6,
            in_dim=48,
            dim=64,
            ffn_dim=128,
            freq_dim=32,
            text_dim=48,
            out_dim=48,
            num_heads=2,
            num_layers=2,
        ),
        (1, 48, 1, 8, 8),
    ),
    Family(
        "ltxv",
        "LTXV",
        dict(
            image_model="ltxv",
            in_channels=128,
            cross_attention_dim=64,
            attention_head_dim=32,
            num_attention_heads=2,
            caption_channels=48,
            num_layers=2,
        ),
        (1, 128, 1, 4, 4),
        extra={"attention_mask": (1, 6)},
        rope=False,
    ),  # its own rotary code, plain torch
    Family(
        "anima",
        "Anima",
        dict(
            image_model="anima",
            max_img_h=64,
            max_img_w=64,
            max_frames=8,
            in_channels=16,
            out_channels=16,
            patch_spatial=2,
            patch_temporal=1,
            concat_padding_mask=True,
            model_channels=64,
            num_blocks=2,
            num_heads=2,
            crossattn_emb_channels=48,
            pos_emb_cls="rope3d",
            pos_emb_learnable=True,
            pos_emb_interpolation="crop",
            use_adaln_lora=True,
            adaln_lora_dim=16,
        ),
        (1, 16, 1, 8, 8),
    ),
]
BY_NAME = {f.name: f for f in FAMILIES}


def build(family: Family):
    """The family's tiny model as a ModelPatcher (random weights, seeded)."""
    import comfy.supported_models as sm

    torch.manual_seed(0)
    patcher = patcher_for(getattr(sm, family.supported_model), dict(family.unet_config))
    with torch.inference_mode():  # norms scale by 1, not 0 (a zero RMSNorm after Lumina's attention silences it)
        for name, p in patcher.model.named_parameters():
            if p.dim() == 1 and "norm" in name:
                p.fill_(1.0)
    return patcher


def conditioning(family: Family, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    extra = {
        k: (torch.ones(v) if k == "attention_mask" else torch.randn(v, generator=g)) if isinstance(v, tuple) else v
        for k, v in family.extra.items()
    }
    return [[torch.randn(family.context, generator=g), extra]]


def latent(family: Family, seed: int = 2):
    return {"samples": torch.randn(family.latent, generator=torch.Generator().manual_seed(seed)) * 0.5}


def available(family: Family) -> bool:
    import comfy.supported_models as sm

    return hasattr(sm, family.supported_model)
