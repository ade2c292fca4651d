"""python -m waveft_core (installed with pip, also `waveft`): inspect, convert, extract, merge and demo WaveFT
adapters. Errors: one line on stderr, exit 1."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .files.kinds import KOHYA, kind_of, stores_positions
from .files.printable import PrintableStream, printable, short_list
from .files.storage import refuse_overwrite
from .keys import (
    DEFAULT_COEFFICIENTS,
    DEFAULT_SCALING,
    DEFAULT_SEED,
    DEFAULT_WAVELET,
    META_BASE_MODEL,
    META_FORMAT_VERSION,
    META_IMPORT_NOTES,
    SPEC_PREFIX,
)
from .names.families import ENCODERS


def _describe_without_base(path: Path, args) -> str:
    """What a file that needs a base model holds, told without one."""
    from .convert.peft_io import CLI
    from .convert.sources import describe, read_source
    from .files import kohya
    from .files.fileformat import read_tensors_and_metadata

    if path.suffix == ".safetensors" and kind_of(path) == KOHYA:
        return kohya.describe(kohya.read(*read_tensors_and_metadata(path), path))
    return describe(read_source(path, args.adapter_name, CLI.adapter), _overrides(args))


def _overrides(args) -> dict:
    use_idwt = None if getattr(args, "use_idwt", None) is None else args.use_idwt == "true"
    return {
        "wavelet_family": getattr(args, "wavelet", None),
        "scaling": getattr(args, "scaling", None),
        "random_loc_seed": getattr(args, "seed", None),
        "use_idwt": use_idwt,
    }


def _load(args, path, base=None):
    """Any adapter form, with the command's --base/--clip/--adapter/settings, and messages in flags."""
    from . import load
    from .convert.peft_io import CLI

    return load(
        path,
        base=base if base is not None else getattr(args, "base", None),
        clip=getattr(args, "clip", None),
        adapter=getattr(args, "adapter_name", None),
        overrides=_overrides(args),
        components=getattr(args, "component", None),
        spelling=CLI,
    )


def _cmd_info(args) -> int:
    path = Path(args.file)
    if args.base is None and not stores_positions(path):
        print(_describe_without_base(path, args))
        print("(give --base <checkpoint or diffusers folder> to see each layer's shape and the native names)")
        return 0
    ad = _load(args, path)
    print(ad.summary())
    extra = {k: v for k, v in ad.metadata.items() if not k.startswith(META_FORMAT_VERSION)}
    if extra:
        print("metadata:")
        for k in sorted(extra):
            v = extra[k]
            print(f"  {printable(k)}: {printable(v if len(v) <= 200 else v[:200] + '...')}")
    if args.layers:
        print("layers:")
        for name, layer in ad.layers.items():
            print(f"  {name}: {list(layer.shape)}, {layer.n_coefficients} coefficients, scaling {layer.scaling:g}")
    return 0


def _cmd_convert(args) -> int:
    from . import save, save_peft

    src, dst = Path(args.src), Path(args.dst)
    refuse_overwrite(dst, src, args.base, overwrite=args.overwrite)
    if not stores_positions(src):
        if dst.suffix != ".safetensors":
            raise ValueError(f"{dst}: the native file needs a .safetensors name")
        ad = _load(args, src)
        if args.base_model:
            ad.metadata[META_BASE_MODEL] = args.base_model
        save(ad, dst)
        print(
            f"wrote {dst}: {len(ad.layers)} layers, {ad.n_parameters:,} coefficients"
            + (f", base model {ad.base_model}" if ad.base_model else "")
        )
        for note in filter(None, ad.metadata.get(META_IMPORT_NOTES, "").split("; ")):
            print(f"note: {note}")
        return 0
    ad = _load(args, src)
    if dst.suffix == ".safetensors":  # re-saved as this version writes it (the settings tensors included)
        save(ad, dst)
        print(f"wrote {dst}: {len(ad.layers)} layers, re-saved with the settings tensors the stock LoRA loader reads")
        return 0
    folders = save_peft(ad, dst, base_model_name=args.base_model)
    for f in folders:
        print(f"wrote PEFT adapter folder {f}")
    return 0


