"""Diffusers/PEFT names of DiT families whose host key map lacks them or places them wrong (no host import here).

ComfyUI's own key map (`comfy.lora.model_lora_keys_unet`) knows diffusers names for Flux, SD3, Qwen-Image and
HiDream, but it has none for Wan or (in 0.8) LTXV, nor for Chroma's guidance approximator or Flux.2's modulations, it uses Z-Image's
names for Lumina 2, and it slices a fused
q/k/v weight into three equal blocks, which is wrong where k and v have fewer heads than q (Lumina 2: 24 query,
8 key/value heads). `diffusers_key_map` gives the entries for those families, in the host map's value forms:
a weight key, or `(key, (dim, start, length))` for rows of a fused weight. The caller reads the head counts from
the model and passes them as plain numbers; an entry here replaces the host's entry of the same name."""
from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

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
)
RENAMES = {"lumina2": _LUMINA2, "wan_2.1": _WAN, "wan_2.2": _WAN, "ltxv": _LTXV, "chroma": _CHROMA, "flux2": _FLUX2}
# Families whose blocks hold one fused q/k/v weight `<block>.attention.qkv`: the names of its q, k and v rows. Lumina 2
# also answers to Z-Image's spelling, which the host's map gives it (with equal thirds).
FUSED_QKV = {
    "lumina2": (".attention.qkv", ((".attn.to_q", ".attention.to_q"), (".attn.to_k", ".attention.to_k"),
                                   (".attn.to_v", ".attention.to_v"))),
    "zimage": (".attention.qkv", ((".attention.to_q",), (".attention.to_k",), (".attention.to_v",))),
}


def _modules(weight_keys: Iterable[str]) -> list[str]:
    """The diffusion model's modules that have a weight, by module path."""
    return [k[len(MODEL_PREFIX):-len(".weight")] for k in weight_keys
            if k.startswith(MODEL_PREFIX) and k.endswith(".weight")]


def diffusers_key_map(family: str, weight_keys: Iterable[str], heads: Heads | None = None) -> dict:
    """Diffusers module name -> the host map's value, for a model of `family` (a names.Family tag) with these weight
    keys (`diffusion_model.<module>.weight`). `heads` places the q/k/v rows of a fused weight; without it a fused
    weight gets no entries (its names stay unmatched rather than land on the wrong rows)."""
    out: dict = {}
    modules = _modules(weight_keys)
    for module in modules:
        for pattern, replacement in RENAMES.get(family, ()):
            if re.fullmatch(pattern, module):
                out[re.sub(pattern, replacement, module)] = f"{MODEL_PREFIX}{module}.weight"
                break
    fused = FUSED_QKV.get(family)
    if fused is not None and heads is not None:
        suffix, spellings = fused
        for module in modules:
            if module.endswith(suffix):
                block = module[:-len(suffix)]
                for names, (start, rows) in zip(spellings, heads.slices()):
                    for name in names:
                        out[block + name] = (f"{MODEL_PREFIX}{module}.weight", (0, start, rows))
    return out
