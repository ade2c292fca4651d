"""Match adapter layer names to a host's weights, given the host's LoRA key map (no host import here).

A host key map (ComfyUI's `model_lora_keys_unet/clip`) sends many spellings of a layer to its weight:
native `diffusion_model.*`/`text_encoders.*`, kohya `lora_unet_*`/`lora_te1_*`, `transformer.*` for DiTs, and
slices of fused weights as (key, (dim, start, length)). PEFT/diffusers names are turned into those
spellings here, so one lookup covers every model family the host knows."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Mapping

from .families import ENCODERS, TE_PREFIX, split_component, to_native

_TE_KOHYA = {
    "text_encoder": ("lora_te1_", "lora_te_"),
    "text_encoder_2": ("lora_te2_",),
    "": ("lora_te1_", "lora_te_", "lora_te2_", "lora_te3_"),
}


@dataclass(frozen=True)
class Target:
    key: str  # the host's state-dict key of the weight
    shape: tuple[int, ...]  # shape of the weight, or of its slice
    offset: tuple[int, int, int] | None = None  # (dim, start, length) of a fused weight's slice
    function: Callable | None = None  # transform the host applies to the delta (e.g. swap_scale_shift)


@dataclass
class MatchReport:
    targets: dict[str, Target] = field(default_factory=dict)  # layer name -> target
    unmatched: list[str] = field(default_factory=list)
    wrong_shape: list[tuple[str, tuple, tuple]] = field(default_factory=list)  # (layer, layer shape, weight shape)

    @property
    def matched(self) -> int:
        return len(self.targets)


def candidate_names(name: str):
    """Spellings of `name` to look up in a host key map, most reliable first."""
    yield name
    component, bare = split_component(name)
    under = bare.replace(".", "_")
    if component in ("", "unet"):
        yield f"unet.{bare}"
        yield f"lora_unet_{under}"
    if component in ("", "transformer"):
        yield f"transformer.{bare}"
        yield f"base_model.model.{bare}"
        yield f"lora_transformer_{under}"
    if bare.startswith("text_model.") or component.startswith("text_encoder"):
        for prefix in _TE_KOHYA.get(component, _TE_KOHYA[""]):
            yield f"{prefix}{under}"
        for clip in ENCODERS:
            yield f"{TE_PREFIX}{clip}.transformer.{bare}"
    yield bare
    # Last: the fixed SD1.x/SDXL naming rule, for maps that lack diffusers spellings. The host's own
    # spellings above come first because they follow the actual model's layout.
    native = to_native(name)
    if native != name:
        yield native


def _target(value, weight_shape: Callable[[str], tuple | None]) -> Target | None:
    offset = function = None
    if isinstance(value, str):
        key = value
    else:
        key = value[0]
        if len(value) > 1:
            offset = tuple(value[1]) if value[1] is not None else None
        if len(value) > 2:
            function = value[2]
    shape = weight_shape(key)
    if shape is None:
        return None
    shape = tuple(shape)
    if offset is not None:
        dim, _, length = offset
        shape = shape[:dim] + (length,) + shape[dim + 1 :]
    return Target(key, shape, offset, function)


def same_matrix(a: tuple, b: tuple) -> bool:
    """A layer fits a weight when both shapes are equal up to trailing 1s (a Linear (320, 320) fits a 1x1 conv
    (320, 320, 1, 1)); equal m x n alone is not enough: a layer made for (320, 32, 10) is not one for (320, 320)."""
    return _without_trailing_ones(a) == _without_trailing_ones(b)


def _without_trailing_ones(shape) -> tuple[int, ...]:
    shape = tuple(int(s) for s in shape)
    end = len(shape)
    while end > 1 and shape[end - 1] == 1:
        end -= 1
    return shape[:end]


def resolve(name: str, key_map: Mapping[str, object], weight_shape, want_shape: tuple | None = None):
    """The target of one layer name, or None. With `want_shape`, a spelling whose weight has another
    shape is skipped (SDXL's two text encoders share names), and the first shape seen is returned for errors."""
    first = None
    for cand in candidate_names(name):
        value = key_map.get(cand)
        if value is None:
            continue
        target = _target(value, weight_shape)
        if target is None:
            continue
        if want_shape is None or same_matrix(want_shape, target.shape):
            return target
        first = first or target
    return first


def match_layers(
    layer_shapes: Mapping[str, tuple], key_map: Mapping[str, object], weight_shape: Callable[[str], tuple | None]
) -> MatchReport:
    """Resolve every layer; sort them into matched, unmatched and wrong-shape."""
    report = MatchReport()
    for name, shape in layer_shapes.items():
        target = resolve(name, key_map, weight_shape, tuple(shape))
        if target is None:
            report.unmatched.append(name)
        elif not same_matrix(shape, target.shape):
            report.wrong_shape.append((name, tuple(shape), target.shape))
        else:
            report.targets[name] = target
    refuse_overlapping_targets((name, t.key, t.offset) for name, t in report.targets.items())
    return report


class SharedTargetError(ValueError):
    """Two layers of one adapter resolve to the same weight (one layer under two spellings: native, kohya,
    diffusers). Applying both would count the change twice, applying one would drop the other silently."""


def refuse_shared_targets(resolved) -> None:
    """SharedTargetError naming both layers when two (layer name, target) pairs share a target; `target` is
    anything hashable that identifies one weight (or one slice of a fused weight)."""
    seen: dict = {}
    for name, target in resolved:
        other = seen.setdefault(target, name)
        if other != name:
            key = target[0] if isinstance(target, tuple) else target
            raise SharedTargetError(
                f"the layers '{other}' and '{name}' both adapt the weight {key} (one layer "
                "under two spellings); a file must hold each weight once. Remove one of "
                "them, or write the file again with a WaveFT tool"
            )


def _slices_overlap(a, b) -> bool:
    """Two (dim, start, length) slices of one weight touch the same entries; None is the whole weight. Slices
    along two different dimensions always cross."""
    if a is None or b is None:
        return True
    return a[0] != b[0] or (a[1] < b[1] + b[2] and b[1] < a[1] + a[2])


def refuse_overlapping_targets(resolved) -> None:
    """refuse_shared_targets for (layer name, weight key, offset) triples, where a layer on a whole fused weight
    (Flux's img_attn.qkv) and one on a slice of it (to_k), or two overlapping slices, also share a target."""
    by_key: dict = {}
    for name, key, offset in resolved:
        for other, other_offset in by_key.get(key, ()):
            if _slices_overlap(other_offset, offset):
                refuse_shared_targets([(other, key), (name, key)])
        by_key.setdefault(key, []).append((name, offset))
