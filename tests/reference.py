"""Independent references and small builders shared by the tests."""

from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent


def reference_delta(indices, values, shape, wavelet, scaling=1.0, use_idwt=True):
    """FORMAT.md section 1 computed literally with PyWavelets in float64: the independent reference."""
    import pywt

    m = int(shape[0])
    n = int(np.prod(shape[1:]))
    idx = np.asarray(indices, dtype=np.int64)
    vals = np.asarray(values, dtype=np.float64)
    if not use_idwt:
        out = np.zeros(m * n)
        np.add.at(out, idx, vals)
        return (scaling * out).reshape(shape)
    L = pywt.Wavelet(wavelet).dec_len
    red = L - 2
    hp, wp = m + red, n + red
    hp += hp % 2
    wp += wp % 2
    grid = np.zeros((hp, wp))
    np.add.at(grid, (idx // n + (hp - m) // 2, idx % n + (wp - n) // 2), vals)
    h2, w2 = hp // 2, wp // 2
    rec = pywt.idwt2((grid[:h2, :w2], (grid[:h2, w2:], grid[h2:, :w2], grid[h2:, w2:])), wavelet, mode="zero")
    r0, c0 = (rec.shape[0] - m) // 2, (rec.shape[1] - n) // 2
    return (scaling * rec[r0 : r0 + m, c0 : c0 + n]).reshape(shape)


def rel_err(a, b) -> float:
    a = torch.as_tensor(a, dtype=torch.float64)
    b = torch.as_tensor(b, dtype=torch.float64)
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def random_layer(shape, p, wavelet="db1", scaling=2.5, seed=0, use_idwt=True, dtype=torch.float32):
    import waveft_core as wft

    g = torch.Generator().manual_seed(seed)
    m = shape[0]
    n = int(np.prod(shape[1:]))
    idx = torch.randperm(m * n, generator=g)[:p]
    spec = torch.randn(p, generator=g).to(dtype)
    return wft.Layer(
        spectrum=spec, indices=idx, shape=tuple(shape), scaling=scaling, wavelet=wavelet, use_idwt=use_idwt
    )
