"""Dense ΔW -> WaveFT: the p coefficients whose synthesis best approximates a weight change (the largest ones of
the adjoint transform, then their values by least squares), and where dense ΔW come from besides LoRAs
(lora.py): a fine-tuned single-file checkpoint minus its base. The patch geometry is delta.py's."""

from __future__ import annotations

import math
import re
from typing import Callable, Iterator, Mapping

import torch
import torch.nn.functional as F

from ..adapter import Adapter, Layer
from ..delta import band_kernels, dense_delta, index_dtype, make_plan, matrix_shape, padded_grid, patch_corners
from ..files.storage import checked_safetensors, open_safetensors, read_header
from ..keys import (
    DEFAULT_SCALING,
    DEFAULT_SEED,
    DEFAULT_WAVELET,
    META_ARCHITECTURE,
    META_BASE_MODEL,
    META_SCALING,
    META_SEED,
    META_SOURCE,
    META_WAVELET,
)
from ..names.layouts import Location, checkpoint_layout, detect_base_model, location_shape
from ..training.trainable import is_attention
from ..wavelets import check_wavelet

# ---------------------------------------------------------------------------------------------------------
# Lazily computed ΔW: a checkpoint's worth of dense matrices would not fit in memory at once


class LazyDeltas(Mapping):
    """name -> dense ΔW, each computed when asked for (nothing is kept). `skipped` lists (name, reason)."""

    def __init__(self, makers: dict[str, Callable[[], torch.Tensor]], skipped=(), metadata=None):
        self._makers = dict(makers)
        self.skipped: list[tuple[str, str]] = list(skipped)
        self.metadata: dict[str, str] = dict(metadata or {})

    def __getitem__(self, name: str) -> torch.Tensor:
        return self._makers[name]()

    def __iter__(self) -> Iterator[str]:
        return iter(self._makers)

    def __len__(self) -> int:
        return len(self._makers)


# ---------------------------------------------------------------------------------------------------------
# The adjoint of the synthesis operator, and extraction


def analysis(x: torch.Tensor, wavelet: str, square_kernels: bool = False) -> torch.Tensor:
    """S^T x: the adjoint of the synthesis operator (coefficients on the unpadded m x n grid -> ΔW without
    scaling), for a matrix x of shape (m, n). Each coefficient's patch starts at row 2i - (L-2) of W, so padding
    W by L-2 at the top/left and correlating at stride 2 with the four L x L band kernels reads every patch;
    the results tile the padded coefficient grid, which is cropped back to the unpadded positions.

    `square_kernels=True` correlates with the squared kernels instead: applied to the all-ones matrix it gives
    the squared norm of every coefficient's (clipped) patch."""
    check_wavelet(wavelet)
    m, n = x.shape
    kernels = band_kernels(wavelet, x.dtype, x.device)[:, None]  # [4, 1, L, L]
    red, hp, wp = padded_grid(m, n, kernels.shape[-1])
    if square_kernels:
        kernels = kernels.square()
    # pad = (left, right, top, bottom); the output of a stride-2 correlation then has hp/2 x wp/2 entries
    padded = F.pad(x[None, None], (red, wp - n, red, hp - m))
    bands = F.conv2d(padded, kernels, stride=2)[0]  # [4, hp/2, wp/2]
    coeffs = torch.cat([torch.cat([bands[0], bands[1]], dim=1), torch.cat([bands[2], bands[3]], dim=1)], dim=0)
    top, left = (hp - m) // 2, (wp - n) // 2
    return coeffs[top : top + m, left : left + n]


