"""Conversions between WaveFT and other weight changes, and merging into checkpoints.

- `to_lora`: WaveFT -> LoRA by a truncated SVD of each layer's dense ΔW (the best rank-r approximation).
- `extract`: dense ΔW -> WaveFT by keeping the largest one-level DWT coefficients and refining their values by
  least squares. The dense ΔW come from a LoRA (`lora_deltas`) or from a fine-tuned checkpoint minus its base
  (`checkpoint_deltas`).
- `merge_into_checkpoint`: a new single-file checkpoint with strength x ΔW baked into the weights.

Naming: adapters use ComfyUI-native module names (FORMAT.md section 3). Single-file SD checkpoints store the
same modules as `model.diffusion_model.*`, `cond_stage_model.transformer.*` (SD1 CLIP-L),
`conditioner.embedders.0.transformer.*` (SDXL CLIP-L) and, for OpenCLIP encoders (SDXL CLIP-G, SD2 CLIP-H),
`...model.transformer.resblocks.N.*` with q, k and v fused into one `attn.in_proj_weight`.
Only safetensors files are read; pickles are refused unread.
"""
from __future__ import annotations

import math
import re
import shutil
import sys
from pathlib import Path
from typing import Callable, Iterable, Iterator, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from .adapter import DEFAULT_SCALING, DEFAULT_SEED, Adapter, Layer
from .delta import compute_dtype, dense_delta, make_plan, matrix_shape
from .fileformat import ARCHITECTURES, WaveFTFileError, atomic_write, check_safetensors_header
from .layouts import Location, checkpoint_layout, detect_base_model, location_shape, read_header
from .names import diffusers_unet_to_ldm, to_native
from .wavelets import check_wavelet, reconstruction_filters

UNET = "diffusion_model."
CLIP_PREFIX = "text_encoders."

# ---------------------------------------------------------------------------------------------------------
# Names: native <-> kohya


# Text-encoder modules that ComfyUI's stock loader (and kohya's trainers) know under `lora_te*_` keys.
_KOHYA_TE_MODULE = re.compile(r"text_model\.encoder\.layers\.\d+\.(mlp\.fc[12]|self_attn\.(q|k|v|out)_proj)")
_NATIVE_CLIP = re.compile(r"text_encoders\.(clip_[a-z]+)\.transformer\.(.+)")


def kohya_prefix(native: str, has_clip_g: bool) -> str:
    """The LoRA key prefix of a native module name (see `to_lora`). Names with no kohya spelling that
    ComfyUI maps stay native: ComfyUI reads `diffusion_model.*` and `text_encoders.*` directly."""
    if native.startswith(UNET):
        return "lora_unet_" + native[len(UNET):].replace(".", "_")
    m = _NATIVE_CLIP.fullmatch(native)
    if m and _KOHYA_TE_MODULE.fullmatch(m[2]):
        clip, module = m[1], m[2].replace(".", "_")
        if clip == "clip_g":
            return "lora_te2_" + module
        if clip in ("clip_l", "clip_h"):
            return ("lora_te1_" if has_clip_g else "lora_te_") + module
    return native


# Module-name parts that contain underscores, in SD1/SDXL LDM and diffusers UNets and in HF CLIP. Everything
# else in a kohya name is separated by dots; see `resolve_underscores`.
_UNDERSCORE_PARTS = frozenset({
    # LDM UNet
    "input_blocks", "middle_block", "output_blocks", "time_embed", "label_emb", "transformer_blocks", "proj_in",
    "proj_out", "to_q", "to_k", "to_v", "to_out", "in_layers", "out_layers", "emb_layers", "skip_connection",
    # diffusers UNet
    "down_blocks", "up_blocks", "mid_block", "conv_in", "conv_out", "conv_norm_out", "time_embedding",
    "add_embedding", "linear_1", "linear_2", "time_emb_proj", "conv_shortcut",
    # HF CLIP
    "text_model", "self_attn", "q_proj", "k_proj", "v_proj", "out_proj", "layer_norm1", "layer_norm2",
    "final_layer_norm", "token_embedding", "position_embedding", "text_projection",
})
_LONGEST_PART = max(p.count("_") + 1 for p in _UNDERSCORE_PARTS)


