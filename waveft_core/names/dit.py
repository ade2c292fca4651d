"""Diffusers/PEFT names of DiT families whose host key map lacks them or places them wrong (no host import here).

ComfyUI's own key map (`comfy.lora.model_lora_keys_unet`) knows diffusers names for Flux, SD3, Qwen-Image and
HiDream. It has none for Wan, HunyuanVideo (only diffusion-pipe's) or, in 0.8, LTXV; none for Chroma's guidance
approximator or Flux.2's modulations; it gives Lumina 2 Z-Image's names, and it slices a fused q/k/v weight into
three equal blocks, which is wrong where k and v have fewer heads than q (Lumina 2: 24 query, 8 key/value heads).
`diffusers_key_map` gives the entries for those families, in the host map's value forms: a weight key,
`(key, (dim, start, length))` for rows of a fused weight, `(key, None, function)` for a weight whose ΔW the host
transforms first. The caller reads the head counts from the model and passes them as plain numbers; an entry here
replaces the host's entry of the same name."""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

import torch

MODEL_PREFIX = "diffusion_model."


@dataclass(frozen=True)
class Heads:
    """Attention heads of a fused q/k/v weight: q has `heads` rows of `head_dim`, k and v `kv_heads` each."""

    heads: int
    kv_heads: int
    head_dim: int

    def slices(self) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int]]:
        """(start, rows) of q, k and v inside the fused weight."""
        q, kv = self.heads * self.head_dim, self.kv_heads * self.head_dim
        return (0, q), (q, kv), (q + kv, kv)