class SupportOperator:
    """The synthesis restricted to p positions: S_P v by delta.py's sparse synthesis, and its adjoint
    S_P^T y as a gather of every coefficient's (clipped) L x L patch."""

    def __init__(self, positions: torch.Tensor, shape: tuple[int, int], wavelet: str, dtype, device):
        m, n = self.rows, self.cols = shape
        self.plan = make_plan(positions.cpu(), shape, wavelet).to(torch.device(device), dtype)
        kernels = band_kernels(wavelet, dtype, device)  # [4, L, L]
        size = kernels.shape[-1]
        pos = positions.to(device, torch.int64)
        top, left, band = patch_corners(pos, m, n, size)
        ar = torch.arange(size, device=device)
        rows = top[:, None] + ar  # [p, L]
        cols = left[:, None] + ar
        inside = ((rows >= 0) & (rows < m))[:, :, None] & ((cols >= 0) & (cols < n))[:, None, :]
        weights = kernels[band] * inside
        self.targets = torch.where(inside, rows[:, :, None] * n + cols[:, None, :], 0).reshape(len(pos), -1)
        self.weights = weights.reshape(len(pos), -1)

    def synthesize(self, values: torch.Tensor) -> torch.Tensor:
        return dense_delta(self.plan, values, 1.0, values.dtype)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return (y.reshape(-1)[self.targets] * self.weights).sum(dim=1)


def least_squares(
    op: SupportOperator, target: torch.Tensor, start: torch.Tensor, iterations: int, tolerance: float = 1e-12
) -> torch.Tensor:
    """argmin_v ||S_P v - target||: conjugate gradient on the normal equations S_P^T S_P v = S_P^T target,
    Jacobi-preconditioned (patches clipped at the edges have norms well below 1). Stops after `iterations`
    steps or when the normal-equation residual falls below `tolerance` relative to S_P^T target. Each step
    lowers ||S_P v - target||, so the result is never worse than `start`."""
    diag = op.weights.square().sum(dim=1)
    inv_diag = torch.where(diag > 0, 1.0 / diag.clamp_min(1e-300), torch.zeros_like(diag))
    v = start.clone()
    rhs = op.adjoint(target)
    r = rhs - op.adjoint(op.synthesize(v))
    z = inv_diag * r
    d = z.clone()
    rz = torch.dot(r, z)
    stop = (tolerance * float(rhs.norm())) ** 2
    for _ in range(iterations):
        if float(torch.dot(r, r)) <= stop:
            break
        sd = op.synthesize(d)
        dad = torch.dot(sd.reshape(-1), sd.reshape(-1))
        if float(dad) <= 0 or float(rz) == 0:
            break
        step = rz / dad
        v += step * d
        r -= step * op.adjoint(sd)
        z = inv_diag * r
        rz_next = torch.dot(r, z)
        d = z + (rz_next / rz) * d
        rz = rz_next
    return v