def resolve_underscores(name: str, known: Mapping[str, str] | None = None) -> str:
    """Undo `replace('.', '_')` on a module name.

    With `known` ({underscored: dotted}, e.g. from a base checkpoint) an exact hit wins. Otherwise the name is
    split into tokens and joined greedily: the longest run of tokens that forms a known underscore-containing
    part (`transformer_blocks`, `to_q`, `self_attn`, ...) stays together, every other boundary becomes a dot."""
    if known is not None and name in known:
        return known[name]
    tokens = name.split("_")
    parts = []
    i = 0
    while i < len(tokens):
        for size in range(min(_LONGEST_PART, len(tokens) - i), 1, -1):
            candidate = "_".join(tokens[i:i + size])
            if candidate in _UNDERSCORE_PARTS:
                parts.append(candidate)
                i += size
                break
        else:
            parts.append(tokens[i])
            i += 1
    return ".".join(parts)


# ---------------------------------------------------------------------------------------------------------
# Single-file checkpoints: native module name <-> tensor (or slice of a fused tensor)

def _checked_safetensors(path, what: str) -> Path:
    path = Path(path)
    if not path.is_file():
        raise WaveFTFileError(path, f"no such {what}")
    check_safetensors_header(path)  # refuses pickles by name, and truncated or non-safetensors files
    return path


