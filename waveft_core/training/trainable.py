"""Training WaveFT, without a host: trainable layers (the spectrum is the only parameter; positions follow PEFT's
rule), what to train, optimizers and schedules, and the state of a run as its checkpoint file holds it."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch import nn

from ..adapter import Adapter, Layer
from ..convert.peft_io import peft_positions
from ..delta import DeltaPlan, PlanCache, compute_dtype, index_dtype, matrix_shape, weight_plus_delta
from ..files.metadata import training_keys
from ..files.printable import short_list
from ..keys import (
    DEFAULT_COEFFICIENTS,
    DEFAULT_SCALING,
    DEFAULT_SEED,
    DEFAULT_USE_IDWT,
    DEFAULT_WAVELET,
    META_SEED,
    META_TRAINING,
    OPTIMIZER_STATE_PREFIX,
)
from ..wavelets import check_wavelet

if TYPE_CHECKING:  # config.py imports this module's presets, optimizers and schedules
    from .config import TrainRecord


class TrainableLayer(nn.Module):
    """ΔW(spectrum) for one weight. `layer(weight)` returns weight + strength * ΔW, differentiably.

    Positions are PEFT's (seeded randperm of m*n), so a trained adapter exports to PEFT exactly."""

    def __init__(
        self,
        shape,
        n_coefficients: int = DEFAULT_COEFFICIENTS,
        wavelet: str = DEFAULT_WAVELET,
        scaling: float = DEFAULT_SCALING,
        seed: int = DEFAULT_SEED,
        use_idwt: bool = DEFAULT_USE_IDWT,
        spectrum: torch.Tensor | None = None,
        indices: torch.Tensor | None = None,
    ):
        super().__init__()
        self.shape = tuple(int(s) for s in shape)
        m, n = matrix_shape(self.shape)
        p = int(n_coefficients)
        if not 1 <= p <= m * n:
            raise ValueError(
                f"n_coefficients must be between 1 and {m * n} for a weight of shape {list(self.shape)}, got {p}"
            )
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
        self.indices = indices.to(index_dtype(m * n)).cpu()
        self._plans = PlanCache(self.indices, self.shape, self.wavelet if self.use_idwt else None)
        self._plans.get("cpu", torch.float64)  # built now, so a layer that cannot be planned fails where it is made
        self.strength = 1.0

    def plan(self, device, dtype) -> DeltaPlan:
        return self._plans.get(device, dtype)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        compute = compute_dtype(weight.dtype)
        plan = self.plan(weight.device, compute)
        return weight_plus_delta(weight, plan, self.spectrum, self.scaling * self.strength)

    def extra_repr(self) -> str:
        return f"shape={list(self.shape)}, coefficients={self.spectrum.numel()}, wavelet={self.wavelet}"

    def to_layer(self) -> Layer:
        return Layer(
            spectrum=self.spectrum.detach().float().cpu().clone(),
            indices=self.indices.clone(),
            shape=self.shape,
            scaling=self.scaling,
            wavelet=self.wavelet,
            use_idwt=self.use_idwt,
        )

    @classmethod
    def from_layer(cls, layer: Layer, seed: int = DEFAULT_SEED) -> "TrainableLayer":
        """Continue training a saved layer: its coefficients and positions as they are."""
        return cls(
            layer.shape,
            layer.n_coefficients,
            layer.wavelet,
            layer.scaling,
            seed=seed,
            use_idwt=layer.use_idwt,
            spectrum=layer.spectrum,
            indices=layer.indices,
        )


def adapter_from_trainables(trainables: dict[str, TrainableLayer], metadata: dict[str, str] | None = None) -> Adapter:
    md = dict(metadata or {})
    seeds = {t.seed for t in trainables.values()}
    if len(seeds) == 1:
        md.setdefault(META_SEED, str(seeds.pop()))
    return Adapter(layers={name: t.to_layer() for name, t in trainables.items()}, metadata=md)


# --- what to train -------------------------------------------------------------------------------

ATTENTION_TARGETS = "attention q/k/v/out"  # the paper's
TARGET_PRESETS = {
    ATTENTION_TARGETS: "attention",
    "attention + feed-forward": "attention+ff",
    "all linear": "linear",
    "all linear + conv": "linear+conv",
}

