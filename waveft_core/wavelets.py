"""Wavelet filters for WaveFT: every orthogonal PyWavelets family, filters taken from PyWavelets."""

from __future__ import annotations

import functools

import numpy as np

# Orthogonal families only: the inverse transform of FORMAT.md is defined for these.
SUPPORTED_WAVELETS: tuple[str, ...] = (
    ("haar",)
    + tuple(f"db{i}" for i in range(1, 39))
    + tuple(f"sym{i}" for i in range(2, 21))
    + tuple(f"coif{i}" for i in range(1, 18))
)
_SUPPORTED_SET = frozenset(SUPPORTED_WAVELETS)


class UnknownWaveletError(ValueError):
    pass


def check_wavelet(name: str) -> str:
    """Return `name` if it is a supported orthogonal wavelet, else raise with the list of valid names."""
    if not isinstance(name, str) or name not in _SUPPORTED_SET:
        raise UnknownWaveletError(f"unknown wavelet {name!r}: use one of haar, db1..db38, sym2..sym20, coif1..coif17")
    return name


def peft_name(name: str) -> str:
    """PEFT knows Haar only as 'db1'."""
    return "db1" if check_wavelet(name) == "haar" else name


@functools.lru_cache(maxsize=None)
def reconstruction_filters(name: str) -> tuple[np.ndarray, np.ndarray]:
    """(rec_lo, rec_hi) as float64 arrays of length L, straight from PyWavelets."""
    import pywt  # imported lazily: only needed when a delta is computed

    w = pywt.Wavelet(check_wavelet(name))
    lo = np.asarray(w.rec_lo, dtype=np.float64)
    hi = np.asarray(w.rec_hi, dtype=np.float64)
    lo.setflags(write=False)
    hi.setflags(write=False)
    return lo, hi