def _open(path: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # safetensors has its own error types for every kind of damage
        raise WaveFTFileError(path, f"cannot be read as safetensors ({e})") from e


def checkpoint_module_names(path) -> set[str]:
    """Native names of every weight in a safetensors checkpoint (reads the header only)."""
    path = _checked_safetensors(path, "checkpoint")
    header, _ = read_header(path)
    return set(checkpoint_layout(header))


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
# WaveFT -> LoRA


def to_lora(adapter: Adapter, rank: int, dtype: torch.dtype = torch.float16, device=None,
            method: str = "exact") -> tuple[dict[str, torch.Tensor], dict[str, str], dict]:
    """A LoRA of rank `rank` per layer: up @ down is the best rank-r approximation of ΔW (truncated SVD), with
    alpha = r so that the loaders' alpha / rank scale is 1. `method='randomized'` uses torch.svd_lowrank (much
    faster on big layers, near-optimal rather than optimal).

    Returns (tensors, metadata, report); report = {'layers': {name: {'rank', 'energy_kept', 'relative_error'}},
    'energy_kept', 'relative_error', 'skipped'}. Energy kept is the sum of the kept squared singular values over
    the total (= ||ΔW||²); the relative error is ||ΔW - up @ down||_F / ||ΔW||_F of the stored tensors."""
    if int(rank) < 1:
        raise ValueError(f"rank must be 1 or more, got {rank}")
    if method not in ("exact", "randomized"):
        raise ValueError(f"method must be 'exact' or 'randomized', got {method!r}")
    rank = int(rank)
    has_clip_g = any(name.startswith(f"{CLIP_PREFIX}clip_g.") for name in adapter.layers)
    tensors: dict[str, torch.Tensor] = {}
    report = {"layers": {}, "skipped": []}
    kept_total = energy_total = err_total = 0.0
    for name, layer in adapter.layers.items():
        m, n = layer.matrix_shape
        # float64 where it is cheap; big layers in float32 (their SVD is several times faster and the result
        # is stored in 16 bits anyway).
        compute = torch.float64 if m * n <= 1 << 20 else torch.float32
        delta = layer.delta(compute, device=device).reshape(m, n)
        energy = float(delta.double().square().sum())
        if energy == 0.0:
            report["skipped"].append((name, "ΔW is zero"))
            continue
        r = min(rank, m, n)
        if method == "exact" or r >= min(m, n) // 2:
            u, s, vh = torch.linalg.svd(delta, full_matrices=False)
        else:
            u, s, v = torch.svd_lowrank(delta, q=min(r + 10, min(m, n)), niter=6)
            vh = v.T
        u, s, vh = u[:, :r], s[:r], vh[:r]
        root = s.sqrt()
        up = (u * root).to(dtype)
        down = (root[:, None] * vh).to(dtype)
        if not (torch.isfinite(up).all() and torch.isfinite(down).all()):
            raise ValueError(f"layer {name}: the LoRA factors overflow {dtype}; use a wider dtype")
        kept = min(float(s.double().square().sum()), energy)
        error = float((delta.double() - up.double() @ down.double()).norm()) / math.sqrt(energy)
        prefix = kohya_prefix(name, has_clip_g)
        if f"{prefix}.lora_up.weight" in tensors:
            raise ValueError(f"layers {name} and another both map to the LoRA key {prefix}")
        extra = len(layer.shape) - 2
        tensors[f"{prefix}.lora_up.weight"] = up.reshape(m, r, *([1] * extra)).cpu().contiguous()
        tensors[f"{prefix}.lora_down.weight"] = down.reshape(r, *layer.shape[1:]).cpu().contiguous()
        tensors[f"{prefix}.alpha"] = torch.tensor(float(r), dtype=torch.float32)
        report["layers"][name] = {"rank": r, "energy_kept": kept / energy, "relative_error": error}
        kept_total += kept
        energy_total += energy
        err_total += error * error * energy
    if not tensors:
        raise ValueError("the adapter has no layer with a non-zero ΔW; nothing to convert")
    report["energy_kept"] = kept_total / energy_total
    report["relative_error"] = math.sqrt(err_total / energy_total)
    return tensors, lora_metadata(adapter.metadata, rank), report


def lora_metadata(source: Mapping[str, str], rank: int) -> dict[str, str]:
    """kohya-style LoRA metadata, keeping the source's base model and model-spec fields."""
    md = {"ss_network_module": "networks.lora", "ss_network_dim": str(rank), "ss_network_alpha": str(rank)}
    for key, value in source.items():
        if key == "ss_base_model_version" or key.startswith("modelspec."):
            md[key] = str(value)
    arch = md.get("modelspec.architecture")
    if arch:
        md["modelspec.architecture"] = re.sub(r"/waveft$", "/lora", arch)
    elif md.get("ss_base_model_version") in ARCHITECTURES:
        md["modelspec.architecture"] = ARCHITECTURES[md["ss_base_model_version"]] + "/lora"
    md.setdefault("modelspec.sai_model_spec", "1.0.0")
    return md


def save_lora(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], path) -> Path:
    """Write a LoRA .safetensors file atomically."""
    from safetensors.torch import save_file

    path = Path(path)
    if path.suffix.lower() != ".safetensors":
        raise ValueError(f"{path}: a LoRA file needs a .safetensors name")
    data = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    md = {str(k): str(v) for k, v in metadata.items()}
    return atomic_write(path, lambda tmp: save_file(data, tmp, metadata=md))


# ---------------------------------------------------------------------------------------------------------
# The adjoint of the synthesis operator, and extraction


def _grid(m: int, n: int, wavelet: str):
    """(L, red, padded rows, padded cols) of FORMAT.md step 1."""
    size = len(reconstruction_filters(wavelet)[0])
    red = size - 2
    return size, red, m + red + ((m + red) & 1), n + red + ((n + red) & 1)


def _band_kernels(wavelet: str, dtype, device) -> torch.Tensor:
    """[4, 1, L, L]: kernel 2*row_band + col_band. Coefficients in the right half (cH, cD) are high-pass along
    the rows of W, those in the bottom half (cV, cD) along the columns (FORMAT.md step 3)."""
    lo, hi = reconstruction_filters(wavelet)
    filt = torch.from_numpy(np.stack([lo, hi])).to(device, dtype)  # [2, L]
    kernels = [filt[col_band][:, None] * filt[row_band][None, :] for row_band in (0, 1) for col_band in (0, 1)]
    return torch.stack(kernels)[:, None]


