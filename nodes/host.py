"""Every touch point with ComfyUI's internals, each small and guarded: model folders, the weight-adapter
class the host's patcher calls, key maps, progress. Host churn is expected; keep it all here."""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
import os

import comfy.lora
import comfy.sd
import comfy.utils
import folder_paths

from ..waveft_core.files import peek_header, printable, reporting_file_errors
from ..waveft_core.hosts import STOCK_ALGORITHM, PatchPlan, adapter_class, plan_from_match, stock_loader
from ..waveft_core.keys import META_ARCHITECTURE, META_BASE_MODEL, SUFFIX_SPECTRUM
from ..waveft_core.names import (
    Heads,
    SharedTargetError,
    diffusers_key_map,
    family_tag_of_comfy,
    match_layers,
    merge_into,
)

log = logging.getLogger("ComfyUI-WaveFT")
FOLDER = "waveft"
EXTENSIONS = {".safetensors"}


def check_dependencies() -> bool:
    """One clear log line instead of a traceback when PyWavelets (the wavelet filters) is missing."""
    import importlib.util
    import sys

    if importlib.util.find_spec("pywt") is None:
        log.error(
            "ComfyUI-WaveFT: PyWavelets is not installed, so WaveFT adapters cannot be applied or trained. "
            "Install it into ComfyUI's Python: %s -m pip install PyWavelets",
            sys.executable,
        )
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


# Where the nodes that write adapters can put them: models/waveft, or models/loras, the one folder other
# packs' LoRA loaders list (they load WaveFT files through the adapter this pack registers with the host).
SAVE_FOLDERS = (FOLDER, "loras")


def save_folder(kind: str = FOLDER) -> str:
    """The first models/<kind> folder: where new files of that kind are written."""
    if kind not in SAVE_FOLDERS:
        raise ValueError(f"WaveFT: cannot save into '{kind}'; choose one of {', '.join(SAVE_FOLDERS)}")
    dirs = folder_dirs(kind)
    return dirs[0] if dirs else os.path.join(folder_paths.models_dir, kind)


def new_adapter_path(prefix: str, suffix: str = "", kind: str = FOLDER) -> str:
    """A new file under models/<kind> (waveft or loras) for `prefix` (see free_path)."""
    return free_path(save_folder(kind), prefix, suffix, f"models/{kind}")


def free_path(folder: str, prefix: str, suffix: str = "", label: str = "") -> str:
    """folder/prefix+suffix.safetensors for a new file: refuses prefixes that leave the folder, and never
    overwrites an existing file (a counter is appended instead). The check is on the final path, not on the
    prefix: '.', 'sub/..' or 'a/' would otherwise name the folder itself, and '.safetensors' appended to a
    folder's path is a file beside it, outside."""
    root = os.path.realpath(folder)
    label = label or folder
    prefix = (prefix or "").strip().replace("\\", "/")
    while prefix.startswith("./"):  # './name' is 'name', as before; a bare '.' or './' is still refused below
        prefix = prefix[2:].lstrip()
    if not prefix or prefix.startswith("/") or os.path.isabs(prefix) or ":" in prefix:
        raise ValueError(f"WaveFT: filename_prefix '{prefix}' must be a relative name inside {label}")
    if any(part.strip() in ("", ".", "..") for part in prefix.split("/")):
        raise ValueError(
            f"WaveFT: filename_prefix '{prefix}' leaves {label} or names a folder (it has a '.', "
            f"'..' or empty part); use a plain name such as 'my_adapter' or 'sub/my_adapter'"
        )
    base, n = os.path.join(root, prefix + suffix), 2
    candidate = base + ".safetensors"
    while os.path.lexists(candidate):
        candidate, n = f"{base}_{n}.safetensors", n + 1
    final = os.path.realpath(candidate)
    if os.path.commonpath([final, root]) != root or final == root:
        raise ValueError(f"WaveFT: filename_prefix '{prefix}' leaves {label}; use a plain name")
    os.makedirs(os.path.dirname(final), exist_ok=True)
    return final


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


def stock_lora_file() -> str | None:
    """The file a stock LoRA loader node is reading, for the adapter's messages: ComfyUI hands an adapter the
    file's tensors only (0.8 and 0.33 alike; 0.33's LoraLoader reads the metadata too, but attaches it to the
    patched model after loading, never to an adapter), so the path is read from the loader's frame
    (`LoraLoader.load_lora`'s `lora_path`). Best effort: None when no such frame is on the stack."""
    import sys

    frame = sys._getframe(1)
    for _ in range(30):
        if frame is None:
            return None
        path = frame.f_locals.get("lora_path")
        if isinstance(path, str):
            return path
        frame = frame.f_back
    return None


