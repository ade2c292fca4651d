"""What a host's stock LoRA loader must not do in silence with a WaveFT file (no host import here).

The stock path (ComfyUI's `comfy.lora.load_lora(lora, key_map)`, called by Load LoRA, the bypass and hook
loaders and the third-party loaders alike) asks the adapters only about the names its key map holds: a WaveFT
layer whose name the map lacks never reaches this pack's adapter, and the host merely logs "lora key not loaded"
for its tensors. The image then silently lacks the layer. `unclaimed_layers` finds those layers from the key
map alone, so the host edge can fail the node before anything is patched."""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping

from ..files.fileformat import _check_mirrors, _parse_bool, _parse_float
from ..files.printable import short_list
from ..keys import META_SCALING, META_USE_IDWT, META_WAVELET, MIRROR_KEYS, SUFFIX_SPECTRUM
from ..names.families import TE_PREFIX, UNET_PREFIX, split_component
from ..names.matching import refuse_overlapping_targets

# kohya's text-encoder spellings: lora_te_, lora_te1_ … lora_te3_, lora_prior_te_ (Stable Cascade)
_KOHYA_TE = re.compile(r"lora_(prior_)?te\d?_")
SHOWN = 5  # layer names listed in a message before "and N more"


def waveft_layers(keys: Iterable[str]) -> list[str]:
    """The layer names of a file's WaveFT layers (every layout stores `<layer>.waveft_spectrum`)."""
    return [k[: -len(SUFFIX_SPECTRUM) - 1] for k in keys if k.endswith("." + SUFFIX_SPECTRUM)]


def is_text_encoder_layer(name: str) -> bool:
    return (
        name.startswith(TE_PREFIX) or bool(_KOHYA_TE.match(name)) or split_component(name)[0].startswith("text_encoder")
    )


def _target_key(target) -> str:
    """A key-map value: the weight key, or (key, offset[, function]) for a slice of a fused weight."""
    return target if isinstance(target, str) else target[0]


def unclaimed_layers(keys: Iterable[str], key_map: Mapping) -> list[str]:
    """WaveFT layers of a file that the key map does not send to a weight, among the components the map covers:
    a map of the diffusion model only (a model-only loader, a hook on the model) leaves the text-encoder layers
    out on purpose, and a text-encoder-only map the diffusion model's."""
    layers = waveft_layers(keys)
    if not layers:
        return []
    targets = [_target_key(t) for t in key_map.values()]
    has_model = any(t.startswith(UNET_PREFIX) for t in targets)
    has_text_encoder = any(not t.startswith(UNET_PREFIX) for t in targets)
    return [
        name
        for name in layers
        if name not in key_map and (has_text_encoder if is_text_encoder_layer(name) else has_model)
    ]


def refuse_layers_on_one_weight(keys: Iterable[str], key_map: Mapping) -> None:
    """matching.SharedTargetError naming both layers when the key map sends two WaveFT layers of a file (one layer
    under its native, kohya and diffusers spellings) to one weight or to overlapping slices of a fused one: the
    host's loader would keep only the last of them, silently."""
    refuse_overlapping_targets(
        (name, _target_key(key_map[name]), None if isinstance(key_map[name], str) else key_map[name][1])
        for name in waveft_layers(keys)
        if name in key_map
    )


def check_mirrors_against_metadata(path, tensors: Mapping, metadata: Mapping[str, str]) -> None:
    """WaveFTFileError naming the file and the key when a settings tensor the stock loader applies says another
    thing than the file's metadata, the reference every other reader applies (fileformat's rule). A file whose
    metadata states no WaveFT setting (stripped on the way) has nothing to disagree with."""
    if not any(k in metadata for k in MIRROR_KEYS) or not any(k in tensors for k in MIRROR_KEYS):
        return
    mirrors = {k: tensors[k] for k in MIRROR_KEYS if k in tensors}  # FORMAT.md extension 1
    wavelet = metadata.get(META_WAVELET)
    scaling = metadata.get(META_SCALING)
    if wavelet is None:  # only what the metadata states is compared
        mirrors.pop(META_WAVELET, None)
    if scaling is None:
        mirrors.pop(META_SCALING, None)
    _check_mirrors(
        path,
        mirrors,
        wavelet,
        None if scaling is None else _parse_float(path, META_SCALING, scaling),
        _parse_bool(path, META_USE_IDWT, metadata.get(META_USE_IDWT, "true")),
    )


def only_text_encoder_layers(keys: Iterable[str]) -> bool:
    """Every WaveFT layer of the file is a text encoder's: a model-only loader would apply none of them."""
    layers = waveft_layers(keys)
    return bool(layers) and all(is_text_encoder_layer(name) for name in layers)


def text_encoder_only_message(source: str, total: int) -> str:
    return (
        f"WaveFT: {source}: all {total} WaveFT layers of this file are for the text encoder, and this loader "
        "patches the diffusion model only, so it would change nothing. Use Load LoRA (or Load WaveFT) with the "
        "CLIP connected."
    )


def unclaimed_message(source: str, missing: list[str], total: int, base_model: str | None = None) -> str:
    listed = short_list(missing, SHOWN)
    recorded = f" (it records the base model '{base_model}')" if base_model else ""
    return (
        f"WaveFT: {source}: the model has no weight for {len(missing)} of its {total} WaveFT layers ({listed}), "
        "so a LoRA loader would leave them out and the result would silently lack them. The 'Load WaveFT' node "
        "reports which layers match this model; if none do, the file was made for another model"
        + recorded
        + ": use it with that one."
    )
