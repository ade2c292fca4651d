"""The bounds a file must keep before any work is done on what it declares: settings finite in float32, every
layer's reachable |ΔW| inside the float16 range, and dense matrices no bigger than a budget. A small file
can declare a huge weight or a huge scaling; these checks refuse it, naming the file and the key, instead of
letting the allocator or an all-black image say it later."""

from __future__ import annotations

import functools
import math
import os

import torch

from ..keys import DEFAULT_SCALING
from .storage import WaveFTFileError

FP32_MAX = float(torch.finfo(torch.float32).max)  # 3.4e38
FP16_MAX = float(torch.finfo(torch.float16).max)  # 65504
# No weight of any model is near this (the largest are ~1e8 entries); larger declarations are damage, and
# would overflow int64 arithmetic further on.
MAX_WEIGHT_ENTRIES = 1 << 40
# Entries of one dense matrix (ΔW of a layer, a LoRA's up @ down) the converters build: 2^28 floats are 1 GiB
# in float32, several times the largest weight of SDXL or Flux. WAVEFT_MAX_DENSE_ENTRIES raises it.
DEFAULT_MAX_DENSE_ENTRIES = 1 << 28


def max_dense_entries() -> int:
    try:
        return int(os.environ.get("WAVEFT_MAX_DENSE_ENTRIES", DEFAULT_MAX_DENSE_ENTRIES))
    except ValueError:
        return DEFAULT_MAX_DENSE_ENTRIES


def check_dense(rows: int, cols: int, source, key: str, what: str = "ΔW") -> None:
    """Refuse (WaveFTFileError naming `source` and `key`) a dense rows x cols matrix above the budget."""
    entries, budget = int(rows) * int(cols), max_dense_entries()
    if entries > budget:
        raise WaveFTFileError(
            source,
            f"{what} would be a dense {rows} x {cols} matrix ({entries:,} entries, "
            f"{entries * 4 / 2**30:.1f} GiB in float32), above the {budget:,} entries allowed",
            key=key,
            advice="A real layer is far smaller: the file is damaged or not made for a "
            "diffusion model. To convert a layer that big anyway, set WAVEFT_MAX_DENSE_ENTRIES",
        )


def check_setting(value: float, source, key: str) -> float:
    """`value` if finite in float32 (the precision ΔW is computed in), else WaveFTFileError naming the key."""
    if not math.isfinite(value) or abs(value) > FP32_MAX:
        raise WaveFTFileError(
            source,
            f"{value!r} is not a finite float32 number",
            key=key,
            advice=f"The file is damaged or was edited by hand; set a plain value such as {DEFAULT_SCALING}",
        )
    return value


@functools.cache
def delta_gain(wavelet: str | None) -> float:
    """An upper bound of |ΔW entry| / (|scaling| * max |coefficient|): one weight entry gets, from each band,
    the coefficients whose filter taps of one parity land on it, so the bound is the sum over bands of the
    product of the largest same-parity sums of |taps| of the row and column filters."""
    if wavelet is None:
        return 1.0
    from ..wavelets import reconstruction_filters

    lo, hi = reconstruction_filters(wavelet)
    parity = [max(float(abs(f[0::2]).sum()), float(abs(f[1::2]).sum())) for f in (lo, hi)]
    return sum(parity) ** 2


def check_delta_range(layer, source, key: str, scaling_key: str) -> None:
    """Refuse a layer whose ΔW can hold an entry beyond float16's range (or float32's): it turns an fp16 or
    bf16 model's weights into inf and the image black. A cheap bound first; where it is exceeded and the
    layer is small enough, ΔW itself decides."""
    spectrum = layer.spectrum.detach()
    if not spectrum.numel():
        return
    peak = float(spectrum.abs().max().double()) * abs(float(layer.scaling))
    bound = peak * delta_gain(layer.wavelet if layer.use_idwt else None)
    if bound <= FP16_MAX:
        return
    m, n = layer.matrix_shape
    reach = bound
    if math.isfinite(bound) and m * n <= max_dense_entries():
        reach = float(layer.delta(torch.float64).abs().max())
        if reach <= FP16_MAX:
            return
    raise WaveFTFileError(
        source,
        f"the weight change reaches |ΔW| = {reach:.3g} (scaling {float(layer.scaling):g} "
        f"from '{scaling_key}' times coefficients up to {float(spectrum.abs().max()):.3g}), beyond the {FP16_MAX:g} a "
        "float16 weight holds: applied, it would turn the weights into inf and the image black",
        key=key,
        advice="The training diverged or the file is damaged; use an earlier checkpoint or a lower scaling",
    )