# The adapter's code is host-agnostic (waveft_core/hosts/weight_adapter.py); here it becomes ComfyUI's class.
WaveFTAdapter = adapter_class(_AdapterBase, (_QuantizedTensor,), log, source_of=stock_lora_file)


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
    register_training_algorithm()
    return True


# --- the stock LoRA loaders: a WaveFT file is applied, or the node fails ------------------------------

# The caller's model while comfy.sd.load_lora_for_models runs: comfy.lora.load_lora is handed the key map only.
_LOADING_FOR = contextvars.ContextVar("waveft_loading_for", default=None)


def _weight_shape(model, clip, patch_key) -> tuple | None:
    """The shape a patch key (the weight key, or (key, (dim, start, length)[, function])) patches."""
    key, offset = (patch_key, None) if isinstance(patch_key, str) else (patch_key[0], patch_key[1])
    for owner in (getattr(model, "model", None), getattr(clip, "cond_stage_model", None)):
        try:
            shape = list(comfy.utils.get_attr(owner, key).shape)
        except (AttributeError, TypeError):
            continue
        if offset is not None:
            shape[offset[0]] = offset[2]
        return tuple(shape)
    return None


def _checked_load_lora(load_lora):
    """comfy.lora.load_lora that fails on WaveFT layers its key map cannot place (stock_loader.py), before anything
    is patched, and checks kohya layers against their weights when the caller's model is known. A file without
    WaveFT layers goes straight through: LoRAs load as before, warnings and all."""

    def checked(lora, to_load, *args, **kwargs):
        if not any(k.endswith("." + SUFFIX_SPECTRUM) for k in lora):
            return load_lora(lora, to_load, *args, **kwargs)
        missing = stock_loader.unclaimed_layers(lora.keys(), to_load)
        models = _LOADING_FOR.get()
        if missing:
            path = stock_lora_file()
            header = peek_header(path) if path else None
            metadata = header.metadata if header is not None else {}
            raise ValueError(
                stock_loader.unclaimed_message(
                    path or "the file given to the LoRA loader",
                    missing,
                    len(stock_loader.waveft_layers(lora)),
                    metadata.get(META_BASE_MODEL) or metadata.get(META_ARCHITECTURE),
                )
            )
        if models is not None and models[1] is None and stock_loader.only_text_encoder_layers(lora):
            raise ValueError(
                stock_loader.text_encoder_only_message(
                    stock_lora_file() or "the file given to the LoRA loader", len(stock_loader.waveft_layers(lora))
                )
            )
        _refuse_what_load_waveft_refuses(lora, to_load)
        patches = load_lora(lora, to_load, *args, **kwargs)
        for key, patch in patches.items() if models is not None else ():
            if callable(getattr(patch, "bind_to_weight", None)):
                shape = _weight_shape(*models, key)
                if shape is not None:
                    patch.bind_to_weight(shape)  # lost 16-bit positions fail this node, not the first sampling step
        return patches

    return checked


def _refuse_what_load_waveft_refuses(lora, to_load) -> None:
    """One file, one weight change on every path: the stock loader would keep the last of two layers on one weight,
    and apply the settings tensors where Load WaveFT applies the file's metadata (the reference)."""
    path = stock_lora_file()
    source = path or "the file given to the LoRA loader"
    try:
        stock_loader.refuse_layers_on_one_weight(lora.keys(), to_load)
    except SharedTargetError as e:
        raise ValueError(printable(f"WaveFT: {source}: {e}")) from None
    header = peek_header(path) if path else None
    if header is not None:
        with reporting_file_errors(safe=True):
            stock_loader.check_mirrors_against_metadata(path, lora, header.metadata)


def _with_models_known(load_for_models):
    """comfy.sd.load_lora_for_models (or its bypass twin) telling the load_lora check which model it loads for."""

    def with_models(*args, **kwargs):
        model = kwargs["model"] if "model" in kwargs else (args[0] if args else None)
        clip = kwargs["clip"] if "clip" in kwargs else (args[1] if len(args) > 1 else None)
        token = _LOADING_FOR.set((model, clip))
        try:
            return load_for_models(*args, **kwargs)
        finally:
            _LOADING_FOR.reset(token)

    return with_models


