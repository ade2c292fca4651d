"""What a training step draws, for every trainer: a function of (seed, step) and the draw's place in the step
alone, never of what was drawn before. So a run resumed at step k draws what an uninterrupted run drew at step
k, and N processes that each draw their own places of a global batch draw what one process draws for all of
them.

The place of a draw is (micro-batch, what it is for, sample in the global batch): each has its own generator,
seeded by a hash of the whole key, so nearby keys give unrelated streams."""

from __future__ import annotations

import hashlib

import torch

# what a draw is for: the third part of its key
PICKS = 1  # which examples make a micro-batch
NOISE = 2  # a sample's noise
TIME = 3  # a sample's timestep or noise level


def generator(seed: int, step: int, *place: int) -> torch.Generator:
    """The one rule: a generator for the draw at `place` of optimizer step `step` (0-based) of a run seeded
    `seed`."""
    key = ",".join(str(int(k)) for k in (seed, step, *place))
    digest = hashlib.sha256(key.encode()).digest()
    return torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))


def picks(seed: int, step: int, micro: int, size: int, n_examples: int) -> list[int]:
    """The examples of micro-batch `micro`: `size` draws (with replacement) from `n_examples`, in global-batch
    order (a process of several takes its own places of it)."""
    return torch.randint(0, n_examples, (size,), generator=generator(seed, step, micro, PICKS)).tolist()


def noise(seed: int, step: int, micro: int, sample: int, shape) -> torch.Tensor:
    """Standard normal noise of `shape` for place `sample` of micro-batch `micro`."""
    return torch.randn(tuple(shape), generator=generator(seed, step, micro, NOISE, sample))


def timestep(seed: int, step: int, micro: int, sample: int, n_timesteps: int) -> int:
    """A discrete timestep in [0, n_timesteps) for place `sample` (a diffusers noise scheduler's)."""
    return int(torch.randint(0, n_timesteps, (1,), generator=generator(seed, step, micro, TIME, sample)))


def fraction(seed: int, step: int, micro: int, sample: int) -> float:
    """A number in [0, 1) for place `sample`: where its noise level lies on a host's sigma schedule."""
    return float(torch.rand((), generator=generator(seed, step, micro, TIME, sample)))
