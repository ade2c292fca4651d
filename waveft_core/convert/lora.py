"""LoRA and WaveFT: kohya names of native modules, WaveFT -> LoRA (the best rank-r approximation of each layer's
ΔW, by a truncated SVD), and LoRA -> dense ΔW (what extraction turns back into WaveFT, extract.py).

Adapters use ComfyUI-native module names (FORMAT.md section 3); LoRA files use kohya's `lora_unet_*` /
`lora_te*_*` spellings where ComfyUI's stock loader knows them, native names elsewhere."""

from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Callable, Iterable, Mapping

import torch

from ..adapter import Adapter
from ..files.limits import check_dense
from ..files.metadata import hashed_file
from ..files.storage import atomic_write
from ..keys import (
    META_ARCHITECTURE,
    META_BASE_MODEL,
    META_DATASETS,
    META_NETWORK_ALPHA,
    META_NETWORK_DIM,
    META_NETWORK_MODULE,
    META_SPEC_VERSION,
    META_TAG_FREQUENCY,
    SPEC_PREFIX,
    SPEC_VERSION,
)
from ..names.families import NATIVE_CLIP, TE_PREFIX, UNET_PREFIX, diffusers_unet_to_ldm, family_of, to_native
from .extract import LazyDeltas

# ---------------------------------------------------------------------------------------------------------
# Names: native <-> kohya

# Text-encoder modules that ComfyUI's stock loader (and kohya's trainers) know under `lora_te*_` keys.
_KOHYA_TE_MODULE = re.compile(r"text_model\.encoder\.layers\.\d+\.(mlp\.fc[12]|self_attn\.(q|k|v|out)_proj)")


def kohya_prefix(native: str, has_clip_g: bool) -> str:
    """The LoRA key prefix of a native module name (see `to_lora`). Names with no kohya spelling that
    ComfyUI maps stay native: ComfyUI reads `diffusion_model.*` and `text_encoders.*` directly."""
    if native.startswith(UNET_PREFIX):
        return "lora_unet_" + native[len(UNET_PREFIX) :].replace(".", "_")
    m = NATIVE_CLIP.fullmatch(native)
    if m and _KOHYA_TE_MODULE.fullmatch(m[2]):
        clip, module = m[1], m[2].replace(".", "_")
        if clip == "clip_g":
            return "lora_te2_" + module
        if clip in ("clip_l", "clip_h"):
            return ("lora_te1_" if has_clip_g else "lora_te_") + module
    return native


# Module-name parts that contain underscores, in SD1/SDXL LDM and diffusers UNets and in HF CLIP. Everything
# else in a kohya name is separated by dots; see `resolve_underscores`.
_UNDERSCORE_PARTS = frozenset(
    {
        # LDM UNet
        "input_blocks",
        "middle_block",
        "output_blocks",
        "time_embed",
        "label_emb",
        "transformer_blocks",
        "proj_in",
        "proj_out",
        "to_q",
        "to_k",
        "to_v",
        "to_out",
        "in_layers",
        "out_layers",
        "emb_layers",
        "skip_connection",
        # diffusers UNet
        "down_blocks",
        "up_blocks",
        "mid_block",
        "conv_in",
        "conv_out",
        "conv_norm_out",
        "time_embedding",
        "add_embedding",
        "linear_1",
        "linear_2",
        "time_emb_proj",
        "conv_shortcut",
        # HF CLIP
        "text_model",
        "self_attn",
        "q_proj",
        "k_proj",
        "v_proj",
        "out_proj",
        "layer_norm1",
        "layer_norm2",
        "final_layer_norm",
        "token_embedding",
        "position_embedding",
        "text_projection",
    }
)
_LONGEST_PART = max(p.count("_") + 1 for p in _UNDERSCORE_PARTS)


def resolve_underscores(name: str, known: Mapping[str, str] | None = None) -> str:
    """Undo `replace('.', '_')` on a module name.

    With `known` ({underscored: dotted}, e.g. from a base checkpoint) an exact hit wins. Otherwise the name is
    split into tokens and joined greedily: the longest run of tokens that forms a known underscore-containing
    part (`transformer_blocks`, `to_q`, `self_attn`, ...) stays together, every other boundary becomes a dot."""
    if known is not None and name in known:
        return known[name]
    tokens = name.split("_")
    parts = []
    i = 0
    while i < len(tokens):
        for size in range(min(_LONGEST_PART, len(tokens) - i), 1, -1):
            candidate = "_".join(tokens[i : i + size])
            if candidate in _UNDERSCORE_PARTS:
                parts.append(candidate)
                i += size
                break
        else:
            parts.append(tokens[i])
            i += 1
    return ".".join(parts)


