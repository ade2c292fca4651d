"""What kind of adapter file this is, from its tensor names and metadata alone (a safetensors header is
enough): the one home of that rule, for the nodes, the stock-loader adapter, the command line and the webui
extension. No torch here.

- native: this project's format (FORMAT.md section 3): `waveft.format_version`, or stored flat positions and shapes,
  or a file the stock Train LoRA node saved with algorithm WaveFT (extension 4: `.waveft_layout`; the native reader
  turns it into the native form)
- kohya: a kohya sd-scripts WaveFT network's file (lora-scripts-next): (row, col) positions, a seed and a
  family code per layer, no shapes (kohya.py)
- spectra: PEFT's adapter_model.safetensors or a diffusers LoRA file: spectra without positions (sources.py)
- lora: a LoRA/LyCORIS file (lora_up/lora_down, lora_A/lora_B, hada_, lokr_ …), not WaveFT at all
- other: none of those"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping

from ..keys import (
    KOHYA_ONLY_SUFFIXES,
    META_FORMAT_VERSION,
    META_NETWORK_MODULE,
    NETWORK_MODULE,
    PEFT_CONFIG_NAME,
    SUFFIX_INDICES,
    SUFFIX_SPECTRUM,
    SUFFIX_STOCK_LAYOUT,
)
from .storage import peek_header

NATIVE, KOHYA, SPECTRA, LORA, OTHER = "native", "kohya", "spectra", "lora", "other"
_KOHYA_ENDINGS = tuple("." + s for s in KOHYA_ONLY_SUFFIXES)
_LORA_MARKERS = (
    ".lora_up.weight",
    ".lora_down.weight",
    ".lora_A.weight",
    ".lora_B.weight",
    ".hada_w1_a",
    ".lokr_w1",
    ".lokr_w1_a",
    ".oft_blocks",
    ".diff",
)
DESCRIPTIONS = {
    NATIVE: "a native WaveFT file",
    KOHYA: "a kohya-style WaveFT file from another trainer (lora-scripts-next's networks.waveft_anima)",
    SPECTRA: "a PEFT or diffusers WaveFT file, which stores no coefficient positions",
    LORA: "a LoRA (not a WaveFT adapter)",
    OTHER: "not an adapter file this pack knows",
}


def file_kind(keys: Iterable[str], metadata: Mapping[str, str] | None = None) -> str:
    keys = [k for k in keys if k != "__metadata__"]
    metadata = metadata or {}
    if any(k.endswith(_KOHYA_ENDINGS) for k in keys):
        return KOHYA
    spectra = any(k.endswith("." + SUFFIX_SPECTRUM) for k in keys)
    if any(k.endswith("." + SUFFIX_STOCK_LAYOUT) for k in keys):  # such files also hold LoRA-style .diff keys
        return NATIVE
    if META_FORMAT_VERSION in metadata or (spectra and any(k.endswith("." + SUFFIX_INDICES) for k in keys)):
        return NATIVE
    if spectra:
        return SPECTRA
    if any(k.endswith(_LORA_MARKERS) for k in keys):
        return LORA
    return OTHER


def is_waveft(keys: Iterable[str], metadata: Mapping[str, str] | None = None) -> bool:
    """Any WaveFT file, so WaveFT's readers should take it (they say what is wrong with a damaged one)."""
    metadata = metadata or {}
    return (
        metadata.get(META_NETWORK_MODULE) == NETWORK_MODULE
        or metadata.get("ss_adapter_algorithm") == "waveft"
        or file_kind(keys, metadata) in (NATIVE, KOHYA, SPECTRA)
    )


def kind_of(path) -> str:
    """NATIVE, KOHYA or SPECTRA: which reader takes `path`, from its safetensors header only. What is not a file
    (a PEFT folder, or a path that is missing) and a PEFT folder's adapter_config.json are SPECTRA: the PEFT reader
    takes them and says what is missing. A file that is no WaveFT file, or whose header cannot be read, is NATIVE:
    the native reader names what is wrong with it."""
    if not os.path.isfile(path) or os.path.basename(path) == PEFT_CONFIG_NAME:
        return SPECTRA
    header = peek_header(path)
    if header is None:
        return NATIVE
    kind = file_kind(header.tensors, header.metadata)
    return NATIVE if kind in (LORA, OTHER) else kind


def stores_positions(path) -> bool:
    """Whether `path` holds everything an adapter is (a native file). PEFT folders and diffusers files store spectra
    only, kohya-style files from other trainers no shapes: those come from the model they are applied to."""
    return kind_of(path) == NATIVE


def is_waveft_file(path) -> bool:
    """Any WaveFT safetensors file (native, kohya-style, PEFT or diffusers), judged from its header only."""
    header = peek_header(path)
    return header is not None and is_waveft(header.tensors, header.metadata)
