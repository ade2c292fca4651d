"""Conversions: PEFT folders and diffusers files (peft_io, sources), LoRA in and out (lora, extract), and
merging an adapter into a checkpoint (merge)."""

# extract, lora and merge are imported as modules (`from waveft_core.convert import merge`): extract needs
# training/, whose trainable layers need peft_io from here.
from . import peft_io, sources
from .peft_io import Spelling

__all__ = ["Spelling", "peft_io", "sources"]
