"""The weight change of one WaveFT layer (FORMAT.md section 1), computed sparsely.

One decomposition level of an orthogonal wavelet is separable, so the inverse transform sends a single
coefficient at sub-band position (i, j) to an L x L patch of the output: rows 2i + a - (L - 2) and columns
2j + b - (L - 2), a, b in [0, L), with value v * f_row[a] * f_col[b], where f_row is the reconstruction
high-pass filter for coefficients in the right half of the grid (cH, cD) and the low-pass one otherwise,
and f_col is high-pass for the bottom half (cV, cD). The padding of FORMAT.md always puts the crop at (0, 0),
so patches that stick out of the m x n weight are simply clipped. ΔW therefore has at most p * L^2 non-zeros
and is added by a scatter, never built densely unless asked for.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from .wavelets import reconstruction_filters


@dataclass(frozen=True)
class DeltaPlan:
    """Where every coefficient's patch lands. Depends only on positions, shape and wavelet, not on the
    coefficient values or the strength, so a layer computes it once and reuses it."""

    rows: int
    cols: int
    patch: int  # L: side of each coefficient's patch (1 when the transform is off)
    order: torch.Tensor  # int32 [p]: coefficient order: whole patches by band (within a band, lone ones
    #                      first), then clipped ones
    band_ends: tuple[int, int, int, int]  # whole patches of band b are order[band_ends[b-1]:band_ends[b]]
    lone_ends: tuple[int, int, int, int]  # ... of which order[band_ends[b-1]:lone_ends[b]] are lone: they
    #                                        share no weight entry with any other patch
    base: torch.Tensor  # [p]: flat index of each patch's top-left corner (in `order`)
    clipped_band: torch.Tensor  # int64 [p - whole]: 2 * row_band + col_band of each clipped patch
    kernels: torch.Tensor  # [4, L, L] outer products of the filters, one per band pair
    offsets: torch.Tensor  # [L, L]: flat offset of each patch entry from its corner
    clipped_top: torch.Tensor  # int64 [p - whole]: first row of each clipped patch (may be < 0)
    clipped_left: torch.Tensor  # int64 [p - whole]: first column of each clipped patch (may be < 0)

    @property
    def whole(self) -> int:
        """How many patches lie entirely inside the weight."""
        return self.band_ends[3]

    def tensors(self) -> tuple[torch.Tensor, ...]:
        """The plan's tensors in a fixed order, for a host that moves an adapter's tensors itself (ComfyUI's
        adapter rebuild); `with_tensors` puts them back."""
        return tuple(getattr(self, name) for name in _TENSOR_FIELDS)

    def with_tensors(self, tensors) -> "DeltaPlan | None":
        """This plan with its tensors replaced by `tensors` (from `tensors()`, possibly moved to another
        device), or None when they no longer fit: another count or shape, tensors on several devices, or a
        dtype that a host's cast changed (a position cast to a float type is no position any more)."""
        tensors = tuple(tensors) if isinstance(tensors, (tuple, list)) else ()
        mine = self.tensors()
        if len(tensors) != len(mine):
            return None
        device = tensors[0].device if isinstance(tensors[0], torch.Tensor) else None
        for new, old in zip(tensors, mine):
            if (
                not isinstance(new, torch.Tensor)
                or new.shape != old.shape
                or new.device != device
                or new.dtype != old.dtype
            ):
                return None
        return replace(self, **dict(zip(_TENSOR_FIELDS, tensors)))

    def to(self, device: torch.device, dtype: torch.dtype) -> "DeltaPlan":
        if self.order.device == device and self.kernels.dtype == dtype:
            return self
        return DeltaPlan(
            self.rows,
            self.cols,
            self.patch,
            self.order.to(device),
            self.band_ends,
            self.lone_ends,
            self.base.to(device),
            self.clipped_band.to(device),
            self.kernels.to(device, dtype),
            self.offsets.to(device),
            self.clipped_top.to(device),
            self.clipped_left.to(device),
        )


_TENSOR_FIELDS = ("order", "base", "clipped_band", "kernels", "offsets", "clipped_top", "clipped_left")


