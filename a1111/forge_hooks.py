"""WaveFT in Stable Diffusion WebUI Forge (the `backend/` Forge, August 2024 on; extensions-builtin/sd_forge_lora).

Forge applies LoRAs as ComfyUI-like patches: `patcher.add_patches(patches={param_key: value})`, then
`backend.patcher.lora.merge_lora_to_weight` merges each value into a float32 copy of the weight. A value
`(patch_type, payload)` whose type is a key of `backend.patcher.lora.extra_weight_calculators` is handed to that
calculator; WaveFT registers "waveft" there, so merging (also Forge's on-the-fly mode for bnb/GGUF models) is
Forge's own code path: weight += strength * ΔW, added sparsely in place (`Layer.add_to_`).

Forge's `load_lora` knows only LoRA-family keys, so `networks.load_lora_for_models` is wrapped: a WaveFT file is
loaded and validated by waveft_core (clear errors), its native module names are Forge's parameter names plus
`.weight` (keymap.forge_key), and the patches go on clones of the UNet and CLIP patchers with the prompt's unet/te
weights as strengths, as Forge does for LoRAs. `networks.load_lora_state_dict` is wrapped too, so that a WaveFT file
is read once, by waveft_core, and a damaged one is reported instead of failing the generation.
"""
from __future__ import annotations

import os
import traceback

import waveft_core as wft

from . import keymap
from .common import load_adapter, log, patch_version_detection, redetect_versions, short_list

PATCH_TYPE = "waveft"
MARK = "_waveft_hooked"


class WaveFTPatch:
    """Payload of a Forge patch: one validated waveft_core Layer."""

    __slots__ = ("layer", "name", "source")

    def __init__(self, layer, name: str, source: str = ""):
        self.layer, self.name, self.source = layer, name, source

    def __repr__(self):
        return f"WaveFTPatch({self.name}, p={self.layer.n_coefficients})"


_warned: set = set()


def weight_calculator(weight, strength, patch):
    """Forge's `extra_weight_calculators` signature: (weight, strength, payload) -> weight. `weight` is the
    patcher's float32 working copy (or a narrowed view of it), so it is updated in place."""
    layer = patch.layer
    if tuple(weight.shape) != layer.shape:
        if (patch.source, patch.name) not in _warned:
            _warned.add((patch.source, patch.name))
            log(f"{os.path.basename(patch.source)}: layer {patch.name} has shape {list(layer.shape)} but the model's "
                f"weight is {list(weight.shape)}; not applied")
        return weight
    if strength == 0:
        return weight
    try:
        layer.add_to_(weight, strength=float(strength))
    except Exception as e:  # never fail a generation over one layer
        log(f"{os.path.basename(patch.source)}: layer {patch.name} not applied: {e}")
    return weight


class _WaveFTFile(dict):
    """What the wrapped load_lora_state_dict returns for a WaveFT file: a marker; waveft_core reads the file."""

    def __init__(self, path):
        super().__init__({"waveft_file.waveft_spectrum": None})
        self.path = path


def build_patches(adapter, unet_params: dict, clip_params: dict, source: str = ""):
    """({param_key: ('waveft', WaveFTPatch)} for the UNet, the same for CLIP, [skipped 'name: reason'])."""
    unet, clip, skipped = {}, {}, []
    for native, layer in adapter.layers.items():
        where = keymap.forge_key(native)
        if where is None:
            skipped.append(f"{native}: not a UNet or text-encoder module name")
            continue
        which, key = where
        params, out = (unet_params, unet) if which == "unet" else (clip_params, clip)
        param = params.get(key)
        if param is None:
            skipped.append(f"{native}: the loaded model has no {key}")
            continue
        if tuple(param.shape) != layer.shape:
            skipped.append(f"{native}: shape {list(layer.shape)}, the model's is {list(param.shape)}")
            continue
        out[key] = (PATCH_TYPE, WaveFTPatch(layer, native, source))
    return unet, clip, skipped


def _params(patcher):
    model = getattr(patcher, "model", None)
    return dict(model.named_parameters()) if model is not None else {}


def apply_waveft(model, clip, filename, strength_model, strength_clip, online_mode=False):
    adapter = load_adapter(filename)
    clip_patcher = getattr(clip, "patcher", None)
    unet, clip_patches, skipped = build_patches(
        adapter, _params(model) if model is not None else {}, _params(clip_patcher) if clip is not None else {},
        source=str(filename))
    name = os.path.basename(str(filename))
    total = len(adapter.layers)
    if skipped and len(skipped) == total:
        log(f"{name}: none of its {total} layers fit the loaded model (the file is for "
            f"{adapter.base_model or 'an unknown base model'}): {short_list(skipped)}")
        return model, clip
    if unet:
        model = model.clone()
        model.add_patches(filename=filename, patches=unet, strength_patch=strength_model, online_mode=online_mode)
    if clip_patches:
        clip = clip.clone()
        clip.add_patches(filename=filename, patches=clip_patches, strength_patch=strength_clip, online_mode=online_mode)
    note = f"; {len(skipped)} not applied: {short_list(skipped)}" if skipped else ""
    log(f"{name}: {len(unet)} UNet layers at weight {strength_model}, {len(clip_patches)} text-encoder layers at "
        f"weight {strength_clip}{note}")
    return model, clip


def make_loader(original):
    def load_lora_for_models(model, clip, lora, strength_model, strength_clip, filename="default", online_mode=False):
        if not keymap.is_waveft_state_dict(lora):
            return original(model, clip, lora, strength_model, strength_clip, filename=filename,
                            online_mode=online_mode)
        path = getattr(lora, "path", filename)
        try:
            return apply_waveft(model, clip, path, strength_model, strength_clip, online_mode)
        except wft.WaveFTFileError as e:
            log(f"cannot use {path}: {e}")
        except Exception as e:  # Forge does not catch errors here: one bad file must not stop the generation
            log(f"{path}: not applied ({type(e).__name__}: {e})\n{traceback.format_exc()}")
        return model, clip

    load_lora_for_models._waveft_original = original
    return load_lora_for_models


def make_state_dict_reader(original):
    def load_lora_state_dict(filename):
        if keymap.is_waveft_file(filename):
            return _WaveFTFile(filename)
        return original(filename)

    load_lora_state_dict._waveft_original = original
    return load_lora_state_dict


def install(networks, network, lora_backend) -> None:
    """Hook into Forge: its sd_forge_lora `networks`/`network` modules and `backend.patcher.lora`. Idempotent."""
    calculators = getattr(lora_backend, "extra_weight_calculators", None)
    if not isinstance(calculators, dict):
        raise RuntimeError("backend.patcher.lora has no extra_weight_calculators; this Forge version is not supported")
    calculators[PATCH_TYPE] = weight_calculator
    if getattr(networks, MARK, False):
        return
    if not hasattr(networks, "load_lora_for_models"):
        raise RuntimeError("sd_forge_lora's networks has no load_lora_for_models; this Forge version is not supported")
    if not getattr(networks.load_lora_for_models, "_waveft_original", None):
        networks.load_lora_for_models = make_loader(networks.load_lora_for_models)
    reader = getattr(networks, "load_lora_state_dict", None)
    if reader is not None and not getattr(reader, "_waveft_original", None):
        networks.load_lora_state_dict = make_state_dict_reader(reader)
    if network is not None:
        patch_version_detection(network)
    redetect_versions(networks)
    setattr(networks, MARK, True)
