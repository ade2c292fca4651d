"""Hugging Face PEFT WaveFT adapters (FORMAT.md section 2): import with PEFT's positions, export back.

PEFT stores only the spectra; it draws each layer's positions from `random_loc_seed` and the layer's
m x n. So an import needs the shape of every target layer (from the model or a base checkpoint) and
an export is only possible when the positions follow that rule."""

from __future__ import annotations

import functools
import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

import torch

from ..adapter import Adapter, Layer
from ..delta import index_dtype, matrix_shape
from ..files.limits import check_delta_range
from ..files.printable import short_list
from ..files.storage import WaveFTFileError, atomic_writes
from ..keys import (
    DEFAULT_SEED,
    META_DESCRIPTION,
    META_IMPORT_NOTES,
    META_SEED,
    META_SOURCE,
    PEFT_CONFIG_NAME,
    PEFT_WEIGHTS_NAME,
    SUFFIX_SPECTRUM,
)
from ..names.families import ENCODERS, TEXT_COMPONENTS, split_component, to_native, to_peft
from ..wavelets import UnknownWaveletError, check_wavelet, peft_name
from .sources import Part, Source, carried_metadata, settings


def peft_positions(shape, count: int, seed: int = DEFAULT_SEED) -> torch.Tensor:
    """The flat positions PEFT draws for a layer: randperm(m*n) from a generator seeded with `seed`.
    Layers of one size share them (a read-only tensor: clone before changing it)."""
    m, n = matrix_shape(tuple(shape))
    return _positions(m * n, int(count), int(seed))


