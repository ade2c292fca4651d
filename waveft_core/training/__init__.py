"""Training: trainable WaveFT layers, optimisers and schedules (trainable), per-block checkpointing for blocks
that write into their inputs (checkpointing), and the accelerate trainer behind `python -m waveft_core train`
(accelerate_train)."""
