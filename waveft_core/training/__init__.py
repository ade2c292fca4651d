"""Training: the settings typed once (config), one (seed, step) rule for what a step draws (randomness), trainable
WaveFT layers, optimisers and schedules (trainable), per-block checkpointing for blocks that write into their
inputs (checkpointing), and the accelerate trainer behind `waveft train` (accelerate_train)."""
