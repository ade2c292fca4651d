"""Every touch point with ComfyUI's internals, each small and guarded: model folders, the weight-adapter
class the host's patcher calls, key maps, progress. Host churn is expected; keep it all here."""
from __future__ import annotations

import contextlib
import logging
import os

import torch

import comfy.lora
import comfy.utils
import folder_paths

from ..waveft_core import Layer
from ..waveft_core.delta import add_into, compute_dtype, dense_delta
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


def new_adapter_path(prefix: str, suffix: str = "") -> str:
    """A new file under models/waveft for `prefix` (see free_path)."""
    return free_path(output_folder(), prefix, suffix, f"models/{FOLDER}")


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

try:  # comfy-kitchen's packed formats (fp8/int8/fp4 with scales); a class nothing is an instance of when absent
    from comfy.quant_ops import QuantizedTensor as _QuantizedTensor
except Exception:
    class _QuantizedTensor:
        pass

_GLOBAL_KEYS = ("waveft.wavelet", "waveft.scaling", "waveft.use_idwt")
_SPARSE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_CONV = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d, 3: torch.nn.functional.conv3d}


def _is_identity(function) -> bool:
    if function is None:
        return True
    probe = torch.zeros(2)
    try:
        return function(probe) is probe
    except Exception:
        return False


def is_packed_weight(weight) -> bool:
    """Quantized storage whose elements are not the weight's values (comfy-kitchen, torch's own quantized
    tensors, integer storage): a scatter into it would write into packed bytes."""
    return (isinstance(weight, _QuantizedTensor) or getattr(weight, "is_quantized", False)
            or not weight.dtype.is_floating_point)


class WaveFTAdapter(_AdapterBase):
    """A WaveFT layer as the host's weight adapter, following the host's contract: constructed from
    (loaded_keys, weights), where `weights` is `Layer.packed()` = (spectrum, plan tensors, Layer). The host
    may move those tensors (ComfyUI >= 0.21 rebuilds adapters as type(v)(v.loaded_keys, <moved weights>) for
    low-VRAM and dynamic-VRAM loads; the bypass hook moves and casts the top-level ones); every method
    computes from the tensors it holds now, on their device. calculate_weight adds strength * ΔW in place
    (sparse scatter, computed in fp32, rounded once into fp16/bf16). Immutable after creation: clones share it."""

    name = "waveft"

    def __init__(self, loaded_keys: set, weights):
        Layer.check_packed(weights)  # a clear TypeError now, not an AttributeError at the first sampling step
        self.loaded_keys = loaded_keys
        self.weights = weights

    @classmethod
    def from_layer(cls, layer: Layer, loaded_keys: set | None = None) -> "WaveFTAdapter":
        return cls(set() if loaded_keys is None else loaded_keys, layer.packed())

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
        return cls.from_layer(layer, loaded_keys)

    def _unpacked(self, device):
        """Layer.unpack(self.weights, device), remembered for the weights object it was made from (the
        bypass hook replaces `weights` with a moved copy; a rebuild makes a new adapter)."""
        memo = self.__dict__.get("_memo")
        if memo is not None and memo[0] is self.weights and memo[1] == device:
            return memo[2]
        unpacked = Layer.unpack(self.weights, device)
        self._memo = (self.weights, device, unpacked)
        return unpacked

    def calculate_shape(self, key):
        """ΔW never changes the weight's shape (a layer stored as m x n fits an m x n x 1 x 1 conv too)."""
        return None

    def calculate_weight(self, weight, key, strength, strength_model, offset, function,
                         intermediate_dtype=torch.float32, original_weight=None):
        if strength == 0:
            return weight
        try:
            if is_packed_weight(weight):
                # The host dequantizes before patching (ops' convert_weight); a packed tensor here would take
                # the scatter into its packed bytes, and comfy-kitchen's in-place add drops the change.
                log.error("WaveFT: %s is stored quantized (%s); WaveFT does not write into packed weights, so "
                          "this layer is left unpatched. Load a non-quantized model, or use 'Load LoRA (Bypass)' "
                          "with the WaveFT file.", key, type(weight).__name__)
                return weight
            layer, spectrum, plan = self._unpacked(weight.device)
            factor = float(layer.scaling) * float(strength)
            if _is_identity(function) and weight.dtype in _SPARSE_DTYPES:
                add_into(weight, plan, spectrum, factor)  # in place: with an offset the host keeps only the view
            else:
                # a function (swap_scale_shift on a DiT's modulation) needs the dense delta; fp8 storage has no
                # sparse write. Either way: W + ΔW in the compute dtype, rounded once into the weight's dtype.
                compute = compute_dtype(weight.dtype)
                delta = dense_delta(plan, spectrum, factor, compute).reshape(weight.shape)
                if function is not None:
                    delta = function(delta)
                weight.copy_((weight.to(compute) + delta).to(weight.dtype))
        except Exception as e:
            log.error("WaveFT: could not patch %s: %s", key, e)
        return weight

    # ComfyUI's bypass mode (0.3x) adds h(x) to the layer's output instead of merging the weight. The bypass
    # hook has set multiplier/is_conv/conv_dim/kw_dict and moved (and cast) the spectrum to the compute
    # device; the plan comes from the bundle or, once per device, from the layer's cache.
    def h(self, x, base_out):
        layer, spectrum, plan = self._unpacked(x.device)
        factor = float(layer.scaling) * float(getattr(self, "multiplier", 1.0))
        delta = dense_delta(plan, spectrum, factor, x.dtype)  # computed in fp32 on x's device, rounded once
        if getattr(self, "is_conv", False):
            kernel = tuple(getattr(self, "kernel_size", ()) or ())  # a conv stored as m x n gets its kernel back
            weight_shape = layer.shape if len(layer.shape) > 2 else (plan.rows, -1, *kernel)
            conv = _CONV[int(getattr(self, "conv_dim", 2) or 2)]
            return conv(x, delta.reshape(weight_shape), **dict(getattr(self, "kw_dict", {}) or {}))
        return torch.nn.functional.linear(x, delta)

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


