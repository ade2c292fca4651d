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

from .adapter import DEFAULT_SCALING, DEFAULT_SEED, Adapter, Layer
from .fileformat import FORMAT_VERSION, WaveFTFileError
from .wavelets import SUPPORTED_WAVELETS, UnknownWaveletError

__all__ = [
    "Adapter", "Layer", "load", "save", "load_peft", "save_peft", "WaveFTFileError", "UnknownWaveletError",
    "SUPPORTED_WAVELETS", "FORMAT_VERSION", "DEFAULT_SCALING", "DEFAULT_SEED", "__version__",
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

        return version("comfyui-waveft")
    except Exception:
        return "0+unknown"


__version__ = _read_version()


def _shape_lookup(base):
    from .peft_io import shapes_from_file, shapes_from_state_dict

    if callable(base):
        return base
    if isinstance(base, Mapping):
        return shapes_from_state_dict(base)
    return shapes_from_file(base)


def load(path, base: "Mapping | str | Path | Callable | None" = None, clip: str | None = None) -> Adapter:
    """Load a native v1 file, or a PEFT WaveFT folder. PEFT stores no positions, so a PEFT folder needs
    `base`: the base model's state dict (or {name: shape}), a checkpoint file or folder, or a function
    (peft_name, native_name) -> shape."""
    from . import fileformat, peft_io

    path = Path(path)
    if path.is_dir() or path.name == peft_io.CONFIG_NAME:
        return load_peft(path, base, clip=clip)
    return fileformat.read(path)


def load_peft(path, base, clip: str | None = None) -> Adapter:
    from . import peft_io

    if base is None:
        raise WaveFTFileError(
            path, "is a PEFT adapter, which stores no coefficient positions",
            advice="Pass base=<the base model's state dict or checkpoint> so each layer's shape is known",
        )
    return peft_io.import_peft(path, _shape_lookup(base), clip=clip)


def save(adapter: Adapter, path) -> Path:
    """Write a native v1 file atomically."""
    from . import fileformat

    return fileformat.write(adapter, path)


def save_peft(adapter: Adapter, out_dir, base_model_name: str | None = None):
    """Write PEFT folder(s); refuses adapters whose positions PEFT could not reproduce."""
    from . import peft_io

    return peft_io.export_peft(adapter, out_dir, base_model_name)