# One rule for "which layers are attention", for every model family, in the host's (native) names and in
# diffusers' names: a projection (leaf) inside an attention module (parent).
_ATTENTION_MODULES = frozenset(
    {"attn", "attn1", "attn2", "self_attn", "cross_attn", "img_attn", "txt_attn", "attention"}
)
_ATTENTION_PROJECTIONS = frozenset(
    {
        "to_q",
        "to_k",
        "to_v",
        "to_out",
        "to_out.0",  # diffusers, SD UNets, LTXV, HiDream, Qwen-Image
        "add_q_proj",
        "add_k_proj",
        "add_v_proj",
        "to_add_out",  # the text stream of joint attention (Qwen, diffusers)
        "to_q_t",
        "to_k_t",
        "to_v_t",
        "to_out_t",  # HiDream's text stream
        "qkv",
        "proj",  # Flux, Chroma, HunyuanVideo, SD3 (fused q/k/v)
        "q",
        "k",
        "v",
        "o",  # Wan
        "out",  # Lumina 2, Z-Image (grouped q/k/v fused as qkv)
        "q_proj",
        "k_proj",
        "v_proj",
        "o_proj",
        "out_proj",
        "output_proj",
    }
)  # CLIP, Anima
# Flux-style single blocks fuse the attention with the MLP: linear1 = [q, k, v, MLP in] rows, linear2 =
# [attention out, MLP out] columns (diffusers splits the first as attn.to_q/k/v + proj_mlp, keeps proj_out
# fused). WaveFT spreads its coefficients over a whole weight, so a fused weight is trained whole and counts as
# attention: its MLP part comes with it, as it does for a LoRA on these layers.
_FUSED_ATTENTION = {"single_blocks": ("linear1", "linear2"), "single_transformer_blocks": ("proj_out",)}
# Feed-forward modules of a block (an index above them in the path: timestep/text embedder MLPs are not).
_FEED_FORWARD_MODULES = frozenset(
    {"ff", "ffn", "mlp", "img_mlp", "txt_mlp", "feed_forward", "ff_i", "ff_t", "ff_context"}
)
_FEED_FORWARD_LEAVES = frozenset({"proj_mlp"})  # diffusers' Flux single block: the MLP rows of linear1


def _leaf_and_parent(parts: list[str]) -> tuple[str, str]:
    if len(parts) >= 3 and parts[-1].isdigit():  # to_out.0
        return ".".join(parts[-2:]), parts[-3]
    return parts[-1], parts[-2] if len(parts) >= 2 else ""


def is_attention(name: str) -> bool:
    """Whether the module `name` is an attention projection (q, k, v, out; fused or not; image or text stream;
    self or cross) in any model family ComfyUI runs, in native or diffusers names."""
    parts = name.split(".")
    leaf, parent = _leaf_and_parent(parts)
    if parent in _ATTENTION_MODULES and leaf in _ATTENTION_PROJECTIONS:
        return True
    return any(block in parts[:-1] and leaf in leaves for block, leaves in _FUSED_ATTENTION.items())


def is_feed_forward(name: str) -> bool:
    """Whether the module `name` is a linear of a block's feed-forward (MLP, gated MLP, MoE experts)."""
    parts = name.split(".")
    if parts[-1] in _FEED_FORWARD_LEAVES:
        return True
    for i, part in enumerate(parts[:-1]):
        if part in _FEED_FORWARD_MODULES and any(p.isdigit() for p in parts[:i]):
            return True
    return False


def is_target(name: str, weight_shape, preset: str) -> bool:
    """Whether the module `name` (with a weight of `weight_shape`) is trained under a TARGET_PRESETS value."""
    kind = TARGET_PRESETS.get(preset, preset)
    dims = len(weight_shape)
    if kind not in TARGET_PRESETS.values():
        raise ValueError(f"unknown targets {preset!r}: use one of {', '.join(TARGET_PRESETS)}")
    if dims < 2:
        return False
    if kind == "attention":
        return dims == 2 and is_attention(name)
    if kind == "attention+ff":
        return dims == 2 and (is_attention(name) or is_feed_forward(name))
    if kind == "linear":
        return dims == 2
    return dims in (2, 3, 4, 5)


def layer_patterns(names, limit: int = 16) -> str:
    """Module names with their block numbers folded (`blocks.N.attn.qkv`), for a message that shows what a
    model has."""
    import re

    patterns = sorted({re.sub(r"(^|\.)\d+(?=\.|$)", r"\1N", n) for n in names})
    return short_list(patterns, limit, more=", and {n} more")


# --- optimisation --------------------------------------------------------------------------------

OPTIMIZERS = ("AdamW", "Adam", "SGD", "RMSprop")
SCHEDULES = ("constant", "cosine", "linear")


def make_optimizer(name: str, params, lr: float):
    if name == "AdamW":
        return torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    if name == "Adam":
        return torch.optim.Adam(params, lr=lr)
    if name == "SGD":
        return torch.optim.SGD(params, lr=lr, momentum=0.9)
    if name == "RMSprop":
        return torch.optim.RMSprop(params, lr=lr)
    raise ValueError(f"unknown optimizer {name!r}: use one of {', '.join(OPTIMIZERS)}")


