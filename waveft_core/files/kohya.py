"""WaveFT files as kohya sd-scripts network modules save them: lora-scripts-next's `networks/waveft_anima.py`
(offered as `lora_type: "waveft"` in its GUI, for Anima), and the same file after its
`convert_anima_lora_to_comfy.py` (`diffusion_model.*` names).

Per layer `<name>` (`lora_unet_<module path, '.' -> '_'>`, `lora_te_…` for the text encoder, or the converted
`diffusion_model.<module>`):

    waveft_spectrum        [p]     the coefficients
    waveft_indices         [2, p]  (row, col) on the unpadded m x n grid: PEFT's positions,
                                   randperm(m*n, Generator().manual_seed(seed))[:p] split by n
    waveft_scaling         []      per-layer scaling
    waveft_random_loc_seed []      the seed that drew the positions
    waveft_use_idwt        []      per layer
    waveft_family_code     []      1 = db1, the only family their module knows
    alpha                  []      kohya's, = p; not used by the math

No weight shape is stored: it comes from the model the file is applied to (or a base checkpoint). Their math
is FORMAT.md section 1 exactly (db1 on a grid padded to even size), so a layer becomes a native Layer.

Their `save_weights` casts every tensor to the save precision, positions and seed included. float32 keeps every
integer below 2^24 (exact in practice); float16 rounds positions above 2048 and bfloat16 above 256 (the seed
777 becomes 776). Rounded positions are never applied: they are drawn again from the seed (ss_network_args, or
the stored seed and its neighbours that round to it) and accepted only when the drawn positions, rounded the
same way, reproduce every stored one."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import torch

from ..adapter import Adapter, Layer
from ..convert.peft_io import peft_positions
from ..delta import matrix_shape
from ..keys import (
    DEFAULT_SEED,
    KOHYA_ARG_SEED,
    KOHYA_SUFFIXES,
    META_ARCHITECTURE,
    META_BASE_MODEL,
    META_IMPORT_NOTES,
    META_LEGACY_HASH,
    META_MODEL_HASH,
    META_NETWORK_ARGS,
    META_NETWORK_MODULE,
    META_SEED,
    META_SOURCE,
    SUFFIX_INDICES,
    SUFFIX_KOHYA_FAMILY,
    SUFFIX_KOHYA_SEED,
    SUFFIX_SCALING,
    SUFFIX_SPECTRUM,
    SUFFIX_USE_IDWT,
)
from ..names.families import TE_PREFIX, UNET_PREFIX
from .kinds import DESCRIPTIONS, KOHYA
from .printable import short_list
from .storage import WaveFTFileError

FAMILY_CODES = {1: "db1"}  # their wavelet family codes
# Integers a float type stores exactly and unambiguously: every stored value below this is the saved integer.
EXACT_BELOW = {torch.float32: 2**24, torch.float16: 2**11, torch.bfloat16: 2**8, torch.float64: 2**53}
PRECISION_NAMES = {torch.float32: "float", torch.float16: "fp16", torch.bfloat16: "bf16", torch.float64: "float64"}
TRAINER = DESCRIPTIONS[KOHYA]
RESAVE = (
    "re-save it from the training state with save_precision float (their GUI: 'save precision' fp32), or train again"
)


@dataclass
class StoredLayer:
    """One layer as the file stores it, checked for what can be checked without the weight's shape."""

    name: str
    spectrum: torch.Tensor  # float [p], as stored
    rows: torch.Tensor  # as stored: int64 or the save precision
    cols: torch.Tensor
    scaling: float
    seed: float  # as stored (rounded in bfloat16)
    seed_dtype: torch.dtype
    use_idwt: bool

    @property
    def positions_exact(self) -> bool:
        """The stored (row, col) are the saved integers: an integer type, or floats all below the type's exact range."""
        limit = EXACT_BELOW.get(self.rows.dtype)
        if limit is None:
            return True
        return self.rows.numel() == 0 or max(float(self.rows.max()), float(self.cols.max())) < limit

    @property
    def precision(self) -> str:
        return PRECISION_NAMES.get(self.rows.dtype, str(self.rows.dtype).removeprefix("torch."))