def _cmd_to_lora(args) -> int:
    import torch

    from .convert.lora import save_lora, to_lora

    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}[args.dtype]
    refuse_overwrite(Path(args.dst), args.src, args.base, overwrite=args.overwrite)
    ad = _load(args, args.src)
    tensors, metadata, report = to_lora(ad, args.rank, dtype=dtype, method="randomized" if args.fast else "exact")
    save_lora(tensors, metadata, args.dst)
    layers = report["layers"]
    worst = min(layers, key=lambda k: layers[k]["energy_kept"])
    capped = f" (asked {args.rank}; no layer allows more)" if report["rank"] < args.rank else ""
    print(f"wrote {args.dst}: {len(layers)} layers as rank-{report['rank']} LoRA ({args.dtype}){capped}")
    print(
        f"energy kept: {100 * report['energy_kept']:.2f}% overall, lowest {100 * layers[worst]['energy_kept']:.2f}% "
        f"in {worst}"
    )
    print(f"relative error: {report['relative_error']:.4f}")
    if report["skipped"]:
        print(f"skipped {len(report['skipped'])} layer(s) whose ΔW is zero")
    return 0


def _cmd_extract(args) -> int:
    from . import save
    from .convert.extract import checkpoint_deltas, extract
    from .convert.lora import lora_deltas
    from .names.layouts import checkpoint_module_names

    dst = Path(args.dst)
    if dst.suffix.lower() != ".safetensors":
        raise ValueError(f"{dst}: the native file needs a .safetensors name")
    refuse_overwrite(dst, args.lora, args.finetuned, args.base, overwrite=args.overwrite)
    if args.lora:
        if args.finetuned:
            raise ValueError("give either --lora or --finetuned, not both")
        from .files.fileformat import read_tensors_and_metadata

        tensors, source_md = read_tensors_and_metadata(args.lora)
        known = checkpoint_module_names(args.base) if args.base else None
        deltas = lora_deltas(tensors, known, source=args.lora)
        metadata = {k: v for k, v in source_md.items() if k == META_BASE_MODEL or k.startswith(SPEC_PREFIX)}
    elif args.finetuned:
        if not args.base:
            raise ValueError("--finetuned needs --base <the checkpoint it was fine-tuned from>")
        deltas = checkpoint_deltas(args.finetuned, args.base, targets=args.targets)
        metadata = dict(deltas.metadata)
    else:
        raise ValueError("give --lora LORA.safetensors, or --finetuned FT.safetensors with --base BASE.safetensors")
    if args.base_model:
        metadata[META_BASE_MODEL] = args.base_model
    ad, report = extract(
        deltas,
        args.coefficients,
        wavelet=args.wavelet,
        scaling=args.scaling,
        iterations=args.iterations,
        metadata=metadata,
    )
    save(ad, dst)
    layers = report["layers"]
    worst = max(layers, key=lambda k: layers[k]["relative_error"])
    print(
        f"wrote {dst}: {len(layers)} layers, {ad.n_parameters:,} coefficients ({args.wavelet}, "
        f"scaling {args.scaling:g})"
    )
    print(
        f"relative error: {report['relative_error']:.4f} overall, highest {layers[worst]['relative_error']:.4f} "
        f"in {worst}"
    )
    if report["skipped"]:
        print(
            f"skipped {len(report['skipped'])}: "
            + short_list((f"{n} ({why})" for n, why in report["skipped"]), 3, "; ", " ...")
        )
    return 0


def _cmd_merge(args) -> int:
    from .convert.merge import merge_into_checkpoint

    refuse_overwrite(Path(args.out), args.checkpoint, args.adapter, overwrite=args.overwrite)
    ad = _load(args, args.adapter, base=args.checkpoint)  # the checkpoint is the base of a PEFT/diffusers adapter
    report = merge_into_checkpoint(args.checkpoint, ad, args.strength, args.out, strict=not args.lenient)
    print(
        f"wrote {args.out}: merged {report['merged']} of {len(ad.layers)} layers at strength {args.strength:g} "
        f"({report['tensors_changed']} tensors changed)"
    )
    for name, why in report["skipped"]:
        print(f"warning: skipped {name}: {why}", file=sys.stderr)
    return 0


