"""The embedded default job: fit a WaveFT adapter to a small model on data made in code, save it as a
native file, load it back and apply it at three strengths. Everything is CPU-sized and deterministic."""

from __future__ import annotations

import copy
import time
from pathlib import Path

import torch
from torch import nn

from . import load, save
from .keys import DEFAULT_SCALING, DEFAULT_SEED, DEFAULT_WAVELET, META_DESCRIPTION, META_TITLE, META_TRAINING
from .training.trainable import TrainableLayer, adapter_from_trainables


def _make_models(seed: int):
    """A base MLP and a 'fine-tuned' copy whose first two weights moved (the change we try to learn)."""
    g = torch.Generator().manual_seed(seed)
    base = nn.Sequential(nn.Linear(96, 160), nn.GELU(), nn.Linear(160, 128), nn.GELU(), nn.Linear(128, 24))
    with torch.no_grad():
        for p in base.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * (1.0 / p.shape[-1] ** 0.5))
    target = copy.deepcopy(base)
    with torch.no_grad():
        # A smooth, high-rank change: what a wavelet basis captures with few coefficients.
        for idx in (0, 2):
            w = target[idx].weight
            rows = torch.linspace(0, 3.0, w.shape[0])[:, None]
            cols = torch.linspace(0, 2.0, w.shape[1])[None, :]
            w += 0.08 * torch.sin(rows * 2.1 + cols * 1.3) * torch.cos(cols * 3.7 - rows)
    return base, target


def run(
    out: str | Path = "out/demo_waveft.safetensors",
    steps: int = 400,
    coefficients: int = 2000,
    wavelet: str = DEFAULT_WAVELET,
    scaling: float = DEFAULT_SCALING,
    lr: float = 5e-4,
    seed: int = 0,
    log=print,
) -> dict:
    torch.manual_seed(seed)
    t_start = time.perf_counter()
    base, target = _make_models(seed)
    g = torch.Generator().manual_seed(seed + 1)
    x_train = torch.randn(4096, 96, generator=g)  # enough data that the fit generalises
    x_test = torch.randn(256, 96, generator=g)
    with torch.no_grad():
        y_train, y_test = target(x_train), target(x_test)
    for p in base.parameters():
        p.requires_grad_(False)

    names = {"0": "mlp.0", "2": "mlp.2"}
    trainables = {
        names[i]: TrainableLayer(base[int(i)].weight.shape, coefficients, wavelet, scaling, seed=DEFAULT_SEED)
        for i in names
    }

    def forward(x, layers, strength=1.0):
        h = x
        for i, mod in enumerate(base):
            if isinstance(mod, nn.Linear):
                w = mod.weight
                name = names.get(str(i))
                if name in layers:
                    layers[name].strength = strength
                    w = layers[name](w)
                h = nn.functional.linear(h, w, mod.bias)
            else:
                h = mod(h)
        return h

    def test_loss(layers, strength=1.0):
        with torch.no_grad():
            return float(nn.functional.mse_loss(forward(x_test, layers, strength), y_test))

    loss_before = test_loss({})
    opt = torch.optim.Adam([t.spectrum for t in trainables.values()], lr=lr)
    t_train = time.perf_counter()
    for step in range(steps):
        idx = torch.randint(0, x_train.shape[0], (64,), generator=g)
        loss = nn.functional.mse_loss(forward(x_train[idx], trainables), y_train[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    train_time = time.perf_counter() - t_train
    loss_after = test_loss(trainables)

    adapter = adapter_from_trainables(
        trainables,
        {
            META_TITLE: "WaveFT demo",
            META_DESCRIPTION: "fitted by 'python -m waveft_core demo' on data made in code",
            META_TRAINING: f'{{"steps": {steps}, "lr": {lr}, "optimizer": "Adam", "batch": 64}}',
        },
    )
    path = save(adapter, out)
    loaded = load(path)

    # Apply the loaded file the way a host does: patch a copy of each weight in place, then run.
    strengths = {}
    for strength in (0.0, 0.5, 1.0):
        patched = copy.deepcopy(base)
        with torch.no_grad():
            for i, name in names.items():
                loaded.layers[name].add_to_(patched[int(i)].weight, strength)
            strengths[strength] = float(nn.functional.mse_loss(patched(x_test), y_test))
    result = {
        "file": str(path),
        "file_size": path.stat().st_size,
        "layers": len(loaded.layers),
        "parameters": loaded.n_parameters,
        "wavelet": wavelet,
        "loss_before": loss_before,
        "loss_after": loss_after,
        "loss_by_strength": strengths,
        "train_seconds": train_time,
        "total_seconds": time.perf_counter() - t_start,
    }
    dense = sum(base[int(i)].weight.numel() for i in names)
    log(
        f"WaveFT demo: fitted {result['layers']} layers, {result['parameters']:,} coefficients "
        f"({100 * result['parameters'] / dense:.1f}% of the {dense:,} weights they change), wavelet {wavelet}"
    )
    log(
        f"  test loss before {loss_before:.5f} -> after {loss_after:.5f} "
        f"({loss_before / max(loss_after, 1e-12):.1f}x lower) in {steps} steps, {train_time:.2f} s"
    )
    log(f"  saved {path.resolve()} ({result['file_size']:,} bytes), loaded back: {loaded.n_parameters:,} coefficients")
    for s, loss in strengths.items():
        log(f"  applied at strength {s:>3}: test loss {loss:.5f}")
    log(f"  total {result['total_seconds']:.2f} s")
    log("next: look inside the file with")
    log(f"  python -m waveft_core info {path.resolve()} --layers")
    log("  (in ComfyUI: put WaveFT adapters in models/waveft and use the Load WaveFT node; ./dev test runs the suite)")
    return result
