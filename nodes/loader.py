"""Load WaveFT adapters onto MODEL and CLIP (thin: the math and the file live in waveft_core)."""

from __future__ import annotations

import logging
import os

from ..waveft_core import Adapter, WaveFTFileError, keys
from ..waveft_core.convert import peft_io, sources
from ..waveft_core.files import fileformat, kinds, kohya
from ..waveft_core.files.printable import printable
from ..waveft_core.files.storage import peek_header
from ..waveft_core.hosts import cache
from ..waveft_core.names.families import ENCODERS, TE_PREFIX
from ..waveft_core.names.matching import SharedTargetError
from . import host

log = logging.getLogger("ComfyUI-WaveFT")
LORA_PREFIX = "loras/"
_ADAPTERS = cache.AdapterCache(8)
_SNIFF: dict = {}  # path -> (size, mtime_ns, is_waveft)
# What a PEFT/diffusers file lacks comes from the connected model; messages say so in the node's terms.
NODE_SPELLING = peft_io.Spelling(
    base="connect the model and CLIP it was trained on",
    choose_clip="Convert it with 'python -m waveft_core convert … --clip clip_l|clip_g', or save it with its "
    "component prefix",
    adapter="the list entry of its sub-folder, ",
    settings="'python -m waveft_core convert … --wavelet/--scaling/--seed/--use-idwt'",
)


# --- listing and resolving names -----------------------------------------------------------------