# Lumina 2 as diffusers names it (Lumina2Transformer2DModel) <- ComfyUI's NextDiT modules; q/k/v come apart below
_LUMINA2 = (
    (r"(.+)\.attention\.out", r"\1.attn.to_out.0"),
    (r"(.+)\.feed_forward\.w([123])", r"\1.feed_forward.linear_\2"),
    (r"(layers|noise_refiner|context_refiner)\.(\d+)\.adaLN_modulation\.1", r"\1.\2.norm1.linear"),
    (r"cap_embedder\.1", "time_caption_embed.caption_embedder.1"),
    (r"t_embedder\.mlp\.0", "time_caption_embed.timestep_embedder.linear_1"),
    (r"t_embedder\.mlp\.2", "time_caption_embed.timestep_embedder.linear_2"),
    (r"final_layer\.adaLN_modulation\.1", "norm_out.linear_1"),
    (r"final_layer\.linear", "norm_out.linear_2"),
    (r"x_embedder", "x_embedder"),
)
# Wan 2.1/2.2 as diffusers names it (WanTransformer3DModel) <- ComfyUI's WanModel modules
_WAN = (
    (r"blocks\.(\d+)\.self_attn\.([qkv])", r"blocks.\1.attn1.to_\2"),
    (r"blocks\.(\d+)\.self_attn\.o", r"blocks.\1.attn1.to_out.0"),
    (r"blocks\.(\d+)\.cross_attn\.([qkv])", r"blocks.\1.attn2.to_\2"),
    (r"blocks\.(\d+)\.cross_attn\.o", r"blocks.\1.attn2.to_out.0"),
    (r"blocks\.(\d+)\.cross_attn\.([kv])_img", r"blocks.\1.attn2.add_\2_proj"),
    (r"blocks\.(\d+)\.ffn\.0", r"blocks.\1.ffn.net.0.proj"),
    (r"blocks\.(\d+)\.ffn\.2", r"blocks.\1.ffn.net.2"),
    (r"text_embedding\.0", "condition_embedder.text_embedder.linear_1"),
    (r"text_embedding\.2", "condition_embedder.text_embedder.linear_2"),
    (r"time_embedding\.0", "condition_embedder.time_embedder.linear_1"),
    (r"time_embedding\.2", "condition_embedder.time_embedder.linear_2"),
    (r"time_projection\.1", "condition_embedder.time_proj"),
    (r"img_emb\.proj\.1", "condition_embedder.image_embedder.ff.net.0.proj"),
    (r"img_emb\.proj\.3", "condition_embedder.image_embedder.ff.net.2"),
    (r"head\.head", "proj_out"),
    (r"patch_embedding", "patch_embedding"),
)
# LTX-Video: diffusers keeps the original module names but two (LTXVideoTransformer3DModel)
_LTXV = (
    (r"patchify_proj", "proj_in"),
    (r"adaln_single\.(.+)", r"time_embed.\1"),
    (r"(.+)", r"\1"),
)
# Chroma: the host gives it Flux's names, which cover all but the layers of its guidance approximator
_CHROMA = (
    (r"distilled_guidance_layer\.layers\.(\d+)\.in_layer", r"distilled_guidance_layer.layers.\1.linear_1"),
    (r"distilled_guidance_layer\.layers\.(\d+)\.out_layer", r"distilled_guidance_layer.layers.\1.linear_2"),
    (r"distilled_guidance_layer\.(in_proj|out_proj)", r"distilled_guidance_layer.\1"),
)
# Flux.2: the host gives it Flux.1's names; its shared modulations and time/guidance embedder are named anew
_FLUX2 = (
    (r"(double_stream_modulation_img|double_stream_modulation_txt|single_stream_modulation)\.lin", r"\1.linear"),
    (r"time_in\.in_layer", "time_guidance_embed.timestep_embedder.linear_1"),
    (r"time_in\.out_layer", "time_guidance_embed.timestep_embedder.linear_2"),
    (r"guidance_in\.in_layer", "time_guidance_embed.guidance_embedder.linear_1"),
    (r"guidance_in\.out_layer", "time_guidance_embed.guidance_embedder.linear_2"),
    # in the host's map from 0.3x on (ComfyUI 0.8 lacks them)
    (r"double_blocks\.(\d+)\.img_mlp\.0", r"transformer_blocks.\1.ff.linear_in"),
    (r"double_blocks\.(\d+)\.img_mlp\.2", r"transformer_blocks.\1.ff.linear_out"),
    (r"double_blocks\.(\d+)\.txt_mlp\.0", r"transformer_blocks.\1.ff_context.linear_in"),
    (r"double_blocks\.(\d+)\.txt_mlp\.2", r"transformer_blocks.\1.ff_context.linear_out"),
    (r"single_blocks\.(\d+)\.linear1", r"single_transformer_blocks.\1.attn.to_qkv_mlp_proj"),
    (r"single_blocks\.(\d+)\.linear2", r"single_transformer_blocks.\1.attn.to_out"),
)
# HunyuanVideo as diffusers names it (HunyuanVideoTransformer3DModel) <- ComfyUI's modules (Flux-like); its fused
# q/k/v weights come apart below
_HUNYUAN_VIDEO = (
    (r"double_blocks\.(\d+)\.img_attn\.proj", r"transformer_blocks.\1.attn.to_out.0"),
    (r"double_blocks\.(\d+)\.txt_attn\.proj", r"transformer_blocks.\1.attn.to_add_out"),
    (r"double_blocks\.(\d+)\.img_mod\.lin", r"transformer_blocks.\1.norm1.linear"),
    (r"double_blocks\.(\d+)\.txt_mod\.lin", r"transformer_blocks.\1.norm1_context.linear"),
    (r"double_blocks\.(\d+)\.img_mlp\.0", r"transformer_blocks.\1.ff.net.0.proj"),
    (r"double_blocks\.(\d+)\.img_mlp\.2", r"transformer_blocks.\1.ff.net.2"),
    (r"double_blocks\.(\d+)\.txt_mlp\.0", r"transformer_blocks.\1.ff_context.net.0.proj"),
    (r"double_blocks\.(\d+)\.txt_mlp\.2", r"transformer_blocks.\1.ff_context.net.2"),
    (r"single_blocks\.(\d+)\.linear2", r"single_transformer_blocks.\1.proj_out"),
    (r"single_blocks\.(\d+)\.modulation\.lin", r"single_transformer_blocks.\1.norm.linear"),
    (r"img_in\.proj", "x_embedder.proj"),
    (r"time_in\.in_layer", "time_text_embed.timestep_embedder.linear_1"),
    (r"time_in\.out_layer", "time_text_embed.timestep_embedder.linear_2"),
    (r"guidance_in\.in_layer", "time_text_embed.guidance_embedder.linear_1"),
    (r"guidance_in\.out_layer", "time_text_embed.guidance_embedder.linear_2"),
    (r"vector_in\.in_layer", "time_text_embed.text_embedder.linear_1"),
    (r"vector_in\.out_layer", "time_text_embed.text_embedder.linear_2"),
    (r"txt_in\.input_embedder", "context_embedder.proj_in"),
    (r"txt_in\.t_embedder\.in_layer", "context_embedder.time_text_embed.timestep_embedder.linear_1"),
    (r"txt_in\.t_embedder\.out_layer", "context_embedder.time_text_embed.timestep_embedder.linear_2"),
    (r"txt_in\.c_embedder\.in_layer", "context_embedder.time_text_embed.text_embedder.linear_1"),
    (r"txt_in\.c_embedder\.out_layer", "context_embedder.time_text_embed.text_embedder.linear_2"),
    (
        r"txt_in\.individual_token_refiner\.blocks\.(\d+)\.self_attn\.proj",
        r"context_embedder.token_refiner.refiner_blocks.\1.attn.to_out.0",
    ),
    (
        r"txt_in\.individual_token_refiner\.blocks\.(\d+)\.mlp\.0",
        r"context_embedder.token_refiner.refiner_blocks.\1.ff.net.0.proj",
    ),
    (
        r"txt_in\.individual_token_refiner\.blocks\.(\d+)\.mlp\.2",
        r"context_embedder.token_refiner.refiner_blocks.\1.ff.net.2",
    ),
    (
        r"txt_in\.individual_token_refiner\.blocks\.(\d+)\.adaLN_modulation\.1",
        r"context_embedder.token_refiner.refiner_blocks.\1.norm_out.linear",
    ),
    (r"final_layer\.linear", "proj_out"),
)
# Anima's DiT (Cosmos-Predict2) as diffusers names it (CosmosTransformer3DModel, the transformer of diffusers' Anima
# pipeline) <- ComfyUI's MiniTrainDIT modules; its LLM adapter has no diffusers names here
_ANIMA = (
    (r"blocks\.(\d+)\.self_attn\.([qkv])_proj", r"transformer_blocks.\1.attn1.to_\2"),
    (r"blocks\.(\d+)\.self_attn\.output_proj", r"transformer_blocks.\1.attn1.to_out.0"),
    (r"blocks\.(\d+)\.cross_attn\.([qkv])_proj", r"transformer_blocks.\1.attn2.to_\2"),
    (r"blocks\.(\d+)\.cross_attn\.output_proj", r"transformer_blocks.\1.attn2.to_out.0"),
    (r"blocks\.(\d+)\.mlp\.layer1", r"transformer_blocks.\1.ff.net.0.proj"),
    (r"blocks\.(\d+)\.mlp\.layer2", r"transformer_blocks.\1.ff.net.2"),
    (r"blocks\.(\d+)\.adaln_modulation_self_attn\.([12])", r"transformer_blocks.\1.norm1.linear_\2"),
    (r"blocks\.(\d+)\.adaln_modulation_cross_attn\.([12])", r"transformer_blocks.\1.norm2.linear_\2"),
    (r"blocks\.(\d+)\.adaln_modulation_mlp\.([12])", r"transformer_blocks.\1.norm3.linear_\2"),
    (r"x_embedder\.proj\.1", "patch_embed.proj"),
    (r"t_embedder\.1\.linear_([12])", r"time_embed.t_embedder.linear_\1"),
    (r"final_layer\.adaln_modulation\.([12])", r"norm_out.linear_\1"),
    (r"final_layer\.linear", "proj_out"),
)
RENAMES = {
    "anima": _ANIMA,
    "lumina2": _LUMINA2,
    "wan_2.1": _WAN,
    "wan_2.2": _WAN,
    "ltxv": _LTXV,
    "chroma": _CHROMA,
    "flux2": _FLUX2,
    "hunyuan_video": _HUNYUAN_VIDEO,
}


