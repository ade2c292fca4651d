"""Backward through blocks that write into their own tensors, with and without gradient checkpointing.

Autograd keeps some tensors of the forward for the backward: a LayerNorm keeps its input, a matmul both
operands. Most DiT blocks then add their residuals *in place* into such a tensor: `img += …`, `txt += …`,
`x += …` in Flux, Flux.2, Chroma and HunyuanVideo (comfy/ldm/flux/layers.py), `x += …` and `x.addcmul_(…)` in
LTXV. Three things go wrong with that:
- plain autograd refuses the backward ("modified by an inplace operation", its version check);
- torch.utils.checkpoint runs the block again from the tensors it was called with, which the block has since
  overwritten, so it recomputes from the wrong input;
- and it keeps what it recomputes without the version check, so the same in-place adds silently change
  tensors the backward then differentiates with (ComfyUI's own trainer at any checkpoint depth).

Here every tensor kept for the backward is *copy-on-write*: a guard sees each in-place write (a torch function
mode) and, just before one lands in the memory of a kept tensor, keeps a copy of that tensor's old value.
Only tensors that really are overwritten are copied, and each once: exactly the old values an out-of-place
block would have kept alive, so nothing more than the math needs. A write the guard cannot see (inside a
compiled kernel) is caught when the tensor is unpacked, as plain autograd would, never used silently.

`checkpointed(fn)` recomputes `fn` in the backward instead of keeping its tensors (non-reentrant, like
torch.utils.checkpoint), with the same copy-on-write rule for the inputs it recomputes from; the recompute
replays the forward's autocast and random state, so gradients are bitwise those of an uncheckpointed run.
"""

from __future__ import annotations

import contextlib
import copy
import threading
import weakref

import torch
from torch.overrides import TorchFunctionMode

__all__ = ["saved_tensors_guard", "checkpointed"]


class _Kept:
    """A tensor kept for the backward (or its private copy, once its memory was about to be overwritten), and
    the version it must still have when unpacked."""

    __slots__ = ("tensor", "version", "__weakref__")

    def __init__(self, tensor: torch.Tensor):
        self.tensor = tensor.detach()  # no reference cycle through an output's grad_fn; same memory and version
        self.version = tensor._version


class _KeptTensors:
    """Kept tensors by the memory they live in: a write into that memory copies them first."""

    def __init__(self):
        # storage address -> {id(kept): weak reference}; an entry leaves when its kept tensor is freed
        self._by_storage: dict[int, dict[int, weakref.ref]] = {}

    @staticmethod
    def _storage_key(t: torch.Tensor):
        try:
            return t.untyped_storage().data_ptr() if t.numel() else None
        except (RuntimeError, NotImplementedError):  # tensors without storage (e.g. some subclasses)
            return None

    def keep(self, t: torch.Tensor) -> _Kept:
        kept = _Kept(t)
        self._register(kept)
        return kept

    def _register(self, kept: _Kept) -> None:
        key = self._storage_key(kept.tensor)
        if key is None:
            return
        by_storage, kid = self._by_storage, id(kept)

        def forget(_, key=key, kid=kid):
            group = by_storage.get(key)
            if group is not None:
                group.pop(kid, None)
                if not group:
                    del by_storage[key]

        by_storage.setdefault(key, {})[kid] = weakref.ref(kept, forget)

    def __len__(self) -> int:
        return len(self._by_storage)

    def before_write(self, t: torch.Tensor) -> None:
        key = self._storage_key(t)
        group = self._by_storage.pop(key, None) if key is not None else None
        if not group:
            return
        copies: dict = {}  # views with the same layout share one copy
        for ref in list(group.values()):
            kept = ref()
            if kept is None or kept.tensor._version != kept.version:
                continue  # overwritten unseen: value() reports it
            layout = (kept.tensor.storage_offset(), tuple(kept.tensor.shape), kept.tensor.stride(), kept.tensor.dtype)
            if layout not in copies:
                copies[layout] = kept.tensor.clone()
            kept.tensor = copies[layout]
            kept.version = kept.tensor._version
            self._register(kept)  # the copy may be written later too (a recompute writes into its inputs)

    @staticmethod
    def value(kept: _Kept) -> torch.Tensor:
        if kept.tensor._version != kept.version:
            raise RuntimeError(
                "WaveFT: a tensor needed for the backward was overwritten in place by an operation the in-place "
                f"guard does not see (a tensor of shape {list(kept.tensor.shape)}); this model cannot be trained "
                "safely this way: please report the model family"
            )
        return kept.tensor


_KEPT = _KeptTensors()
_ACTIVE = threading.local()

_INPLACE_DUNDERS = frozenset(
    {
        "__iadd__",
        "__isub__",
        "__imul__",
        "__itruediv__",
        "__ifloordiv__",
        "__imod__",
        "__ipow__",
        "__iand__",
        "__ior__",
        "__ixor__",
        "__ilshift__",
        "__irshift__",
        "__imatmul__",
        "__setitem__",
    }
)
_NOT_WRITES = frozenset({"requires_grad_", "retain_grad", "share_memory_", "record_stream"})


def _tensors(x):
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _tensors(v)
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)


