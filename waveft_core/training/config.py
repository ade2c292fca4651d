"""The settings of a training run, typed once: `TrainConfig` is what the user chooses (the Train WaveFT node's
inputs, `waveft train`'s options), checked when it is made; `TrainRecord` is what a trained file records of the
run (`waveft.training` and kohya's `ss_*` keys): the settings and the facts of the run."""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

from ..keys import DEFAULT_COEFFICIENTS, DEFAULT_LEARNING_RATE, DEFAULT_SCALING, DEFAULT_WAVELET
from ..wavelets import SUPPORTED_WAVELETS
from .trainable import ATTENTION_TARGETS, OPTIMIZERS, SCHEDULES, TARGET_PRESETS

TRAINING_DTYPES = ("bf16", "fp16", "fp32")  # the node offers bf16 and fp32; `waveft train` all three


@dataclass(frozen=True)
class TrainConfig:
    """One training run's settings. Names are the node's inputs; a bad value is a ValueError naming it."""

    steps: int = 500  # optimizer steps this run makes (a resumed run adds them to the file's)
    learning_rate: float = DEFAULT_LEARNING_RATE
    batch_size: int = 1  # images per micro-batch (per process, under accelerate)
    grad_accumulation_steps: int = 4  # micro-batches summed before each optimizer step (see CLI_DEFAULTS)
    n_coefficients: int = DEFAULT_COEFFICIENTS  # per layer (a smaller layer gets all of its entries)
    scaling: float = DEFAULT_SCALING
    wavelet: str = DEFAULT_WAVELET
    targets: str = ATTENTION_TARGETS  # a TARGET_PRESETS name
    seed: int = 0  # positions (PEFT's rule), batches, noise and timesteps (randomness.py)
    optimizer: str = "AdamW"
    lr_schedule: str = "constant"
    warmup_steps: int = 0
    training_dtype: str = "bf16"  # the forward's and backward's compute dtype; the coefficients stay fp32
    gradient_checkpointing: bool = True
    save_every_n_steps: int = 0  # a checkpoint with optimizer state every N steps; 0 = never

    def __post_init__(self):
        for name, low in (
            ("steps", 1),
            ("batch_size", 1),
            ("grad_accumulation_steps", 1),
            ("n_coefficients", 1),
            ("seed", 0),
            ("warmup_steps", 0),
            ("save_every_n_steps", 0),
        ):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"{name} must be a whole number, got {value!r}")
            if value < low:
                raise ValueError(f"{name} must be at least {low}")
        for name in ("learning_rate", "scaling"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
            object.__setattr__(self, name, float(value))
        for name, choices in (
            ("wavelet", SUPPORTED_WAVELETS),
            ("targets", tuple(TARGET_PRESETS)),
            ("optimizer", OPTIMIZERS),
            ("lr_schedule", SCHEDULES),
            ("training_dtype", TRAINING_DTYPES),
        ):
            if getattr(self, name) not in choices:
                shown = ", ".join(choices) if len(choices) <= 8 else f"{', '.join(choices[:8])}, ..."
                raise ValueError(f"{name} {getattr(self, name)!r} is not one of {shown}")
        if not isinstance(self.gradient_checkpointing, bool):
            raise ValueError(f"gradient_checkpointing must be true or false, got {self.gradient_checkpointing!r}")

    @classmethod
    def from_inputs(cls, inputs: dict) -> "TrainConfig":
        """The settings among `inputs` (a node's inputs, parsed options); others are left for the caller."""
        return cls(**{f.name: inputs[f.name] for f in fields(cls) if f.name in inputs})

    @property
    def mixed_precision(self) -> str:
        """accelerate's name of the compute dtype."""
        return "no" if self.training_dtype == "fp32" else self.training_dtype


# The Train WaveFT node's defaults are the class's. `waveft train` differs in one: no accumulation (diffusers'
# DreamBooth scripts' default: each process already adds its own micro-batch to a step), where the node sums 4
# micro-batches so that a step still averages 4 images when each holds one.
NODE_DEFAULTS = TrainConfig()
CLI_DEFAULTS = replace(NODE_DEFAULTS, grad_accumulation_steps=1)


@dataclass(frozen=True)
class TrainRecord:
    """A run as its file records it. `wavelet`, `n_coefficients` and `scaling` are the layers' (the first
    layer's coefficient count; a resumed run keeps its file's settings), `config.seed` the seed the run's draws
    use. `processes` and `trainer` are recorded by the accelerate trainer only, `finished_at` once it ends."""

    config: TrainConfig
    steps_total: int  # the step the run ends at: its file's steps before it and config.steps
    dataset_size: int
    resumed_from_step: int
    started_at: int  # unix time
    resolution: list | None  # [width, height] in pixels
    base_checkpoint: str | None
    wavelet: str
    n_coefficients: int
    scaling: float
    processes: int | None = None
    trainer: str | None = None
    finished_at: int | None = None

    @property
    def batch_size(self) -> int:
        """Images per micro-batch over all processes."""
        return self.config.batch_size * (self.processes or 1)

    def as_dict(self) -> dict:
        """The `waveft.training` record (docs/FORMAT.md), less `steps_done`: its field names are this."""
        c = self.config
        out = {
            "steps": c.steps,
            "steps_total": self.steps_total,
            "lr": c.learning_rate,
            "optimizer": c.optimizer,
            "batch_size": self.batch_size,
            "grad_accumulation_steps": c.grad_accumulation_steps,
            "targets": c.targets,
            "dataset_size": self.dataset_size,
            "seed": c.seed,
            "lr_schedule": c.lr_schedule,
            "warmup_steps": c.warmup_steps,
            "training_dtype": c.training_dtype,
            "gradient_checkpointing": c.gradient_checkpointing,
            "wavelet": self.wavelet,
            "n_coefficients": self.n_coefficients,
            "scaling": self.scaling,
            "resumed_from_step": self.resumed_from_step,
            "started_at": self.started_at,
            "resolution": self.resolution,
            "base_checkpoint": self.base_checkpoint,
        }
        for name in ("processes", "trainer", "finished_at"):  # absent, not null, where a run has none
            if getattr(self, name) is not None:
                out[name] = getattr(self, name)
        return out