def swap_scale_shift(delta: torch.Tensor) -> torch.Tensor:
    """diffusers' final norm projects to (scale, shift), the original layout ComfyUI keeps to (shift, scale)."""
    shift, scale = delta.chunk(2, dim=0)
    return torch.cat((scale, shift), dim=0)


# Weights whose diffusers projection differs from the original's by the order of its two halves
SWAPPED = {"hunyuan_video": ((r"final_layer\.adaLN_modulation\.1", "norm_out.linear"),)}

# Fused q/k/v weights: (native module pattern, diffusers names of q, k, v rows[, of the rows after them]). Each name
# is a tuple of spellings. Lumina 2 also answers to Z-Image's spelling, which the host's map gives it (in thirds).
_LUMINA_QKV = (
    (
        r"(.+)\.attention\.qkv",
        (
            (r"\1.attn.to_q", r"\1.attention.to_q"),
            (r"\1.attn.to_k", r"\1.attention.to_k"),
            (r"\1.attn.to_v", r"\1.attention.to_v"),
        ),
    ),
)
FUSED_QKV = {
    "lumina2": _LUMINA_QKV,
    "zimage": ((r"(.+)\.attention\.qkv", ((r"\1.attention.to_q",), (r"\1.attention.to_k",), (r"\1.attention.to_v",))),),
    "hunyuan_video": (
        (
            r"double_blocks\.(\d+)\.img_attn\.qkv",
            (
                (r"transformer_blocks.\1.attn.to_q",),
                (r"transformer_blocks.\1.attn.to_k",),
                (r"transformer_blocks.\1.attn.to_v",),
            ),
        ),
        (
            r"double_blocks\.(\d+)\.txt_attn\.qkv",
            (
                (r"transformer_blocks.\1.attn.add_q_proj",),
                (r"transformer_blocks.\1.attn.add_k_proj",),
                (r"transformer_blocks.\1.attn.add_v_proj",),
            ),
        ),
        (
            r"single_blocks\.(\d+)\.linear1",
            (
                (r"single_transformer_blocks.\1.attn.to_q",),
                (r"single_transformer_blocks.\1.attn.to_k",),
                (r"single_transformer_blocks.\1.attn.to_v",),
                (r"single_transformer_blocks.\1.proj_mlp",),
            ),
        ),
        (
            r"txt_in\.individual_token_refiner\.blocks\.(\d+)\.self_attn\.qkv",
            (
                (r"context_embedder.token_refiner.refiner_blocks.\1.attn.to_q",),
                (r"context_embedder.token_refiner.refiner_blocks.\1.attn.to_k",),
                (r"context_embedder.token_refiner.refiner_blocks.\1.attn.to_v",),
            ),
        ),
    ),
}


