"""One (seed, step) rule for both trainers (waveft_core/training/randomness.py): what a step draws depends on the
seed, the step and the draw's place alone. A run saved at step k and resumed from its file trains exactly what an
uninterrupted run trains, drawing the way the accelerate trainer does (timesteps, a global batch shared by
processes) and the way the node does (noise levels, images grouped into batches); the processes' shares of a
global batch are what one process draws for all of it."""

import hashlib

import pytest
import torch

from waveft_core.training import randomness
from waveft_core.training.trainable import TrainableLayer, TrainingState, make_optimizer

SHAPE = (8, 12)
EXAMPLES = [torch.randn(12, generator=torch.Generator().manual_seed(i)) for i in range(5)]
BASE = torch.randn(SHAPE, generator=torch.Generator().manual_seed(99))


def accelerate_draws(seed, step, micro, batch, world=1, rank=0):
    """As accelerate_train.run draws: a global batch from the seed, this process's places of it, a noise and a
    discrete timestep per place."""
    picks = randomness.picks(seed, step, micro, batch * world, len(EXAMPLES))
    places = range(rank * batch, (rank + 1) * batch)
    return [
        (
            picks[p],
            randomness.noise(seed, step, micro, p, (12,)),
            randomness.timestep(seed, step, micro, p, 1000) / 1000,
        )
        for p in places
    ]


def node_draws(seed, step, micro, batch):
    """As nodes/train_loop.py draws: the micro-batch's picks, a noise and a noise-level fraction per place."""
    picks = randomness.picks(seed, step, micro, batch, len(EXAMPLES))
    return [
        (i, randomness.noise(seed, step, micro, p, (12,)), randomness.fraction(seed, step, micro, p))
        for p, i in enumerate(picks)
    ]


DRAWS = {"accelerate": accelerate_draws, "node": node_draws}


def train(state: TrainingState, draws, until: int, batch=2, accumulation=2) -> TrainingState:
    """A small denoising run: the trainable layer maps noisy examples back, each step `accumulation`
    micro-batches of `batch` drawn by `draws`; the optimizer's moments continue from the state."""
    layer = state.trainables["layer"]
    optimizer = make_optimizer("AdamW", [layer.spectrum], 1e-2)
    names = {layer.spectrum: "layer"}
    if state.optimizer_tensors:
        assert state.restore(optimizer, names)
    layer.spectrum.requires_grad_(True)
    while state.step < until:
        for micro in range(accumulation):
            for i, noise, level in draws(state.seed, state.step, micro, batch):
                x0 = EXAMPLES[i]
                pred = layer(BASE) @ (x0 + level * noise)
                (torch.nn.functional.mse_loss(pred, BASE @ x0) / (batch * accumulation)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
    layer.spectrum.requires_grad_(False)
    state.capture(optimizer, names)
    return state


def fresh(seed):
    return TrainingState({"layer": TrainableLayer(SHAPE, 30, "db1", seed=seed)}, step=0, seed=seed)


@pytest.mark.parametrize("trainer", DRAWS)
def test_a_resumed_run_retraces_an_uninterrupted_one(trainer, tmp_path):
    draws = DRAWS[trainer]
    whole = train(fresh(4), draws, until=6)
    half = train(fresh(4), draws, until=3)
    path = half.save(tmp_path / "half_00003.safetensors")
    resumed = train(TrainingState.load(path), draws, until=6)
    assert resumed.step == 6 and resumed.seed == 4
    moved = float(whole.trainables["layer"].spectrum.abs().max())
    assert moved > 1e-3  # it trained
    assert torch.equal(resumed.trainables["layer"].spectrum, whole.trainables["layer"].spectrum)
    # the same steps drawn in another order, or alone, are the same draws: nothing depends on what came before
    later = [draws(4, 5, micro, 2) for micro in (1, 0)]
    for micro, got in zip((1, 0), later):
        want = draws(4, 5, micro, 2)
        assert [i for i, *_ in got] == [i for i, *_ in want]
        assert all(torch.equal(a[1], b[1]) and a[2] == b[2] for a, b in zip(got, want))
    # and another seed trains something else
    other = train(fresh(5), draws, until=6)
    assert not torch.equal(other.trainables["layer"].spectrum, whole.trainables["layer"].spectrum)


def test_processes_share_what_one_process_draws():
    """Two processes of batch 2 each take their places of the global batch of 4 that one process draws."""
    one = accelerate_draws(7, 3, 1, batch=4)
    shares = accelerate_draws(7, 3, 1, batch=2, world=2, rank=0) + accelerate_draws(7, 3, 1, batch=2, world=2, rank=1)
    assert [i for i, *_ in shares] == [i for i, *_ in one]
    assert all(torch.equal(a[1], b[1]) and a[2] == b[2] for a, b in zip(shares, one))


def test_draws_have_their_own_streams_and_ranges():
    noises = {
        (s, t, m, p): randomness.noise(s, t, m, p, (64,))
        for s in (0, 1)
        for t in (0, 1)
        for m in (0, 1)
        for p in (0, 1)
    }
    values = list(noises.values())
    assert all(not torch.equal(a, b) for i, a in enumerate(values) for b in values[i + 1 :])  # each key its own
    assert all(0 <= randomness.timestep(3, t, 0, 0, 10) < 10 for t in range(50))
    assert all(0.0 <= randomness.fraction(3, t, 0, 0) < 1.0 for t in range(50))
    assert all(0 <= i < 3 for i in randomness.picks(3, 0, 0, 100, 3))


def test_the_rule_is_the_accelerate_trainers_as_it_was():
    """A hash of the whole key seeds each draw's generator, as `waveft train` has always drawn: its runs (and
    the files they wrote) are unchanged."""
    digest = hashlib.sha256(b"4,5,1,2,3").digest()  # seed 4, step 5, micro-batch 1, noise, place 3
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    assert torch.equal(randomness.noise(4, 5, 1, 3, (2, 3)), torch.randn((2, 3), generator=g))
    digest = hashlib.sha256(b"4,5,1,1").digest()
    g = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
    assert randomness.picks(4, 5, 1, 6, 9) == torch.randint(0, 9, (6,), generator=g).tolist()