def _is_waveft_file(path: str) -> bool:
    """Read only the safetensors header: WaveFT files (native, PEFT or diffusers) have '<module>.waveft_spectrum'
    keys."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    cached = _SNIFF.get(path)
    if cached and cached[:2] == (st.st_size, st.st_mtime_ns):
        return cached[2]
    header = peek_header(path)
    found = header is not None and kinds.is_waveft(header.tensors, header.metadata)
    _SNIFF[path] = (st.st_size, st.st_mtime_ns, found)
    return found


def _peft_dirs() -> list[str]:
    """PEFT WaveFT folders inside models/waveft (relative names, '/' separated)."""
    found = set()
    for root in host.folder_dirs(host.FOLDER):
        found.update(sources.adapter_folders(root))
    return sorted(found)


def list_adapters() -> list[str]:
    """Native files in models/waveft, PEFT folders there (name ending in '/'), WaveFT files among loras."""
    names = [f for f in host.filename_list(host.FOLDER) if f.lower().endswith(".safetensors")]
    names += [d + "/" for d in _peft_dirs()]
    for f in host.filename_list("loras"):
        if f.lower().endswith(".safetensors"):
            path = host.full_path("loras", f)
            if path and _is_waveft_file(path):
                names.append(LORA_PREFIX + f)
    return names


def listed_name(path: str, kind: str = host.FOLDER) -> str:
    """How Load WaveFT lists a file written into models/<kind> (files among the LoRAs carry 'loras/')."""
    rel = os.path.relpath(path, host.save_folder(kind)).replace(os.sep, "/")
    return rel if kind == host.FOLDER else LORA_PREFIX + rel


def resolve_path(name: str) -> str:
    """The file or folder behind a combo entry, refusing anything outside the model folders."""
    if name.endswith("/"):
        rel = name.rstrip("/")
        for root in host.folder_dirs(host.FOLDER):
            candidate = os.path.realpath(os.path.join(root, rel))
            if os.path.commonpath([candidate, os.path.realpath(root)]) != os.path.realpath(root):
                continue
            if os.path.isfile(os.path.join(candidate, keys.PEFT_CONFIG_NAME)):
                return candidate
        raise ValueError(f"WaveFT: no PEFT adapter folder '{rel}' in models/{host.FOLDER}")
    if name.startswith(LORA_PREFIX):
        path = host.full_path("loras", name[len(LORA_PREFIX) :])
        if path:
            return path
    path = host.full_path(host.FOLDER, name)
    if not path:
        raise ValueError(
            f"WaveFT: '{name}' is not in models/{host.FOLDER} or models/loras (was it moved or "
            "deleted? press R to refresh the list)"
        )
    return path


def fingerprint(name: str) -> str:
    """Changes whenever the file (or a PEFT folder's files) changes, so an edited adapter reloads."""
    try:
        return fingerprint_path(resolve_path(name))
    except ValueError:
        return name


# --- loading -------------------------------------------------------------------------------------


def file_kind(path: str) -> str:
    """kinds.NATIVE, KOHYA, SPECTRA, ... of a file, from its header; a folder is a PEFT folder (SPECTRA)."""
    if os.path.isdir(path):
        return kinds.SPECTRA
    header = peek_header(path)
    if header is None:
        return kinds.NATIVE  # the native reader names what is wrong with it
    kind = kinds.file_kind(header.tensors, header.metadata)
    return kinds.NATIVE if kind in (kinds.LORA, kinds.OTHER) else kind  # the native reader says what it is


def stores_positions(path: str) -> bool:
    """A native file. PEFT folders and diffusers files store spectra only, kohya-style files from other trainers
    no shapes; those come from the model they are applied to."""
    return file_kind(path) == kinds.NATIVE


def load_adapter(path: str, model=None, clip=None) -> Adapter:
    """A native file (cached by path, size and mtime), or a PEFT folder or diffusers file with positions drawn
    for the shapes of the model and CLIP it is applied to (so the cache key holds those shapes too). Layers of
    a text encoder go to the encoder the file names (text_encoder_2 is CLIP-G), else to the only one of the
    connected CLIP where they fit; a file for a text encoder is refused when no CLIP is connected."""
    if stores_positions(path):
        return _ADAPTERS.get(("file", cache.fingerprint(path)), lambda: fileformat.read(path))
    shapes = host.weight_shapes(model, clip)
    clip_keys = set(host.weight_shapes(None, clip)) if clip is not None else set()
    kmap = host.key_map(model, clip)
    encoders = tuple(e for e in ENCODERS if any(k.startswith(e + ".") for k in clip_keys))
    from ..waveft_core.names.matching import resolve

    def shape_of(peft_name, native):
        if native.startswith(TE_PREFIX):  # the encoder is decided: that encoder's weight, nothing else
            return shapes.get(native[len(TE_PREFIX) :] + ".weight")
        target = resolve(peft_name, kmap, shapes.get)
        return None if target is None else target.shape

    if file_kind(path) == kinds.KOHYA:

        def make_kohya():
            tensors, metadata = fileformat.read_tensors_and_metadata(path)
            return kohya.to_adapter(
                kohya.read(tensors, metadata, path), lambda name: shape_of(name, name), skip_missing=True
            )

        return _ADAPTERS.get(("kohya", cache.fingerprint(path), tuple(sorted(shapes.items()))), make_kohya)

    def make():
        source = sources.read_source(path)
        if clip is None:
            text = [p for p in source.parts if peft_io.is_text_part(p)]
            if text and len(text) < len(source.parts):
                source.parts = [p for p in source.parts if p not in text]
                source.notes.append(
                    f"{sum(len(p.spectra) for p in text)} text-encoder layers unused (no CLIP connected)"
                )
        return peft_io.import_source(source, shape_of, native_names=False, encoders=encoders, spelling=NODE_SPELLING)

    key = ("peft", cache.fingerprint(path), tuple(sorted(shapes.items())))
    return _ADAPTERS.get(key, make)


def fingerprint_path(path: str) -> str:
    """IS_CHANGED's value for a file or folder: changes whenever it (or a PEFT folder's files) changes."""
    return repr(cache.fingerprint(path))


def apply_adapter(adapter: Adapter, model, clip, strength_model: float, strength_clip: float, label: str):
    """Clone MODEL/CLIP and add one WaveFTAdapter patch per matched layer. Returns (model, clip, summary)."""
    use_model = model is not None and strength_model != 0
    use_clip = clip is not None and strength_clip != 0
    try:
        report = host.match(adapter.layers, model, clip)
    except SharedTargetError as e:
        raise ValueError(f"WaveFT {label}: {e}") from None
    wants = adapter.base_model or "an unknown base model"
    got = host.model_family(model) if model is not None else "a text encoder only"
    if report.wrong_shape:
        name, mine, theirs = report.wrong_shape[0]
        raise ValueError(
            f"{label}: {len(report.wrong_shape)} layer(s) have another shape than the model's weights, e.g. "
            f"{name}: adapter {list(mine)}, model {list(theirs)}. The file was made for {wants}; the model is {got}."
        )
    if not report.targets:
        raise ValueError(
            f"{label}: none of its {len(adapter.layers)} layers match this model. The file was made for {wants}; "
            f"the model is {got}. Pick the adapter made for this model."
        )
    model_keys = set(host.weight_shapes(model)) if model is not None else set()
    model_patches, clip_patches = {}, {}
    for name, target in report.targets.items():
        patch = host.WaveFTAdapter.from_layer(adapter.layers[name])
        (model_patches if target.key in model_keys else clip_patches)[host.patch_key(target)] = patch
    for key, patch in host.full_diff_patches(adapter.extra_tensors, model, clip).items():  # stock Train LoRA files
        (model_patches if key in model_keys else clip_patches)[key] = patch
    out_model, out_clip = model, clip
    if use_model and model_patches:
        out_model = model.clone()
        out_model.add_patches(model_patches, strength_model)
    if use_clip and clip_patches:
        out_clip = clip.clone()
        out_clip.add_patches(clip_patches, strength_clip)
    summary = (
        f"{label}: {report.matched} of {len(adapter.layers)} layers matched "
        f"({len(model_patches)} model, {len(clip_patches)} text encoder)"
    )
    if adapter.metadata.get(keys.META_IMPORT_NOTES):
        summary += f"; read as: {adapter.metadata[keys.META_IMPORT_NOTES]}"
    if report.unmatched:
        summary += f"; {len(report.unmatched)} did not match (names in the log)"
        log.warning(
            "WaveFT %s: %d layer(s) matched nothing in %s: %s",
            printable(label),
            len(report.unmatched),
            got,
            printable(", ".join(report.unmatched[:20]) + (" ..." if len(report.unmatched) > 20 else "")),
        )
    if clip is None and clip_patches:
        summary += f"; {len(clip_patches)} text-encoder layers unused (no CLIP connected)"
    log.info("WaveFT %s", printable(summary))
    return out_model, out_clip, summary


def load_and_apply(waveft_name, model, clip, strength_model, strength_clip):
    path = resolve_path(waveft_name)
    try:
        adapter = load_adapter(path, model, clip)
    except WaveFTFileError as e:
        raise ValueError(f"WaveFT: {e}") from None
    return apply_adapter(adapter, model, clip, strength_model, strength_clip, os.path.basename(path.rstrip("/")))


# --- nodes ---------------------------------------------------------------------------------------

STRENGTH = {"default": 1.0, "min": -100.0, "max": 100.0, "step": 0.01}


class WaveFTLoader:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The diffusion model (UNet or DiT) to patch."}),
                "clip": ("CLIP", {"tooltip": "The text encoder(s) to patch with the adapter's text-encoder layers."}),
                "waveft_name": (
                    list_adapters(),
                    {
                        "tooltip": "WaveFT adapter: a .safetensors file in models/waveft, a "
                        "PEFT folder there (ends with '/'), or a WaveFT file in models/loras (also those of "
                        "lora-scripts-next, kohya-style)."
                    },
                ),
                "strength_model": (
                    "FLOAT",
                    {
                        **STRENGTH,
                        "tooltip": "Multiplier of the weight change on the "
                        "diffusion model. 0 leaves it untouched; negative values invert the adapter.",
                    },
                ),
                "strength_clip": (
                    "FLOAT",
                    {**STRENGTH, "tooltip": "Multiplier of the weight change on the text encoder(s)."},
                ),
            }
        }

    RETURN_TYPES = ("MODEL", "CLIP")
    OUTPUT_TOOLTIPS = (
        "The model with the adapter applied (a patched clone; the input is unchanged).",
        "The text encoder with the adapter applied (a patched clone).",
    )
    FUNCTION = "load"
    CATEGORY = "loaders/waveft"
    DESCRIPTION = (
        "Applies a WaveFT adapter (sparse wavelet fine-tuning) to a model and its text encoder. The "
        "weight change is rebuilt on the model's device when it loads, without a dense copy."
    )

    @classmethod
    def IS_CHANGED(cls, waveft_name, **kwargs):
        return fingerprint(waveft_name)

    def load(self, model, clip, waveft_name, strength_model, strength_clip):
        if strength_model == 0 and strength_clip == 0:
            return {"ui": {"text": ["strengths are 0: nothing applied"]}, "result": (model, clip)}
        out_model, out_clip, summary = load_and_apply(waveft_name, model, clip, strength_model, strength_clip)
        return {"ui": {"text": [summary]}, "result": (out_model, out_clip)}