def _written(func, args, kwargs):
    """The tensors a torch call writes into: the first argument of `add_`, `x += y`, `x[i] = y`, `relu_(x)`,
    `F.silu(x, inplace=True)`, and any `out=`."""
    name = getattr(func, "__name__", "")
    if args and (
        (name.endswith("_") and not name.endswith("__") and name not in _NOT_WRITES)
        or name in _INPLACE_DUNDERS
        or kwargs.get("inplace") is True
    ):
        yield from _tensors(args[0])
    if kwargs.get("out") is not None:
        yield from _tensors(kwargs["out"])


class _WriteGuard(TorchFunctionMode):
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for t in _written(func, args, kwargs):
            _KEPT.before_write(t)
        return func(*args, **kwargs)


@contextlib.contextmanager
def _write_guard():
    """The write guard, once per thread however deeply entered."""
    if getattr(_ACTIVE, "depth", 0):
        _ACTIVE.depth += 1
        try:
            yield
        finally:
            _ACTIVE.depth -= 1
        return
    _ACTIVE.depth = 1
    try:
        with _WriteGuard():
            yield
    finally:
        _ACTIVE.depth = 0


@contextlib.contextmanager
def saved_tensors_guard():
    """Run a forward whose backward must survive in-place writes: every tensor autograd keeps (outside
    checkpointed units) is copy-on-write. The backward may run after the block ends."""
    with _write_guard(), torch.autograd.graph.saved_tensors_hooks(_KEPT.keep, _KEPT.value):
        yield


class _StopRecompute(Exception):
    pass


class _Frame:
    """One call of a checkpointed function: its inputs (copy-on-write), how many tensors its forward would
    have kept, and, once the backward asks, those tensors recomputed."""

    def __init__(self, fn, args, kwargs):
        self.fn = fn
        # dicts (transformer_options) are copied: the model writes per-block entries into them later
        self.args = args
        self.kwargs = {k: copy.copy(v) if isinstance(v, dict) else v for k, v in kwargs.items()}
        self.inputs = [(t, _KEPT.keep(t), t.requires_grad) for t in _tensors((args, kwargs))]
        self.count = 0
        self.recomputed: list | None = None
        self.devices = sorted({t.device.type for t, _, _ in self.inputs} | {"cpu"})
        self.autocast = {d: (torch.is_autocast_enabled(d), torch.get_autocast_dtype(d)) for d in self.devices}
        self.cpu_rng = torch.get_rng_state()
        self.cuda_rng = torch.cuda.get_rng_state() if "cuda" in self.devices and torch.cuda.is_initialized() else None

    def pack(self, t):
        self.count += 1
        return self.count - 1

    def unpack(self, index: int):
        if self.recomputed is None:
            self._recompute()
        return _KEPT.value(self.recomputed[index])

    def _replay_input(self, t):
        for original, kept, requires_grad in self.inputs:
            if original is t:
                value = _KEPT.value(kept)
                # a fresh non-leaf when it needs a gradient (the block may write into it, as it did before)
                return value.detach().requires_grad_(True).clone() if requires_grad else value
        return t

    def _replay(self, x):
        if isinstance(x, torch.Tensor):
            return self._replay_input(x)
        if isinstance(x, (list, tuple)) and not hasattr(x, "_fields"):
            return type(x)(self._replay(v) for v in x)
        if isinstance(x, dict):
            return {k: self._replay(v) for k, v in x.items()}
        return x

    def _keep_recomputed(self, t):
        self.recomputed.append(_KEPT.keep(t))
        if len(self.recomputed) == self.count:
            raise _StopRecompute  # everything the backward needs is there; the rest of the block is not
        return None

    def _recompute(self):
        self.recomputed = []
        with contextlib.ExitStack() as stack:
            stack.enter_context(
                torch.random.fork_rng(devices=[] if self.cuda_rng is None else [torch.cuda.current_device()])
            )
            torch.set_rng_state(self.cpu_rng)
            if self.cuda_rng is not None:
                torch.cuda.set_rng_state(self.cuda_rng)
            for device, (enabled, dtype) in self.autocast.items():
                stack.enter_context(torch.autocast(device, dtype=dtype, enabled=enabled))
            stack.enter_context(torch.enable_grad())
            args, kwargs = self._replay(self.args), self._replay(self.kwargs)
            stack.enter_context(_write_guard())
            stack.enter_context(torch.autograd.graph.saved_tensors_hooks(self._keep_recomputed, _unreachable))
            try:
                self.fn(*args, **kwargs)
            except _StopRecompute:
                pass
        if len(self.recomputed) != self.count:
            raise RuntimeError(
                f"WaveFT checkpointing: the recomputed block kept {len(self.recomputed)} tensors, its "
                f"forward {self.count}; the block does not compute the same way twice (turn "
                "gradient_checkpointing off for this model)"
            )
        self.args = self.kwargs = self.inputs = None  # the inputs are no longer needed


def _unreachable(_):
    raise RuntimeError("WaveFT checkpointing: the recomputed graph is not for a backward")


def checkpointed(fn):
    """`fn` whose kept tensors are recomputed in the backward instead of held (see the module docstring)."""

    def run(*args, **kwargs):
        if not torch.is_grad_enabled():
            return fn(*args, **kwargs)
        frame = _Frame(fn, args, kwargs)
        with _write_guard(), torch.autograd.graph.saved_tensors_hooks(frame.pack, frame.unpack):
            return fn(*args, **kwargs)

    return run
