"""WaveFT in ComfyUI's own *Train LoRA* node (algorithm "WaveFT"), and the files its *Save LoRA Weights* writes:
FORMAT.md extension 4.

The stock node saves only an adapter's parameters (`<module>.<parameter>`), cast to the run's `lora_dtype` (bf16
or fp32), with no metadata; buffers and attributes are lost. So what a loader needs besides the coefficients is
fixed by rule, and the little that varies travels as a float parameter that every float dtype holds exactly:

- `<module>.spectrum` [p]: the coefficients, p = min(rank * (m + n), m * n) (the parameter count of a LoRA of
  that rank), trained exactly as Train WaveFT trains them (`TrainableLayer`);
- `<module>.waveft_layout` [k]: small integers 0..255 (exact in bf16, fp16 and fp32): `87, 1` (a marker and
  the layout version), the number of dimensions, each dimension of the weight's shape as 4 base-256 digits
  (most significant first), and a checksum of the positions as 4 more digits. It has no gradient, so the
  stock optimizers never change it.

Layout version 1 means the paper's recipe: wavelet db1, scaling 25, the inverse transform on, and PEFT's
positions for seed 777 (`peft_positions`, the rule Train WaveFT uses): a loader draws them again from the shape
and p, and refuses the layer when their checksum is not the stored one (a torch whose randperm draws another
permutation), rather than apply coefficients at the wrong places."""

from __future__ import annotations

import torch
from torch import nn

from ..adapter import Layer
from ..convert.peft_io import peft_positions
from ..delta import dense_delta, matrix_shape
from ..files.storage import DAMAGED, WaveFTFileError
from ..keys import (
    DEFAULT_SCALING,
    DEFAULT_SEED,
    DEFAULT_WAVELET,
    META_FORMAT_VERSION,
    META_IMPORT_NOTES,
    META_NETWORK_MODULE,
    META_SCALING,
    META_SEED,
    META_USE_IDWT,
    META_WAVELET,
    NETWORK_MODULE,
    SUFFIX_INDICES,
    SUFFIX_SHAPE,
    SUFFIX_SPECTRUM,
    SUFFIX_STOCK_LAYOUT,
)
from ..training.trainable import TrainableLayer

ALGORITHM = "WaveFT"  # the name in the stock node's `algorithm` list
SPECTRUM = "spectrum"  # the stock node's parameter name, not the native file's suffix
WAVELET, SCALING, SEED = DEFAULT_WAVELET, DEFAULT_SCALING, DEFAULT_SEED  # layout version 1: the paper's recipe
_MARKER, _VERSION, _DIGITS = 87, 1, 4
_CONV = {1: nn.functional.conv1d, 2: nn.functional.conv2d, 3: nn.functional.conv3d}


def coefficient_count(shape, rank: int) -> int:
    """p for a weight of `shape` at LoRA rank `rank`: as many coefficients as that LoRA has parameters."""
    m, n = matrix_shape(tuple(shape))
    return max(1, min(int(rank) * (m + n), m * n))


def positions_checksum(indices: torch.Tensor) -> int:
    """sum over k of (k + 1) * idx[k], modulo 2^32: tells one permutation's first p entries from another's."""
    weights = torch.arange(1, indices.numel() + 1, dtype=torch.int64)
    return int((indices.to(torch.int64) * weights).sum().remainder(2**32))


def _digits(value: int) -> list[int]:
    return [(int(value) >> (8 * i)) & 255 for i in reversed(range(_DIGITS))]


def encode_layout(shape, indices: torch.Tensor) -> torch.Tensor:
    shape = tuple(int(s) for s in shape)
    values = [_MARKER, _VERSION, len(shape)]
    for s in shape:
        values += _digits(s)
    values += _digits(positions_checksum(indices))
    return torch.tensor(values, dtype=torch.float32)