# ---------------------------------------------------------------------------------------------------------
# WaveFT -> LoRA


def to_lora(
    adapter: Adapter, rank: int, dtype: torch.dtype = torch.float16, device=None, method: str = "exact"
) -> tuple[dict[str, torch.Tensor], dict[str, str], dict]:
    """A LoRA of rank `rank` per layer: up @ down is the best rank-r approximation of ΔW (truncated SVD), with
    alpha = r so that the loaders' alpha / rank scale is 1. `method='randomized'` uses torch.svd_lowrank (much
    faster on big layers, near-optimal rather than optimal).

    Returns (tensors, metadata, report); report = {'layers': {name: {'rank', 'energy_kept', 'relative_error'}},
    'rank' (the largest stored: `rank` capped by each layer's smaller side), 'energy_kept', 'relative_error',
    'skipped'}. Energy kept is the sum of the kept squared singular values over
    the total (= ||ΔW||²); the relative error is ||ΔW - up @ down||_F / ||ΔW||_F of the stored tensors."""
    if int(rank) < 1:
        raise ValueError(f"rank must be 1 or more, got {rank}")
    if method not in ("exact", "randomized"):
        raise ValueError(f"method must be 'exact' or 'randomized', got {method!r}")
    rank = int(rank)
    has_clip_g = any(name.startswith(f"{TE_PREFIX}clip_g.") for name in adapter.layers)
    tensors: dict[str, torch.Tensor] = {}
    report = {"layers": {}, "skipped": []}
    kept_total = energy_total = err_total = 0.0
    for name, layer in adapter.layers.items():
        m, n = layer.matrix_shape
        # float64 where it is cheap; big layers in float32 (their SVD is several times faster and the result
        # is stored in 16 bits anyway).
        compute = torch.float64 if m * n <= 1 << 20 else torch.float32
        check_dense(m, n, adapter.source or "the adapter", f"{name}.waveft_shape")
        delta = layer.delta(compute, device=device).reshape(m, n)
        energy = float(delta.double().square().sum())
        if energy == 0.0:
            report["skipped"].append((name, "ΔW is zero"))
            continue
        r = min(rank, m, n)
        if method == "exact" or r >= min(m, n) // 2:
            u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        else:
            u, s, v = torch.svd_lowrank(delta, q=min(r + 10, min(m, n)), niter=6)
            vh = v.T
        u, s, vh = u[:, :r], s[:r], vh[:r]
        root = s.sqrt()
        up = (u * root).to(dtype)
        down = (root[:, None] * vh).to(dtype)
        if not (torch.isfinite(up).all() and torch.isfinite(down).all()):
            raise ValueError(f"layer {name}: the LoRA factors overflow {dtype}; use a wider dtype")
        kept = min(float(s.double().square().sum()), energy)
        error = float((delta.double() - up.double() @ down.double()).norm()) / math.sqrt(energy)
        prefix = kohya_prefix(name, has_clip_g)
        if f"{prefix}.lora_up.weight" in tensors:
            raise ValueError(f"layers {name} and another both map to the LoRA key {prefix}")
        extra = len(layer.shape) - 2
        tensors[f"{prefix}.lora_up.weight"] = up.reshape(m, r, *([1] * extra)).cpu().contiguous()
        tensors[f"{prefix}.lora_down.weight"] = down.reshape(r, *layer.shape[1:]).cpu().contiguous()
        tensors[f"{prefix}.alpha"] = torch.tensor(float(r), dtype=torch.float32)
        report["layers"][name] = {"rank": r, "energy_kept": kept / energy, "relative_error": error}
        kept_total += kept
        energy_total += energy
        err_total += error * error * energy
    if not tensors:
        raise ValueError("the adapter has no layer with a non-zero ΔW; nothing to convert")
    report["energy_kept"] = kept_total / energy_total
    report["relative_error"] = math.sqrt(err_total / energy_total)
    # the rank actually stored: a layer allows no more than its smaller side
    report["rank"] = max(entry["rank"] for entry in report["layers"].values())
    return tensors, lora_metadata(adapter.metadata, report["rank"]), report