def _wrap_host_function(module, name: str, wrap) -> bool:
    """Replace module.name by wrap(original), once: a reload of the pack re-wraps the host's original, never its
    own earlier wrapper. Absent on this host: nothing done."""
    current = getattr(module, name, None)
    if not callable(current):
        return False
    original = current.__waveft_original__ if getattr(current, "__waveft_wrapper__", None) is current else current
    wrapper = functools.wraps(original)(wrap(original))
    wrapper.__waveft_wrapper__ = wrapper
    wrapper.__waveft_original__ = original
    setattr(module, name, wrapper)
    return True


def guard_stock_loaders() -> bool:
    """No silent no-op: every stock LoRA path (Load LoRA, bypass, hooks, the third-party loaders that call
    comfy.sd.load_lora_for_models) goes through comfy.lora.load_lora, which otherwise only logs 'lora key not
    loaded' for a WaveFT layer its key map lacks."""
    guarded = _wrap_host_function(comfy.lora, "load_lora", _checked_load_lora)
    for name in ("load_lora_for_models", "load_bypass_lora_for_models"):
        _wrap_host_function(comfy.sd, name, _with_models_known)
    return guarded


def register_training_algorithm() -> None:
    """Put WaveFT in the stock Train LoRA node's `algorithm` list, which it rebuilds from adapter_maps whenever
    the node list is asked for (FORMAT.md extension 4 is what its Save LoRA Weights then writes)."""
    import comfy.weight_adapter as wa

    algorithms = getattr(wa, "adapter_maps", None)
    if isinstance(algorithms, dict) and callable(getattr(WaveFTAdapter, "create_train", None)):
        algorithms[STOCK_ALGORITHM] = WaveFTAdapter


def full_diff_patches(tensors: dict, view: ModelView) -> dict:
    """weight key -> the host's own "diff" patch for the `<module>.diff` / `.diff_b` tensors of a file (the
    stock Train LoRA node trains every bias and norm as such a full diff), as its LoRA loader makes them."""
    diffs = {k: v for k, v in tensors.items() if k.endswith((".diff", ".diff_b"))}
    if not diffs:
        return {}
    return comfy.lora.load_lora(diffs, view.key_map, log_missing=False)


# --- key maps and matching -----------------------------------------------------------------------


class ModelView:
    """A model and CLIP as one load reads them: their weights' shapes and the host's key map, each built once and
    only when asked for (walking a model's state dict and building its key map are a load's costs besides the
    file; the loader, the patch plan and the full-diff patches all read them)."""

    def __init__(self, model=None, clip=None):
        self.model, self.clip = model, clip

    @functools.cached_property
    def model_shapes(self) -> dict:
        return weight_shapes(self.model)

    @functools.cached_property
    def clip_shapes(self) -> dict:
        return weight_shapes(None, self.clip)

    @functools.cached_property
    def shapes(self) -> dict:
        return {**self.model_shapes, **self.clip_shapes}

    @functools.cached_property
    def key_map(self) -> dict:
        return key_map(self.model, self.clip, self.model_shapes)


def key_map(model=None, clip=None, model_shapes: dict | None = None) -> dict:
    """The host's own map of LoRA spellings -> weights for this model and text encoder (`model_shapes`: the
    model's weight shapes when the caller has them already)."""
    kmap: dict = {}
    if model is not None:
        kmap = comfy.lora.model_lora_keys_unet(model.model, kmap)
        shapes = model_shapes if model_shapes is not None else weight_shapes(model)
        # diffusers names the host's map lacks or places wrong (Wan, LTXV, Lumina 2's grouped k/v heads)
        merge_into(kmap, diffusers_key_map(family_tag_of_comfy(model_family(model)), shapes, attention_heads(model)))
    if clip is not None:
        kmap = comfy.lora.model_lora_keys_clip(clip.cond_stage_model, kmap)
    return kmap