def decode_layout(layout: torch.Tensor, where: str, path="<memory>") -> tuple[tuple[int, ...], int]:
    """(weight shape, positions checksum) from a layout tensor; WaveFTFileError naming the key otherwise."""
    values = layout.detach().double().reshape(-1).tolist()
    if not values or any(v != int(v) or not 0 <= v <= 255 for v in values):
        raise WaveFTFileError(
            path,
            "is not a WaveFT layout (expected small whole numbers): was the file changed after training?",
            key=where,
            advice=DAMAGED,
        )
    values = [int(v) for v in values]
    if (
        values[:2] != [_MARKER, _VERSION]
        or len(values) < 3
        or len(values) != 3 + _DIGITS * (values[2] + 1)
        or values[2] < 2
    ):
        raise WaveFTFileError(
            path,
            f"layout {values[:3]} is not one this version reads (marker {_MARKER}, version {_VERSION})",
            key=where,
            advice="Update ComfyUI-WaveFT",
        )

    def number(i):
        return sum(d << (8 * (_DIGITS - 1 - j)) for j, d in enumerate(values[i : i + _DIGITS]))

    dims = [number(3 + _DIGITS * k) for k in range(values[2])]
    if any(d <= 0 for d in dims):
        raise WaveFTFileError(path, f"weight shape {dims} has a dimension below 1", key=where, advice=DAMAGED)
    return tuple(dims), number(3 + _DIGITS * values[2])


def is_stock_file(keys) -> bool:
    return any(k.endswith("." + SUFFIX_STOCK_LAYOUT) for k in keys)


def stock_layer(module: str, tensors: dict, path="<memory>") -> Layer:
    """The layer `module` of a stock file, its positions drawn again and checked; WaveFTFileError otherwise."""
    key_layout, key_spectrum = f"{module}.{SUFFIX_STOCK_LAYOUT}", f"{module}.{SPECTRUM}"
    if key_spectrum not in tensors:
        raise WaveFTFileError(
            path,
            "missing (a WaveFT layer of the stock Train LoRA node has a spectrum next to its layout)",
            key=key_spectrum,
            advice=DAMAGED,
        )
    shape, checksum = decode_layout(tensors[key_layout], key_layout, path)
    spectrum = tensors[key_spectrum]
    m, n = matrix_shape(shape)
    if spectrum.dim() != 1 or not 1 <= spectrum.numel() <= m * n or not spectrum.dtype.is_floating_point:
        raise WaveFTFileError(
            path,
            f"must be 1 to {m * n} float coefficients for weight shape {list(shape)}, got "
            f"{spectrum.dtype} {list(spectrum.shape)}",
            key=key_spectrum,
            advice=DAMAGED,
        )
    indices = peft_positions(shape, spectrum.numel(), SEED)
    if positions_checksum(indices) != checksum:
        raise WaveFTFileError(
            path,
            f"the positions this torch ({torch.__version__}) draws for seed {SEED} are not "
            "the ones the layer was trained with (their checksums differ), so its coefficients "
            "cannot be placed",
            key=key_layout,
            advice="Load it where it was trained (same torch version) and re-save it with "
            "'Save WaveFT' or 'python -m waveft_core convert', which store the positions",
        )
    return Layer(spectrum=spectrum, indices=indices.clone(), shape=shape, scaling=SCALING, wavelet=WAVELET)


