"""Backward through blocks that add into their inputs in place (the Flux/LTXV pattern): plain autograd refuses it,
torch.utils.checkpoint silently differentiates overwritten values; the copy-on-write guard and its checkpoint
give the gradients of the same block written out of place, bit for bit."""

import pytest
import torch
from torch import nn

from waveft_core.training.checkpointing import checkpointed, saved_tensors_guard


class InPlaceBlock(nn.Module):
    """Flux's double block pattern (norm, attention-ish, `x += …`) and LTXV's `x.addcmul_`, on two streams."""

    def __init__(self, width=16, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.norm = nn.LayerNorm(width, elementwise_affine=False)
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)
        self.ff = nn.Linear(width, width)
        self.gate = nn.Parameter(torch.randn(width))
        self.out_of_place = False

    def forward(self, x, y, scale):
        q, k, v = self.qkv(self.norm(x)).chunk(3, dim=-1)
        attn = torch.softmax(q @ k.transpose(-1, -2), dim=-1) @ v
        if self.out_of_place:
            x = x + self.proj(attn) * scale
            x = torch.addcmul(x, self.ff(self.norm(x)), self.gate)
            y = y + self.ff(self.norm(x))
        else:
            x += self.proj(attn) * scale
            x.addcmul_(self.ff(self.norm(x)), self.gate)
            y[:, :2] += self.ff(self.norm(x))[:, :2]
            y[:, 2:] += self.ff(self.norm(x))[:, 2:]
        return x, y


def run(mode, out_of_place=False, blocks=3):
    torch.manual_seed(1)
    stack = [InPlaceBlock(seed=i) for i in range(blocks)]
    for b in stack:
        b.out_of_place = out_of_place
        b.requires_grad_(False)
        b.proj.weight.requires_grad_(True)
        b.qkv.weight.requires_grad_(True)
    calls = []
    forwards = []
    for b in stack:
        original = b.forward

        def counted(*a, _f=original, **k):
            calls.append(1)
            return _f(*a, **k)

        forwards.append(counted)
    x0 = torch.randn(2, 5, 16)
    y0 = torch.randn(2, 5, 16)
    scale = torch.full((16,), 0.5)

    def forward():
        if mode == "torch_whole":  # ComfyUI's trainer at depth 1: the whole model is one checkpoint
            return torch.utils.checkpoint.checkpoint(stacked, use_reentrant=False)
        return stacked()

    def stacked():
        x, y = x0.clone(), y0.clone()
        for b, f in zip(stack, forwards):
            if mode == "checkpointed":
                x, y = checkpointed(f)(x, y, scale=scale)
            elif mode == "torch":
                x, y = torch.utils.checkpoint.checkpoint(f, x, y, scale=scale, use_reentrant=False)
            else:
                x, y = f(x, y, scale)
        return x.square().mean() + y.square().mean()

    if mode in ("plain", "torch", "torch_whole"):
        loss = forward()
    else:
        with saved_tensors_guard():
            loss = forward()
    loss.backward()
    grads = [p.grad.clone() for b in stack for p in (b.proj.weight, b.qkv.weight)]
    return grads, len(calls)


def test_plain_autograd_refuses_the_in_place_block():
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        run("plain")


def test_guard_gives_the_out_of_place_gradients_bitwise():
    reference, _ = run("plain", out_of_place=True)
    guarded, calls = run("guarded")
    assert calls == 3
    assert all(torch.equal(a, b) for a, b in zip(guarded, reference))


def test_checkpointed_recomputes_and_gives_the_same_gradients_bitwise():
    reference, _ = run("plain", out_of_place=True)
    ckpt, calls = run("checkpointed")
    assert calls == 6  # every block ran once more, in the backward
    assert all(torch.equal(a, b) for a, b in zip(ckpt, reference))


def test_torch_checkpoint_refuses_per_block_and_is_silently_wrong_around_all():
    """Why the project does not use torch.utils.checkpoint here: around each block it finds its saved inputs
    overwritten; around the whole stack (nothing outside writes the inputs) it recomputes without the version
    check and differentiates overwritten values: no error, wrong gradients."""
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        run("torch")
    reference, _ = run("plain", out_of_place=True)
    wrong, _ = run("torch_whole")
    assert not all(torch.allclose(a, b, rtol=1e-3, atol=1e-6) for a, b in zip(wrong, reference))


def test_only_overwritten_tensors_are_copied():
    """A block that writes nothing it kept makes no copy: the guard costs no memory there."""
    from waveft_core.training import checkpointing

    clones = []
    original = torch.Tensor.clone
    lin = nn.Linear(8, 8)

    def counting_clone(self, *a, **k):
        clones.append(tuple(self.shape))
        return original(self, *a, **k)

    x = torch.randn(4, 8, requires_grad=True)
    torch.Tensor.clone = counting_clone
    try:
        with saved_tensors_guard():
            h = torch.tanh(lin(x))  # tanh keeps its output
            out = h * 2
            h2 = lin(x)
            h2 += 1  # h2 is kept by nothing: no copy
            loss = out.sum() + h2.sum()
        assert clones == []
        with saved_tensors_guard():
            h = torch.tanh(lin(x))
            h += 1  # overwrites the kept output of tanh: one copy
            loss2 = h.sum()
        assert clones == [(4, 8)]
    finally:
        torch.Tensor.clone = original
    loss.backward()
    loss2.backward()
    del loss, loss2, out, h, h2
    assert len(checkpointing._KEPT) == 0  # nothing is left behind once the graphs are freed


def test_the_registry_is_empty_after_a_training_step():
    from waveft_core.training import checkpointing

    run("checkpointed")
    run("guarded")
    assert len(checkpointing._KEPT) == 0


def test_a_write_the_guard_cannot_see_is_refused_not_used():
    x = torch.randn(3, requires_grad=True)
    with saved_tensors_guard():
        h = torch.exp(x)  # exp keeps its output
        with torch.overrides._pop_mode_temporarily():  # as a compiled kernel would: unseen
            h.add_(1)
    with pytest.raises(RuntimeError, match="overwritten in place"):
        h.sum().backward()