def lr_factor(step: int, total: int, schedule: str, warmup: int) -> float:
    """Multiplier of the base learning rate at optimizer step `step` (0-based) of `total`."""
    import math

    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    span = max(1, total - warmup)
    progress = min(1.0, max(0.0, (step - warmup) / span))
    if schedule == "constant":
        return 1.0
    if schedule == "cosine":
        return 0.5 * (1.0 + math.cos(math.pi * progress))
    if schedule == "linear":
        return 1.0 - progress
    raise ValueError(f"unknown lr schedule {schedule!r}: use one of {', '.join(SCHEDULES)}")


@dataclass
class TrainingState:
    """A training run as its checkpoint file holds it: the trainable layers, the steps done, the seed (the
    positions, batches, noise and timesteps all derive from it and the step number, so a resumed run retraces
    an uninterrupted one), the run's settings and other metadata, and the optimizer's moments.

    save() writes a native file (readable as an adapter by every loader) with the optimizer state as the
    backward-compatible extension `waveft_train.<module>.<state>`; load() reads one back, with or without it."""

    trainables: dict[str, TrainableLayer]
    step: int = 0
    seed: int = DEFAULT_SEED
    record: TrainRecord | None = None  # None: a file opened to continue, before its run starts
    metadata: dict = field(default_factory=dict)
    optimizer_tensors: dict = field(default_factory=dict)

    def adapter(self) -> Adapter:
        """The layers as they are now, with the run's settings and steps done in `waveft.training`."""
        md = dict(self.metadata)
        settings = self.record.as_dict() if self.record is not None else {}
        if self.record is not None:  # kohya's names for them, which LoRA managers show
            md.update(training_keys(self.record, self.step))
        md[META_TRAINING] = json.dumps({**settings, "steps_done": self.step}, sort_keys=True)
        md[META_SEED] = str(self.seed)
        return adapter_from_trainables(self.trainables, md)

    def capture(self, optimizer, param_names: dict) -> None:
        """Take the optimizer's current state (per parameter, as flat tensors) for the next save."""
        out = {}
        for param, name in param_names.items():
            for key, value in optimizer.state.get(param, {}).items():
                t = (
                    value.detach().float().cpu().reshape(-1).clone()
                    if isinstance(value, torch.Tensor)
                    else torch.tensor([float(value)])
                )
                out[f"{OPTIMIZER_STATE_PREFIX}{name}.{key}"] = t
        self.optimizer_tensors = out

    def restore(self, optimizer, param_names: dict) -> bool:
        """Put saved optimizer state back; False (and nothing changed) when there is none or it does not fit
        these parameters (then the moments start afresh)."""
        staged = {}
        for param, name in param_names.items():
            state = {}
            head = f"{OPTIMIZER_STATE_PREFIX}{name}."
            for key, value in self.optimizer_tensors.items():
                if not key.startswith(head) or "." in key[len(head) :]:
                    continue
                field_name = key[len(head) :]
                if field_name == "step":
                    state[field_name] = value.reshape(()).clone()
                elif value.numel() == param.numel():
                    state[field_name] = value.reshape(param.shape).to(param.device, param.dtype).clone()
                else:
                    return False
            if not state:
                return False
            staged[param] = state
        for param, state in staged.items():
            optimizer.state[param] = state
        return True

    def save(self, path) -> Path:
        from ..files.fileformat import write

        adapter = self.adapter()
        adapter.extra_tensors.update(self.optimizer_tensors)
        return write(adapter, path)

    @classmethod
    def load(cls, path) -> "TrainingState":
        """A checkpoint (or any native file) to continue: WaveFTFileError when it cannot be read."""
        from ..files.fileformat import adapter_from_tensors, read_tensors_and_metadata

        tensors, metadata = read_tensors_and_metadata(path)
        adapter = adapter_from_tensors(tensors, metadata, path)
        try:
            training = json.loads(metadata.get(META_TRAINING, "{}"))
        except ValueError:
            training = {}
        try:
            seed = int(metadata.get(META_SEED, DEFAULT_SEED))
        except ValueError:
            seed = DEFAULT_SEED
        step = int(training.get("steps_done", 0)) if isinstance(training, dict) else 0
        trainables = {name: TrainableLayer.from_layer(layer, seed) for name, layer in adapter.layers.items()}
        return cls(
            trainables,
            step,
            seed,
            metadata=dict(metadata),
            optimizer_tensors={k: v for k, v in tensors.items() if k.startswith(OPTIMIZER_STATE_PREFIX)},
        )

    def check_fits(self, shapes: dict, label: str) -> None:
        """ValueError unless every layer is one of `shapes` (module -> weight shape) with that shape."""
        missing = [n for n in self.trainables if n not in shapes]
        wrong = [n for n in self.trainables if n in shapes and tuple(self.trainables[n].shape) != tuple(shapes[n])]
        if missing or wrong:
            raise ValueError(
                f"{label} was trained on another model or other targets: {len(missing)} of its layers "
                f"are not in this model's targets, {len(wrong)} have another shape (e.g. "
                f"{(missing or wrong)[0]})"
            )
