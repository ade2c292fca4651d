"""The separable form of one WaveFT layer's ΔW: the bypass product x · ΔWᵀ without forming ΔW (ComfyUI's bypass
mode calls it per forward), and ΔW added into an fp16/bf16 weight block by block (the per-forward merge).

Derivation. One level of the inverse transform is separable (FORMAT.md section 1, step 3). In 1-D, a coefficient
at sub-band position i with filter tap k lands at output 2i + k - (L - 2); delta.py shows that the padding puts
the crop at (0, 0), so as a matrix the 1-D synthesis with filter f (lo or hi) over an output of length N is

    S_f^N[r, i] = f[r - 2i + red]   (0 <= r - 2i + red < L, 0 <= r < N),   red = L - 2,

an N x N2 band (N2 = half the padded length). The four sub-bands are sparse N2-grids; the row filter of a
coefficient follows its column band and the column filter its row band (delta.band_kernels: cH, top right, is
high-pass along the rows). Writing C_ab for the sub-band with row filter a and column filter b,

    ΔW = scaling · Σ_{a,b ∈ {lo,hi}} S_a^m · C_ab · (S_b^n)ᵀ        (m x n)

and the bypass output of tokens x (T x n) is

    x · ΔWᵀ = scaling · Σ_a ( Σ_b (x · S_b^n) · C_abᵀ ) · (S_a^m)ᵀ.

Read right to left it is three cheap steps, never an m x n matrix:
  1. analysis along the input:   U_b = x · S_b^n, i.e. U_b[t, j] = Σ_k x[t, 2j + k - red] f_b[k]  (a strided
     correlation, T·n·L multiply-adds for both filters together);
  2. the sparse product:         Z_a = Σ_b U_b · C_abᵀ  (one gather, scale and scatter-add per coefficient and
     token: T·p);
  3. synthesis along the output: y = Σ_a Z_a · (S_a^m)ᵀ, i.e. y[t, 2i + k - red] += Z_a[t, i] f_a[k]
     (upsample by two and filter: T·m·L).
So T·(L·(m + n) + p) operations against T·m·n for x · ΔWᵀ with a dense ΔW (plus building ΔW: m·n + p·L²). With
use_idwt false ΔW is the bare scatter (S = identity) and only step 2 remains. A conv layer is the same product on
its im2col patches: W viewed as out x (in·kh·kw) times the unfolded input, so tokens are batch x output pixels.

For db1 (L = 2) `haar_product` takes the place of the banded steps 1 and 3: sums and differences of adjacent
features (a block-diagonal matrix of ±1 pairs, no band).

Which path a layer takes is decided by `structured_is_cheaper` from the shapes alone (an operation-count model
whose constants were measured: benchmarks/per_forward.py), never by a flag. Everything is computed in float32
(float64 stays float64) and rounded once into x's dtype, as the dense path does; nothing here reads the base
layer's output, so a trainer may call h(x, None).
"""

from __future__ import annotations

import math
import threading
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .delta import DeltaPlan, add_into, compute_dtype
from .wavelets import reconstruction_filters

BLOCK = 16  # filter outputs per block-banded product at least (2·L for longer filters)
CHUNK_ENTRIES = 1 << 17  # floats per intermediate per pass of tokens (0.5 MiB in float32: stays in cache)

# The op-count model that picks a layer's path, in units of one multiply-add of a large dense matmul. The
# structured path's filter steps are block-banded matmuls (block + red multiply-adds per feature and token,
# against L in theory, but at matmul speed), its sparse product runs ~10x slower per multiply-add than a dense
# matmul, its transposes and buffers cost ~4 per feature and token, and its ~10 extra kernel launches ~1e6.
# Building a dense ΔW costs a zero fill and a rounding of m·n entries and a scatter of p·L² (constants measured
# on CPU with benchmarks/per_forward.py; the choice only needs the right order of magnitude).
_SPARSE_COST = 10.0
_MOVE_COST = 4.0
_FIXED_COST = 1e6
_FILL_COST = 3.0
_SCATTER_COST = 4.0


