"""Training: trainable WaveFT layers, optimisers and schedules (trainable), per-block checkpointing for blocks
that write into their inputs (checkpointing), and the accelerate trainer behind `python -m waveft_core train`
(accelerate_train)."""

from .checkpointing import checkpointed, saved_tensors_guard
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
    "OPTIMIZERS",
    "SCHEDULES",
    "TARGET_PRESETS",
    "TrainableLayer",
    "TrainingState",
    "checkpointed",
    "is_target",
    "layer_patterns",
    "lr_factor",
    "make_optimizer",
    "saved_tensors_guard",
]