@functools.lru_cache(maxsize=64)
def _positions(size: int, count: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    # int32 draws the same permutation as PEFT's int64 one (checked in the tests) with half the memory.
    return torch.randperm(size, generator=generator, dtype=index_dtype(size))[:count].clone()


@dataclass(frozen=True)
class Spelling:
    """How the caller names its inputs, so a message tells a Python user `base=`, a CLI user `--base` and a
    ComfyUI user which socket to connect."""

    base: str = "base=<single-file checkpoint, diffusers folder or state dict>"
    choose_clip: str = "Say which with clip='clip_l' or clip='clip_g'"
    adapter: str = "adapter="
    settings: str = "overrides={'wavelet_family': …, 'scaling': …, 'random_loc_seed': …, 'use_idwt': …}"


PYTHON = Spelling()
CLI = Spelling(
    "--base <single-file checkpoint or diffusers folder>",
    "Say which with --clip clip_l or --clip clip_g",
    "--adapter ",
    "--wavelet/--scaling/--seed/--use-idwt",
)
SETTINGS_LABELS = {"wavelet_family": "wavelet", "scaling": "scaling", "random_loc_seed": "seed", "use_idwt": "use_idwt"}


ShapeLookup = Callable[[str, str], "tuple[int, ...] | None"]  # (peft name, native name) -> weight shape


def import_source(
    source: Source,
    shape_of: ShapeLookup,
    clip: str | None = None,
    native_names: bool = True,
    encoders: tuple[str, ...] = (),
    overrides: dict | None = None,
    spelling: Spelling = PYTHON,
) -> Adapter:
    """A PEFT folder's or diffusers file's spectra (sources.read_source) -> Adapter with PEFT's positions for
    each layer's shape. Names become ComfyUI-native (the SD1.x/SDXL rules of names/families.py) or, with
    native_names=False, stay as the tool wrote them minus its wrappers (a host that resolves names against the
    actual model does better than the fixed rules for other families); a text encoder's layers always get
    the native name of the encoder decided for them.

    `shape_of(peft_name, native_name)` gives the base weight's shape or None; `encoders` the base's text
    encoders ('clip_l', 'clip_g', ...) when known. Notes on how the source was read (other adapters in its
    folder, PEFT defaults used, the encoder chosen) go into metadata['waveft.import_notes']."""
    layers: dict[str, Layer] = {}
    notes = list(source.notes)
    seeds = set()
    for part in source.parts:
        values, defaulted = settings(part, overrides)
        label = f"{part.component or 'the model'}"
        try:
            wavelet = check_wavelet(str(values["wavelet_family"]))
        except UnknownWaveletError as e:
            raise WaveFTFileError(source.path, str(e), key="wavelet_family") from None
        if defaulted:
            which = ", ".join(f"{SETTINGS_LABELS[k]} {_show(values[k])}" for k in defaulted)
            where = "no settings are stored" if part.config is None else f"{part.origin} does not say"
            notes.append(f"{label}: {where}; PEFT's defaults used: {which} (set them with {spelling.settings})")
        encoder = _encoder_for(source, part, shape_of, encoders, clip, spelling) if is_text_part(part) else None
        missing = []
        for module, spectrum in part.spectra.items():
            peft_name = f"{part.component}.{module}" if part.component else module
            native = to_native(peft_name, clip=encoder)
            shape = shape_of(peft_name, native)
            if shape is None:
                missing.append(peft_name)
                continue
            shape = tuple(int(s) for s in shape)
            m, n = matrix_shape(shape)
            if spectrum.numel() > m * n:
                raise WaveFTFileError(
                    source.path,
                    f"{spectrum.numel()} coefficients do not fit the base weight of shape {list(shape)}",
                    key=peft_name + "." + SUFFIX_SPECTRUM,
                    advice=f"Give the base model it was trained on ({spelling.base})",
                )
            # a text encoder's layer keeps the native name: it carries the encoder decided above
            name = native if native_names or encoder else split_component(peft_name)[1]
            layers[name] = Layer(
                spectrum=spectrum.float(),
                indices=peft_positions(shape, spectrum.numel(), values["random_loc_seed"]),
                shape=shape,
                scaling=values["scaling"],
                wavelet=wavelet,
                use_idwt=values["use_idwt"],
            )
            check_delta_range(layers[name], source.path, peft_name + "." + SUFFIX_SPECTRUM, "scaling")
        if missing:
            listed = short_list(missing, 5)
            where = f" in {encoder}" if encoder else ""
            raise WaveFTFileError(
                source.path,
                f"the base model has no weight{where} for {len(missing)} of "
                f"{len(part.spectra)} {label} layers ({listed})",
                advice=f"Give the base model this adapter was trained on ({spelling.base})",
            )
        if encoder:
            notes.append(f"{label} layers go to {encoder}")
        seeds.add(values["random_loc_seed"])
    metadata = {META_SOURCE: "peft" if source.kind == "PEFT folder" else "diffusers"}
    for part in source.parts:
        for key, value in part.metadata.items():
            metadata.setdefault(key, value)
    if len(seeds) == 1:
        metadata[META_SEED] = str(seeds.pop())
    if notes:
        metadata[META_IMPORT_NOTES] = "; ".join(notes)
    base_model = next(
        (
            p.config.get("base_model_name_or_path")
            for p in source.parts
            if p.config and p.config.get("base_model_name_or_path")
        ),
        None,
    )
    if base_model:
        metadata.setdefault(META_DESCRIPTION, f"converted from a {source.kind} for {base_model}")
    return Adapter(layers=layers, metadata=metadata, source=str(source.path))


def _show(value) -> str:
    return f"{value:g}" if isinstance(value, float) else str(value)


def is_text_part(part: Part) -> bool:
    """Whether a part adapts a text encoder (by its component, else by its module names)."""
    if part.component:
        return part.component in TEXT_COMPONENTS
    return any(split_component(name)[0] in TEXT_COMPONENTS for name in part.spectra)


def _encoder_for(source: Source, part: Part, shape_of: ShapeLookup, encoders, clip, spelling: Spelling) -> str:
    """Which text encoder a part adapts: the caller's choice, else its component (text_encoder_2 is CLIP-G;
    text_encoder the first encoder, CLIP-L or SD2's CLIP-H), else the only encoder of the base where every
    layer has a weight its spectrum fits. Several that fit is an error, never a guess."""
    if clip:
        return clip
    if part.component == "text_encoder_2":
        return "clip_g"
    if part.component == "text_encoder":
        return next((e for e in ("clip_l", "clip_h") if e in encoders), "clip_l")
    fits = []
    for encoder in encoders or ENCODERS:
        ok = True
        for module, spectrum in part.spectra.items():
            shape = shape_of(module, to_native(module, clip=encoder))
            if shape is None or spectrum.numel() > matrix_shape(tuple(shape))[0] * matrix_shape(tuple(shape))[1]:
                ok = False
                break
        if ok:
            fits.append(encoder)
    if len(fits) == 1:
        return fits[0]
    if not fits:
        return next(iter(encoders), "clip_l")  # reported as missing weights by the caller
    raise WaveFTFileError(
        source.path,
        f"its text-encoder layers fit {' and '.join(fits)} alike, and nothing in the "
        "adapter says which encoder it was trained on",
        advice=f"{spelling.choose_clip} (SDXL's text_encoder is CLIP-L, text_encoder_2 is CLIP-G)",
    )


def export_peft(adapter: Adapter, out_dir, base_model_name: str | None = None) -> list[Path]:
    """Write PEFT folders for `adapter`: one folder when all layers belong to one model, else one
    sub-folder per pipeline component (unet/, text_encoder/, text_encoder_2/). Returns the folders.

    Refuses (ValueError) when a layer's positions are not the ones PEFT would draw for the file's seed."""
    seed = int(adapter.metadata.get(META_SEED, DEFAULT_SEED))
    scalings = {float(layer.scaling) for layer in adapter.layers.values()}
    if len(scalings) > 1:
        raise ValueError(f"PEFT has one scaling per adapter but the layers use {sorted(scalings)}")
    groups: dict[str, dict[str, Layer]] = {}
    for native, layer in adapter.layers.items():
        expected = peft_positions(layer.shape, layer.n_coefficients, seed)
        if not torch.equal(expected.long(), layer.indices.to(torch.int64).cpu()):
            raise ValueError(
                f"layer {native}: its positions are not the ones PEFT draws with random_loc_seed={seed}, so PEFT "
                "could not load them (PEFT stores no positions). Adapters trained by this project or converted "
                "from PEFT keep PEFT's positions; adapters extracted from LoRAs or weight differences do not"
            )
        component, name = to_peft(native)
        groups.setdefault(component, {})[name] = layer
    out_dir = Path(out_dir)
    written = []
    for component, layers in groups.items():
        folder = out_dir / component if len(groups) > 1 and component else out_dir
        _write_peft_folder(folder, layers, seed, base_model_name, carried_metadata(adapter.metadata))
        written.append(folder)
    return written


def _write_peft_folder(
    folder: Path, layers: Mapping[str, Layer], seed: int, base_model_name, metadata: Mapping[str, str]
) -> None:
    from safetensors.torch import save_file

    first = next(iter(layers.values()))
    counts = Counter(layer.n_coefficients for layer in layers.values())
    n_frequency = counts.most_common(1)[0][0]
    config = {
        "peft_type": "WAVEFT",
        "task_type": None,
        "base_model_name_or_path": base_model_name,
        "n_frequency": n_frequency,
        "n_frequency_pattern": {
            name: layer.n_coefficients for name, layer in layers.items() if layer.n_coefficients != n_frequency
        },
        "scaling": float(first.scaling),
        "wavelet_family": peft_name(first.wavelet),
        "use_idwt": bool(first.use_idwt),
        "random_loc_seed": seed,
        "target_modules": sorted(layers),
        "fan_in_fan_out": False,
        "bias": "none",
        "proportional_parameters": False,
        "init_weights": True,
        "inference_mode": True,
    }
    tensors = {
        f"base_model.model.{name}.{SUFFIX_SPECTRUM}": layer.spectrum.detach().float().cpu().contiguous()
        for name, layer in layers.items()
    }
    text = json.dumps(config, indent=2)
    # both files are staged first and then renamed, so an error leaves any earlier export whole
    # title, trigger words and the like ride in the weights file's metadata, which PEFT ignores
    file_metadata = {**metadata, "format": "pt"}
    atomic_writes(
        {
            folder / PEFT_WEIGHTS_NAME: lambda tmp: save_file(tensors, tmp, metadata=file_metadata),
            folder / PEFT_CONFIG_NAME: lambda tmp: Path(tmp).write_text(text, encoding="utf-8"),
        }
    )