def analysis(x: torch.Tensor, wavelet: str, square_kernels: bool = False) -> torch.Tensor:
    """S^T x: the adjoint of the synthesis operator (coefficients on the unpadded m x n grid -> ΔW without
    scaling), for a matrix x of shape (m, n). Each coefficient's patch starts at row 2i - (L-2) of W, so padding
    W by L-2 at the top/left and correlating at stride 2 with the four L x L band kernels reads every patch;
    the results tile the padded coefficient grid, which is cropped back to the unpadded positions.

    `square_kernels=True` correlates with the squared kernels instead: applied to the all-ones matrix it gives
    the squared norm of every coefficient's (clipped) patch."""
    check_wavelet(wavelet)
    m, n = x.shape
    size, red, hp, wp = _grid(m, n, wavelet)
    kernels = _band_kernels(wavelet, x.dtype, x.device)
    if square_kernels:
        kernels = kernels.square()
    # pad = (left, right, top, bottom); the output of a stride-2 correlation then has hp/2 x wp/2 entries
    padded = F.pad(x[None, None], (red, wp - n, red, hp - m))
    bands = F.conv2d(padded, kernels, stride=2)[0]  # [4, hp/2, wp/2]
    coeffs = torch.cat([torch.cat([bands[0], bands[1]], dim=1), torch.cat([bands[2], bands[3]], dim=1)], dim=0)
    top, left = (hp - m) // 2, (wp - n) // 2
    return coeffs[top:top + m, left:left + n]