def lora_metadata(source: Mapping[str, str], rank: int) -> dict[str, str]:
    """kohya-style LoRA metadata, keeping the source's base model, model-spec fields and trigger words."""
    md = {META_NETWORK_MODULE: "networks.lora", META_NETWORK_DIM: str(rank), META_NETWORK_ALPHA: str(rank)}
    for key, value in source.items():
        if key in (META_BASE_MODEL, META_TAG_FREQUENCY, META_DATASETS) or key.startswith(SPEC_PREFIX):
            md[key] = str(value)
    arch = md.get(META_ARCHITECTURE)
    if arch:
        md[META_ARCHITECTURE] = re.sub(r"/waveft$", "/lora", arch)
    elif family_of(md):
        md[META_ARCHITECTURE] = family_of(md).architecture + "/lora"
    md.setdefault(META_SPEC_VERSION, SPEC_VERSION)
    return md


def save_lora(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], path) -> Path:
    """Write a LoRA .safetensors file atomically, its tensors serialized once (metadata.hashed_file)."""
    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"{path}: a LoRA file needs a .safetensors name")
    data = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    _, write_to = hashed_file(data, {str(k): str(v) for k, v in metadata.items()})
    return atomic_write(path, write_to)


# ---------------------------------------------------------------------------------------------------------
# LoRA -> dense ΔW

