"""waveft_core: WaveFT adapters (Bilican et al., arXiv 2505.12532) without any ComfyUI dependency.

import waveft_core as wft
ad = wft.load("x.safetensors")                  # native v1; a PEFT folder needs base=...
ad.layers[name].delta(dtype=torch.float32)      # dense ΔW, scaling included
ad.layers[name].add_to_(weight, strength=1.0)   # in place, sparse
wft.save(ad, "y.safetensors")
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Mapping

try:
    import torch  # noqa: F401
except ImportError as e:  # the one dependency this package cannot install for you: the build must fit your GPU
    raise ImportError(
        "waveft_core needs PyTorch: install the build for your machine first (pip install torch, or "
        "the command from pytorch.org), then waveft_core"
    ) from e

from .adapter import Adapter, Layer
from .files.fileformat import FORMAT_VERSION
from .files.storage import WaveFTFileError
from .keys import DEFAULT_SCALING, DEFAULT_SEED, META_BASE_MODEL
from .wavelets import SUPPORTED_WAVELETS, UnknownWaveletError

__all__ = [
    "Adapter",
    "Layer",
    "load",
    "save",
    "load_peft",
    "save_peft",
    "WaveFTFileError",
    "UnknownWaveletError",
    "SUPPORTED_WAVELETS",
    "FORMAT_VERSION",
    "DEFAULT_SCALING",
    "DEFAULT_SEED",
    "__version__",
]


def _read_version() -> str:
    """The version lives in pyproject.toml only; an installed copy falls back to package metadata."""
    pyproject = Path(__file__).resolve().parent.parent / "pyproject.toml"
    try:
        for line in pyproject.read_text(encoding="utf-8").splitlines():
            if line.startswith("version"):
                return line.split("=", 1)[1].strip().strip('"')
    except OSError:
        pass
    try:
        from importlib.metadata import version

        return version("waveft")
    except Exception:
        return "0+unknown"


__version__ = _read_version()


def load(
    path,
    base: "Mapping | str | Path | Callable | None" = None,
    clip: str | None = None,
    adapter: str | None = None,
    overrides: Mapping | None = None,
    components=None,
    spelling=None,
) -> Adapter:
    """Load a WaveFT adapter: a native v1 file, or one that stores no positions or shapes: a PEFT folder (one
    adapter, several by name, or one sub-folder per pipeline component), a diffusers .safetensors file, or a
    kohya-style file from another trainer (lora-scripts-next; files/kohya.py). Those need
    `base`, the model it was trained on (a single-file checkpoint, a diffusers folder, a state dict or
    {name: shape}, or a function (peft_name, native_name) -> shape), to draw each layer's positions.

    clip: 'clip_l' / 'clip_g' for a text-encoder adapter that does not say which encoder it adapts.
    adapter: the adapter's name in a folder holding several. overrides: wavelet_family, scaling,
    random_loc_seed, use_idwt, for adapters saved without them (PEFT's defaults otherwise). components: only
    these pipeline components ('unet', 'text_encoder', 'text_encoder_2', 'transformer') of a multi-part one."""
    from .convert import peft_io
    from .files import fileformat, kinds, kohya

    spelling = spelling or peft_io.PYTHON
    path = Path(path)
    kind = kinds.kind_of(path)
    if kind == kinds.KOHYA:
        return kohya.load(*fileformat.read_tensors_and_metadata(path), path, base, spelling.base)
    if kind == kinds.NATIVE:
        return fileformat.read(path)
    return load_peft(
        path, base, clip=clip, adapter=adapter, overrides=overrides, components=components, spelling=spelling
    )


def load_peft(
    path,
    base,
    clip: str | None = None,
    adapter: str | None = None,
    overrides: Mapping | None = None,
    components=None,
    spelling=None,
) -> Adapter:
    """A PEFT folder or diffusers file (see `load`) resolved against `base`."""
    from .convert import peft_io, sources
    from .names import layouts

    spelling = spelling or peft_io.PYTHON
    source = sources.read_source(path, adapter, spelling.adapter)  # a bad path is reported before a missing base
    if components:
        source = sources.select_components(source, components)
    if base is None:
        raise WaveFTFileError(
            path,
            f"is a {source.kind}, which stores no coefficient positions",
            advice=f"Give the base model it was trained on ({spelling.base}) so each layer's shape is known",
        )
    shapes = layouts.base_shapes(base)
    lookup = shapes if shapes is not None else base
    adapter_obj = peft_io.import_source(
        source,
        lookup,
        clip=clip,
        encoders=shapes.encoders if shapes else (),
        overrides=dict(overrides or {}),
        spelling=spelling,
    )
    if shapes is not None and shapes.family:
        adapter_obj.metadata.setdefault(META_BASE_MODEL, shapes.family)
    return adapter_obj


def save(adapter: Adapter, path) -> Path:
    """Write a native v1 file atomically."""
    from .files import fileformat

    return fileformat.write(adapter, path)


def save_peft(adapter: Adapter, out_dir, base_model_name: str | None = None):
    """Write PEFT folder(s); refuses adapters whose positions PEFT could not reproduce."""
    from .convert import peft_io

    return peft_io.export_peft(adapter, out_dir, base_model_name)
