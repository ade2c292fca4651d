"""In-memory WaveFT adapter: a set of layers, each a sparse set of wavelet coefficients."""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from .delta import DeltaPlan, PlanCache, add_into, compute_dtype, dense_delta, matrix_shape
from .keys import (
    DEFAULT_SCALING,
    DEFAULT_SEED,  # noqa: F401 (re-exported: the package and older importers read it here)
    DEFAULT_USE_IDWT,
    DEFAULT_WAVELET,
    META_ARCHITECTURE,
    META_BASE_MODEL,
    META_DATE,
    META_DESCRIPTION,
    META_IMPORT_NOTES,
    META_SCALING,
    META_TITLE,
    META_TRIGGER_PHRASE,
    META_USE_IDWT,
    META_WAVELET,
)
from .wavelets import check_wavelet


@dataclass(eq=False)
class Layer:
    """One adapted weight. ΔW = scaling * crop(idwt2(coefficients scattered at `indices`)), FORMAT.md 1.

    Treat a layer as immutable once it is in use: ComfyUI clones share it between models."""

    spectrum: torch.Tensor  # float [p]: coefficient values
    indices: torch.Tensor  # int [p]: flat positions on the unpadded m x n grid
    shape: tuple[int, ...]  # the full weight shape
    scaling: float = DEFAULT_SCALING
    wavelet: str = DEFAULT_WAVELET
    use_idwt: bool = DEFAULT_USE_IDWT
    _plans: PlanCache | None = field(default=None, init=False, repr=False)

    def __post_init__(self):
        self.shape = tuple(int(s) for s in self.shape)
        check_wavelet(self.wavelet)

    @property
    def n_coefficients(self) -> int:
        return int(self.spectrum.numel())

    @property
    def matrix_shape(self) -> tuple[int, int]:
        return matrix_shape(self.shape)

    def plan(self, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> DeltaPlan:
        """Positions of every patch, built once on the CPU and kept per device (a few dozen KiB)."""
        if self._plans is None:
            self._plans = PlanCache(self.indices, self.shape, self.wavelet if self.use_idwt else None)
        return self._plans.get(device, dtype)

    def delta(self, dtype: torch.dtype = torch.float32, device=None, strength: float = 1.0) -> torch.Tensor:
        """Dense strength * ΔW in the weight's shape. Differentiable with respect to `spectrum`."""
        device = torch.device(device) if device is not None else self.spectrum.device
        compute = compute_dtype(dtype)
        spectrum = self.spectrum.to(device, compute)
        out = dense_delta(self.plan(device, compute), spectrum, float(self.scaling) * float(strength), dtype)
        return out.reshape(self.shape)

    def add_to_(self, weight: torch.Tensor, strength: float = 1.0) -> torch.Tensor:
        """weight += strength * ΔW in place, on the weight's device and dtype; returns `weight`."""
        compute = compute_dtype(weight.dtype)
        plan = self.plan(weight.device, compute)
        return add_into(weight, plan, self.spectrum, float(self.scaling) * float(strength))


@dataclass(eq=False)
class Adapter:
    """A WaveFT adapter: module name -> Layer, plus string metadata (FORMAT.md section 3)."""

    layers: dict[str, Layer] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    source: str = ""  # where it was read from, for messages
    extra_tensors: dict[str, torch.Tensor] = field(default_factory=dict)  # unknown keys, kept for round trips

    @property
    def n_parameters(self) -> int:
        return sum(layer.n_coefficients for layer in self.layers.values())

    @property
    def wavelet(self) -> str:
        names = {layer.wavelet for layer in self.layers.values()}
        return names.pop() if len(names) == 1 else self.metadata.get(META_WAVELET, DEFAULT_WAVELET)

    @property
    def scaling(self) -> float:
        values = {float(layer.scaling) for layer in self.layers.values()}
        if len(values) == 1:
            return values.pop()
        try:
            return float(self.metadata.get(META_SCALING, DEFAULT_SCALING))
        except ValueError:
            return DEFAULT_SCALING

    @property
    def use_idwt(self) -> bool:
        values = {bool(layer.use_idwt) for layer in self.layers.values()}
        return values.pop() if len(values) == 1 else self.metadata.get(META_USE_IDWT, "true") != "false"

    @property
    def base_model(self) -> str:
        return self.metadata.get(META_BASE_MODEL, "") or self.metadata.get(META_ARCHITECTURE, "")

    def summary(self) -> str:
        """Human-readable description used by the CLI and the Info node."""
        md = self.metadata
        lines = [
            f"file: {os.path.basename(str(self.source).rstrip('/'))}" if self.source else "",
            f"layers: {len(self.layers)}",
            f"parameters: {self.n_parameters:,}",
            f"wavelet: {self.wavelet}",
            f"scaling: {self.scaling:g}",
            f"transform: {'inverse DWT' if self.use_idwt else 'none (use_idwt=false)'}",
            f"base model: {self.base_model or 'unknown'}",
        ]
        for key, label in (
            (META_TITLE, "title"),
            (META_TRIGGER_PHRASE, "trigger words"),
            (META_DESCRIPTION, "description"),
            (META_DATE, "date"),
            (META_IMPORT_NOTES, "read as"),
        ):
            if md.get(key):
                lines.append(f"{label}: {md[key]}")
        groups: dict[str, int] = {}
        for name in self.layers:
            top = name.split(".", 1)[0]
            groups[top] = groups.get(top, 0) + 1
        if groups:
            lines.append("layers by part: " + ", ".join(f"{k}: {v}" for k, v in sorted(groups.items())))
        return "\n".join(line for line in lines if line)