@dataclass
class KohyaFile:
    path: str
    layers: dict[str, StoredLayer]
    metadata: dict[str, str]
    seed_hint: int | None  # the seed the trainer was given (ss_network_args), when the file says
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def precision(self) -> str:
        names = {layer.precision for layer in self.layers.values()}
        return names.pop() if len(names) == 1 else "mixed"


def _scalar(path, key: str, t: torch.Tensor) -> float:
    if t.numel() != 1:
        raise WaveFTFileError(path, f"must be a scalar, got shape {list(t.shape)}", key=key, advice=_advice())
    value = float(t.reshape(()).to(torch.float64))
    if not math.isfinite(value):
        raise WaveFTFileError(path, f"{value} is not finite", key=key, advice=_advice())
    return value


def _advice() -> str:
    return f"It is {TRAINER}, and this part of it is damaged; {RESAVE}"


def seed_hint_of_file(path) -> int | None:
    """The seed in a file's ss_network_args, from its header only; None when it cannot be read."""
    from .storage import peek_header

    header = peek_header(path) if path else None
    return _seed_hint(header.metadata) if header is not None else None


def _seed_hint(metadata: Mapping[str, str]) -> int | None:
    text = metadata.get(META_NETWORK_ARGS)
    if not text:
        return None
    try:
        args = json.loads(text)
        return int(str(args.get(KOHYA_ARG_SEED, DEFAULT_SEED)).strip())  # their default is PEFT's 777
    except (ValueError, TypeError, AttributeError):
        return None


