"""Every touch point with ComfyUI's internals, each small and guarded: model folders, the weight-adapter
class the host's patcher calls, key maps, progress. Host churn is expected; keep it all here."""
from __future__ import annotations

import logging
import os

import torch

import comfy.lora
import comfy.utils
import folder_paths

from ..waveft_core import Layer
from ..waveft_core.fileformat import FORMAT_VERSION
from ..waveft_core.matching import match_layers

log = logging.getLogger("ComfyUI-WaveFT")
FOLDER = "waveft"
EXTENSIONS = {".safetensors"}

def check_dependencies() -> bool:
    """One clear log line instead of a traceback when PyWavelets (the wavelet filters) is missing."""
    import importlib.util
    import sys

    if importlib.util.find_spec("pywt") is None:
        log.error("ComfyUI-WaveFT: PyWavelets is not installed, so WaveFT adapters cannot be applied or trained. "
                  "Install it into ComfyUI's Python: %s -m pip install PyWavelets (or run the pack's install.py)",
                  sys.executable)
        return False
    return True


# --- model folders -------------------------------------------------------------------------------


def register_folder() -> None:
    """models/waveft as a model folder. extra_model_paths.yaml may have created the entry already (with
    an 'accept anything' extension set): merge into it instead of replacing it."""
    default = os.path.join(folder_paths.models_dir, FOLDER)
    try:
        os.makedirs(default, exist_ok=True)  # so users find where adapters go
    except OSError:
        pass
    paths, exts = folder_paths.folder_names_and_paths.get(FOLDER, ([], set()))
    paths = list(paths)
    if default not in paths:
        paths.append(default)
    folder_paths.folder_names_and_paths[FOLDER] = (paths, set(exts) | EXTENSIONS)


def output_folder() -> str:
    """Where trained adapters are written: the first models/waveft folder."""
    dirs = folder_dirs(FOLDER)
    return dirs[0] if dirs else os.path.join(folder_paths.models_dir, FOLDER)


def free_path(folder: str, prefix: str, suffix: str = "", label: str = "") -> str:
    """folder/prefix+suffix.safetensors for a new file: refuses prefixes that leave the folder, and never
    overwrites an existing file (a counter is appended instead)."""
    root = os.path.realpath(folder)
    label = label or folder
    prefix = (prefix or "").strip().replace("\\", "/")
    if not prefix or prefix.startswith("/") or os.path.isabs(prefix) or ":" in prefix:
        raise ValueError(f"WaveFT: filename_prefix '{prefix}' must be a relative name inside {label}")
    path = os.path.realpath(os.path.join(root, prefix + suffix))
    if os.path.commonpath([path, root]) != root:
        raise ValueError(f"WaveFT: filename_prefix '{prefix}' leaves {label}; use a plain name")
    candidate, n = path + ".safetensors", 2
    while os.path.exists(candidate):
        candidate, n = f"{path}_{n}.safetensors", n + 1
    os.makedirs(os.path.dirname(candidate), exist_ok=True)
    return candidate


def folder_dirs(name: str) -> list[str]:
    try:
        return list(folder_paths.get_folder_paths(name))
    except Exception:
        return []


def filename_list(name: str) -> list[str]:
    try:
        return list(folder_paths.get_filename_list(name))
    except Exception:
        return []


def full_path(name: str, filename: str) -> str | None:
    try:
        return folder_paths.get_full_path(name, filename)
    except Exception:
        return None


# --- the patch object ----------------------------------------------------------------------------

try:
    from comfy.weight_adapter import WeightAdapterBase as _AdapterBase
except Exception:  # a host without the adapter registry: the loader still patches through add_patches
    _AdapterBase = object

_GLOBAL_KEYS = ("waveft.wavelet", "waveft.scaling", "waveft.use_idwt")


def _is_identity(function) -> bool:
    if function is None:
        return True
    probe = torch.zeros(2)
    try:
        return function(probe) is probe
    except Exception:
        return False


