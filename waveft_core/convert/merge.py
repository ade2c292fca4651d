"""An adapter baked into a copy of a single-file .safetensors checkpoint, tensor by tensor (layouts.py says where
each native module's weight lives, fused OpenCLIP q/k/v rows included)."""

from __future__ import annotations

import math
import shutil
import sys
from pathlib import Path

import torch

from ..adapter import Adapter, Layer
from ..delta import compute_dtype, matrix_shape
from ..files.printable import short_list
from ..files.storage import atomic_write, checked_safetensors, open_safetensors, read_header
from ..names.layouts import Location, checkpoint_layout, location_shape


def merge_into_checkpoint(
    checkpoint_path, adapter: Adapter | str | Path, strength: float, out_path, strict: bool = True
) -> dict:
    """Write a copy of a single-file .safetensors checkpoint with strength x ΔW added to the adapter's weights
    (UNet, CLIP-L, and the OpenCLIP CLIP-G/CLIP-H of SDXL/SD2, whose q/k/v are rows of `attn.in_proj_weight`).
    The sum is computed in float32 (float64 for float64 weights) and stored in each weight's dtype; every other
    byte, metadata included, is copied unchanged. Written atomically.

    A layer that matches no weight or whose shape differs raises ValueError naming it; with strict=False such
    layers are skipped and listed in report['skipped']. Report: {'merged', 'tensors_changed', 'skipped'}."""
    from .. import load

    if not isinstance(adapter, Adapter):
        adapter = load(adapter)
    strength = float(strength)
    if not math.isfinite(strength):
        raise ValueError(f"strength must be a finite number, got {strength}")
    src = checked_safetensors(checkpoint_path, "checkpoint")
    out = Path(out_path)
    if out.suffix.lower() != ".safetensors":
        raise ValueError(f"{out}: the merged checkpoint needs a .safetensors name")
    if sys.byteorder != "little":
        raise ValueError("merging writes raw little-endian tensor bytes; this machine is big-endian")
    parsed = read_header(src)
    header, data_start = parsed.tensors, parsed.data_start
    layout = checkpoint_layout(header)

    by_key: dict[str, list[tuple[Layer, Location]]] = {}
    problems: list[tuple[str, str]] = []
    for name, layer in adapter.layers.items():
        loc = layout.get(name)
        if loc is None:
            problems.append((name, f"matches no weight in {src}"))
            continue
        shape = location_shape(header, loc)
        if matrix_shape(shape) != layer.matrix_shape:
            problems.append((name, f"has shape {list(layer.shape)} but the weight {loc.key} is {list(shape)}"))
            continue
        if not header[loc.key]["dtype"].startswith(("F", "BF")):
            problems.append((name, f"the weight {loc.key} is {header[loc.key]['dtype']}, not floating point"))
            continue
        by_key.setdefault(loc.key, []).append((layer, loc))
    if problems and strict:
        listed = short_list((f"{n} {why}" for n, why in problems), 5, "; ", " (and {n} more)")
        raise ValueError(f"{len(problems)} adapter layer(s) do not fit {src}: {listed}")
    if not by_key:
        raise ValueError(f"no adapter layer matches a weight of {src}; is it the right base model?")

    def write(tmp):
        shutil.copyfile(src, tmp)
        with open_safetensors(src) as f, open(tmp, "r+b") as dst:
            for key, entries in by_key.items():
                weight = f.get_tensor(key)
                compute = compute_dtype(weight.dtype)
                total = weight.to(compute)
                for layer, loc in entries:
                    part = total if loc.rows is None else total[loc.rows[0] : loc.rows[1]]
                    part += layer.delta(compute, device="cpu", strength=strength).reshape(part.shape)
                data = total.to(weight.dtype).contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                begin, end = header[key]["data_offsets"]
                if len(data) != end - begin:
                    raise ValueError(f"{key}: {len(data)} bytes computed for a {end - begin}-byte tensor")
                dst.seek(data_start + begin)
                dst.write(data)

    atomic_write(out, write)
    return {
        "merged": sum(len(v) for v in by_key.values()),
        "tensors_changed": len(by_key),
        "skipped": problems,
        "strength": strength,
    }