def as_native(tensors: dict, metadata: dict, path="<memory>") -> tuple[dict, dict]:
    """A stock file's tensors and metadata in the native form (FORMAT.md): each layer's spectrum, positions and
    shape, the settings of layout version 1, and every other tensor (the node's full diffs of biases and norms,
    `.diff` and `.diff_b`) kept as it is."""
    modules = sorted(k[: -len(SUFFIX_STOCK_LAYOUT) - 1] for k in tensors if k.endswith("." + SUFFIX_STOCK_LAYOUT))
    claimed = {f"{m}.{s}" for m in modules for s in (SUFFIX_STOCK_LAYOUT, SPECTRUM)}
    out = {k: v for k, v in tensors.items() if k not in claimed}
    for module in modules:
        layer = stock_layer(module, tensors, path)
        out[f"{module}.{SUFFIX_SPECTRUM}"] = layer.spectrum
        out[f"{module}.{SUFFIX_INDICES}"] = layer.indices
        out[f"{module}.{SUFFIX_SHAPE}"] = torch.tensor(layer.shape, dtype=torch.int64)
    diffs = sum(1 for k in out if k.endswith((".diff", ".diff_b")))
    md = {
        META_FORMAT_VERSION: "1",
        META_WAVELET: WAVELET,
        META_SCALING: repr(float(SCALING)),
        META_USE_IDWT: "true",
        META_SEED: str(SEED),
        META_NETWORK_MODULE: NETWORK_MODULE,
        META_IMPORT_NOTES: f"ComfyUI's Train LoRA node, algorithm WaveFT (FORMAT.md extension 4): "
        f"{WAVELET}, scaling {SCALING:g}, PEFT positions for seed {SEED}; "
        f"{diffs} full diffs of biases and norms",
        **dict(metadata or {}),
    }
    return out, md


class StockTrainable(TrainableLayer):
    """The module the stock Train LoRA node trains for one weight: Train WaveFT's layer (same positions, ΔW and
    gradient) plus the layout parameter that lets a loader find the positions again. Also serves the host's
    bypass training (`h`) and memory accounting."""

    def __init__(self, shape, n_coefficients: int, spectrum: torch.Tensor | None = None):
        super().__init__(shape, n_coefficients, WAVELET, SCALING, SEED, True, spectrum)
        self.waveft_layout = nn.Parameter(encode_layout(self.shape, self.indices), requires_grad=False)

    @classmethod
    def create(cls, weight: torch.Tensor, rank: int) -> StockTrainable:
        """A fresh layer (coefficients zero, so training starts from the base model), on the weight's device."""
        return cls(tuple(weight.shape), coefficient_count(weight.shape, rank)).to(weight.device)

    @classmethod
    def from_layer(cls, layer: Layer, seed: int = SEED) -> StockTrainable:
        """Continue a layer: only one that follows layout version 1, or its file could not say where it is."""
        rule = peft_positions(layer.shape, layer.n_coefficients, SEED)
        if (layer.wavelet, float(layer.scaling), bool(layer.use_idwt)) != (
            WAVELET,
            float(SCALING),
            True,
        ) or not torch.equal(layer.indices.to(torch.int64), rule.to(torch.int64)):
            raise ValueError(
                f"WaveFT: this layer ({layer.wavelet}, scaling {layer.scaling:g}, own positions) cannot "
                f"be continued by the Train LoRA node, whose files hold {WAVELET}, scaling {SCALING:g} "
                f"and PEFT's positions for seed {SEED} only; continue it with Train WaveFT's "
                "resume_from instead"
            )
        return cls(layer.shape, layer.n_coefficients, spectrum=layer.spectrum)

    def h(self, x: torch.Tensor, base_out: torch.Tensor | None = None) -> torch.Tensor:
        """The bypass mode's addition to the layer's output: x through ΔW (differentiable). The host's bypass
        hook sets multiplier, is_conv, conv_dim and kw_dict on the module first."""
        factor = self.scaling * self.strength * float(getattr(self, "multiplier", 1.0))
        delta = dense_delta(self.plan(x.device, torch.float32), self.spectrum, factor, x.dtype)
        if getattr(self, "is_conv", False):
            conv = _CONV[int(getattr(self, "conv_dim", 0) or len(self.shape) - 2)]
            return conv(x, delta.reshape(self.shape), **dict(getattr(self, "kw_dict", {}) or {}))
        return nn.functional.linear(x, delta.reshape(self.shape))

    def g(self, y: torch.Tensor) -> torch.Tensor:
        return y

    def passive_memory_usage(self) -> int:
        """Bytes this layer keeps on its device: parameters and positions."""
        params = sum(p.nelement() * p.element_size() for p in self.parameters())
        return params + self.indices.nelement() * self.indices.element_size()

    def move_to(self, device) -> int:
        self.to(device)
        return self.passive_memory_usage()