class WaveFTLoaderModelOnly:
    @classmethod
    def INPUT_TYPES(cls):
        req = WaveFTLoader.INPUT_TYPES()["required"]
        return {"required": {k: req[k] for k in ("model", "waveft_name", "strength_model")}}

    RETURN_TYPES = ("MODEL",)
    OUTPUT_TOOLTIPS = ("The model with the adapter applied (a patched clone).",)
    FUNCTION = "load"
    CATEGORY = "loaders/waveft"
    DESCRIPTION = "Applies a WaveFT adapter's diffusion-model layers only."

    @classmethod
    def IS_CHANGED(cls, waveft_name, **kwargs):
        return fingerprint(waveft_name)

    def load(self, model, waveft_name, strength_model):
        if strength_model == 0:
            return {"ui": {"text": ["strength is 0: nothing applied"]}, "result": (model,)}
        out_model, _, summary = load_and_apply(waveft_name, model, None, strength_model, 0.0)
        return {"ui": {"text": [summary]}, "result": (out_model,)}


class WaveFTInfo:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "waveft_name": (list_adapters(), {"tooltip": "The adapter to describe."}),
            },
            "optional": {
                "model": (
                    "MODEL",
                    {"tooltip": "Optional: also count how many of the adapter's layers match this model."},
                ),
                "clip": ("CLIP", {"tooltip": "Optional: include the text encoder in the match count."}),
            },
        }

    RETURN_TYPES = ("STRING",)
    OUTPUT_TOOLTIPS = ("Metadata, layers, parameters, wavelet, scaling, base model, trigger words and match count.",)
    FUNCTION = "info"
    CATEGORY = "loaders/waveft"
    OUTPUT_NODE = True
    DESCRIPTION = "Describes a WaveFT adapter and, given a model, how well it matches."

    @classmethod
    def IS_CHANGED(cls, waveft_name, **kwargs):
        return fingerprint(waveft_name)

    def info(self, waveft_name, model=None, clip=None):
        path = resolve_path(waveft_name)
        if not stores_positions(path) and model is None and clip is None:
            try:
                if file_kind(path) == kinds.KOHYA:
                    text = kohya.describe(kohya.read(*fileformat.read_tensors_and_metadata(path), path))
                else:
                    text = sources.describe(sources.read_source(path))
                text += "\n(connect a model to see its layers)"
            except WaveFTFileError as e:
                raise ValueError(f"WaveFT: {e}") from None
            return {"ui": {"text": [text]}, "result": (text,)}
        try:
            adapter = load_adapter(path, model, clip)
        except WaveFTFileError as e:
            raise ValueError(f"WaveFT: {e}") from None
        text = adapter.summary()
        if model is not None or clip is not None:
            report = host.match(adapter.layers, model, clip)
            text += (
                f"\nmatches this model ({host.model_family(model) if model is not None else 'CLIP'}): "
                f"{report.matched} of {len(adapter.layers)} layers"
            )
            if report.unmatched:
                text += f"\nunmatched: {', '.join(report.unmatched[:10])}" + (
                    " ..." if len(report.unmatched) > 10 else ""
                )
            if report.wrong_shape:
                n, a, b = report.wrong_shape[0]
                text += f"\nwrong shape: {len(report.wrong_shape)} (e.g. {n}: {list(a)} vs {list(b)})"
        return {"ui": {"text": [text]}, "result": (text,)}