def training_clone(model):
    """The clone a training run patches. Under dynamic VRAM (ComfyUI 0.3x on NVIDIA, `ModelPatcherDynamic`)
    a plain clone shares modules whose weights stream in per forward; the host's own trainer trains on a
    freshly loaded, non-dynamic copy, and so does this (`clone(disable_dynamic=True)`)."""
    is_dynamic = getattr(model, "is_dynamic", None)
    if callable(is_dynamic) and is_dynamic():
        return model.clone(disable_dynamic=True)
    return model.clone()


def unload_patcher(patcher) -> None:
    """Unload this one patcher and take its weight wrappers off the modules it shares with other clones.

    After a full load the host's unpatch leaves weight wrappers on the modules (it wipes them only after a
    low-VRAM load), so a training clone's wrappers would keep changing the shared model's forward until
    some other model happens to load."""
    import comfy.model_management as mm
    import comfy.model_patcher

    loaded_models = getattr(mm, "current_loaded_models", None)
    if isinstance(loaded_models, list):
        for i in range(len(loaded_models) - 1, -1, -1):
            if getattr(loaded_models[i], "model", None) is patcher:
                loaded_models[i].model_unload()
                loaded_models.pop(i)
    wipe = getattr(comfy.model_patcher, "wipe_lowvram_weight", None)
    for module in patcher.model.modules():
        if wipe is not None and hasattr(module, "comfy_cast_weights"):
            wipe(module)


@contextlib.contextmanager
def in_training():
    """The host's training flag (ComfyUI 0.3x: model code avoids in-place ops that autograd cannot undo,
    quantized ops skip their inference-only kernels) for the duration of a training loop."""
    import comfy.model_management as mm

    if not hasattr(mm, "in_training"):
        yield
        return
    before = mm.in_training
    mm.in_training = True
    try:
        yield
    finally:
        mm.in_training = before


class Progress:
    """The host's progress bar. update() raises InterruptProcessingException once the user has pressed
    Cancel: checked on every step, because the bar's hook (which checks too, under the server) is throttled
    to one call per 100 ms by newer ComfyUI and would otherwise notice a step or more late."""

    def __init__(self, total: int):
        self.bar = comfy.utils.ProgressBar(total)

    def update(self, n: int = 1, preview=None):
        self.bar.update_absolute(self.bar.current + n, preview=preview)
        import comfy.model_management as mm

        mm.throw_exception_if_processing_interrupted()
