"""The native WaveFT file, format v1 (FORMAT.md section 3): strict reading, atomic writing (storage.py)."""
from __future__ import annotations

import math
from collections import Counter
from pathlib import Path

import torch

from .adapter import Adapter, Layer
from .delta import index_dtype, matrix_shape
from .metadata import content_hashes
from .names import family_of
from .storage import DAMAGED as _DAMAGED
from .storage import WaveFTFileError, atomic_write, read_header
from .wavelets import UnknownWaveletError, check_wavelet

FORMAT_VERSION = 1
SUFFIXES = ("waveft_spectrum", "waveft_indices", "waveft_shape", "waveft_scaling")
SPECTRUM_DTYPES = {torch.float32, torch.float16, torch.bfloat16}
INDEX_DTYPES = {torch.int32, torch.int64}


def read_tensors_and_metadata(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of a safetensors file (on the CPU) and its metadata, with errors that name the file."""
    from safetensors import safe_open

    path = Path(path)
    read_header(path)  # refuses pickles, non-safetensors and truncated files by name, before safetensors sees them
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            metadata = dict(f.metadata() or {})
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for every kind of damage
        raise WaveFTFileError(path, f"cannot be read as safetensors ({e})", advice=_DAMAGED) from e
    return tensors, metadata


def _parse_bool(path, key: str, value: str) -> bool:
    v = value.strip().lower()
    if v in ("true", "1", "yes"):
        return True
    if v in ("false", "0", "no"):
        return False
    raise WaveFTFileError(path, f"'{value}' is not true or false", key=key, advice=_DAMAGED)


def _parse_float(path, key: str, value: str) -> float:
    try:
        x = float(value)
    except ValueError:
        raise WaveFTFileError(path, f"'{value}' is not a number", key=key, advice=_DAMAGED) from None
    if not math.isfinite(x):
        raise WaveFTFileError(path, f"{value} is not a finite number", key=key, advice=_DAMAGED)
    return x


def looks_like_waveft(keys) -> bool:
    return any(k.endswith((".waveft_spectrum", ".waveft_layout")) for k in keys)  # .waveft_layout: extension 4


def adapter_from_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path="<memory>") -> Adapter:
    """Validate native v1 tensors and metadata (every rule of FORMAT.md section 3) into an Adapter."""
    from .stock import as_native, is_stock_file  # (stock imports the trainer, which needs this module)

    if is_stock_file(tensors):  # saved by ComfyUI's Train LoRA node: the same layers, in the native form
        tensors, metadata = as_native(tensors, metadata, path)
    if not looks_like_waveft(tensors):
        raise WaveFTFileError(
            path, "holds no '<module>.waveft_spectrum' tensors, so it is not a WaveFT adapter",
            advice="If it is a LoRA, load it with a LoRA loader",
        )
    version_text = metadata.get("waveft.format_version")
    if version_text is None:
        if not any(k.endswith(".waveft_indices") for k in tensors):
            raise WaveFTFileError(
                path, "has WaveFT spectra but no stored positions and no 'waveft.format_version': this is a "
                "PEFT adapter_model.safetensors",
                advice="Load the PEFT folder (with its adapter_config.json) instead, or convert it with "
                "'python -m waveft_core convert <folder> <out.safetensors> --base <checkpoint>'",
            )
        raise WaveFTFileError(path, "missing", key="waveft.format_version", advice=_DAMAGED)
    try:
        version = int(version_text)
    except ValueError:
        raise WaveFTFileError(path, f"'{version_text}' is not a version number", key="waveft.format_version") from None
    if version > FORMAT_VERSION:
        raise WaveFTFileError(
            path, f"format version {version} is newer than this reader knows ({FORMAT_VERSION})",
            key="waveft.format_version", advice="Update ComfyUI-WaveFT",
        )
    if version < 1:
        raise WaveFTFileError(path, f"format version {version} does not exist", key="waveft.format_version")
    for key in ("waveft.wavelet", "waveft.scaling"):
        if key not in metadata:
            raise WaveFTFileError(path, "missing", key=key, advice=_DAMAGED)
    module_type = metadata.get("ss_network_module")
    if module_type is not None and module_type != "waveft":
        raise WaveFTFileError(
            path, f"ss_network_module is '{module_type}', not 'waveft'", key="ss_network_module", advice=_DAMAGED
        )
    wavelet = metadata["waveft.wavelet"]
    try:
        check_wavelet(wavelet)
    except UnknownWaveletError as e:
        raise WaveFTFileError(path, str(e), key="waveft.wavelet", advice="Update ComfyUI-WaveFT or fix the file") from None
    scaling = _parse_float(path, "waveft.scaling", metadata["waveft.scaling"])
    use_idwt = _parse_bool(path, "waveft.use_idwt", metadata.get("waveft.use_idwt", "true"))

    modules: dict[str, dict[str, torch.Tensor]] = {}
    extra: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        module, _, suffix = key.rpartition(".")
        if module and suffix in SUFFIXES:
            modules.setdefault(module, {})[suffix] = t
        else:
            extra[key] = t  # unknown keys are kept and ignored

    layers: dict[str, Layer] = {}
    for module in sorted(modules):
        parts = modules[module]
        for suffix in ("waveft_spectrum", "waveft_indices", "waveft_shape"):
            if suffix not in parts:
                raise WaveFTFileError(path, "missing (every adapted layer needs spectrum, indices and shape)",
                                      key=f"{module}.{suffix}", advice=_DAMAGED)
        layers[module] = _validate_layer(path, module, parts, scaling, wavelet, use_idwt)
    return Adapter(layers=layers, metadata=dict(metadata), source=str(path), extra_tensors=extra)


def _validate_layer(path, module, parts, scaling, wavelet, use_idwt) -> Layer:
    spectrum, indices, shape_t = parts["waveft_spectrum"], parts["waveft_indices"], parts["waveft_shape"]
    k_spec, k_idx, k_shape = (f"{module}.{s}" for s in ("waveft_spectrum", "waveft_indices", "waveft_shape"))
    if spectrum.dtype not in SPECTRUM_DTYPES or spectrum.dim() != 1:
        raise WaveFTFileError(path, f"must be a 1-D float32/float16/bfloat16 tensor, got {spectrum.dtype} "
                              f"of shape {list(spectrum.shape)}", key=k_spec, advice=_DAMAGED)
    if indices.dtype not in INDEX_DTYPES or indices.dim() != 1:
        raise WaveFTFileError(path, f"must be a 1-D int32/int64 tensor, got {indices.dtype} of shape "
                              f"{list(indices.shape)}", key=k_idx, advice=_DAMAGED)
    if shape_t.dtype.is_floating_point or shape_t.dtype == torch.bool or shape_t.dim() != 1 or shape_t.numel() < 2:
        raise WaveFTFileError(path, f"must be a 1-D int64 tensor with the weight shape (2 or more entries), got "
                              f"{shape_t.dtype} {shape_t.tolist()}", key=k_shape, advice=_DAMAGED)
    shape = tuple(int(s) for s in shape_t.tolist())
    if any(s <= 0 for s in shape):
        raise WaveFTFileError(path, f"weight shape {list(shape)} has a dimension below 1", key=k_shape,
                              advice=_DAMAGED)
    if spectrum.numel() != indices.numel():
        raise WaveFTFileError(path, f"{spectrum.numel()} coefficients but {indices.numel()} positions in "
                              f"'{k_idx}'; the two must have the same length", key=k_spec, advice=_DAMAGED)
    if not torch.isfinite(spectrum).all():
        bad = int((~torch.isfinite(spectrum)).sum())
        raise WaveFTFileError(path, f"{bad} coefficient(s) are NaN or infinite", key=k_spec,
                              advice="The training diverged; use an earlier checkpoint or a lower learning rate")
    m, n = matrix_shape(shape)
    if indices.numel():
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= m * n:
            bad = lo if lo < 0 else hi
            raise WaveFTFileError(path, f"position {bad} is outside [0, {m * n}) for weight shape {list(shape)}",
                                  key=k_idx, advice=_DAMAGED)
        if index_dtype(m * n) == torch.int64 and indices.dtype == torch.int32:
            raise WaveFTFileError(path, "int32 positions cannot address a weight of 2^31 entries or more",
                                  key=k_idx, advice=_DAMAGED)
        s = torch.sort(indices.to(torch.int64)).values
        dup = torch.nonzero(s[1:] == s[:-1])
        if dup.numel():
            raise WaveFTFileError(path, f"position {int(s[int(dup[0])])} appears more than once (positions must be "
                                  "unique)", key=k_idx, advice=_DAMAGED)
    layer_scaling = scaling
    if "waveft_scaling" in parts:
        t = parts["waveft_scaling"]
        k_sc = f"{module}.waveft_scaling"
        if not t.dtype.is_floating_point or t.numel() != 1:
            raise WaveFTFileError(path, f"must be a float scalar, got {t.dtype} of shape {list(t.shape)}",
                                  key=k_sc, advice=_DAMAGED)
        layer_scaling = float(t.reshape(()))
        if not math.isfinite(layer_scaling):
            raise WaveFTFileError(path, f"{layer_scaling} is not finite", key=k_sc, advice=_DAMAGED)
    return Layer(spectrum=spectrum, indices=indices, shape=shape, scaling=layer_scaling, wavelet=wavelet,
                 use_idwt=use_idwt)


def read(path) -> Adapter:
    """Read and validate a native v1 file."""
    tensors, metadata = read_tensors_and_metadata(path)
    return adapter_from_tensors(tensors, metadata, path)


def _common(values, what: str):
    values = list(values)
    if len(set(values)) > 1:
        raise ValueError(f"the native format stores one {what} per file, but the layers use {sorted(set(values))}")
    return values[0]


def to_tensors_and_metadata(adapter: Adapter) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not adapter.layers:
        raise ValueError("the adapter has no layers; nothing to save")
    wavelet = _common((layer.wavelet for layer in adapter.layers.values()), "wavelet")
    use_idwt = _common((layer.use_idwt for layer in adapter.layers.values()), "use_idwt setting")
    # The most common layer scaling becomes the file's default; others get a per-layer tensor.
    scaling = Counter(float(layer.scaling) for layer in adapter.layers.values()).most_common(1)[0][0]
    tensors: dict[str, torch.Tensor] = {}
    for name, layer in adapter.layers.items():
        m, n = layer.matrix_shape
        spectrum = layer.spectrum.detach().to("cpu")
        if spectrum.dtype not in SPECTRUM_DTYPES:
            spectrum = spectrum.to(torch.float32)
        if not torch.isfinite(spectrum).all():
            raise ValueError(f"layer {name}: the spectrum has NaN or infinite values; refusing to save it")
        # Copies: layers may share one positions tensor (PEFT's rule gives equal-size layers the same
        # positions), and safetensors refuses tensors that share memory.
        tensors[f"{name}.waveft_spectrum"] = spectrum.contiguous().clone()
        tensors[f"{name}.waveft_indices"] = layer.indices.detach().to("cpu", index_dtype(m * n)).contiguous().clone()
        tensors[f"{name}.waveft_shape"] = torch.tensor(layer.shape, dtype=torch.int64)
        if float(layer.scaling) != scaling:
            tensors[f"{name}.waveft_scaling"] = torch.tensor(float(layer.scaling), dtype=torch.float32)
    # Mirrors of the settings the math needs, for hosts that hand an adapter the tensors without the
    # metadata (ComfyUI's stock LoRA loader). A backward-compatible extension: v1 readers ignore them.
    tensors["waveft.wavelet"] = torch.tensor(list(wavelet.encode("ascii")), dtype=torch.uint8)
    tensors["waveft.scaling"] = torch.tensor(scaling, dtype=torch.float64)
    tensors["waveft.use_idwt"] = torch.tensor(1 if use_idwt else 0, dtype=torch.uint8)
    for key, t in adapter.extra_tensors.items():
        tensors.setdefault(key, t.detach().to("cpu").contiguous())
    metadata = {str(k): str(v) for k, v in adapter.metadata.items()}
    metadata.update({
        "waveft.format_version": str(FORMAT_VERSION),
        "waveft.wavelet": wavelet,
        "waveft.scaling": repr(scaling),
        "waveft.use_idwt": "true" if use_idwt else "false",
        "ss_network_module": "waveft",
        "modelspec.sai_model_spec": "1.0.0",
    })
    family = family_of(metadata)
    if family and "modelspec.architecture" not in metadata:
        metadata["modelspec.architecture"] = f"{family.architecture}/waveft"
    # Always recomputed: hashes carried over from a source file would name other bytes.
    metadata.update(content_hashes(tensors, metadata))
    return tensors, metadata


def write(adapter: Adapter, path) -> Path:
    """Write a native v1 file atomically (temporary file in the same folder, then rename)."""
    from safetensors.torch import save_file

    tensors, metadata = to_tensors_and_metadata(adapter)
    return atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))

