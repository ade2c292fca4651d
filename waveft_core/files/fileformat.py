"""The native WaveFT file, format v1 (FORMAT.md section 3): strict reading, atomic writing (storage.py)."""

from __future__ import annotations

import math
import os
import sys
from collections import Counter
from pathlib import Path

import torch

from ..adapter import Adapter, Layer
from ..delta import index_dtype, matrix_shape
from ..keys import (
    META_ARCHITECTURE,
    META_FORMAT_VERSION,
    META_NETWORK_MODULE,
    META_SCALING,
    META_SPEC_VERSION,
    META_USE_IDWT,
    META_WAVELET,
    NATIVE_SUFFIXES,
    NETWORK_MODULE,
    SPEC_VERSION,
    SUFFIX_INDICES,
    SUFFIX_SCALING,
    SUFFIX_SHAPE,
    SUFFIX_SPECTRUM,
    SUFFIX_STOCK_LAYOUT,
    SUFFIX_USE_IDWT,
    SUFFIX_WAVELET,
)
from ..names.families import family_of
from ..wavelets import UnknownWaveletError, check_wavelet
from .kinds import DESCRIPTIONS, KOHYA, file_kind
from .limits import MAX_WEIGHT_ENTRIES, check_delta_range, check_setting
from .metadata import content_hashes, hashed_file
from .storage import DAMAGED as _DAMAGED
from .storage import WaveFTFileError, atomic_write, read_header

FORMAT_VERSION = 2  # 2 = 1 + per-layer wavelet/use_idwt tensors (FORMAT.md 3.2); written only when layers differ
SPECTRUM_DTYPES = {torch.float32, torch.float16, torch.bfloat16}
INDEX_DTYPES = {torch.int32, torch.int64}


# safetensors dtype names -> torch dtypes (the ones torch can hold; others are refused by name).
_TORCH_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
    **{
        name: getattr(torch, attr)
        for name, attr in (
            ("F8_E4M3", "float8_e4m3fn"),
            ("F8_E5M2", "float8_e5m2"),
            ("U16", "uint16"),
            ("U32", "uint32"),
            ("U64", "uint64"),
        )
        if hasattr(torch, attr)
    },
}


