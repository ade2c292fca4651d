"""ComfyUI-native module names (FORMAT.md section 3) -> the names A1111 and Forge give the same layers.

Pure functions: no webui; the header reader and the names come from waveft_core (files/storage.py, names/families.py).
The A1111 names are those of `networks.assign_network_names_to_compvis_modules`:
every module path of the loaded model with dots turned into underscores,

    UNet (SD1, SD2, SDXL)  sd_model.model.<path>             diffusion_model_input_blocks_4_1_..._attn1_to_q
    SD1 text encoder       cond_stage_model.wrapped.<path>   transformer_text_model_encoder_layers_0_self_attn_q_proj
    SDXL embedder i        conditioner.embedders[i].wrapped  0_transformer_text_model_...  (CLIP-L, Hugging Face layout)
                                                             1_model_transformer_resblocks_0_attn  (CLIP-G, OpenCLIP)
    SD2 text encoder       cond_stage_model.wrapped.<path>   model_transformer_resblocks_0_attn  (OpenCLIP-H)

OpenCLIP fuses q, k and v into one `nn.MultiheadAttention.in_proj_weight` of shape (3d, d) (rows q, then k, then v:
exactly the Hugging Face q_proj, k_proj, v_proj weights stacked), keeps `attn.out_proj` as a Linear inside the
MultiheadAttention, and names the MLP `mlp.c_fc` / `mlp.c_proj` (Hugging Face `mlp.fc1` / `mlp.fc2`).

Forge (its `backend/` since August 2024) keeps ComfyUI's layout: the UNet patcher's parameters are
`diffusion_model.<ldm path>.weight`, the CLIP patcher's are `clip_l|clip_g.transformer.<hf path>.weight`.
"""

from __future__ import annotations

import re
from typing import NamedTuple

from waveft_core.files import kinds
from waveft_core.keys import META_NETWORK_MODULE, NETWORK_MODULE, SUFFIX_SPECTRUM
from waveft_core.names import NATIVE_CLIP, TE_PREFIX, UNET_PREFIX, family_of

QKV = ("q", "k", "v")


class A1111Target(NamedTuple):
    """Where one WaveFT layer goes in A1111.

    lookup:     the key that must exist in `sd_model.network_layer_mapping` (the layer A1111 patches)
    module_key: the key of `Network.modules` that `networks.network_apply_weights` looks the update up by
    part:       None for the whole weight of `lookup`; 'q', 'k' or 'v' for that third of the rows of the
                nn.MultiheadAttention `lookup`'s in_proj_weight; 'out' for its out_proj (`lookup` is the out_proj)
    """

    lookup: str
    module_key: str
    part: str | None = None

    @property
    def mha_key(self) -> str | None:
        """network_layer_name of the nn.MultiheadAttention this target belongs to (None if it is not a part)."""
        if self.part in QKV:
            return self.lookup
        if self.part == "out":
            return self.lookup[: -len("_out_proj")]
        return None


_HF_LAYER = re.compile(r"text_model\.encoder\.layers\.(\d+)\.(.+)")
# OpenCLIP encoders and the prefixes A1111 gives them, best first: CLIP-G is embedder 1 of SDXL base (0 of the
# refiner, which has no CLIP-L); CLIP-H is SD2's only encoder (no prefix).
_OPENCLIP_PREFIXES = {"clip_g": ("1_", "0_"), "clip_h": ("",)}
# CLIP-L (Hugging Face layout in A1111 too): SDXL embedder 0, or SD1's only encoder (no prefix).
_HF_PREFIXES = {"clip_l": ("0_", "")}


def _us(name: str) -> str:
    return name.replace(".", "_")


