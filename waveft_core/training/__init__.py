"""Training: the settings typed once (config), one (seed, step) rule for what a step draws (randomness), trainable
WaveFT layers, optimisers and schedules (trainable), per-block checkpointing for blocks that write into their
inputs (checkpointing), and the accelerate trainer behind `python -m waveft_core train` (accelerate_train)."""

from . import randomness
from .checkpointing import checkpointed, saved_tensors_guard
from .config import CLI_DEFAULTS, NODE_DEFAULTS, TrainConfig, TrainRecord
from .trainable import (
    OPTIMIZERS,
    SCHEDULES,
    TARGET_PRESETS,
    TrainableLayer,
    TrainingState,
    is_target,
    layer_patterns,
    lr_factor,
    make_optimizer,
)

__all__ = [
    "CLI_DEFAULTS",
    "NODE_DEFAULTS",
    "OPTIMIZERS",
    "SCHEDULES",
    "TARGET_PRESETS",
    "TrainConfig",
    "TrainRecord",
    "TrainableLayer",
    "TrainingState",
    "checkpointed",
    "is_target",
    "layer_patterns",
    "lr_factor",
    "make_optimizer",
    "randomness",
    "saved_tensors_guard",
]