def read_tensors_and_metadata(path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Every tensor of a safetensors file (on the CPU) and its metadata, with errors that name the file.

    The tensors are read into memory of their own with plain reads, never mapped: a mapped tensor follows the
    file, so rewriting the file in place (a re-download, a save over it) while an adapter is loaded would
    change weights already loaded, and shrinking it would kill the process (SIGBUS) at the next access."""
    path = Path(path)
    header = read_header(path)  # refuses pickles, non-safetensors and truncated files by name
    tensors = {}
    try:
        with open(path, "rb") as f:
            data_size = os.fstat(f.fileno()).st_size - header.data_start
            for key, info in header.tensors.items():
                tensors[key] = _read_tensor(path, f, header.data_start, data_size, key, info)
    except OSError as e:
        raise WaveFTFileError(path, f"cannot be read ({e})") from None
    return tensors, dict(header.metadata)


def _read_tensor(path, f, data_start: int, data_size: int, key: str, info: dict) -> torch.Tensor:
    dtype = _TORCH_DTYPES.get(info["dtype"])
    if dtype is None:
        raise WaveFTFileError(path, f"has the unknown tensor type '{info['dtype']}'", key=key, advice=_DAMAGED)
    try:
        shape = [int(s) for s in info["shape"]]
        begin, end = (int(o) for o in info["data_offsets"])
    except (KeyError, TypeError, ValueError):
        raise WaveFTFileError(path, "has no valid shape or data offsets", key=key, advice=_DAMAGED) from None
    count = math.prod(shape)
    if min(shape, default=0) < 0 or not 0 <= begin <= end <= data_size or end - begin != count * dtype.itemsize:
        raise WaveFTFileError(
            path,
            f"claims {shape} {info['dtype']} at bytes {begin}..{end} of {data_size}: the file is truncated or damaged",
            key=key,
            advice=_DAMAGED,
        )
    buffer = bytearray(end - begin)
    f.seek(data_start + begin)
    if f.readinto(buffer) != len(buffer):
        raise WaveFTFileError(
            path,
            "ended while being read (was it rewritten meanwhile?)",
            key=key,
            advice="Wait until the copy or download is complete, then queue again",
        )
    if not buffer:
        return torch.empty(shape, dtype=dtype)
    tensor = torch.frombuffer(buffer, dtype=dtype).reshape(shape)
    return tensor if sys.byteorder == "little" else torch.from_numpy(tensor.numpy().byteswap())


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
    return check_setting(x, path, key)


def looks_like_waveft(keys) -> bool:
    return any(k.endswith(_WAVEFT_ENDINGS) for k in keys)


_WAVEFT_ENDINGS = ("." + SUFFIX_SPECTRUM, "." + SUFFIX_STOCK_LAYOUT)  # the layout: extension 4


def adapter_from_tensors(tensors: dict[str, torch.Tensor], metadata: dict[str, str], path="<memory>") -> Adapter:
    """Validate native v1 tensors and metadata (every rule of FORMAT.md section 3) into an Adapter."""
    from ..hosts.stock import as_native, is_stock_file  # (stock imports the trainer, which needs this module)

    if is_stock_file(tensors):  # saved by ComfyUI's Train LoRA node: the same layers, in the native form
        tensors, metadata = as_native(tensors, metadata, path)
    if not looks_like_waveft(tensors):
        raise WaveFTFileError(
            path,
            f"holds no '<module>.{SUFFIX_SPECTRUM}' tensors, so it is not a WaveFT adapter",
            advice="If it is a LoRA, load it with a LoRA loader",
        )
    version_text = metadata.get(META_FORMAT_VERSION)
    if version_text is None and file_kind(tensors, metadata) == KOHYA:  # not damaged: another trainer's layout
        raise WaveFTFileError(
            path,
            f"is {DESCRIPTIONS[KOHYA]}, not a native file: it stores no weight shapes",
            advice="Load it with 'Load WaveFT' on the model it was trained on, or convert it with "
            "'python -m waveft_core convert <file> <out.safetensors> --base <checkpoint>'",
        )
    if version_text is None:
        if not any(k.endswith("." + SUFFIX_INDICES) for k in tensors):
            raise WaveFTFileError(
                path,
                f"has WaveFT spectra but no stored positions and no '{META_FORMAT_VERSION}': this is a "
                "PEFT adapter_model.safetensors",
                advice="Load the PEFT folder (with its adapter_config.json) instead, or convert it with "
                "'python -m waveft_core convert <folder> <out.safetensors> --base <checkpoint>'",
            )
        raise WaveFTFileError(path, "missing", key=META_FORMAT_VERSION, advice=_DAMAGED)
    try:
        version = int(version_text)
    except ValueError:
        raise WaveFTFileError(path, f"'{version_text}' is not a version number", key=META_FORMAT_VERSION) from None
    if version > FORMAT_VERSION:
        raise WaveFTFileError(
            path,
            f"format version {version} is newer than this reader knows ({FORMAT_VERSION})",
            key=META_FORMAT_VERSION,
            advice="Update ComfyUI-WaveFT",
        )
    if version < 1:
        raise WaveFTFileError(path, f"format version {version} does not exist", key=META_FORMAT_VERSION)
    for key in (META_WAVELET, META_SCALING):
        if key not in metadata:
            raise WaveFTFileError(path, "missing", key=key, advice=_DAMAGED)
    module_type = metadata.get(META_NETWORK_MODULE)
    if module_type is not None and module_type != NETWORK_MODULE:
        raise WaveFTFileError(
            path,
            f"{META_NETWORK_MODULE} is '{module_type}', not '{NETWORK_MODULE}'",
            key=META_NETWORK_MODULE,
            advice=_DAMAGED,
        )
    wavelet = metadata[META_WAVELET]
    try:
        check_wavelet(wavelet)
    except UnknownWaveletError as e:
        raise WaveFTFileError(path, str(e), key=META_WAVELET, advice="Update ComfyUI-WaveFT or fix the file") from None
    scaling = _parse_float(path, META_SCALING, metadata[META_SCALING])
    use_idwt = _parse_bool(path, META_USE_IDWT, metadata.get(META_USE_IDWT, "true"))
    _check_mirrors(path, tensors, wavelet, scaling, use_idwt)

    modules: dict[str, dict[str, torch.Tensor]] = {}
    extra: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        module, _, suffix = key.rpartition(".")
        if module and suffix in NATIVE_SUFFIXES:
            modules.setdefault(module, {})[suffix] = t
        else:
            extra[key] = t  # unknown keys are kept and ignored

    layers: dict[str, Layer] = {}
    for module in sorted(modules):
        parts = modules[module]
        for suffix in (SUFFIX_SPECTRUM, SUFFIX_INDICES, SUFFIX_SHAPE):
            if suffix not in parts:
                raise WaveFTFileError(
                    path,
                    "missing (every adapted layer needs spectrum, indices and shape)",
                    key=f"{module}.{suffix}",
                    advice=_DAMAGED,
                )
        layers[module] = _validate_layer(path, module, parts, scaling, wavelet, use_idwt)
    return Adapter(layers=layers, metadata=dict(metadata), source=str(path), extra_tensors=extra)


def _check_mirrors(path, tensors, wavelet: str, scaling: float, use_idwt: bool) -> None:
    """The settings tensors mirrored for metadata-blind hosts (FORMAT.md extension 1) must say what the
    metadata says: ComfyUI's stock LoRA loader applies the mirrors, every other reader the metadata (the
    reference), so a disagreement would give one file two different weight changes."""
    said = {}
    try:
        if META_SCALING in tensors:
            said[META_SCALING] = (float(tensors[META_SCALING].reshape(-1)[0]), scaling)
        if META_WAVELET in tensors:
            said[META_WAVELET] = (
                bytes(tensors[META_WAVELET].to(torch.uint8).tolist()).decode("ascii"),
                wavelet,
            )
        if META_USE_IDWT in tensors:
            said[META_USE_IDWT] = (bool(tensors[META_USE_IDWT].reshape(-1)[0]), use_idwt)
    except (RuntimeError, IndexError, UnicodeDecodeError, ValueError):
        raise WaveFTFileError(
            path,
            "is not a valid mirror of the metadata setting",
            key=next(k for k in (META_SCALING, META_WAVELET, META_USE_IDWT) if k in tensors and k not in said),
            advice=_DAMAGED,
        ) from None
    for key, (mirror, reference) in said.items():
        same = math.isclose(mirror, reference, rel_tol=1e-6) if key == META_SCALING else mirror == reference
        if not same:
            raise WaveFTFileError(
                path,
                f"the tensor says {mirror!r} but the metadata says {reference!r} (ComfyUI's "
                "stock LoRA loader would apply the one, every other reader the other)",
                key=key,
                advice="The file was edited by hand or is damaged; write it again with a WaveFT "
                "tool (the metadata is the reference)",
            )


def _validate_layer(path, module, parts, scaling, wavelet, use_idwt) -> Layer:
    spectrum, indices, shape_t = parts[SUFFIX_SPECTRUM], parts[SUFFIX_INDICES], parts[SUFFIX_SHAPE]
    k_spec, k_idx, k_shape = (f"{module}.{s}" for s in (SUFFIX_SPECTRUM, SUFFIX_INDICES, SUFFIX_SHAPE))
    if spectrum.dtype not in SPECTRUM_DTYPES or spectrum.dim() != 1:
        raise WaveFTFileError(
            path,
            f"must be a 1-D float32/float16/bfloat16 tensor, got {spectrum.dtype} of shape {list(spectrum.shape)}",
            key=k_spec,
            advice=_DAMAGED,
        )
    if indices.dtype not in INDEX_DTYPES or indices.dim() != 1:
        raise WaveFTFileError(
            path,
            f"must be a 1-D int32/int64 tensor, got {indices.dtype} of shape {list(indices.shape)}",
            key=k_idx,
            advice=_DAMAGED,
        )
    if shape_t.dtype.is_floating_point or shape_t.dtype == torch.bool or shape_t.dim() != 1 or shape_t.numel() < 2:
        raise WaveFTFileError(
            path,
            f"must be a 1-D int64 tensor with the weight shape (2 or more entries), got "
            f"{shape_t.dtype} {shape_t.tolist()}",
            key=k_shape,
            advice=_DAMAGED,
        )
    shape = tuple(int(s) for s in shape_t.tolist())
    if any(s <= 0 for s in shape):
        raise WaveFTFileError(path, f"weight shape {list(shape)} has a dimension below 1", key=k_shape, advice=_DAMAGED)
    if math.prod(shape) > MAX_WEIGHT_ENTRIES:
        raise WaveFTFileError(
            path,
            f"weight shape {list(shape)} has {math.prod(shape):,} entries, more than any model's weight",
            key=k_shape,
            advice=_DAMAGED,
        )
    if spectrum.numel() != indices.numel():
        raise WaveFTFileError(
            path,
            f"{spectrum.numel()} coefficients but {indices.numel()} positions in "
            f"'{k_idx}'; the two must have the same length",
            key=k_spec,
            advice=_DAMAGED,
        )
    if not torch.isfinite(spectrum).all():
        bad = int((~torch.isfinite(spectrum)).sum())
        raise WaveFTFileError(
            path,
            f"{bad} coefficient(s) are NaN or infinite",
            key=k_spec,
            advice="The training diverged; use an earlier checkpoint or a lower learning rate",
        )
    m, n = matrix_shape(shape)
    if indices.numel():
        lo, hi = int(indices.min()), int(indices.max())
        if lo < 0 or hi >= m * n:
            bad = lo if lo < 0 else hi
            raise WaveFTFileError(
                path,
                f"position {bad} is outside [0, {m * n}) for weight shape {list(shape)}",
                key=k_idx,
                advice=_DAMAGED,
            )
        if index_dtype(m * n) == torch.int64 and indices.dtype == torch.int32:
            raise WaveFTFileError(
                path, "int32 positions cannot address a weight of 2^31 entries or more", key=k_idx, advice=_DAMAGED
            )
        s = torch.sort(indices.to(torch.int64)).values
        dup = torch.nonzero(s[1:] == s[:-1])
        if dup.numel():
            raise WaveFTFileError(
                path,
                f"position {int(s[int(dup[0])])} appears more than once (positions must be unique)",
                key=k_idx,
                advice=_DAMAGED,
            )
    wavelet, use_idwt = _layer_settings(path, module, parts, wavelet, use_idwt)
    layer_scaling = scaling
    if SUFFIX_SCALING in parts:
        t = parts[SUFFIX_SCALING]
        k_sc = f"{module}.{SUFFIX_SCALING}"
        if not t.dtype.is_floating_point or t.numel() != 1:
            raise WaveFTFileError(
                path, f"must be a float scalar, got {t.dtype} of shape {list(t.shape)}", key=k_sc, advice=_DAMAGED
            )
        layer_scaling = check_setting(float(t.reshape(()).double()), path, k_sc)
    layer = Layer(
        spectrum=spectrum, indices=indices, shape=shape, scaling=layer_scaling, wavelet=wavelet, use_idwt=use_idwt
    )
    check_delta_range(layer, path, k_spec, k_sc if SUFFIX_SCALING in parts else META_SCALING)
    return layer


def _layer_settings(path, module, parts, wavelet: str, use_idwt: bool) -> tuple[str, bool]:
    """A layer's own wavelet and use_idwt (format 2) over the file's defaults."""
    if SUFFIX_WAVELET in parts:
        t, key = parts[SUFFIX_WAVELET], f"{module}.{SUFFIX_WAVELET}"
        if t.dtype != torch.uint8 or t.dim() != 1:
            raise WaveFTFileError(
                path, f"must be a 1-D uint8 tensor (the name in ASCII), got {t.dtype}", key=key, advice=_DAMAGED
            )
        wavelet = bytes(t.tolist()).decode("ascii", "replace")
        try:
            check_wavelet(wavelet)
        except UnknownWaveletError as e:
            raise WaveFTFileError(path, str(e), key=key, advice="Update ComfyUI-WaveFT or fix the file") from None
    if SUFFIX_USE_IDWT in parts:
        t, key = parts[SUFFIX_USE_IDWT], f"{module}.{SUFFIX_USE_IDWT}"
        if t.numel() != 1 or t.dtype.is_floating_point or int(t.reshape(())) not in (0, 1):
            raise WaveFTFileError(path, "must be a 0 or 1 integer scalar", key=key, advice=_DAMAGED)
        use_idwt = bool(int(t.reshape(())))
    return wavelet, use_idwt


def read(path) -> Adapter:
    """Read and validate a native v1 file."""
    tensors, metadata = read_tensors_and_metadata(path)
    return adapter_from_tensors(tensors, metadata, path)


def _most_common(values):
    return Counter(values).most_common(1)[0][0]


def _unhashed(adapter: Adapter) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The file's tensors and metadata, without the content hashes."""
    if not adapter.layers:
        raise ValueError("the adapter has no layers; nothing to save")
    # The most common wavelet and use_idwt are the file's defaults; a layer that differs carries its own (format 2,
    # so a reader that knows only format 1 refuses the file instead of applying those layers with the default).
    wavelet = _most_common(layer.wavelet for layer in adapter.layers.values())
    use_idwt = _most_common(bool(layer.use_idwt) for layer in adapter.layers.values())
    version = 1
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
        tensors[f"{name}.{SUFFIX_SPECTRUM}"] = spectrum.contiguous().clone()
        indices = layer.indices.detach().to("cpu", index_dtype(m * n)).contiguous().clone()
        tensors[f"{name}.{SUFFIX_INDICES}"] = indices
        tensors[f"{name}.{SUFFIX_SHAPE}"] = torch.tensor(layer.shape, dtype=torch.int64)
        if float(layer.scaling) != scaling:
            tensors[f"{name}.{SUFFIX_SCALING}"] = torch.tensor(float(layer.scaling), dtype=torch.float32)
        if layer.wavelet != wavelet:
            tensors[f"{name}.{SUFFIX_WAVELET}"] = torch.tensor(list(layer.wavelet.encode("ascii")), dtype=torch.uint8)
            version = 2
        if bool(layer.use_idwt) != use_idwt:
            tensors[f"{name}.{SUFFIX_USE_IDWT}"] = torch.tensor(int(bool(layer.use_idwt)), dtype=torch.uint8)
            version = 2
    # Mirrors of the settings the math needs, for hosts that hand an adapter the tensors without the
    # metadata (ComfyUI's stock LoRA loader). A backward-compatible extension: v1 readers ignore them.
    tensors[META_WAVELET] = torch.tensor(list(wavelet.encode("ascii")), dtype=torch.uint8)
    tensors[META_SCALING] = torch.tensor(scaling, dtype=torch.float64)
    tensors[META_USE_IDWT] = torch.tensor(1 if use_idwt else 0, dtype=torch.uint8)
    for key, t in adapter.extra_tensors.items():
        tensors.setdefault(key, t.detach().to("cpu").contiguous())
    metadata = {str(k): str(v) for k, v in adapter.metadata.items()}
    metadata.update(
        {
            META_FORMAT_VERSION: str(version),
            META_WAVELET: wavelet,
            META_SCALING: repr(scaling),
            META_USE_IDWT: "true" if use_idwt else "false",
            META_NETWORK_MODULE: NETWORK_MODULE,
            META_SPEC_VERSION: SPEC_VERSION,
        }
    )
    family = family_of(metadata)
    if family and META_ARCHITECTURE not in metadata:
        metadata[META_ARCHITECTURE] = f"{family.architecture}/waveft"
    return tensors, metadata


def to_tensors_and_metadata(adapter: Adapter) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The tensors and metadata of the file `write` writes, content hashes included."""
    tensors, metadata = _unhashed(adapter)
    # Always recomputed: hashes carried over from a source file would name other bytes.
    metadata.update(content_hashes(tensors, metadata))
    return tensors, metadata


def write(adapter: Adapter, path) -> Path:
    """Write a native v1 file atomically (temporary file in the same folder, then rename). The tensors are
    serialized once, for the content hashes and the file both (metadata.hashed_file)."""
    _, write_to = hashed_file(*_unhashed(adapter))
    return atomic_write(path, write_to)