def structured_is_cheaper(tokens: int, rows: int, cols: int, coefficients: int, patch: int) -> bool:
    """True when x · ΔWᵀ through the filters costs fewer (weighted) operations than forming ΔW and multiplying:
    T·((block + red + c_move)·(m + n) + c_sparse·p) + fixed  <  T·m·n + c_fill·m·n + c_scatter·p·L²."""
    taps = max(BLOCK, 2 * patch) + patch - 2 if patch > 1 else 0  # use_idwt false: no filter step at all
    structured = tokens * ((taps + _MOVE_COST) * (rows + cols) + _SPARSE_COST * coefficients) + _FIXED_COST
    dense = tokens * rows * cols + _FILL_COST * rows * cols + _SCATTER_COST * coefficients * patch * patch
    return structured < dense


@dataclass(frozen=True)
class SeparablePlan:
    """Everything but the coefficient values, built once per layer and device from the DeltaPlan.

    The coefficients form one sparse matrix K of (2·H2) x (2·W2) between the filter outputs: row 2i + a holds the
    coefficients of sub-band row i whose row filter is a, column 2j + b those of sub-band column j with column
    filter b (CSR, rows sorted). The filter steps run as dense block-banded products (BLAS, not a strided
    correlation): `block` filter outputs at a time from `block + red` inputs, the same small matrix for every
    block, since the band is translation invariant."""

    rows: int  # m
    cols: int  # n
    patch: int  # L (1: use_idwt false)
    half_rows: int  # H2 (m when use_idwt is false)
    half_cols: int  # W2 (n when use_idwt is false)
    block: int  # filter outputs per block-banded product
    order: torch.Tensor  # int64 [p]: spectrum entry of each stored value of K, CSR order
    crow: torch.Tensor  # int64 [rows of K + 1]: CSR row pointers (rows padded to whole synthesis blocks)
    source: torch.Tensor  # int64 [p]: CSR column of each value
    analysis: torch.Tensor  # [block, block + red]: U block = analysis @ x window (step 1)
    synthesis: torch.Tensor  # [block, block + red]: yᵀ block = synthesis @ Z window (step 3)
    filters: torch.Tensor  # [2, L]: (lo, hi); [1, 1] of ones without a transform
    row_of_coefficient: torch.Tensor  # int64 [p]: the CSR row of each value (the row of M in the merge)
    crow_host: tuple  # crow as Python ints: the merge slices coefficients per block of rows without a device sync

    @property
    def in_blocks(self) -> int:
        return -(-2 * self.half_cols // self.block)

    @property
    def out_blocks(self) -> int:
        return -(-self.rows // self.block)

    def to(self, device, dtype) -> SeparablePlan:
        if self.order.device == torch.device(device) and self.analysis.dtype == dtype:
            return self
        return SeparablePlan(
            self.rows,
            self.cols,
            self.patch,
            self.half_rows,
            self.half_cols,
            self.block,
            self.order.to(device),
            self.crow.to(device),
            self.source.to(device),
            self.analysis.to(device, dtype),
            self.synthesis.to(device, dtype),
            self.filters.to(device, dtype),
            self.row_of_coefficient.to(device),
            self.crow_host,
        )


def band_blocks(lo, hi, block: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The block-banded filter matrices (float64). Analysis: U[2j + b] = Σ_k xp[2j + k] f_b[k] for xp = x shifted
    right by red, so `block` outputs read `block + red` inputs. Synthesis: y[r] = Σ Z[2i + a] f_a[r - 2i + red];
    outputs r0..r0 + block read Z[r0 .. r0 + block + red) (i from r0/2 to r0/2 + (block + red)/2 - 1)."""
    filters = torch.tensor([list(lo), list(hi)], dtype=torch.float64)
    size = filters.shape[1]
    red = size - 2
    analysis = torch.zeros(block, block + red, dtype=torch.float64)
    synthesis = torch.zeros(block, block + red, dtype=torch.float64)
    for half in range(block // 2):
        for b in range(2):
            analysis[2 * half + b, 2 * half : 2 * half + size] = filters[b]
    for half in range((block + red) // 2):
        for r in range(block):
            k = r + red - 2 * half
            if 0 <= k < size:
                synthesis[r, 2 * half : 2 * half + 2] = filters[:, k]
    return analysis, synthesis


def separable_plan(plan: DeltaPlan, wavelet: str | None, device=None, dtype=torch.float32) -> SeparablePlan:
    """The SeparablePlan of a DeltaPlan (positions only; built on the CPU, then moved)."""
    m, n, size = plan.rows, plan.cols, plan.patch
    cpu = plan.to(torch.device("cpu"), torch.float64)
    whole = cpu.whole
    corner = cpu.base[:whole].long()
    top = torch.cat([corner // n, cpu.clipped_top])
    left = torch.cat([corner % n, cpu.clipped_left])
    band = torch.zeros(whole, dtype=torch.int64)
    for b, (start, end) in enumerate(zip((0,) + cpu.band_ends[:3], cpu.band_ends)):
        band[start:end] = b
    band = torch.cat([band, cpu.clipped_band])
    if wavelet is None:  # ΔW[row, col] = v: y[:, row] += v · x[:, col]
        half_rows, half_cols, block = m, n, 1
        source, target = left, top
        analysis = synthesis = filters = torch.ones(1, 1, dtype=torch.float64)
        k_rows = m
    else:
        red = size - 2
        half_rows, half_cols = (m + red + ((m + red) & 1)) // 2, (n + red + ((n + red) & 1)) // 2
        block = max(BLOCK, 2 * size)
        i, j = (top + red) // 2, (left + red) // 2  # patch corner 2i - red (delta.patch_corners)
        row_filter, col_filter = band % 2, band // 2  # kernels[b] = filt[b % 2] (rows) x filt[b // 2] (cols)
        source, target = 2 * j + col_filter, 2 * i + row_filter
        lo, hi = reconstruction_filters(wavelet)
        filters = torch.tensor([list(lo), list(hi)], dtype=torch.float64)
        analysis, synthesis = band_blocks(lo, hi, block)
        k_rows = -(-m // block) * block + red  # Z as the synthesis windows read it, zero rows past 2·H2
    by_target = torch.argsort(target * (2 * half_cols) + source)
    crow = torch.zeros(k_rows + 1, dtype=torch.int64)
    crow[1:] = torch.cumsum(torch.bincount(target, minlength=k_rows), 0)
    return SeparablePlan(
        m,
        n,
        size,
        half_rows,
        half_cols,
        block,
        cpu.order.long()[by_target],
        crow,
        source[by_target],
        analysis,
        synthesis,
        filters,
        target[by_target],
        tuple(crow.tolist()),
    ).to(device or "cpu", dtype)


_workspaces = threading.local()


def _workspace(slot: str, numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reusable flat buffer of at least `numel` entries per thread, device, dtype and slot. On the CPU a fresh
    buffer of a few hundred KiB is mapped anew by the allocator each time and pays a page fault per 4 KiB on
    first touch (most of a small layer's time); CUDA's caching allocator has no such cost, so only the CPU keeps
    them (at most ~1 MiB per slot)."""
    if device.type != "cpu":
        return torch.empty(numel, dtype=dtype, device=device)
    store = _workspaces.__dict__.setdefault("buffers", {})
    key = (slot, dtype)
    buffer = store.get(key)
    if buffer is None or buffer.numel() < numel:
        buffer = store[key] = torch.empty(numel, dtype=dtype)
    return buffer[:numel]


def _sparse_matrix(sep: SeparablePlan, spectrum: torch.Tensor, factor: float, dtype) -> torch.Tensor:
    """factor · K as a CSR tensor (its columns: the analysis output, or x itself without a transform)."""
    cols = sep.in_blocks * sep.block if sep.patch > 1 else sep.cols
    values = spectrum.to(dtype)[sep.order] * factor
    with warnings.catch_warnings():  # "sparse CSR support is in beta": said once per process, not ours to show
        warnings.simplefilter("ignore")
        return torch.sparse_csr_tensor(
            sep.crow, sep.source, values, (sep.crow.numel() - 1, cols), check_invariants=False
        )


def _chunk_tokens(sep: SeparablePlan) -> int:
    """Tokens per pass: keeps the [features, tokens] intermediates of one pass within ~0.5 MiB of cache each."""
    return max(32, min(1024, CHUNK_ENTRIES // max(2 * sep.half_cols, 2 * sep.half_rows, 1)))


def structured_product(x2d: torch.Tensor, sep: SeparablePlan, spectrum: torch.Tensor, factor: float) -> torch.Tensor:
    """factor · x2d · ΔWᵀ for tokens x2d [T, n] in the compute dtype: [T, m], ΔW never formed.

    Tokens go through in chunks whose intermediates stay in cache; inside a chunk the intermediates are
    feature-major ([features, tokens]), so the sparse step reads and writes whole rows."""
    tokens = x2d.shape[0]
    kmat = _sparse_matrix(sep, spectrum, factor, x2d.dtype)
    out = torch.empty(tokens, sep.rows, dtype=x2d.dtype, device=x2d.device)
    if sep.patch == 1:
        for t0 in range(0, tokens, _chunk_tokens(sep)):
            chunk = x2d[t0 : t0 + _chunk_tokens(sep)]
            out[t0 : t0 + chunk.shape[0]] = torch.sparse.mm(kmat, chunk.t().contiguous()).t()
        return out
    block, red = sep.block, sep.patch - 2
    width = sep.in_blocks * block + red
    buffers = {}
    for t0 in range(0, tokens, _chunk_tokens(sep)):
        k = min(_chunk_tokens(sep), tokens - t0)
        # x shifted right by red, zero past both edges, copied per chunk into a buffer that stays in cache: the
        # windows below read it column-wise (even unpadded, that is ~10x slower from x itself, out of cache)
        chunk = _workspace("x", k * width, x2d.dtype, x2d.device).view(k, width)
        chunk[:, :red].zero_()
        chunk[:, red + sep.cols :].zero_()
        chunk[:, red : red + sep.cols] = x2d[t0 : t0 + k]
        z = buffers.get(k)
        if z is None:
            z = buffers[k] = _workspace(f"z{k}", kmat.shape[0] * k, x2d.dtype, x2d.device).view(-1, k)
        # step 1: [in_blocks, block, k], each block a product with a transposed window of the token-major x
        windows = chunk.as_strided((sep.in_blocks, block + red, k), (block, 1, chunk.stride(0)))
        u = torch.matmul(sep.analysis, windows).view(-1, k)
        z.zero_().addmm_(kmat, u)  # step 2: [out_blocks·block + red, k], zero rows past 2·H2
        windows = z.as_strided((sep.out_blocks, block + red, k), (block * k, k, 1))
        y = torch.matmul(sep.synthesis, windows).view(-1, k)  # step 3: yᵀ, [out_blocks·block, k]
        out[t0 : t0 + k] = y[: sep.rows].t()  # the one transposition, of a chunk still in cache
    return out


def _haar_chunk_tokens(sep: SeparablePlan) -> int:
    """Tokens per pass of the Haar product: its feature-major buffers of one pass stay in L2 (measured best on CPU
    with benchmarks/per_forward.py: 128 up to 2048 features, 64 above; the largest buffer, 64 tokens of 12288
    features in float32, is 3 MiB)."""
    return 128 if max(sep.rows, sep.cols) <= 2048 else 64


_haar_pairs: dict = {}


def haar_pairs(size: int, dtype, device) -> torch.Tensor:
    """The size x size matrix of Haar's pairs, (a, b) -> (a + b, a - b) along its diagonal: both the analysis of
    adjacent input features and the synthesis of adjacent output features (it is its own transpose). Kept per
    size, dtype and device: building it costs more than a small layer's whole product."""
    key = (size, dtype, str(device))
    pairs = _haar_pairs.get(key)
    if pairs is None:
        pair = torch.tensor([[1.0, 1.0], [1.0, -1.0]], dtype=torch.float64)
        pairs = _haar_pairs[key] = torch.block_diag(*[pair] * (size // 2)).to(device, dtype)
    return pairs


def haar_product(
    x2d: torch.Tensor,
    sep: SeparablePlan,
    spectrum: torch.Tensor,
    factor: float,
    compute: torch.dtype,
    out_dtype: torch.dtype,
) -> torch.Tensor:
    """factor · x2d · ΔWᵀ for a db1 (Haar) layer: [T, m] in `out_dtype`, computed in `compute`, ΔW never formed.

    With L = 2 and red = 0 the synthesis is a 2x2 block structure and no band is needed. Both Haar filters are
    c·(1, ±1) with c² = 1/2, so with c² folded into the coefficients:
      1. pairs of input features:  U[2j] = x[2j] + x[2j+1], U[2j+1] = x[2j] - x[2j+1]  (zero past n);
      2. the sparse product:       Z = K · U  (K: the plan's CSR, rows 2i + a, columns 2j + b; T·p);
      3. pairs of output features: y[2i] = Z[2i] + Z[2i+1], y[2i+1] = Z[2i] - Z[2i+1]  (cropped to m rows).
    Steps 1 and 3 turn a pass of tokens feature-major and back as they go: each is one batched matmul of a
    `block` x `block` pairs matrix with the pass's features in blocks, which BLAS reads and writes transposed
    (measured 1.3-2x faster on CPU than a transposing copy plus elementwise sums, whose strided copies dominate).
    Its entries are ±1 and 0, so the sums stay exact. Everything stays in cache-sized buffers; x is read in its
    own dtype (no full-size float32 copy of it) and the output rounded once into `out_dtype`."""
    tokens, n, m, block = x2d.shape[0], sep.cols, sep.rows, sep.block
    in_blocks, out_blocks = sep.in_blocks, sep.out_blocks
    kmat = _sparse_matrix(sep, spectrum.to(compute), factor * 0.5, compute)  # [out_blocks·block, in_blocks·block]
    pairs = haar_pairs(block, compute, x2d.device)
    out = torch.empty(tokens, m, dtype=out_dtype, device=x2d.device)
    step = _haar_chunk_tokens(sep)
    buffers = {}
    for t0 in range(0, tokens, step):
        k = min(step, tokens - t0)
        if k not in buffers:  # a whole pass and the last one, on the same buffers (one slot each, whatever the T)
            xf = _workspace("haar x", k * in_blocks * block, compute, x2d.device).view(k, in_blocks * block)
            u = _workspace("haar u", in_blocks * block * k, compute, x2d.device).view(in_blocks, block, k)
            z = _workspace("haar z", out_blocks * block * k, compute, x2d.device).view(out_blocks, block, k)
            r = _workspace("haar r", out_blocks * k * block, compute, x2d.device).view(out_blocks, k, block)
            yf = _workspace("haar y", k * out_blocks * block, compute, x2d.device).view(k, out_blocks, block)
            xf[:, n:].zero_()  # features past n pair with zeros (odd n) or fill the last block
            buffers[k] = xf, u, z, r, yf
        xf, u, z, r, yf = buffers[k]
        xf[:, :n].copy_(x2d[t0 : t0 + k])  # token-major, converted to the compute dtype
        torch.matmul(pairs, xf.view(k, in_blocks, block).permute(1, 2, 0), out=u)  # step 1, feature-major
        z.zero_()
        z.view(-1, k).addmm_(kmat, u.view(-1, k))  # step 2
        torch.matmul(z.transpose(1, 2), pairs, out=r)  # step 3 (pairs is symmetric), token-major per block
        yf.copy_(r.permute(1, 0, 2))
        out[t0 : t0 + k].copy_(yf.view(k, -1)[:, :m])  # rounded once
    return out


def _conv_tokens(x: torch.Tensor, kernel: tuple, kw: dict):
    """im2col of a 2-D conv input: ([B·Ho·Wo, in·kh·kw] rows in the order conv weights flatten, (B, Ho, Wo)),
    or None where unfold cannot express the conv (groups, 'same' padding, other dimensionality)."""
    if x.dim() != 4 or len(kernel) != 2 or int(kw.get("groups", 1) or 1) != 1:
        return None
    padding = kw.get("padding", 0)
    if isinstance(padding, str):
        return None
    stride, dilation = kw.get("stride", 1), kw.get("dilation", 1)
    cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # [B, n, Ho·Wo]

    def out_size(size, k, s, p, d):
        return (size + 2 * p - d * (k - 1) - 1) // s + 1

    pair = torch.nn.modules.utils._pair
    ho, wo = (out_size(x.shape[2 + a], kernel[a], pair(stride)[a], pair(padding)[a], pair(dilation)[a]) for a in (0, 1))
    return cols.transpose(1, 2).reshape(-1, cols.shape[1]), (x.shape[0], ho, wo)


def bypass_output(
    x: torch.Tensor, plan: DeltaPlan, separable, spectrum: torch.Tensor, factor: float, conv: dict | None = None
) -> torch.Tensor | None:
    """factor · (x · ΔWᵀ) (Linear) or factor · conv(x, ΔW) (conv, `conv` = {kernel, stride, padding, ...}) through
    the separable path when the shapes make it cheaper, else None (the caller takes the dense path).
    `separable(dtype)` returns the layer's SeparablePlan on x's device in that dtype (built once per dtype from
    float64 filters; only asked for when used)."""
    compute = compute_dtype(x.dtype)
    m, n = plan.rows, plan.cols
    if conv is None:
        if x.shape[-1] != n:
            return None
        tokens, frame = x.numel() // n, None
    else:
        kernel = tuple(conv.get("kernel", ()))
        if len(kernel) != 2 or x.dim() != 4 or x.shape[1] * kernel[0] * kernel[1] != n:
            return None
        tokens = x.shape[0] * x.shape[2] * x.shape[3]  # stride 1's count: an upper bound, enough for the choice
    if not structured_is_cheaper(tokens, m, n, spectrum.numel(), plan.patch):
        return None
    # 2-tap filters are Haar's (db1/haar: the only ones wavelets.py accepts): pairs of features, no band, and x read
    # in its own dtype
    haar = plan.patch == 2
    if conv is None:
        x2d = x.reshape(-1, n) if haar else x.reshape(-1, n).to(compute)
    else:
        unfolded = _conv_tokens(x if haar else x.to(compute), kernel, conv)
        if unfolded is None:
            return None
        x2d, frame = unfolded
    sep = separable(compute)
    if haar:
        y = haar_product(x2d, sep, spectrum, factor, compute, x.dtype)
    else:
        y = structured_product(x2d, sep, spectrum, factor).to(x.dtype)
    if frame is None:
        return y.reshape(*x.shape[:-1], m)
    batch, ho, wo = frame
    return y.view(batch, ho, wo, m).permute(0, 3, 1, 2)


def conv_arguments(adapter, shape: tuple) -> dict | None:
    """What `bypass_output` needs of a 2-D conv from the attributes ComfyUI's bypass hook sets on an adapter
    (is_conv, conv_dim, kernel_size, kw_dict); None for a Linear layer. Another conv gets an empty dict: it takes
    the dense path."""
    if not getattr(adapter, "is_conv", False):
        return None
    if int(getattr(adapter, "conv_dim", 2) or 2) != 2:
        return {}
    kernel = tuple(shape[2:]) if len(shape) == 4 else tuple(getattr(adapter, "kernel_size", ()) or ())
    return {"kernel": kernel, **dict(getattr(adapter, "kw_dict", {}) or {})}


def add_through_filters(
    weight: torch.Tensor, sep: SeparablePlan, spectrum: torch.Tensor, factor: float
) -> torch.Tensor:
    """weight += factor · ΔW in place, ΔW formed in float32 through the same factorization, a block of rows at a
    time, each rounded once into the weight's dtype: ΔW = S_m · M with M = K · (S_n)ᵀ. A coefficient adds L values
    to one row of M (its CSR row), so the rows of ΔW from `top` to `bottom` need only the coefficients
    crow[top] .. crow[bottom + red]: a contiguous slice, scattered into a small zeroed buffer, then the block-banded
    synthesis of step 3 and one add into the weight. O(m·n·(block + red)) multiply-adds at matmul speed plus p·L
    scattered values and buffers that stay in cache, against the p·L² values that delta.add_into must sort and sum
    per entry before rounding an fp16/bf16 weight."""
    m, n, block, size = sep.rows, sep.cols, sep.block, sep.patch
    red = size - 2
    device, compute = weight.device, sep.analysis.dtype
    values = spectrum.to(device, compute)[sep.order] * factor  # CSR order: rows of M ascending
    # each coefficient's L values land at M[row, 2j - red + k] for column filter b = source % 2, j = source // 2
    cols = (sep.source - sep.source % 2 - red)[:, None] + torch.arange(size, device=device)  # [p, L]
    keep = (cols >= 0) & (cols < n)
    local = sep.row_of_coefficient[:, None] * n + cols.clamp(0, n - 1)  # flat in M; a clipped tap adds 0 in its row
    spread = torch.where(
        keep, values[:, None] * sep.filters[sep.source % 2], torch.zeros((), dtype=compute, device=device)
    )
    crow = sep.crow_host
    matrix = weight.view(m, n)
    blocks_per_pass = max(1, CHUNK_ENTRIES // (block * n))
    buffer = _workspace("rows of M", (blocks_per_pass * block + red) * n, compute, device)
    product = _workspace("rows of ΔW", blocks_per_pass * block * n, compute, device)
    for first in range(0, sep.out_blocks, blocks_per_pass):
        last = min(sep.out_blocks, first + blocks_per_pass)
        top, bottom = first * block, last * block
        a, b = crow[top], crow[bottom + red]
        rows_of_m = buffer[: (bottom - top + red) * n].zero_()
        if b > a:
            rows_of_m.index_add_(0, (local[a:b] - top * n).reshape(-1), spread[a:b].reshape(-1))
        windows = rows_of_m.as_strided((last - first, block + red, n), (block * n, n, 1))
        rows = product[: (last - first) * block * n].view(last - first, block, n)
        torch.matmul(sep.synthesis, windows, out=rows)  # [blocks, block, n] of ΔW, in cache
        rows = rows.view(-1, n)
        bottom = min(m, bottom)
        matrix[top:bottom].add_(rows[: bottom - top])  # float32 sum, rounded once into the weight's dtype
    return weight


# The merge's op-count model (fp16/bf16 weights, CPU-measured like the bypass's): delta.add_into sorts the p·L²
# patch values of overlapping patches to sum them per entry (~1.5 per value and sort level); the filtered merge
# runs m·n·(block + red) multiply-adds at matmul speed (~1/8 each) and two passes over the weight.
_SORT_COST = 1.5
_MATMUL_SHARE = 1 / 8
_PASS_COST = 2.0


def filtered_merge_is_cheaper(rows: int, cols: int, coefficients: int, patch: int) -> bool:
    """True when forming ΔW block by block through the filters beats scattering and coalescing p·L² values."""
    if patch <= 2:  # Haar's 2x2 patches mostly touch distinct entries: the scatter needs no sort for them
        return False
    values = coefficients * patch * patch
    sparse = values * _SORT_COST * max(1.0, math.log2(values))
    taps = max(BLOCK, 2 * patch) + patch - 2
    filtered = rows * cols * (taps * _MATMUL_SHARE + _PASS_COST) + coefficients * patch
    return filtered < sparse


def add_delta(weight: torch.Tensor, plan: DeltaPlan, separable, spectrum: torch.Tensor, factor: float) -> torch.Tensor:
    """weight += factor · ΔW in place, by the cheaper of delta.add_into and add_through_filters for this shape;
    the filtered path serves contiguous fp16/bf16 weights (fp32 takes add_into's direct scatter, no sorting).
    `separable(dtype)` returns the layer's SeparablePlan on the weight's device (only asked for when used)."""
    if (
        weight.dtype in (torch.float16, torch.bfloat16)
        and weight.is_contiguous()
        and factor != 0
        and weight.numel() == plan.rows * plan.cols
        and plan.patch > 1
        and filtered_merge_is_cheaper(plan.rows, plan.cols, spectrum.numel(), plan.patch)
    ):
        return add_through_filters(weight, separable(torch.float32), spectrum, factor)
    return add_into(weight, plan, spectrum, factor)
