"""python -m waveft_core: inspect, convert and demo WaveFT adapters. Errors: one line on stderr, exit 1."""
from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _cmd_info(args) -> int:
    from . import load

    ad = load(args.file, base=args.base)
    print(ad.summary())
    extra = {k: v for k, v in ad.metadata.items() if not k.startswith(("waveft.format_version",))}
    if args.metadata and extra:
        print("metadata:")
        for k in sorted(extra):
            v = extra[k]
            print(f"  {k}: {v if len(v) <= 200 else v[:200] + '...'}")
    if args.layers:
        for name, layer in ad.layers.items():
            print(f"  {name}: {list(layer.shape)}, {layer.n_coefficients} coefficients, scaling {layer.scaling:g}")
    return 0


def _cmd_convert(args) -> int:
    from . import load, save, save_peft
    from .peft_io import is_peft_dir

    src, dst = Path(args.src), Path(args.dst)
    if is_peft_dir(src) or src.name == "adapter_config.json":
        if args.base is None:
            raise ValueError(f"{src.name}: a PEFT adapter stores no coefficient positions; give --base "
                             "<the base model checkpoint or diffusers folder> so each layer's shape is known")
        ad = load(src, base=args.base, clip=args.clip)
        if dst.suffix != ".safetensors":
            raise ValueError(f"{dst}: the native file needs a .safetensors name")
        if args.base_model:
            ad.metadata["ss_base_model_version"] = args.base_model
        save(ad, dst)
        print(f"wrote {dst}: {len(ad.layers)} layers, {ad.n_parameters:,} coefficients")
        return 0
    ad = load(src)
    if dst.suffix == ".safetensors":
        raise ValueError(f"{dst}: a native file converts to a PEFT folder; give a folder name, not a .safetensors file")
    folders = save_peft(ad, dst, base_model_name=args.base_model)
    for f in folders:
        print(f"wrote PEFT adapter folder {f}")
    return 0


def _cmd_demo(args) -> int:
    from .demo import run

    run(out=args.out, steps=args.steps, coefficients=args.coefficients, wavelet=args.wavelet)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m waveft_core", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="layers, parameters, wavelet, scaling, base model and metadata of an adapter")
    info.add_argument("file", help="native .safetensors file or PEFT folder (then also --base)")
    info.add_argument("--base", help="base checkpoint for a PEFT folder (layer shapes)")
    info.add_argument("--layers", action="store_true", help="list every layer")
    info.add_argument("--metadata", action="store_true", default=True, help=argparse.SUPPRESS)
    info.set_defaults(func=_cmd_info)

    conv = sub.add_parser("convert", help="PEFT folder -> native file, or native file -> PEFT folder")
    conv.add_argument("src")
    conv.add_argument("dst")
    conv.add_argument("--base", help="base model (checkpoint .safetensors or diffusers folder): needed for PEFT input")
    conv.add_argument("--clip", choices=["clip_l", "clip_g", "clip_h"],
                      help="which text encoder a PEFT text-encoder adapter belongs to (default: detected)")
    conv.add_argument("--base-model", help="base model tag to record, e.g. sd_v1 or sdxl_base_v1-0")
    conv.set_defaults(func=_cmd_convert)

    demo = sub.add_parser("demo", help="fit, save, load and apply a WaveFT adapter on a small model made in code")
    demo.add_argument("--out", default="out/demo_waveft.safetensors")
    demo.add_argument("--steps", type=int, default=400)
    demo.add_argument("--coefficients", type=int, default=2000)
    demo.add_argument("--wavelet", default="db1")
    demo.set_defaults(func=_cmd_demo)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, OSError) as e:  # WaveFTFileError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 1