def attention_heads(model) -> Heads | None:
    """The heads of the diffusion model's fused q/k/v attention, as the model holds them: Lumina 2 and Z-Image on
    each `JointAttention` (`n_local_heads`, `n_local_kv_heads`, `head_dim`), Flux-like models (HunyuanVideo) on the
    model (`num_heads`, `hidden_size`, as many k/v heads as q heads); None for a model without them."""
    diffusion_model = getattr(model.model, "diffusion_model", None)
    if diffusion_model is None:
        return None
    for module in diffusion_model.modules():
        if hasattr(module, "qkv") and hasattr(module, "n_local_kv_heads"):
            return Heads(int(module.n_local_heads), int(module.n_local_kv_heads), int(module.head_dim))
    heads, width = getattr(diffusion_model, "num_heads", None), getattr(diffusion_model, "hidden_size", None)
    if isinstance(heads, int) and isinstance(width, int) and heads > 0:
        return Heads(heads, heads, width // heads)
    return None


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


def match(adapter_layers: dict, model=None, clip=None, view: ModelView | None = None):
    view = view or ModelView(model, clip)
    return match_layers({n: layer.shape for n, layer in adapter_layers.items()}, view.key_map, view.shapes.get)


def plan(adapter, view: ModelView) -> PatchPlan:
    """The patch plan of `adapter` on this model and CLIP (waveft_core/hosts/plan.py), through the host's key map."""
    return plan_from_match(match(adapter.layers, view=view), len(adapter.layers), adapter.base_model)


def checkpoint_name(model) -> str:
    """The file name the model was loaded from, where the host records it (since about 0.20, for reloading a
    model in a new mode), else ''."""
    try:
        path = model.cached_patcher_init[1][0]
    except (AttributeError, IndexError, KeyError, TypeError):
        return ""
    return os.path.basename(path) if isinstance(path, str) else ""


def image_size(model, latents) -> list[int]:
    """[width, height] in pixels of the most common latent size: the resolution of a training run."""
    from collections import Counter

    ratio = getattr(getattr(getattr(model, "model", None), "latent_format", None), "spacial_downscale_ratio", 8)
    (width, height), _ = Counter((int(x.shape[-1]), int(x.shape[-2])) for x in latents).most_common(1)[0]
    return [width * ratio, height * ratio]


def thumbnail_png(image, max_side: int = 256) -> bytes:
    """The first picture of an IMAGE (batch, height, width, channels in 0..1) as PNG bytes, scaled down to at
    most `max_side` pixels a side (the size the model spec suggests for a thumbnail)."""
    import io

    import torch
    from PIL import Image

    picture = image[0] if image.ndim == 4 else image
    height, width = int(picture.shape[0]), int(picture.shape[1])
    scale = min(1.0, max_side / max(height, width))
    if scale < 1.0:
        size = (max(1, round(height * scale)), max(1, round(width * scale)))
        picture = torch.nn.functional.interpolate(
            picture.movedim(-1, 0)[None].float(), size=size, mode="bilinear", antialias=True, align_corners=False
        )[0].movedim(0, -1)
    pixels = (picture.clamp(0, 1) * 255).round().to(torch.uint8).cpu().numpy()
    out = io.BytesIO()
    Image.fromarray(pixels[..., :3] if pixels.shape[-1] >= 3 else pixels[..., 0]).save(out, format="PNG")
    return out.getvalue()


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
    swapped = _differentiable_kernels()
    try:
        for module, name, kernel in swapped:
            setattr(module, name, kernel)
        yield
    finally:
        mm.in_training = before
        for module, name, kernel in swapped:
            setattr(module, name, getattr(kernel, "_host_original"))


# Host kernels that model code calls even while training, though they have no backward: ComfyUI 0.33's
# Cosmos/Anima attention calls comfy_kitchen's rms_rope_split_half unconditionally (Flux, Lumina and LTXV switch
# to plain torch under the training flag themselves). comfy_kitchen's eager version of the same function is
# plain torch, differentiable, and what the kernel runs on a CPU anyway.
_KERNELS_WITHOUT_BACKWARD = ("rms_rope_split_half",)


def _differentiable_kernels() -> list:
    try:
        import comfy.quant_ops
        from comfy_kitchen.backends.eager import rope as eager

        ck = comfy.quant_ops.ck
    except Exception:  # no comfy_kitchen (older hosts use plain torch there)
        return []
    out = []
    for name in _KERNELS_WITHOUT_BACKWARD:
        if callable(getattr(ck, name, None)) and callable(getattr(eager, name, None)):

            def kernel(*args, _eager=getattr(eager, name), **kwargs):
                return _eager(*args, **kwargs)

            kernel._host_original = getattr(ck, name)
            out.append((ck, name, kernel))
    return out


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
