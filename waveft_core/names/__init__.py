"""Layer names: model families and the PEFT/diffusers/native spellings (families), the DiTs' diffusers names
(dit), the shapes a base model gives each layer (layouts), and which model layer a file's layer patches
(matching)."""

from .dit import Heads, diffusers_key_map, merge_into
from .families import ENCODERS, NATIVE_CLIP, TE_PREFIX, UNET_PREFIX, family_of, family_tag_of_comfy
from .matching import MatchReport, SharedTargetError, Target, match_layers, resolve

__all__ = [
    "ENCODERS",
    "Heads",
    "MatchReport",
    "NATIVE_CLIP",
    "SharedTargetError",
    "TE_PREFIX",
    "Target",
    "UNET_PREFIX",
    "diffusers_key_map",
    "family_of",
    "family_tag_of_comfy",
    "match_layers",
    "merge_into",
    "resolve",
]