def extract_layer(
    delta: torch.Tensor,
    n_coefficients: int,
    wavelet: str = DEFAULT_WAVELET,
    iterations: int = 100,
    support_rounds: int = 4,
    device=None,
) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(positions, values, relative error) of a p-sparse coefficient set whose synthesis approximates `delta`
    (any shape; viewed as m x n), without scaling.

    The support starts as the p largest |S^T ΔW| (for an orthonormal transform, the best p-sparse
    approximation) and the values are refined by least squares. Then, as in hard thresholding pursuit, the
    support is re-chosen from the refined values plus the adjoint of the residual, measured against each
    patch's norm (patches clipped at an edge are shorter than 1), and kept only while the error falls: the
    result is never worse than the first support's least-squares fit.

    Where patches lie wholly inside W the transform is orthonormal and an exactly p-sparse ΔW comes back exactly.
    Clipped patches are not orthonormal (the synthesis on the m x n positions is rank-deficient for most
    wavelets and shapes other than Haar on even sizes), so coefficients there are recovered closely, not always
    exactly or at the same positions."""
    device = torch.device(device) if device is not None else delta.device
    m, n = matrix_shape(tuple(delta.shape))
    target = delta.reshape(m, n).to(device, torch.float64)
    total = float(target.norm())
    p = min(int(n_coefficients), m * n)
    if p < 1:
        raise ValueError(f"n_coefficients must be 1 or more, got {n_coefficients}")
    proxy = analysis(target, wavelet).reshape(-1)
    norms = analysis(torch.ones_like(target), wavelet, square_kernels=True).reshape(-1).sqrt()
    usable = norms > 1e-9 * float(norms.max())
    safe_norms = torch.where(usable, norms, torch.ones_like(norms))

    def fit(positions, start):
        positions = torch.sort(positions).values
        op = SupportOperator(positions, (m, n), wavelet, torch.float64, device)
        values = least_squares(op, target, start[positions], iterations)
        residual = target - op.synthesize(values)
        return positions, values, residual, float(residual.norm())

    positions, values, residual, error = fit(torch.topk(proxy.abs(), p).indices, proxy)
    for _ in range(support_rounds):
        if error <= 1e-13 * total:
            break
        coeffs = torch.zeros(m * n, dtype=torch.float64, device=device)
        coeffs[positions] = values
        estimate = coeffs + analysis(residual, wavelet).reshape(-1) / safe_norms.square()
        score = torch.where(usable, estimate.abs() * safe_norms, torch.zeros_like(estimate))
        candidate = torch.topk(score, p).indices
        if torch.equal(torch.sort(candidate).values, positions):
            break
        trial = fit(candidate, estimate)
        if trial[3] >= error:
            break
        positions, values, residual, error = trial
    return positions, values, error / total if total > 0 else 0.0


def extract(
    deltas: Mapping[str, torch.Tensor],
    n_coefficients: int,
    wavelet: str = DEFAULT_WAVELET,
    scaling: float = DEFAULT_SCALING,
    seed: int = DEFAULT_SEED,
    iterations: int = 100,
    support_rounds: int = 4,
    metadata: Mapping[str, str] | None = None,
    device=None,
    log: Callable[[str], None] | None = None,
) -> tuple[Adapter, dict]:
    """A WaveFT adapter approximating each dense ΔW (name -> tensor in the weight's shape) with
    `n_coefficients` coefficients per layer (fewer where the weight has fewer entries).

    Values are divided by `scaling` so that layer.delta() reproduces ΔW. The chosen positions are stored (they
    are not PEFT's random ones); `seed` is recorded as metadata only. `iterations` bounds the conjugate-gradient
    steps of each least-squares refinement, `support_rounds` the re-choices of the support.
    Report: {'layers': {name: {'coefficients', 'relative_error'}}, 'relative_error' (over all layers, by
    energy), 'skipped': [(name, reason)]}."""
    check_wavelet(wavelet)
    scaling = float(scaling)
    if not math.isfinite(scaling) or scaling == 0:
        raise ValueError(f"scaling must be a finite non-zero number, got {scaling}")
    layers: dict[str, Layer] = {}
    report = {"layers": {}, "skipped": list(getattr(deltas, "skipped", []))}
    err_sq = energy = 0.0
    for name in deltas:
        delta = deltas[name]
        if delta.dim() < 2:
            report["skipped"].append((name, f"not a matrix (shape {list(delta.shape)})"))
            continue
        if not torch.isfinite(delta).all():
            raise ValueError(f"layer {name}: ΔW has NaN or infinite values")
        norm_sq = float(delta.double().square().sum())
        if norm_sq == 0.0:
            report["skipped"].append((name, "ΔW is zero"))
            continue
        positions, values, _ = extract_layer(delta, n_coefficients, wavelet, iterations, support_rounds, device)
        m, n = matrix_shape(tuple(delta.shape))
        layer = Layer(
            spectrum=(values / scaling).to("cpu", torch.float32),
            indices=positions.to("cpu", index_dtype(m * n)),
            shape=tuple(delta.shape),
            scaling=scaling,
            wavelet=wavelet,
        )
        # The error of what is stored (float32 values), not of the float64 fit.
        error = float((layer.delta(torch.float64) - delta.to(torch.float64).cpu()).norm()) / math.sqrt(norm_sq)
        layers[name] = layer
        report["layers"][name] = {"coefficients": layer.n_coefficients, "relative_error": error}
        err_sq += error * error * norm_sq
        energy += norm_sq
        if log:
            log(f"{name}: {layer.n_coefficients} coefficients, relative error {error:.4f}")
    if not layers:
        raise ValueError("no layer has a non-zero ΔW; nothing to extract")
    report["relative_error"] = math.sqrt(err_sq / energy)
    md = {k: str(v) for k, v in (metadata or {}).items()}
    if md.get(META_ARCHITECTURE):
        md[META_ARCHITECTURE] = re.sub(r"/lora$", "/waveft", md[META_ARCHITECTURE])
    md.update(
        {
            META_SOURCE: "extracted",
            META_SEED: str(int(seed)),
            META_WAVELET: wavelet,
            META_SCALING: repr(scaling),
        }
    )
    return Adapter(layers=layers, metadata=md), report


# ---------------------------------------------------------------------------------------------------------
# Fine-tuned checkpoint minus base -> dense ΔW

TARGETS = ("attention", "linear", "all")


def _wanted(name: str, shape: tuple[int, ...], targets: str) -> bool:
    if targets == "attention":
        return len(shape) == 2 and is_attention(name)  # the trainer's rule, one for every family
    if name.endswith("embedding"):  # token/position embeddings are tables, not projections
        return False
    return len(shape) == 2 or (targets == "all" and len(shape) in (3, 4))


def checkpoint_deltas(finetuned_path, base_path, targets: str = "attention") -> LazyDeltas:
    """native module name -> ΔW = W_finetuned - W_base (float32) for the matching weights of two single-file SD
    checkpoints. `targets`: 'attention' (q/k/v/out projections of UNet and CLIP attention), 'linear' (every
    2-D weight but embeddings), 'all' (also convolutions). Tensors are read lazily with safe_open, one pair at a
    time, and layers whose weights are identical are left out."""
    if targets not in TARGETS:
        raise ValueError(f"targets must be one of {', '.join(TARGETS)}, got {targets!r}")
    ft_path = checked_safetensors(finetuned_path, "fine-tuned checkpoint")
    base_path = checked_safetensors(base_path, "base checkpoint")
    ft_header = read_header(ft_path).tensors
    base_header = read_header(base_path).tensors
    ft_layout, base_layout = checkpoint_layout(ft_header), checkpoint_layout(base_header)
    common = [name for name in ft_layout if name in base_layout]
    if not common:
        raise ValueError(f"{ft_path} and {base_path} share no UNet or text-encoder weights")

    def read(path, loc: Location) -> torch.Tensor:
        with open_safetensors(path) as f:
            if loc.rows is None:
                return f.get_tensor(loc.key)
            return f.get_slice(loc.key)[loc.rows[0] : loc.rows[1]]

    def make(name):
        return lambda: read(ft_path, ft_layout[name]).float() - read(base_path, base_layout[name]).float()

    makers, skipped = {}, []
    for name in sorted(common):
        shape = location_shape(ft_header, ft_layout[name])
        if shape != location_shape(base_header, base_layout[name]):
            raise ValueError(
                f"{name}: shape {list(shape)} in {ft_path} but "
                f"{list(location_shape(base_header, base_layout[name]))} in {base_path}; "
                "are they the same model family?"
            )
        if not _wanted(name, shape, targets):
            continue
        if not ft_header[ft_layout[name].key]["dtype"].startswith(("F", "BF")):
            skipped.append((name, "not a float weight"))
            continue
        if torch.equal(read(ft_path, ft_layout[name]), read(base_path, base_layout[name])):
            continue  # unchanged by the fine-tune: nothing to extract
        makers[name] = make(name)
    md = {}
    base_model = detect_base_model(ft_header)
    if base_model:
        md[META_BASE_MODEL] = base_model
    return LazyDeltas(makers, skipped, md)