def _cmd_train(args) -> int:
    try:
        from .training.accelerate_train import run
    except ImportError as e:  # the optional extra
        raise ValueError(
            f"training from the command line needs accelerate, diffusers and transformers ({e}); "
            "pip install 'waveft[train]'"
        ) from None
    run(args)
    return 0


def _cmd_demo(args) -> int:
    from .demo import run

    run(out=args.out, steps=args.steps, coefficients=args.coefficients, wavelet=args.wavelet)
    return 0


class _Help(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows each option's default, where it has one."""

    def _get_help_string(self, action):
        if action.default in (None, False) or action.default is argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def _parser_with_defaults(**kwargs):
    return argparse.ArgumentParser(formatter_class=_Help, **kwargs)


ADAPTER_HELP = (
    "WaveFT adapter: a native .safetensors file, a PEFT folder (or a folder of several), or a diffusers "
    ".safetensors file"
)


def _source_options(p, base_help: str | None) -> None:
    """Options for adapters that store no positions (PEFT, diffusers)."""
    if base_help is not None:
        p.add_argument(
            "--base", help=f"the base model: single-file checkpoint .safetensors or diffusers folder; {base_help}"
        )
    p.add_argument(
        "--clip",
        choices=list(ENCODERS),
        help="the text encoder a text-encoder adapter was trained on, when it does not say "
        "(SDXL: text_encoder = clip_l, text_encoder_2 = clip_g)",
    )
    p.add_argument(
        "--adapter",
        dest="adapter_name",
        help="which adapter of a PEFT folder that holds several (default: the top one)",
    )
    p.add_argument(
        "--component",
        action="append",
        choices=["unet", "transformer", "text_encoder", "text_encoder_2"],
        help="only this pipeline component of a multi-part adapter (repeat for several)",
    )
    p.add_argument(
        "--wavelet", help=f"wavelet for an adapter saved without its settings (PEFT default {DEFAULT_WAVELET})"
    )
    p.add_argument(
        "--scaling", type=float, help=f"scaling for an adapter saved without its settings (default {DEFAULT_SCALING:g})"
    )
    p.add_argument("--seed", type=int, help=f"random_loc_seed for an adapter saved without it (default {DEFAULT_SEED})")
    p.add_argument(
        "--use-idwt", choices=["true", "false"], help="use_idwt for an adapter saved without it (default true)"
    )


def build_parser() -> argparse.ArgumentParser:
    # One name in every message: `python -m waveft_core` also works in a ComfyUI folder, without installing
    p = argparse.ArgumentParser(prog="python -m waveft_core", description=__doc__, formatter_class=_Help)
    sub = p.add_subparsers(dest="command", required=True, parser_class=_parser_with_defaults)

    info = sub.add_parser("info", help="layers, parameters, wavelet, scaling, base model and metadata of an adapter")
    info.add_argument("file", help=ADAPTER_HELP)
    _source_options(info, "with a PEFT folder or diffusers file: show each layer's shape and native name")
    info.add_argument("--layers", action="store_true", help="list every layer")
    info.set_defaults(func=_cmd_info)

    conv = sub.add_parser("convert", help="PEFT folder or diffusers file -> native file; native file -> PEFT folder")
    conv.add_argument("src", help=ADAPTER_HELP)
    conv.add_argument("dst", help="native .safetensors to write (from PEFT/diffusers), or a PEFT folder (from native)")
    _source_options(conv, "needed for a PEFT folder or diffusers file (it draws each layer's positions)")
    conv.add_argument(
        "--base-model", help="base model tag to record, e.g. sd_1.5 or sdxl_base_v1-0 (default: what --base is)"
    )
    conv.add_argument("--overwrite", action="store_true", help="replace DST when it exists (never an input)")
    conv.set_defaults(func=_cmd_convert)

    to_lora = sub.add_parser("to-lora", help="WaveFT adapter -> LoRA (best rank-r approximation of each layer)")
    to_lora.add_argument("src", help=ADAPTER_HELP)
    to_lora.add_argument("dst", help="LoRA .safetensors to write")
    _source_options(to_lora, "needed for a PEFT folder or diffusers file")
    to_lora.add_argument("--overwrite", action="store_true", help="replace DST when it exists (never an input)")
    to_lora.add_argument(
        "--rank", type=int, default=8, help="LoRA rank per layer (capped at each layer's smaller side)"
    )
    to_lora.add_argument("--dtype", choices=["fp16", "bf16", "fp32"], default="fp16", help="dtype of the LoRA tensors")
    to_lora.add_argument("--fast", action="store_true", help="randomized SVD: much faster on big layers, near-optimal")
    to_lora.set_defaults(func=_cmd_to_lora)

    ext = sub.add_parser(
        "extract",
        help="LoRA, or fine-tuned minus base checkpoint -> WaveFT (largest wavelet "
        "coefficients, refined by least squares)",
    )
    ext.add_argument("dst", help="native WaveFT .safetensors to write")
    ext.add_argument("--lora", help="LoRA .safetensors (kohya, ComfyUI-native or PEFT key names)")
    ext.add_argument("--finetuned", help="fine-tuned single-file .safetensors checkpoint")
    ext.add_argument("--base", help="base checkpoint: required with --finetuned; with --lora it settles layer names")
    ext.add_argument("--coefficients", type=int, default=DEFAULT_COEFFICIENTS, help="coefficients per layer")
    ext.add_argument("--wavelet", default=DEFAULT_WAVELET, help="wavelet of the WaveFT adapter to write")
    ext.add_argument("--scaling", type=float, default=DEFAULT_SCALING, help="scaling of the WaveFT adapter to write")
    ext.add_argument(
        "--targets",
        choices=["attention", "linear", "all"],
        default="attention",
        help="with --finetuned: attention projections, every linear layer, or also convolutions",
    )
    ext.add_argument("--iterations", type=int, default=100, help="least-squares (conjugate gradient) steps per fit")
    ext.add_argument("--base-model", help="base model tag to record, e.g. sd_1.5 or sdxl_base_v1-0")
    ext.add_argument("--overwrite", action="store_true", help="replace DST when it exists (never an input)")
    ext.set_defaults(func=_cmd_extract)

    merge = sub.add_parser("merge", help="bake an adapter into a copy of a single-file .safetensors checkpoint")
    merge.add_argument("checkpoint", help="single-file .safetensors checkpoint (left unchanged)")
    merge.add_argument("adapter", help=ADAPTER_HELP + " (the checkpoint is its base)")
    merge.add_argument("out", help="merged checkpoint .safetensors to write (never the checkpoint itself)")
    _source_options(merge, None)
    merge.add_argument("--overwrite", action="store_true", help="replace OUT when it exists (never an input)")
    merge.add_argument("--strength", type=float, default=1.0, help="multiplier of each layer's ΔW")
    merge.add_argument(
        "--lenient", action="store_true", help="skip (and list) layers that match no weight instead of refusing"
    )
    merge.set_defaults(func=_cmd_merge)

    from .training.accelerate_train import add_arguments as train_arguments

    train = sub.add_parser(
        "train",
        help="train an adapter on a diffusers pipeline folder and a folder of captioned "
        "images; one process, or many through 'accelerate launch -m waveft_core train ...'",
    )
    train_arguments(train)
    train.set_defaults(func=_cmd_train)

    demo = sub.add_parser("demo", help="fit, save, load and apply a WaveFT adapter on a small model made in code")
    demo.add_argument("--out", default="out/demo_waveft.safetensors", help="where the fitted adapter is written")
    demo.add_argument("--steps", type=int, default=400, help="optimizer steps")
    demo.add_argument("--coefficients", type=int, default=2000, help="coefficients per layer")
    demo.add_argument("--wavelet", default=DEFAULT_WAVELET, help="wavelet family")
    demo.set_defaults(func=_cmd_demo)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    # Everything printed may quote a file (titles, metadata, layer names, bad values in errors): no terminal
    # escapes get through.
    out, err = sys.stdout, sys.stderr
    sys.stdout, sys.stderr = PrintableStream(out), PrintableStream(err)
    try:
        return args.func(args)
    except (ValueError, OSError) as e:  # WaveFTFileError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        sys.stdout, sys.stderr = out, err