def diffusers_key_map(family: str, weight_shapes: Mapping[str, tuple], heads: Heads | None = None) -> dict:
    """Diffusers module name -> the host map's value, for a model of `family` (a names.Family tag) whose weights have
    these shapes (`diffusion_model.<module>.weight` -> shape). `heads` places the rows of a fused q/k/v weight;
    without it a fused weight gets no entries (its names stay unmatched rather than land on the wrong rows)."""
    out: dict = {}
    modules = {
        k[len(MODEL_PREFIX) : -len(".weight")]: tuple(shape)
        for k, shape in weight_shapes.items()
        if k.startswith(MODEL_PREFIX) and k.endswith(".weight")
    }
    for module in modules:
        key = f"{MODEL_PREFIX}{module}.weight"
        for pattern, replacement in RENAMES.get(family, ()):
            if re.fullmatch(pattern, module):
                out[re.sub(pattern, replacement, module)] = key
                break
        for pattern, name in SWAPPED.get(family, ()):
            if re.fullmatch(pattern, module):
                out[name] = (key, None, swap_scale_shift)
        if heads is None:
            continue
        for pattern, parts in FUSED_QKV.get(family, ()):
            if not re.fullmatch(pattern, module):
                continue
            slices = list(heads.slices())
            used = slices[-1][0] + slices[-1][1]
            if len(parts) > 3:  # the rows after q/k/v (a single block's MLP input)
                slices.append((used, modules[module][0] - used))
            for spellings, (start, rows) in zip(parts, slices):
                for spelling in spellings:
                    out[re.sub(pattern, spelling, module)] = (key, (0, start, rows))
    return out


def spellings(name: str) -> tuple[str, ...]:
    """The forms under which host key maps list a diffusers module name (bare, pipeline, native-prefixed,
    OneTrainer, LyCORIS)."""
    under = name.replace(".", "_")
    return (name, f"transformer.{name}", f"{MODEL_PREFIX}{name}", f"lora_transformer_{under}", f"lycoris_{under}")


def merge_into(host_map: dict, entries: dict) -> dict:
    """The host's map with `entries` added; an entry replaces the host's own value under every spelling of its name
    the host lists, so that no spelling keeps rows the host placed wrong."""
    for name, value in entries.items():
        host_map[name] = value
        for spelling in spellings(name)[1:]:
            if spelling in host_map:
                host_map[spelling] = value
    return host_map
