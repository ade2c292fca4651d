"""python -m waveft_core: inspect, convert, extract, merge and demo WaveFT adapters. Errors: one line on stderr,
exit 1."""
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


def _cmd_to_lora(args) -> int:
    import torch

    from . import load
    from .convert import save_lora, to_lora

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    ad = load(args.src)
    tensors, metadata, report = to_lora(ad, args.rank, dtype=dtype, method="randomized" if args.fast else "exact")
    save_lora(tensors, metadata, args.dst)
    layers = report["layers"]
    worst = min(layers, key=lambda k: layers[k]["energy_kept"])
    print(f"wrote {args.dst}: {len(layers)} layers as rank-{args.rank} LoRA ({args.dtype})")
    print(f"energy kept: {100 * report['energy_kept']:.2f}% overall, lowest {100 * layers[worst]['energy_kept']:.2f}% "
          f"in {worst}")
    print(f"relative error: {report['relative_error']:.4f}")
    if report["skipped"]:
        print(f"skipped {len(report['skipped'])} layer(s) whose ΔW is zero")
    return 0


def _cmd_extract(args) -> int:
    from . import save
    from .convert import checkpoint_deltas, checkpoint_module_names, extract, lora_deltas

    dst = Path(args.dst)
    if dst.suffix.lower() != ".safetensors":
        raise ValueError(f"{dst}: the native file needs a .safetensors name")
    if args.lora:
        if args.finetuned:
            raise ValueError("give either --lora or --finetuned, not both")
        from .fileformat import read_tensors_and_metadata

        tensors, source_md = read_tensors_and_metadata(args.lora)
        known = checkpoint_module_names(args.base) if args.base else None
        deltas = lora_deltas(tensors, known)
        metadata = {k: v for k, v in source_md.items() if k == "ss_base_model_version" or k.startswith("modelspec.")}
    elif args.finetuned:
        if not args.base:
            raise ValueError("--finetuned needs --base <the checkpoint it was fine-tuned from>")
        deltas = checkpoint_deltas(args.finetuned, args.base, targets=args.targets)
        metadata = dict(deltas.metadata)
    else:
        raise ValueError("give --lora LORA.safetensors, or --finetuned FT.safetensors with --base BASE.safetensors")
    if args.base_model:
        metadata["ss_base_model_version"] = args.base_model
    ad, report = extract(deltas, args.coefficients, wavelet=args.wavelet, scaling=args.scaling,
                         iterations=args.iterations, metadata=metadata)
    save(ad, dst)
    layers = report["layers"]
    worst = max(layers, key=lambda k: layers[k]["relative_error"])
    print(f"wrote {dst}: {len(layers)} layers, {ad.n_parameters:,} coefficients ({args.wavelet}, "
          f"scaling {args.scaling:g})")
    print(f"relative error: {report['relative_error']:.4f} overall, highest {layers[worst]['relative_error']:.4f} "
          f"in {worst}")
    if report["skipped"]:
        print(f"skipped {len(report['skipped'])}: " + "; ".join(f"{n} ({why})" for n, why in report["skipped"][:3])
              + (" ..." if len(report["skipped"]) > 3 else ""))
    return 0


def _cmd_merge(args) -> int:
    from . import load
    from .convert import merge_into_checkpoint

    ad = load(args.adapter)
    report = merge_into_checkpoint(args.checkpoint, ad, args.strength, args.out, strict=not args.lenient)
    print(f"wrote {args.out}: merged {report['merged']} of {len(ad.layers)} layers at strength {args.strength:g} "
          f"({report['tensors_changed']} tensors changed)")
    for name, why in report["skipped"]:
        print(f"warning: skipped {name}: {why}", file=sys.stderr)
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

    to_lora = sub.add_parser("to-lora", help="WaveFT file -> LoRA (best rank-r approximation of each layer)")
    to_lora.add_argument("src", help="native WaveFT .safetensors")
    to_lora.add_argument("dst", help="LoRA .safetensors to write")
    to_lora.add_argument("--rank", type=int, default=8)
    to_lora.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16")
    to_lora.add_argument("--fast", action="store_true", help="randomized SVD: much faster on big layers, near-optimal")
    to_lora.set_defaults(func=_cmd_to_lora)

    ext = sub.add_parser("extract", help="LoRA, or fine-tuned minus base checkpoint -> WaveFT (largest wavelet "
                         "coefficients, refined by least squares)")
    ext.add_argument("dst", help="native WaveFT .safetensors to write")
    ext.add_argument("--lora", help="LoRA .safetensors (kohya, ComfyUI-native or PEFT key names)")
    ext.add_argument("--finetuned", help="fine-tuned single-file .safetensors checkpoint")
    ext.add_argument("--base", help="base checkpoint: required with --finetuned; with --lora it settles layer names")
    ext.add_argument("--coefficients", type=int, default=2592, help="coefficients per layer")
    ext.add_argument("--wavelet", default="db1")
    ext.add_argument("--scaling", type=float, default=25.0)
    ext.add_argument("--targets", choices=["attention", "linear", "all"], default="attention",
                     help="with --finetuned: attention projections, every linear layer, or also convolutions")
    ext.add_argument("--iterations", type=int, default=100, help="least-squares (conjugate gradient) steps per fit")
    ext.add_argument("--base-model", help="base model tag to record, e.g. sd_v1 or sdxl_base_v1-0")
    ext.set_defaults(func=_cmd_extract)

    merge = sub.add_parser("merge", help="bake an adapter into a copy of a single-file .safetensors checkpoint")
    merge.add_argument("checkpoint")
    merge.add_argument("adapter", help="native WaveFT .safetensors")
    merge.add_argument("out", help="merged checkpoint .safetensors to write")
    merge.add_argument("--strength", type=float, default=1.0)
    merge.add_argument("--lenient", action="store_true",
                       help="skip (and list) layers that match no weight instead of refusing")
    merge.set_defaults(func=_cmd_merge)

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