_LORA_PAIRS = (  # (up suffix, down suffix)
    (".lora_up.weight", ".lora_down.weight"),
    (".lora_B.weight", ".lora_A.weight"),
    (".lora.up.weight", ".lora.down.weight"),
    (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
)
_UNSUPPORTED = {
    ".lora_mid.weight": "LoCon Tucker (lora_mid)",
    ".dora_scale": "DoRA",
    ".hada_w1_a": "LoHa",
    ".lokr_w1": "LoKr",
    ".lokr_w1_a": "LoKr",
}
_KOHYA_TE = {"lora_te_": "clip_l", "lora_te1_": "clip_l", "lora_te2_": "clip_g"}
_DIFFUSERS_UNET_PREFIX_ROOTS = (
    "down_blocks",
    "up_blocks",
    "mid_block",
    "conv_in",
    "conv_out",
    "conv_norm_out",
    "time_embedding",
    "add_embedding",
)


def lora_module_name(prefix: str, known: Mapping[str, str] | None = None, te_clip: str | None = None) -> str | None:
    """The native module name of a LoRA key prefix in ComfyUI-native, kohya (LDM or diffusers UNet names) or
    PEFT/diffusers spelling; None when it cannot be named. `known` maps underscored -> dotted native names
    without their part prefix (see `lora_deltas`)."""
    if prefix.startswith((UNET_PREFIX, TE_PREFIX)):
        return prefix
    if prefix.startswith("lora_unet_"):
        dotted = resolve_underscores(prefix[len("lora_unet_") :], known)
        if dotted.startswith(_DIFFUSERS_UNET_PREFIX_ROOTS):  # kohya's SD1 LoRAs use diffusers module names
            dotted = diffusers_unet_to_ldm(dotted)
        return UNET_PREFIX + dotted if dotted else None
    for head, clip in _KOHYA_TE.items():
        if prefix.startswith(head):
            dotted = resolve_underscores(prefix[len(head) :], known)
            if head != "lora_te2_" and te_clip:
                clip = te_clip
            return f"{TE_PREFIX}{clip}.transformer.{dotted}"
    native = to_native(prefix)
    return native if native.startswith((UNET_PREFIX, TE_PREFIX)) else None


def _underscored_names(known: Iterable[str]) -> dict[str, str]:
    """{underscored: dotted} of native names, without `diffusion_model.` / `text_encoders.<clip>.transformer.`."""
    out = {}
    for name in known:
        if name.startswith(UNET_PREFIX):
            bare = name[len(UNET_PREFIX) :]
        else:
            m = NATIVE_CLIP.fullmatch(name)
            if not m:
                continue
            bare = m[2]
        out.setdefault(bare.replace(".", "_"), bare)
    return out


def lora_delta(up: torch.Tensor, down: torch.Tensor, alpha: float | None) -> torch.Tensor:
    """(up @ down) * alpha / rank in float32, shaped like the weight (down's trailing dims: conv kernels)."""
    rank = down.shape[0]
    if up.dim() > 2 and any(s != 1 for s in up.shape[2:]):
        raise ValueError(f"a LoRA up weight of shape {list(up.shape)} is not a 1x1 projection")
    if up.shape[1] != rank:
        raise ValueError(f"LoRA up {list(up.shape)} and down {list(down.shape)} have different ranks")
    scale = 1.0 if alpha is None else float(alpha) / rank
    d = up.reshape(up.shape[0], rank).float() @ down.reshape(rank, -1).float()
    return (d * scale).reshape(up.shape[0], *down.shape[1:])


def lora_deltas(
    lora_state_dict: Mapping[str, torch.Tensor], known_modules: Iterable[str] | None = None, source="the LoRA"
) -> LazyDeltas:
    """native module name -> ΔW = (up @ down) * alpha / rank for every LoRA pair of a state dict, computed on
    access. Keys may be ComfyUI-native (`diffusion_model.X.lora_up.weight`), kohya (`lora_unet_…`, `lora_te_…`,
    `lora_te1_…`, `lora_te2_…`; LDM or diffusers UNet names) or PEFT-style (`….lora_A.weight`/`lora_B.weight`).
    `known_modules` (native names, e.g. `checkpoint_module_names(base)`) settles kohya names exactly and
    rejects names the base model does not have; without it standard SD1/SDXL names are assumed.
    Unreadable prefixes end up in `.skipped`; LyCORIS/DoRA tensors raise ValueError; a product above the dense
    budget (limits.py) is refused before anything is computed, naming `source` (the file) and the key."""
    keys = set(lora_state_dict)
    for key in keys:
        for suffix, kind in _UNSUPPORTED.items():
            if key.endswith(suffix):
                raise ValueError(f"{key}: {kind} tensors are not a plain LoRA; only up/down (A/B) pairs convert")
    known_set = set(known_modules) if known_modules is not None else None
    known = _underscored_names(known_set) if known_set is not None else None
    te_clip = None
    clips = {m[1] for m in map(NATIVE_CLIP.fullmatch, known_set or ()) if m}
    if "clip_h" in clips and "clip_l" not in clips:
        te_clip = "clip_h"  # SD2: lora_te_ means the OpenCLIP-H encoder
    makers: dict[str, Callable[[], torch.Tensor]] = {}
    skipped: list[tuple[str, str]] = []
    used: set[str] = set()
    for key in sorted(keys):
        for up_suffix, down_suffix in _LORA_PAIRS:
            if not key.endswith(up_suffix):
                continue
            prefix = key[: -len(up_suffix)]
            down_key = prefix + down_suffix
            if down_key not in keys:
                raise ValueError(f"{key} has no matching {down_key}")
            used.update((key, down_key, prefix + ".alpha"))
            name = lora_module_name(prefix, known, te_clip)
            if name is None:
                skipped.append((prefix, "not an SD1/SDXL UNet or text-encoder module name this converter knows"))
            elif known_set is not None and name not in known_set:
                skipped.append((prefix, f"{name} is not in the base model"))
            elif name in makers:
                raise ValueError(f"two LoRA entries name the same layer {name} (the second is {prefix})")
            else:
                up_shape, down_shape = lora_state_dict[key].shape, lora_state_dict[down_key].shape
                check_dense(up_shape[0] if up_shape else 0, math.prod(down_shape[1:]), source, key, "up @ down")
                alpha_t = lora_state_dict.get(prefix + ".alpha")
                alpha = float(alpha_t.reshape(-1)[0]) if alpha_t is not None else None
                makers[name] = lambda u=key, d=down_key, a=alpha: lora_delta(lora_state_dict[u], lora_state_dict[d], a)
            break
    if not makers:
        raise ValueError("no LoRA up/down (or A/B) pairs that name SD1/SDXL layers were found")
    for key in sorted(keys - used):
        skipped.append((key, "not part of a LoRA pair"))
    return LazyDeltas(makers, skipped)
