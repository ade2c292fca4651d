"""Load WaveFT adapters onto MODEL and CLIP (thin: the math and the file live in waveft_core)."""

from __future__ import annotations

import logging
import os

from ..waveft_core import Adapter, keys
from ..waveft_core.convert import peft_io, sources
from ..waveft_core.files import fileformat, kinds, kohya, printable, reporting_file_errors
from ..waveft_core.hosts import AdapterCache, cache
from ..waveft_core.names import ENCODERS, TE_PREFIX, SharedTargetError, resolve
from . import host
from .catalog import fingerprint, list_adapters, resolve_path

log = logging.getLogger("ComfyUI-WaveFT")
_ADAPTERS = AdapterCache(8)
# What a PEFT/diffusers file lacks comes from the connected model; messages say so in the node's terms.
NODE_SPELLING = peft_io.Spelling(
    base="connect the model and CLIP it was trained on",
    choose_clip="Convert it with 'python -m waveft_core convert … --clip clip_l|clip_g', or save it with its "
    "component prefix",
    adapter="the list entry of its sub-folder, ",
    settings="'python -m waveft_core convert … --wavelet/--scaling/--seed/--use-idwt'",
)


# --- loading -------------------------------------------------------------------------------------


def load_adapter(path: str, model=None, clip=None, view: host.ModelView | None = None) -> Adapter:
    """A native file (cached by path, size and mtime), or a PEFT folder or diffusers file with positions drawn
    for the shapes of the model and CLIP it is applied to (so the cache key holds those shapes too). Layers of
    a text encoder go to the encoder the file names (text_encoder_2 is CLIP-G), else to the only one of the
    connected CLIP where they fit; a file for a text encoder is refused when no CLIP is connected. `view`: the
    model and CLIP as this load reads them (their shapes and key map, built once per load)."""
    kind = kinds.kind_of(path)
    if kind == kinds.NATIVE:
        return _ADAPTERS.get(("file", cache.fingerprint(path)), lambda: fileformat.read(path))
    view = view or host.ModelView(model, clip)
    shapes = view.shapes
    encoders = tuple(e for e in ENCODERS if any(k.startswith(e + ".") for k in view.clip_shapes))

    def shape_of(peft_name, native):
        if native.startswith(TE_PREFIX):  # the encoder is decided: that encoder's weight, nothing else
            return shapes.get(native[len(TE_PREFIX) :] + ".weight")
        target = resolve(peft_name, view.key_map, shapes.get)
        return None if target is None else target.shape

    if kind == kinds.KOHYA:

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


def apply_adapter(
    adapter: Adapter,
    model,
    clip,
    strength_model: float,
    strength_clip: float,
    label: str,
    view: host.ModelView | None = None,
):
    """Clone MODEL/CLIP and add one WaveFTAdapter patch per layer of the patch plan. Returns (model, clip,
    summary)."""
    use_model = model is not None and strength_model != 0
    use_clip = clip is not None and strength_clip != 0
    view = view or host.ModelView(model, clip)
    try:
        plan = host.plan(adapter, view)
    except SharedTargetError as e:
        raise ValueError(f"WaveFT {label}: {e}") from None
    got = host.model_family(model) if model is not None else "a text encoder only"
    refusal = plan.refusal(label, got)
    if refusal:
        raise ValueError(refusal)
    model_keys = view.model_shapes
    model_patches, clip_patches = {}, {}
    for name, target in plan.targets.items():
        patch = host.WaveFTAdapter.from_layer(adapter.layers[name])
        (model_patches if target.key in model_keys else clip_patches)[host.patch_key(target)] = patch
    for key, patch in host.full_diff_patches(adapter.extra_tensors, view).items():  # stock Train LoRA files
        (model_patches if key in model_keys else clip_patches)[key] = patch
    out_model, out_clip = model, clip
    if use_model and model_patches:
        out_model = model.clone()
        out_model.add_patches(model_patches, strength_model)
    if use_clip and clip_patches:
        out_clip = clip.clone()
        out_clip.add_patches(clip_patches, strength_clip)
    summary = plan.summary(
        label,
        len(model_patches),
        len(clip_patches),
        adapter.metadata.get(keys.META_IMPORT_NOTES, ""),
        len(clip_patches) if clip is None else 0,
    )
    if plan.skipped:
        log.warning(
            "WaveFT %s: %d layer(s) matched nothing in %s: %s",
            printable(label),
            len(plan.skipped),
            got,
            printable(plan.unmatched_log()),
        )
    log.info("WaveFT %s", printable(summary))
    return out_model, out_clip, summary


def load_and_apply(waveft_name, model, clip, strength_model, strength_clip):
    path = resolve_path(waveft_name)
    view = host.ModelView(model, clip)
    with reporting_file_errors():
        adapter = load_adapter(path, model, clip, view)
    return apply_adapter(adapter, model, clip, strength_model, strength_clip, os.path.basename(path.rstrip("/")), view)


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
        kind = kinds.kind_of(path)
        if kind != kinds.NATIVE and model is None and clip is None:
            with reporting_file_errors():
                if kind == kinds.KOHYA:
                    text = kohya.describe(kohya.read(*fileformat.read_tensors_and_metadata(path), path))
                else:
                    text = sources.describe(sources.read_source(path))
            text += "\n(connect a model to see its layers)"
            return {"ui": {"text": [text]}, "result": (text,)}
        view = host.ModelView(model, clip)
        with reporting_file_errors():
            adapter = load_adapter(path, model, clip, view)
        text = adapter.summary()
        if model is not None or clip is not None:
            text += host.plan(adapter, view).match_lines(host.model_family(model) if model is not None else "CLIP")
        return {"ui": {"text": [text]}, "result": (text,)}