def read(tensors: Mapping[str, torch.Tensor], metadata: Mapping[str, str], path="<memory>") -> KohyaFile:
    """The layers of a kohya-style WaveFT file, each checked on its own (the positions' range and uniqueness
    need the weight's shape: `layer_for`)."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    extra = {}
    for key, t in tensors.items():
        module, _, suffix = key.rpartition(".")
        if module and suffix in KOHYA_SUFFIXES:
            groups.setdefault(module, {})[suffix] = t
        else:
            extra[key] = t  # kohya's alpha and anything else: kept, not used
    layers = {}
    for name in sorted(groups):
        parts = groups[name]
        for suffix in KOHYA_SUFFIXES:
            if suffix not in parts:
                raise WaveFTFileError(
                    path,
                    f"missing: every layer of {TRAINER} has {', '.join(KOHYA_SUFFIXES)}",
                    key=f"{name}.{suffix}",
                    advice=_advice(),
                )
        layers[name] = _stored_layer(path, name, parts)
    if not layers:
        raise WaveFTFileError(path, "holds no kohya-style WaveFT layers")
    return KohyaFile(str(path), layers, dict(metadata), _seed_hint(metadata), extra)


def _stored_layer(path, name: str, parts: Mapping[str, torch.Tensor]) -> StoredLayer:
    spectrum, indices = parts[SUFFIX_SPECTRUM], parts[SUFFIX_INDICES]
    k = f"{name}.%s"
    if not spectrum.dtype.is_floating_point or spectrum.dim() != 1:
        raise WaveFTFileError(
            path,
            f"must be a 1-D float tensor, got {spectrum.dtype} {list(spectrum.shape)}",
            key=k % SUFFIX_SPECTRUM,
            advice=_advice(),
        )
    if not torch.isfinite(spectrum).all():
        raise WaveFTFileError(
            path,
            "has NaN or infinite coefficients",
            key=k % SUFFIX_SPECTRUM,
            advice="The training diverged; use an earlier save or a lower learning rate",
        )
    if indices.dim() != 2 or indices.shape[0] != 2 or indices.shape[1] != spectrum.numel():
        raise WaveFTFileError(
            path,
            f"must be [2, {spectrum.numel()}] (row, col) for {spectrum.numel()} coefficients, "
            f"got {list(indices.shape)}",
            key=k % SUFFIX_INDICES,
            advice=_advice(),
        )
    if indices.dtype == torch.bool or indices.is_complex():
        raise WaveFTFileError(path, f"{indices.dtype} cannot hold positions", key=k % SUFFIX_INDICES, advice=_advice())
    if indices.dtype.is_floating_point and indices.numel():
        if not torch.isfinite(indices).all() or (indices != indices.round()).any() or (indices < 0).any():
            raise WaveFTFileError(
                path, "holds values that are not whole non-negative numbers", key=k % SUFFIX_INDICES, advice=_advice()
            )
    elif indices.numel() and int(indices.min()) < 0:
        raise WaveFTFileError(
            path, f"position {int(indices.min())} is negative", key=k % SUFFIX_INDICES, advice=_advice()
        )
    family = _scalar(path, k % SUFFIX_KOHYA_FAMILY, parts[SUFFIX_KOHYA_FAMILY])
    if family not in FAMILY_CODES:
        raise WaveFTFileError(
            path,
            f"wavelet family code {family:g} is unknown: the trainer's own module knows only "
            "1 (db1) and refuses this layer too",
            key=k % SUFFIX_KOHYA_FAMILY,
            advice="Load it with the trainer that wrote it, or re-save it with db1",
        )
    use_idwt = _scalar(path, k % SUFFIX_USE_IDWT, parts[SUFFIX_USE_IDWT])
    if use_idwt not in (0.0, 1.0):
        raise WaveFTFileError(
            path, f"{use_idwt:g} is not true (1) or false (0)", key=k % SUFFIX_USE_IDWT, advice=_advice()
        )
    seed_t = parts[SUFFIX_KOHYA_SEED]
    seed = _scalar(path, k % SUFFIX_KOHYA_SEED, seed_t)
    if seed < 0 or seed != int(seed):
        raise WaveFTFileError(path, f"{seed:g} is not a seed", key=k % SUFFIX_KOHYA_SEED, advice=_advice())
    return StoredLayer(
        name=name,
        spectrum=spectrum,
        rows=indices[0],
        cols=indices[1],
        scaling=_scalar(path, k % SUFFIX_SCALING, parts[SUFFIX_SCALING]),
        seed=seed,
        seed_dtype=seed_t.dtype,
        use_idwt=bool(use_idwt),
    )


def _seed_candidates(layer: StoredLayer, hint: int | None) -> list[int]:
    """The seeds that may have drawn the positions: the file's ss_network_args first, then every integer the
    stored seed tensor may be a rounding of."""
    out = [hint] if hint is not None else []
    limit = EXACT_BELOW.get(layer.seed_dtype)
    if limit is None or layer.seed < limit:
        out.append(int(layer.seed))
    else:
        stored = torch.tensor(layer.seed, dtype=layer.seed_dtype)
        step = int(2 ** math.floor(math.log2(layer.seed)) * torch.finfo(layer.seed_dtype).eps)  # spacing there
        for s in range(max(0, int(layer.seed) - step), int(layer.seed) + step + 1):
            if torch.tensor(s, dtype=torch.float64).to(layer.seed_dtype) == stored:
                out.append(s)
    return list(dict.fromkeys(out))


def _reproduces(layer: StoredLayer, flat: torch.Tensor, n: int) -> bool:
    rows, cols = flat // n, flat % n
    return bool((rows.to(layer.rows.dtype) == layer.rows).all() and (cols.to(layer.cols.dtype) == layer.cols).all())


def recover_positions(layer: StoredLayer, shape, hint: int | None, path) -> tuple[torch.Tensor, int]:
    """Flat positions of a layer whose stored ones were rounded: drawn again from the seed, accepted only when
    they reproduce every stored (rounded) index. Returns (positions, seed)."""
    m, n = matrix_shape(tuple(shape))
    p = layer.spectrum.numel()
    found: dict[int, torch.Tensor] = {}
    for seed in _seed_candidates(layer, hint):
        flat = peft_positions((m, n), p, seed).to(torch.int64)
        if _reproduces(layer, flat, n):
            found[seed] = flat
            if seed == hint:
                break  # the trainer's own record of the seed, confirmed by every stored index
    distinct = {tuple(f.tolist()) for f in found.values()}
    if len(distinct) == 1:
        seed, flat = next(iter(found.items()))
        return flat, seed
    why = (
        "no seed reproduces them"
        if not found
        else f"the seeds {', '.join(map(str, found))} reproduce them with different positions"
    )
    raise WaveFTFileError(
        path,
        f"saved with save_precision {layer.precision}: positions lost (the stored positions "
        f"were rounded and {why}, for weight shape {list(shape)})",
        key=f"{layer.name}.{SUFFIX_INDICES}",
        advice=f"It is {TRAINER}; {RESAVE}",
    )


def layer_for(kfile: KohyaFile, name: str, shape) -> tuple[Layer, int | None]:
    """The native Layer of one stored layer on a weight of `shape`. Returns (layer, seed) with the seed that
    recovered rounded positions, or None when the stored positions were exact."""
    stored = kfile.layers[name]
    shape = tuple(int(s) for s in shape)
    m, n = matrix_shape(shape)
    path = kfile.path
    p = stored.spectrum.numel()
    if p > m * n:
        raise WaveFTFileError(
            path,
            f"{p} coefficients do not fit a weight of shape {list(shape)}",
            key=f"{name}.{SUFFIX_SPECTRUM}",
            advice="Apply it to the model it was trained on",
        )
    seed = None
    if stored.positions_exact:
        rows, cols = stored.rows.to(torch.int64), stored.cols.to(torch.int64)
        key = f"{name}.{SUFFIX_INDICES}"
        if p and int(rows.max()) >= m:
            raise WaveFTFileError(
                path,
                f"row {int(rows.max())} is outside the weight's {m} rows (shape {list(shape)})",
                key=key,
                advice="Apply it to the model it was trained on",
            )
        if p and int(cols.max()) >= n:
            raise WaveFTFileError(
                path,
                f"column {int(cols.max())} is outside the weight's {n} columns (shape {list(shape)})",
                key=key,
                advice="Apply it to the model it was trained on",
            )
        flat = rows * n + cols
        ordered = torch.sort(flat).values
        dup = torch.nonzero(ordered[1:] == ordered[:-1])
        if dup.numel():
            at = int(ordered[int(dup[0])])
            raise WaveFTFileError(
                path, f"position (row {at // n}, col {at % n}) appears more than once", key=key, advice=_advice()
            )
    else:
        flat, seed = recover_positions(stored, shape, kfile.seed_hint, path)
    layer = Layer(
        spectrum=stored.spectrum.to(torch.float32),
        indices=flat,
        shape=shape,
        scaling=stored.scaling,
        wavelet=FAMILY_CODES[1],
        use_idwt=stored.use_idwt,
    )
    return layer, seed


def to_adapter(
    kfile: KohyaFile,
    shape_of: Callable[[str], tuple | None],
    name_of: Callable[[str], str] = lambda name: name,
    base_advice: str = "",
    skip_missing: bool = False,
) -> Adapter:
    """Every layer on the weights `shape_of(stored name)` gives; `name_of` renames layers (e.g. to native names).
    A layer without a weight is an error naming the layers (the file was made for another model), or with
    `skip_missing` (a loader that reports what matched) left out and counted in the notes."""
    layers: dict[str, Layer] = {}
    missing, recovered = [], {}
    for name in kfile.layers:
        shape = shape_of(name)
        if shape is None:
            missing.append(name)
            continue
        layer, seed = layer_for(kfile, name, shape)
        layers[name_of(name)] = layer
        if seed is not None:
            recovered[name] = seed
    listed = short_list(missing, 5)
    if missing and (not skip_missing or not layers):
        raise WaveFTFileError(
            kfile.path,
            f"the model has no weight for {len(missing)} of its {len(kfile.layers)} layers ({listed})",
            advice=base_advice
            or "Apply it to the model it was trained on (its base model: "
            + (kfile.metadata.get(META_BASE_MODEL) or "not recorded")
            + ")",
        )
    notes = [TRAINER]
    if missing:
        notes.append(f"{len(missing)} of its {len(kfile.layers)} layers have no weight here ({listed})")
    if recovered:
        seeds = sorted(set(recovered.values()))
        notes.append(
            f"saved with save_precision {kfile.precision}: the rounded positions of {len(recovered)} of "
            f"{len(kfile.layers)} layers were recovered from seed {', '.join(map(str, seeds))} (every stored "
            "index reproduced)"
        )
    # their ss_network_module and 'anima-preview/lora' architecture describe their container, not this adapter
    metadata = {
        k: v for k, v in kfile.metadata.items() if k not in (META_NETWORK_MODULE, META_MODEL_HASH, META_LEGACY_HASH)
    }
    if metadata.get(META_ARCHITECTURE, "").endswith("/lora"):
        metadata[META_ARCHITECTURE] = metadata[META_ARCHITECTURE][: -len("/lora")] + "/waveft"
    metadata[META_SOURCE] = "kohya"
    metadata[META_IMPORT_NOTES] = "; ".join(notes)
    metadata.setdefault(
        META_SEED,
        str(kfile.seed_hint if kfile.seed_hint is not None else int(next(iter(kfile.layers.values())).seed)),
    )
    return Adapter(layers=layers, metadata=metadata, source=kfile.path)


def base_name(stored: str, known: Mapping[str, tuple[str, str]]) -> tuple[str, str] | None:
    """(the base model's module name, the ComfyUI-native name) of a stored layer name, given
    `underscored_names` of the base; None when the base has no such module."""
    if stored.startswith((UNET_PREFIX, TE_PREFIX)):  # their convert_anima_lora_to_comfy.py output
        found = known.get("native:" + stored)
        return found if found else None
    for head, kind in (("lora_unet_", "unet:"), ("lora_te_", "te:"), ("lora_te1_", "te:"), ("lora_te2_", "te:")):
        if stored.startswith(head):
            return known.get(kind + stored[len(head) :])
    return None


def underscored_names(names) -> dict[str, tuple[str, str]]:
    """{'unet:'/'te:' + underscored module path: (base name, native name)} for every dot-boundary tail of each
    module name of a base model, so a kohya name finds its weight whatever wrapper the base's keys carry (`net.`,
    `model.diffusion_model.`, …); and {'native:' + native name: …} for names already native."""
    out: dict[str, tuple[str, str]] = {}
    for name in names:
        is_te = name.startswith(TE_PREFIX)
        parts = name.split(".")
        for i in range(len(parts)):
            tail = ".".join(parts[i:])
            native = name if name.startswith((UNET_PREFIX, TE_PREFIX)) else UNET_PREFIX + tail
            out.setdefault(("te:" if is_te else "unet:") + tail.replace(".", "_"), (name, native))
            out.setdefault("native:" + native, (name, native))
    return out


def describe(kfile: KohyaFile) -> str:
    """What the file holds, without a model (its shapes are not stored)."""
    layers = list(kfile.layers.values())
    count = sum(layer.spectrum.numel() for layer in layers)
    idwt = {layer.use_idwt for layer in layers}
    scalings = sorted({layer.scaling for layer in layers})
    unet = sum(1 for layer in layers if not layer.name.startswith(("lora_te", TE_PREFIX)))
    lines = [
        f"{kfile.path.rsplit('/', 1)[-1]}: {TRAINER}, which stores no weight shapes (the model gives them)",
        f"layers: {len(layers)} ({unet} diffusion model, {len(layers) - unet} text encoder)",
        f"parameters: {count:,}",
        "wavelet: db1",
        f"scaling: {', '.join(f'{s:g}' for s in scalings)}",
        "transform: "
        + (
            "inverse DWT"
            if idwt == {True}
            else "none (use_idwt=false)"
            if idwt == {False}
            else "per layer (inverse DWT on some, none on others)"
        ),
        f"seed: {kfile.seed_hint if kfile.seed_hint is not None else int(layers[0].seed)}",
        f"saved with save_precision: {kfile.precision}",
        "base model: " + (kfile.metadata.get(META_BASE_MODEL) or kfile.metadata.get(META_ARCHITECTURE) or "unknown"),
    ]
    rounded = [layer.name for layer in layers if not layer.positions_exact]
    if rounded:
        lines.append(
            f"positions: rounded by the save in {len(rounded)} of {len(layers)} layers; they are drawn again "
            "from the seed and used only when they reproduce every stored index"
        )
    return "\n".join(lines)


def load(
    tensors: Mapping[str, torch.Tensor],
    metadata: Mapping[str, str],
    path,
    base,
    base_advice: str = "base=<single-file checkpoint, diffusers folder or state dict>",
) -> Adapter:
    """A kohya-style file as an Adapter with ComfyUI-native names, on the weights of `base` (a checkpoint, a
    diffusers folder, a state dict or {name: shape}, or a function (name, name) -> shape)."""
    from ..names import layouts

    kfile = read(tensors, metadata, path)
    if base is None:
        raise WaveFTFileError(
            path,
            f"is {TRAINER}, which stores no weight shapes",
            advice=f"Give the base model it was trained on ({base_advice}) so each layer's shape is known",
        )
    shapes = layouts.base_shapes(base)
    if shapes is None:  # a lookup function
        return to_adapter(kfile, lambda name: base(name, name), base_advice=f"Give the base model ({base_advice})")
    known = underscored_names(shapes.shapes)

    def found(name: str) -> tuple[str, str] | None:
        return base_name(name, known)

    adapter = to_adapter(
        kfile,
        lambda name: shapes.shapes.get(found(name)[0]) if found(name) else None,
        lambda name: found(name)[1],
        base_advice=f"Give the base model it was trained on ({base_advice})",
    )
    if shapes.family:
        adapter.metadata.setdefault(META_BASE_MODEL, shapes.family)
    return adapter


class PendingLayer:
    """A stored layer waiting for its weight's shape: a host's stock LoRA loader hands an adapter the file's
    tensors but neither the model nor the metadata, and this layout stores no shape. Bound on first use, once
    per shape (a plain value, so it survives a host rebuilding the adapter around moved tensors)."""

    def __init__(self, stored: StoredLayer, source: str, seed_hint: int | None = None):
        self.stored = stored
        self.source = source  # the file, as the host's loader names it, for messages
        self.seed_hint = seed_hint  # ss_network_args' seed when the file's header could be read
        self.scaling = stored.scaling
        self._bound: dict[tuple, Layer] = {}
        self.last_shape: tuple | None = None

    def bind(self, shape) -> Layer:
        """The Layer on a weight of `shape`; ValueError naming the file when the positions cannot be right."""
        shape = tuple(int(s) for s in shape)
        layer = self._bound.get(shape)
        if layer is None:
            kfile = KohyaFile(self.source, {self.stored.name: self.stored}, {}, self.seed_hint)
            try:
                layer = layer_for(kfile, self.stored.name, shape)[0]
            except WaveFTFileError as e:
                raise ValueError(f"WaveFT: {e}") from None
            self._bound[shape] = layer
        self.last_shape = shape
        return layer
