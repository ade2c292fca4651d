"""Trainable WaveFT layers: the spectrum is the only parameter; positions follow PEFT's rule."""
from __future__ import annotations

import torch
from torch import nn

from .adapter import DEFAULT_SCALING, DEFAULT_SEED, Adapter, Layer
from .delta import DeltaPlan, make_plan, matrix_shape, weight_plus_delta
from .peft_io import peft_positions
from .wavelets import check_wavelet


class TrainableLayer(nn.Module):
    """ΔW(spectrum) for one weight. `layer(weight)` returns weight + strength * ΔW, differentiably.

    Positions are PEFT's (seeded randperm of m*n), so a trained adapter exports to PEFT exactly."""

    def __init__(self, shape, n_coefficients: int = 2592, wavelet: str = "db1", scaling: float = DEFAULT_SCALING,
                 seed: int = DEFAULT_SEED, use_idwt: bool = True, spectrum: torch.Tensor | None = None,
                 indices: torch.Tensor | None = None):
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        m, n = matrix_shape(self.shape)
        p = int(n_coefficients)
        if not 1 <= p <= m * n:
            raise ValueError(f"n_coefficients must be between 1 and {m * n} for a weight of shape "
                             f"{list(self.shape)}, got {p}")
        self.wavelet = check_wavelet(wavelet)
        self.scaling = float(scaling)
        self.use_idwt = bool(use_idwt)
        self.seed = int(seed)
        if indices is None:
            indices = peft_positions(self.shape, p, seed)
        init = torch.zeros(p) if spectrum is None else spectrum.detach().float().clone()
        if init.numel() != indices.numel():
            raise ValueError(f"{init.numel()} coefficients for {indices.numel()} positions")
        self.spectrum = nn.Parameter(init)
        # Positions are fixed data, not trained: a plain attribute keeps them out of parameters and buffers.
        self.indices = indices.to(torch.int64).cpu()
        self._plan_cpu = make_plan(self.indices, self.shape, self.wavelet if self.use_idwt else None)
        self._plans: dict = {}
        self.strength = 1.0

    def plan(self, device, dtype) -> DeltaPlan:
        key = (torch.device(device), dtype)
        if key not in self._plans:
            self._plans[key] = self._plan_cpu.to(key[0], dtype)
        return self._plans[key]

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        compute = torch.float64 if weight.dtype == torch.float64 else torch.float32
        plan = self.plan(weight.device, compute)
        return weight_plus_delta(weight, plan, self.spectrum, self.scaling * self.strength)

    def extra_repr(self) -> str:
        return f"shape={list(self.shape)}, coefficients={self.spectrum.numel()}, wavelet={self.wavelet}"

    def to_layer(self) -> Layer:
        return Layer(spectrum=self.spectrum.detach().float().cpu().clone(), indices=self.indices.clone(),
                     shape=self.shape, scaling=self.scaling, wavelet=self.wavelet, use_idwt=self.use_idwt)

    @classmethod
    def from_layer(cls, layer: Layer) -> "TrainableLayer":
        return cls(layer.shape, layer.n_coefficients, layer.wavelet, layer.scaling, use_idwt=layer.use_idwt,
                   spectrum=layer.spectrum, indices=layer.indices)


def adapter_from_trainables(trainables: dict[str, TrainableLayer], metadata: dict[str, str] | None = None) -> Adapter:
    md = dict(metadata or {})
    seeds = {t.seed for t in trainables.values()}
    if len(seeds) == 1:
        md.setdefault("waveft.seed", str(seeds.pop()))
    return Adapter(layers={name: t.to_layer() for name, t in trainables.items()}, metadata=md)