def _openclip_targets(rest: str, prefixes) -> list[A1111Target]:
    m = _HF_LAYER.fullmatch(rest)
    if not m:
        return []  # embeddings, text_projection (a bare Parameter in OpenCLIP), norms: not patched by A1111
    i, sub = m[1], m[2]
    out: list[A1111Target] = []
    for p in prefixes:
        block = f"{p}model_transformer_resblocks_{i}"
        if sub in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
            x = sub[len("self_attn.")]
            out.append(A1111Target(f"{block}_attn", f"{block}_attn_{x}_proj", x))
        elif sub == "self_attn.out_proj":
            out.append(A1111Target(f"{block}_attn_out_proj", f"{block}_attn_out_proj", "out"))
        elif sub == "mlp.fc1":
            out.append(A1111Target(f"{block}_mlp_c_fc", f"{block}_mlp_c_fc"))
        elif sub == "mlp.fc2":
            out.append(A1111Target(f"{block}_mlp_c_proj", f"{block}_mlp_c_proj"))
    return out


def a1111_targets(native: str) -> list[A1111Target]:
    """Candidate A1111 places for a ComfyUI-native module, best first: the first whose `lookup` is in the
    loaded model's `network_layer_mapping` is the one. Empty when A1111 has no layer it would patch for it."""
    if native.startswith(UNET_PREFIX):
        key = _us(native)
        return [A1111Target(key, key)]
    m = NATIVE_CLIP.fullmatch(native)
    if not m:
        return []
    clip, rest = m[1], m[2]
    if clip in _HF_PREFIXES:
        if not _HF_LAYER.fullmatch(rest):
            return []  # embeddings (nn.Embedding: A1111 never patches those), final_layer_norm
        return [A1111Target(f"{p}transformer_{_us(rest)}", f"{p}transformer_{_us(rest)}") for p in _HF_PREFIXES[clip]]
    if clip in _OPENCLIP_PREFIXES:
        return _openclip_targets(rest, _OPENCLIP_PREFIXES[clip])
    return []


def unsupported_reason(native: str) -> str:
    """Why a1111_targets(native) is empty, for messages."""
    if native.startswith(UNET_PREFIX):
        return "not a layer of this model"
    m = NATIVE_CLIP.fullmatch(native)
    if not m:
        return "A1111's Lora code handles SD1, SD2 and SDXL UNets and CLIP text encoders only"
    if m[1] not in _HF_PREFIXES and m[1] not in _OPENCLIP_PREFIXES:
        return f"text encoder '{m[1]}' is not one A1111 loads for SD1/SD2/SDXL"
    if m[2].endswith("text_projection"):
        return "OpenCLIP keeps text_projection as a bare parameter, which A1111 cannot patch"
    if ".embeddings." in m[2]:
        return "A1111 does not patch embedding layers"
    return "A1111 does not patch this layer"


def forge_key(native: str) -> tuple[str, str] | None:
    """('unet' | 'clip', parameter key of Forge's UNet / CLIP patcher) for a ComfyUI-native module, else None."""
    if native.startswith(UNET_PREFIX):
        return "unet", native + ".weight"
    if native.startswith(TE_PREFIX):
        return "clip", native[len(TE_PREFIX) :] + ".weight"
    return None


def sd_version(metadata: dict) -> str | None:
    """'SD1', 'SD2', 'SDXL', 'SD3', 'Flux' or 'Unknown' for a WaveFT file's metadata (FORMAT.md section 3);
    None when the metadata is not a WaveFT file's (leave those to the host's own detection)."""
    if str(metadata.get(META_NETWORK_MODULE, "")) != NETWORK_MODULE:
        return None
    family = family_of(metadata)
    return family.webui if family and family.webui else "Unknown"


def is_waveft_file(path, metadata: dict | None = None) -> bool:
    """A native or PEFT WaveFT safetensors file (judged from its header), so WaveFT's loader should take it:
    it then says clearly what is wrong with a damaged or PEFT one."""
    if metadata and kinds.is_waveft((), {k: str(v) for k, v in metadata.items()}):
        return True
    return str(path).lower().endswith(".safetensors") and kinds.is_waveft_file(path)


def is_waveft_state_dict(sd) -> bool:
    return any(isinstance(k, str) and k.endswith("." + SUFFIX_SPECTRUM) for k in sd)