def matrix_shape(shape: tuple[int, ...]) -> tuple[int, int]:
    """(m, n): the weight viewed as m rows of prod(rest) columns (Linear: itself; Conv: out x in*kh*kw)."""
    m = int(shape[0])
    n = 1
    for s in shape[1:]:
        n *= int(s)
    return m, n


def padded_grid(m: int, n: int, size: int) -> tuple[int, int, int]:
    """(red, padded rows, padded cols) of FORMAT.md step 1 for a filter of length `size`: m + size - 2 and
    n + size - 2, each rounded up to even."""
    red = size - 2
    return red, m + red + ((m + red) & 1), n + red + ((n + red) & 1)


def patch_corners(idx: torch.Tensor, m: int, n: int, size: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """For flat positions `idx` (int64) on the unpadded m x n grid: the first row and column of each
    coefficient's size x size patch in W (below 0 or past the edge where the patch is clipped), and its band
    2 * row_band + col_band (0 cA, 1 cH, 2 cV, 3 cD)."""
    red, padded_rows, padded_cols = padded_grid(m, n, size)
    r = idx // n + (padded_rows - m) // 2
    c = idx % n + (padded_cols - n) // 2
    half_r, half_c = padded_rows // 2, padded_cols // 2
    band_r = (r >= half_r).to(torch.int64)
    band_c = (c >= half_c).to(torch.int64)
    return 2 * (r - band_r * half_r) - red, 2 * (c - band_c * half_c) - red, 2 * band_r + band_c


def band_kernels(wavelet: str, dtype: torch.dtype = torch.float64, device=None) -> torch.Tensor:
    """[4, L, L]: the patch one unit coefficient of each band adds to W (outer products of the filters)."""
    lo, hi = reconstruction_filters(wavelet)
    filt = torch.stack([torch.from_numpy(lo.copy()), torch.from_numpy(hi.copy())])  # [2, L]
    # The top-right quadrant holds cH, high-pass along the rows: the row filter follows the column band and
    # the column filter the row band (PyWavelets' idwt2 convention, FORMAT.md step 3).
    kernels = (filt[None, :, :, None] * filt[:, None, None, :]).reshape(4, len(lo), len(lo))
    return kernels.to(device=device, dtype=dtype)


class PlanCache:
    """A layer's DeltaPlan, built once on the CPU (float64 kernels) when first asked for and kept per (device,
    dtype) it is used in: a few dozen KiB each. The one cache of plans, for loaded and for trainable layers."""

    def __init__(self, indices: torch.Tensor, shape: tuple[int, ...], wavelet: str | None):
        self._indices, self._shape, self._wavelet = indices, shape, wavelet
        self._plans: dict[tuple[torch.device, torch.dtype], DeltaPlan] = {}

    def get(self, device: torch.device | str | None = None, dtype: torch.dtype = torch.float32) -> DeltaPlan:
        key = (torch.device(device if device is not None else "cpu"), dtype)
        plan = self._plans.get(key)
        if plan is None:
            cpu_key = (torch.device("cpu"), torch.float64)
            base = self._plans.get(cpu_key)
            if base is None:
                base = self._plans[cpu_key] = make_plan(self._indices, self._shape, self._wavelet)
            plan = self._plans[key] = base.to(*key)
        return plan


def make_plan(indices: torch.Tensor, shape: tuple[int, ...], wavelet: str | None) -> DeltaPlan:
    """Plan for flat positions `indices` on the unpadded m x n grid. `wavelet=None` means use_idwt=false."""
    m, n = matrix_shape(shape)
    idx = indices.detach().to("cpu", torch.int64).reshape(-1)
    if wavelet is None:
        size = 1
        base = idx
        top, left = idx // n, idx % n
        band = torch.zeros_like(idx)
        whole = torch.ones_like(idx, dtype=torch.bool)
        kernels = torch.ones(4, 1, 1, dtype=torch.float64)
    else:
        kernels = band_kernels(wavelet)
        size = kernels.shape[-1]
        top, left, band = patch_corners(idx, m, n, size)
        base = top * n + left
        whole = (top >= 0) & (top + size <= m) & (left >= 0) & (left + size <= n)
    ar = torch.arange(size, dtype=torch.int64)
    offsets64 = ar[:, None] * n + ar[None, :]
    clipped = torch.nonzero(~whole).reshape(-1)
    whole_idx = torch.nonzero(whole).reshape(-1)
    # Patches that share no weight entry with another patch can be written without sorting (the fp16/bf16
    # path then needs no coalescing for them); found once here, by counting every target.
    overlapping = _overlapping(base[whole_idx], top[clipped], left[clipped], m, n, size, offsets64)
    # Whole patches sorted by band let each band's values be one broadcast multiply (no gather).
    key = band[whole_idx] * 2 + overlapping.to(torch.int64)
    whole_idx = whole_idx[torch.argsort(key, stable=True)]
    counts = torch.bincount(key[torch.argsort(key, stable=True)], minlength=8).tolist()
    band_ends = tuple(int(sum(counts[: 2 * b + 2])) for b in range(4))
    lone_ends = tuple(int(sum(counts[: 2 * b + 1])) for b in range(4))
    order = torch.cat([whole_idx, clipped]).to(torch.int32)
    targets = index_dtype(m * n)
    return DeltaPlan(
        m,
        n,
        size,
        order,
        band_ends,
        lone_ends,
        base[order.long()].to(targets),
        band[clipped],
        kernels,
        offsets64.to(targets),
        top[clipped],
        left[clipped],
    )


# Patch entries handled at once when a plan is made or applied: bounds the memory a layer needs while it
# loads or is patched to O(CHUNK + m*n), whatever its p and filter length (a coif17 layer of a few thousand
# coefficients has tens of millions of patch entries).
CHUNK = 1 << 21


def _clipped_targets(top: torch.Tensor, left: torch.Tensor, m: int, n: int, size: int) -> torch.Tensor:
    """Flat targets inside the m x n weight of clipped patches with corners (top, left)."""
    ar = torch.arange(size, dtype=torch.int64)
    rr, cc = top[:, None] + ar, left[:, None] + ar
    ok = ((rr >= 0) & (rr < m))[:, :, None] & ((cc >= 0) & (cc < n))[:, None, :]
    return (rr[:, :, None] * n + cc[:, None, :])[ok]


def _overlapping(whole_base, clipped_top, clipped_left, m: int, n: int, size: int, offsets) -> torch.Tensor:
    """bool [whole]: whether each whole patch shares a weight entry with another patch. Small plans sort all
    targets; large ones count them in a dense int16 map of the weight (a target has at most L^2 patches, 10404
    for coif17), a chunk of patches at a time, so memory stays O(m*n + CHUNK) instead of ~33 bytes per entry."""
    rows = size * size
    flat_offsets = offsets.reshape(-1)
    if (whole_base.numel() + clipped_top.numel()) * rows <= CHUNK:
        whole_targets = whole_base[:, None] + flat_offsets
        all_targets = torch.cat([whole_targets.reshape(-1), _clipped_targets(clipped_top, clipped_left, m, n, size)])
        uniq, counts = torch.unique(all_targets, return_counts=True)
        return torch.isin(whole_targets, uniq[counts > 1]).any(dim=1)
    step = max(1, CHUNK // rows)
    counts = torch.zeros(m * n, dtype=torch.int16)
    for a in range(0, whole_base.numel(), step):
        t = (whole_base[a : a + step, None] + flat_offsets).reshape(-1)
        counts.index_add_(0, t, torch.ones(t.numel(), dtype=torch.int16))
    for a in range(0, clipped_top.numel(), step):
        t = _clipped_targets(clipped_top[a : a + step], clipped_left[a : a + step], m, n, size)
        counts.index_add_(0, t, torch.ones(t.numel(), dtype=torch.int16))
    parts = [
        (counts[whole_base[a : a + step, None] + flat_offsets] > 1).any(dim=1)
        for a in range(0, whole_base.numel(), step)
    ]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool)


def index_dtype(numel: int) -> torch.dtype:
    """Positions and scatter targets of a weight with `numel` entries: int32 halves the index traffic (and a
    layer's plan is ~12 bytes per coefficient); int64 only from 2^31 entries on."""
    return torch.int32 if numel < 2**31 else torch.int64


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    # fp16/bf16 are computed in fp32 and rounded once; fp64 stays fp64 (used for reference checks).
    return torch.float64 if dtype == torch.float64 else torch.float32


def contributions(plan: DeltaPlan, spectrum: torch.Tensor, factor: float, split_lone: bool = False):
    """Flat (targets, values, targets_unique) pieces of every non-zero entry of factor * ΔW: the whole patches,
    then the clipped ones, at most CHUNK entries a piece (a generator: memory stays bounded). With
    `split_lone`, the whole patches come as two kinds: lone ones (targets unique and shared with no other
    piece) and overlapping ones.

    `spectrum` is on the plan's device in the compute dtype. Clipped patch entries are redirected to
    target 0 with value 0, so no step depends on data-dependent sizes (no device sync)."""
    v = spectrum[plan.order] * factor
    k = plan.whole
    step = max(1, CHUNK // (plan.patch * plan.patch))
    if k:
        if split_lone:
            starts = (0,) + plan.band_ends[:3]
            groups = [(zip(starts, plan.lone_ends), True), (zip(plan.lone_ends, plan.band_ends), False)]
        else:
            groups = [([(0, k)], False)]
        for spans, unique in groups:
            spans = [(s, e) for s, e in spans if e > s]
            if len(spans) > 1 and sum(e - s for s, e in spans) <= step:  # one piece, as few kernels as can be
                pieces = [_whole_patches(plan, v, s, e) for s, e in spans]
                yield torch.cat([t for t, _ in pieces]), torch.cat([x for _, x in pieces]), unique
                continue
            for s, e in spans:
                for a in range(s, e, step):
                    yield (*_whole_patches(plan, v, a, min(e, a + step)), unique)
    for a in range(k, v.numel(), step):
        yield (*_clipped_patches(plan, v, a, min(v.numel(), a + step)), False)


def _clipped_patches(plan: DeltaPlan, v: torch.Tensor, a: int, z: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat targets and values of the clipped patches order[a:z] (a >= plan.whole)."""
    n, size, k = plan.cols, plan.patch, plan.whole
    ar = torch.arange(size, device=v.device)
    rr = plan.clipped_top[a - k : z - k, None] + ar  # [q, L]
    cc = plan.clipped_left[a - k : z - k, None] + ar
    ok = ((rr >= 0) & (rr < plan.rows))[:, :, None] & ((cc >= 0) & (cc < n))[:, None, :]
    tgts = torch.where(ok, rr[:, :, None] * n + cc[:, None, :], 0).to(plan.base.dtype)
    vals = v[a:z, None, None] * plan.kernels[plan.clipped_band[a - k : z - k]]
    vals = torch.where(ok, vals, torch.zeros((), dtype=vals.dtype, device=vals.device))
    return tgts.reshape(-1), vals.reshape(-1)


def _whole_patches(plan: DeltaPlan, v: torch.Tensor, a: int, z: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Flat targets and values of the whole patches order[a:z]: one broadcast multiply per band."""
    size = plan.patch
    bounds = [
        (b, max(s, a), min(e, z))
        for b, (s, e) in enumerate(zip((0,) + plan.band_ends[:3], plan.band_ends))
        if min(e, z) > max(s, a)
    ]
    if v.requires_grad:  # out= is not differentiable
        vals = torch.cat([v[s:e, None, None] * plan.kernels[b] for b, s, e in bounds])
    else:
        vals = torch.empty(z - a, size, size, dtype=v.dtype, device=v.device)
        for b, s, e in bounds:
            torch.mul(v[s:e, None, None], plan.kernels[b], out=vals[s - a : e - a])
    tgts = plan.base[a:z, None, None] + plan.offsets
    return tgts.reshape(-1), vals.reshape(-1)


def dense_delta(plan: DeltaPlan, spectrum: torch.Tensor, factor: float, dtype: torch.dtype) -> torch.Tensor:
    """factor * ΔW as a dense [m, n] matrix; differentiable with respect to `spectrum`."""
    compute = compute_dtype(dtype)
    plan = plan.to(spectrum.device, compute)
    out = torch.zeros(plan.rows * plan.cols, dtype=compute, device=spectrum.device)
    for tgts, vals, _ in contributions(plan, spectrum.to(compute), factor):
        out = out.index_add(0, tgts, vals)
    return out.reshape(plan.rows, plan.cols).to(dtype)


def add_into(weight: torch.Tensor, plan: DeltaPlan, spectrum: torch.Tensor, factor: float) -> torch.Tensor:
    """weight += factor * ΔW in place, on the weight's device, without building ΔW densely.

    fp32/fp64 contiguous weights take a direct scatter-add. fp16/bf16 (or strided) weights get the sums
    per entry in fp32 first and are rounded once, as a dense W + ΔW would be."""
    if weight.numel() != plan.rows * plan.cols or weight.shape[0] != plan.rows:
        raise ValueError(
            f"weight of shape {list(weight.shape)} does not match the adapter layer's {plan.rows} x {plan.cols}"
        )
    if factor == 0:
        return weight  # bit-identical: even -0.0 entries stay as they are
    compute = compute_dtype(weight.dtype)
    plan = plan.to(weight.device, compute)
    direct = weight.dtype == compute and weight.is_contiguous()
    parts = contributions(plan, spectrum.to(weight.device, compute), factor, split_lone=not direct)
    if direct:
        flat = weight.view(-1)
        for tgts, vals, _ in parts:
            if flat.device.type == "cpu":
                flat.index_add_(0, tgts, vals)
            else:  # sorted accumulation: repeatable bits on CUDA, unlike atomics
                flat.index_put_((tgts,), vals, accumulate=True)
        return weight
    if weight.is_contiguous():
        flat = weight.view(-1)

        def write(where, sums):
            flat[where] = (flat[where].to(compute) + sums).to(weight.dtype)
    else:

        def write(where, sums):
            where = torch.unravel_index(where.long(), weight.shape)
            weight[where] = (weight[where].to(compute) + sums).to(weight.dtype)

    # Round once per entry: lone patches touch distinct entries; the rest are summed per entry first: by a
    # sort while they are few, in an fp32 map of the weight once they outnumber its entries (memory
    # O(m*n + CHUNK) then, however many patches there are).
    rows = plan.patch * plan.patch
    rest_entries = (sum(e - s for s, e in zip(plan.lone_ends, plan.band_ends)) + plan.order.numel() - plan.whole) * rows
    dense_sum = rest_entries > min(weight.numel(), CHUNK)
    if dense_sum:
        sums = torch.zeros(weight.numel(), dtype=compute, device=weight.device)
        touched = torch.zeros(weight.numel(), dtype=torch.bool, device=weight.device)
    rest = []
    for tgts, vals, unique in parts:
        if unique:
            write(tgts, vals)
        elif dense_sum:
            sums.index_add_(0, tgts, vals)
            touched[tgts] = True
        else:
            rest.append((tgts, vals))
    if dense_sum:
        where = torch.nonzero(touched).reshape(-1)
        write(where, sums[where])
    elif rest:
        tgts = torch.cat([t for t, _ in rest])
        vals = torch.cat([v for _, v in rest])
        uniq, inverse = torch.unique(tgts, return_inverse=True)
        sums = torch.zeros(uniq.numel(), dtype=compute, device=weight.device).index_add_(0, inverse, vals)
        write(uniq, sums)
    return weight


def weight_plus_delta(weight: torch.Tensor, plan: DeltaPlan, spectrum: torch.Tensor, factor: float) -> torch.Tensor:
    """weight + factor * ΔW as a new tensor, differentiable with respect to `spectrum` (and `weight`).

    Used in training: the scatter goes straight into the copy of the weight that the forward needs
    anyway, so no dense ΔW is made and the backward is a gather."""
    compute = compute_dtype(weight.dtype)
    plan = plan.to(weight.device, compute)
    flat = weight.reshape(-1)
    for tgts, vals, _ in contributions(plan, spectrum.to(weight.device, compute), factor):
        flat = flat.index_add(0, tgts, vals.to(weight.dtype))
    return flat.view(weight.shape)