class WaveFTAdapter(_AdapterBase):
    """A WaveFT layer as the host's weight adapter: calculate_weight adds strength * ΔW in place on the
    weight's own device and dtype (sparse scatter, computed in fp32, rounded once), so it is cheap
    enough for lowvram's per-forward recomputation. Immutable after creation: clones share it."""

    name = "waveft"

    def __init__(self, loaded_keys: set, layer: Layer):
        self.loaded_keys = loaded_keys
        self.layer = layer
        self.weights = [layer.spectrum, layer.indices]

    # Called by the stock LoRA loader for every key-map entry with every adapter class: a dict lookup.
    @classmethod
    def load(cls, x, lora, alpha=None, dora_scale=None, loaded_keys=None):
        spectrum_key = f"{x}.waveft_spectrum"
        if spectrum_key not in lora:
            return None
        from ..waveft_core.fileformat import WaveFTFileError, adapter_from_tensors

        keys = [f"{x}.{s}" for s in ("waveft_spectrum", "waveft_indices", "waveft_shape", "waveft_scaling")]
        tensors = {k: lora[k] for k in keys if k in lora}
        try:
            metadata = stock_loader_metadata(lora)
            layer = adapter_from_tensors(tensors, metadata, path=x).layers[x]
        except (WaveFTFileError, KeyError) as e:
            log.error("WaveFT: layer %s cannot be used: %s", x, e)
            return None
        if loaded_keys is None:
            loaded_keys = set()
        loaded_keys.update(k for k in keys if k in lora)
        loaded_keys.update(k for k in _GLOBAL_KEYS if k in lora)
        return cls(loaded_keys, layer)

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        if strength == 0:
            return weight
        try:
            if _is_identity(function):
                self.layer.add_to_(weight, strength)  # in place: with an offset the host keeps only the view
            else:  # e.g. swap_scale_shift on a DiT's modulation weight: needs the dense delta
                delta = self.layer.delta(torch.float32, weight.device, strength).reshape(weight.shape)
                weight += function(delta).to(weight.dtype)
        except Exception as e:
            log.error("WaveFT: could not patch %s: %s", key, e)
        return weight

    # Newer ComfyUI's bypass mode adds h(x) to the layer's output instead of merging the weight.
    def h(self, x, base_out):
        strength = float(getattr(self, "multiplier", 1.0))
        delta = self.layer.delta(torch.float32, x.device, strength).to(x.dtype)
        if getattr(self, "is_conv", False):
            conv = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d, 3: torch.nn.functional.conv3d}
            return conv[int(getattr(self, "conv_dim", 2))](x, delta, **dict(getattr(self, "kw_dict", {}) or {}))
        return torch.nn.functional.linear(x, delta.reshape(delta.shape[0], -1))

    def g(self, y):
        return y


def stock_loader_metadata(lora: dict) -> dict:
    """The stock LoRA loader hands adapters the tensors only. Files from this project mirror the three
    settings the math needs into small tensors (FORMAT extension, docs/FORMAT.md) so that path works too."""
    if "waveft.wavelet" not in lora:
        raise KeyError("this file has no 'waveft.wavelet' tensor, so the stock LoRA loader cannot tell its "
                       "wavelet; load it with the 'Load WaveFT' node (or re-save it with this version)")
    wavelet = bytes(lora["waveft.wavelet"].to(torch.uint8).tolist()).decode("ascii", "replace")
    md = {"waveft.format_version": str(FORMAT_VERSION), "waveft.wavelet": wavelet, "ss_network_module": "waveft"}
    md["waveft.scaling"] = repr(float(lora["waveft.scaling"])) if "waveft.scaling" in lora else "25.0"
    if "waveft.use_idwt" in lora:
        md["waveft.use_idwt"] = "true" if bool(lora["waveft.use_idwt"]) else "false"
    return md


def register_adapter_class() -> bool:
    """Let the stock LoRA loader and hooks understand WaveFT files. A module-level list, not a promised
    API: guarded, and idempotent across reloads (a class from an earlier import is replaced)."""
    try:
        import comfy.weight_adapter as wa
    except Exception:
        return False
    adapters = getattr(wa, "adapters", None)
    if not isinstance(adapters, list) or _AdapterBase is object:
        return False
    adapters[:] = [a for a in adapters if getattr(a, "name", None) != WaveFTAdapter.name]
    adapters.append(WaveFTAdapter)
    return True


# --- key maps and matching -----------------------------------------------------------------------


def key_map(model=None, clip=None) -> dict:
    """The host's own map of LoRA spellings -> weights for this model and text encoder."""
    kmap: dict = {}
    if model is not None:
        kmap = comfy.lora.model_lora_keys_unet(model.model, kmap)
    if clip is not None:
        kmap = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, kmap)
    return kmap


def weight_shapes(model=None, clip=None):
    """key -> shape of the weights of the model and the CLIP, without copying anything."""
    shapes = {}
    if model is not None:
        for k, v in model.model.state_dict(keep_vars=True).items():
            shapes[k] = tuple(v.shape)
    if clip is not None:
        for k, v in clip.cond_stage_model.state_dict(keep_vars=True).items():
            shapes[k] = tuple(v.shape)
    return shapes


def match(adapter_layers: dict, model=None, clip=None):
    shapes = weight_shapes(model, clip)
    return match_layers({n: layer.shape for n, layer in adapter_layers.items()}, key_map(model, clip), shapes.get)


def model_family(model) -> str:
    """A short name of what the host detected (SD15, SDXL, Flux, ...), for messages."""
    try:
        return type(model.model.model_config).__name__
    except Exception:
        return type(getattr(model, "model", model)).__name__


def patch_key(target):
    """The key form ModelPatcher.add_patches takes: the weight key, or (key, offset[, function])."""
    if target.offset is None and target.function is None:
        return target.key
    if target.function is None:
        return (target.key, target.offset)
    return (target.key, target.offset, target.function)


class Progress:
    """The host's progress bar; under the server update() also raises when the user presses Cancel."""

    def __init__(self, total: int):
        self.bar = comfy.utils.ProgressBar(total)

    def update(self, n: int = 1, preview=None):
        self.bar.update_absolute(self.bar.current + n, preview=preview)