class SupportOperator:
    """The synthesis restricted to p positions: S_P v by delta.py's sparse synthesis, and its adjoint
    S_P^T y as a gather of every coefficient's (clipped) L x L patch."""

    def __init__(self, positions: torch.Tensor, shape: tuple[int, int], wavelet: str, dtype, device):
        m, n = self.rows, self.cols = shape
        self.plan = make_plan(positions.cpu(), shape, wavelet).to(torch.device(device), dtype)
        size, red, hp, wp = _grid(m, n, wavelet)
        pos = positions.to(device, torch.int64)
        r = pos // n + (hp - m) // 2
        c = pos % n + (wp - n) // 2
        band_r = (r >= hp // 2).long()
        band_c = (c >= wp // 2).long()
        top = 2 * (r - band_r * (hp // 2)) - red
        left = 2 * (c - band_c * (wp // 2)) - red
        ar = torch.arange(size, device=device)
        rows = top[:, None] + ar  # [p, L]
        cols = left[:, None] + ar
        inside = ((rows >= 0) & (rows < m))[:, :, None] & ((cols >= 0) & (cols < n))[:, None, :]
        kernels = _band_kernels(wavelet, dtype, device)[:, 0]  # [4, L, L]
        weights = kernels[2 * band_r + band_c] * inside
        self.targets = torch.where(inside, rows[:, :, None] * n + cols[:, None, :], 0).reshape(len(pos), -1)
        self.weights = weights.reshape(len(pos), -1)

    def synthesize(self, values: torch.Tensor) -> torch.Tensor:
        return dense_delta(self.plan, values, 1.0, values.dtype)

    def adjoint(self, y: torch.Tensor) -> torch.Tensor:
        return (y.reshape(-1)[self.targets] * self.weights).sum(dim=1)


def least_squares(op: SupportOperator, target: torch.Tensor, start: torch.Tensor, iterations: int,
                  tolerance: float = 1e-12) -> torch.Tensor:
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


def extract_layer(delta: torch.Tensor, n_coefficients: int, wavelet: str = "db1", iterations: int = 100,
                  support_rounds: int = 4, device=None) -> tuple[torch.Tensor, torch.Tensor, float]:
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


def extract(deltas: Mapping[str, torch.Tensor], n_coefficients: int, wavelet: str = "db1",
            scaling: float = DEFAULT_SCALING, seed: int = DEFAULT_SEED, iterations: int = 100,
            support_rounds: int = 4, metadata: Mapping[str, str] | None = None, device=None,
            log: Callable[[str], None] | None = None) -> tuple[Adapter, dict]:
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
        layer = Layer(spectrum=(values / scaling).to("cpu", torch.float32),
                      indices=positions.to("cpu", torch.int32 if m * n < 2**31 else torch.int64),
                      shape=tuple(delta.shape), scaling=scaling, wavelet=wavelet)
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
    if md.get("modelspec.architecture"):
        md["modelspec.architecture"] = re.sub(r"/lora$", "/waveft", md["modelspec.architecture"])
    md.update({"waveft.source": "extracted", "waveft.seed": str(int(seed)), "waveft.wavelet": wavelet,
               "waveft.scaling": repr(scaling)})
    return Adapter(layers=layers, metadata=md), report


# ---------------------------------------------------------------------------------------------------------
# LoRA -> dense ΔW

_LORA_PAIRS = (  # (up suffix, down suffix)
    (".lora_up.weight", ".lora_down.weight"),
    (".lora_B.weight", ".lora_A.weight"),
    (".lora.up.weight", ".lora.down.weight"),
    (".lora_linear_layer.up.weight", ".lora_linear_layer.down.weight"),
)
_UNSUPPORTED = {".lora_mid.weight": "LoCon Tucker (lora_mid)", ".dora_scale": "DoRA",
                ".hada_w1_a": "LoHa", ".lokr_w1": "LoKr", ".lokr_w1_a": "LoKr"}
_KOHYA_TE = {"lora_te_": "clip_l", "lora_te1_": "clip_l", "lora_te2_": "clip_g"}
_DIFFUSERS_UNET_ROOTS = ("down_blocks", "up_blocks", "mid_block", "conv_in", "conv_out", "conv_norm_out",
                         "time_embedding", "add_embedding")


def lora_module_name(prefix: str, known: Mapping[str, str] | None = None, te_clip: str | None = None) -> str | None:
    """The native module name of a LoRA key prefix in ComfyUI-native, kohya (LDM or diffusers UNet names) or
    PEFT/diffusers spelling; None when it cannot be named. `known` maps underscored -> dotted native names
    without their part prefix (see `lora_deltas`)."""
    if prefix.startswith((UNET, CLIP_PREFIX)):
        return prefix
    if prefix.startswith("lora_unet_"):
        dotted = resolve_underscores(prefix[len("lora_unet_"):], known)
        if dotted.startswith(_DIFFUSERS_UNET_ROOTS):  # kohya's SD1 LoRAs use diffusers module names
            dotted = diffusers_unet_to_ldm(dotted)
        return UNET + dotted if dotted else None
    for head, clip in _KOHYA_TE.items():
        if prefix.startswith(head):
            dotted = resolve_underscores(prefix[len(head):], known)
            if head != "lora_te2_" and te_clip:
                clip = te_clip
            return f"{CLIP_PREFIX}{clip}.transformer.{dotted}"
    native = to_native(prefix)
    return native if native.startswith((UNET, CLIP_PREFIX)) else None


def _underscored_names(known: Iterable[str]) -> dict[str, str]:
    """{underscored: dotted} of native names, without `diffusion_model.` / `text_encoders.<clip>.transformer.`."""
    out = {}
    for name in known:
        if name.startswith(UNET):
            bare = name[len(UNET):]
        else:
            m = _NATIVE_CLIP.fullmatch(name)
            if not m:
                continue
            bare = m[2]
        out.setdefault(bare.replace(".", "_"), bare)
    return out


def lora_delta(up: torch.Tensor, down: torch.Tensor, alpha: float | None) -> torch.Tensor:
    """(up @ down) * alpha / rank in float32, shaped like the weight (down's trailing dims: conv kernels)."""
    rank = down.shape[0]
    if up.dim() > 2 and any(s != 1 for s in up.shape[2:]):
        raise ValueError(f"a LoRA up weight of shape {list(up.shape)} is not a 1x1 projection")
    if up.shape[1] != rank:
        raise ValueError(f"LoRA up {list(up.shape)} and down {list(down.shape)} have different ranks")
    scale = 1.0 if alpha is None else float(alpha) / rank
    d = up.reshape(up.shape[0], rank).float() @ down.reshape(rank, -1).float()
    return (d * scale).reshape(up.shape[0], *down.shape[1:])


def lora_deltas(lora_state_dict: Mapping[str, torch.Tensor], known_modules: Iterable[str] | None = None) -> LazyDeltas:
    """native module name -> ΔW = (up @ down) * alpha / rank for every LoRA pair of a state dict, computed on
    access. Keys may be ComfyUI-native (`diffusion_model.X.lora_up.weight`), kohya (`lora_unet_…`, `lora_te_…`,
    `lora_te1_…`, `lora_te2_…`; LDM or diffusers UNet names) or PEFT-style (`….lora_A.weight`/`lora_B.weight`).
    `known_modules` (native names, e.g. `checkpoint_module_names(base)`) settles kohya names exactly and
    rejects names the base model does not have; without it standard SD1/SDXL names are assumed.
    Unreadable prefixes end up in `.skipped`; LyCORIS/DoRA tensors raise ValueError."""
    keys = set(lora_state_dict)
    for key in keys:
        for suffix, kind in _UNSUPPORTED.items():
            if key.endswith(suffix):
                raise ValueError(f"{key}: {kind} tensors are not a plain LoRA; only up/down (A/B) pairs convert")
    known_set = set(known_modules) if known_modules is not None else None
    known = _underscored_names(known_set) if known_set is not None else None
    te_clip = None
    clips = {m[1] for m in map(_NATIVE_CLIP.fullmatch, known_set or ()) if m}
    if "clip_h" in clips and "clip_l" not in clips:
        te_clip = "clip_h"  # SD2: lora_te_ means the OpenCLIP-H encoder
    makers: dict[str, Callable[[], torch.Tensor]] = {}
    skipped: list[tuple[str, str]] = []
    used: set[str] = set()
    for key in sorted(keys):
        for up_suffix, down_suffix in _LORA_PAIRS:
            if not key.endswith(up_suffix):
                continue
            prefix = key[:-len(up_suffix)]
            down_key = prefix + down_suffix
            if down_key not in keys:
                raise ValueError(f"{key} has no matching {down_key}")
            used.update((key, down_key, prefix + ".alpha"))
            name = lora_module_name(prefix, known, te_clip)
            if name is None:
                skipped.append((prefix, "not an SD1/SDXL UNet or text-encoder module name this converter knows"))
            elif known_set is not None and name not in known_set:
                skipped.append((prefix, f"{name} is not in the base model"))
            elif name in makers:
                raise ValueError(f"two LoRA entries name the same layer {name} (the second is {prefix})")
            else:
                alpha_t = lora_state_dict.get(prefix + ".alpha")
                alpha = float(alpha_t.reshape(-1)[0]) if alpha_t is not None else None
                makers[name] = (lambda u=key, d=down_key, a=alpha:
                                lora_delta(lora_state_dict[u], lora_state_dict[d], a))
            break
    if not makers:
        raise ValueError("no LoRA up/down (or A/B) pairs that name SD1/SDXL layers were found")
    for key in sorted(keys - used):
        skipped.append((key, "not part of a LoRA pair"))
    return LazyDeltas(makers, skipped)


# ---------------------------------------------------------------------------------------------------------
# Fine-tuned checkpoint minus base -> dense ΔW

TARGETS = ("attention", "linear", "all")
_ATTENTION = re.compile(r".*\.(attn[12]\.(to_q|to_k|to_v|to_out\.0)|self_attn\.(q|k|v|out)_proj)")


def _wanted(name: str, shape: tuple[int, ...], targets: str) -> bool:
    if targets == "attention":
        return len(shape) == 2 and bool(_ATTENTION.fullmatch(name))
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
    ft_path = _checked_safetensors(finetuned_path, "fine-tuned checkpoint")
    base_path = _checked_safetensors(base_path, "base checkpoint")
    ft_header, _ = read_header(ft_path)
    base_header, _ = read_header(base_path)
    ft_layout, base_layout = checkpoint_layout(ft_header), checkpoint_layout(base_header)
    common = [name for name in ft_layout if name in base_layout]
    if not common:
        raise ValueError(f"{ft_path.name} and {base_path.name} share no UNet or text-encoder weights")

    def read(path, loc: Location) -> torch.Tensor:
        with _open(path) as f:
            if loc.rows is None:
                return f.get_tensor(loc.key)
            return f.get_slice(loc.key)[loc.rows[0]:loc.rows[1]]

    def make(name):
        return lambda: read(ft_path, ft_layout[name]).float() - read(base_path, base_layout[name]).float()

    makers, skipped = {}, []
    for name in sorted(common):
        shape = location_shape(ft_header, ft_layout[name])
        if shape != location_shape(base_header, base_layout[name]):
            raise ValueError(f"{name}: shape {list(shape)} in {ft_path.name} but "
                             f"{list(location_shape(base_header, base_layout[name]))} in {base_path.name}; "
                             "are they the same model family?")
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
        md["ss_base_model_version"] = base_model
    return LazyDeltas(makers, skipped, md)


# ---------------------------------------------------------------------------------------------------------
# Merging into a checkpoint


def merge_into_checkpoint(checkpoint_path, adapter: Adapter | str | Path, strength: float, out_path,
                          strict: bool = True) -> dict:
    """Write a copy of a single-file .safetensors checkpoint with strength x ΔW added to the adapter's weights
    (UNet, CLIP-L, and the OpenCLIP CLIP-G/CLIP-H of SDXL/SD2, whose q/k/v are rows of `attn.in_proj_weight`).
    The sum is computed in float32 (float64 for float64 weights) and stored in each weight's dtype; every other
    byte, metadata included, is copied unchanged. Written atomically.

    A layer that matches no weight or whose shape differs raises ValueError naming it; with strict=False such
    layers are skipped and listed in report['skipped']. Report: {'merged', 'tensors_changed', 'skipped'}."""
    from . import load

    if not isinstance(adapter, Adapter):
        adapter = load(adapter)
    strength = float(strength)
    if not math.isfinite(strength):
        raise ValueError(f"strength must be a finite number, got {strength}")
    src = _checked_safetensors(checkpoint_path, "checkpoint")
    out = Path(out_path)
    if out.suffix.lower() != ".safetensors":
        raise ValueError(f"{out}: the merged checkpoint needs a .safetensors name")
    if sys.byteorder != "little":
        raise ValueError("merging writes raw little-endian tensor bytes; this machine is big-endian")
    header, data_start = read_header(src)
    layout = checkpoint_layout(header)

    by_key: dict[str, list[tuple[Layer, Location]]] = {}
    problems: list[tuple[str, str]] = []
    for name, layer in adapter.layers.items():
        loc = layout.get(name)
        if loc is None:
            problems.append((name, f"matches no weight in {src.name}"))
            continue
        shape = location_shape(header, loc)
        if matrix_shape(shape) != layer.matrix_shape:
            problems.append((name, f"has shape {list(layer.shape)} but the weight {loc.key} is {list(shape)}"))
            continue
        if not header[loc.key]["dtype"].startswith(("F", "BF")):
            problems.append((name, f"the weight {loc.key} is {header[loc.key]['dtype']}, not floating point"))
            continue
        by_key.setdefault(loc.key, []).append((layer, loc))
    if problems and strict:
        listed = "; ".join(f"{n} {why}" for n, why in problems[:5])
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise ValueError(f"{len(problems)} adapter layer(s) do not fit {src.name}: {listed}{more}")
    if not by_key:
        raise ValueError(f"no adapter layer matches a weight of {src.name}; is it the right base model?")

    def write(tmp):
        shutil.copyfile(src, tmp)
        with _open(src) as f, open(tmp, "r+b") as dst:
            for key, entries in by_key.items():
                weight = f.get_tensor(key)
                compute = compute_dtype(weight.dtype)
                total = weight.to(compute)
                for layer, loc in entries:
                    part = total if loc.rows is None else total[loc.rows[0]:loc.rows[1]]
                    part += layer.delta(compute, device="cpu", strength=strength).reshape(part.shape)
                data = total.to(weight.dtype).contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                begin, end = header[key]["data_offsets"]
                if len(data) != end - begin:
                    raise ValueError(f"{key}: {len(data)} bytes computed for a {end - begin}-byte tensor")
                dst.seek(data_start + begin)
                dst.write(data)

    atomic_write(out, write)
    return {"merged": sum(len(v) for v in by_key.values()), "tensors_changed": len(by_key),
            "skipped": problems, "strength": strength}
