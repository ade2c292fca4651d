"""The diffusers side of tests/host/test_dit_names_host.py, run with the project's .venv (real diffusers and PEFT;
ComfyUI's Python has neither).

    python tests/diffusers_reference.py SPEC.json NATIVE.safetensors OUT_DIR

SPEC names a diffusers transformer class, its tiny config and diffusers' own single-file converter of the family
(`diffusers.loaders.single_file_utils.<converter>`, which turns the original checkpoint layout, the one ComfyUI's
model uses, into diffusers'; null where the two layouts are the same). NATIVE is the tiny ComfyUI model's state
dict. Written to OUT_DIR:

- `adapter/pytorch_lora_weights.safetensors`: a WaveFT adapter that PEFT put on every Linear layer of the diffusers
  model (random non-zero spectra), saved by diffusers' `save_lora_adapter` under diffusers' names;
- `merged.safetensors`: every weight of the diffusers model with PEFT's own ΔW added (float64);
- `index.safetensors`: for every diffusers weight, which element of NATIVE each of its elements is, found by
  running the converter on a copy of NATIVE whose elements hold their own running number (float64, exact): the
  converter's layout change (renames, q/k/v splits, scale/shift swaps) as data the host test can apply."""

import json
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def convert(spec, state):
    for ours, original in spec.get("to_original", []):  # where ComfyUI renamed keys of the original layout on load
        state = {k.replace(ours, original): v for k, v in state.items()}
    if not spec.get("converter"):
        return dict(state)
    return converter(spec)(dict(state))


def converter(spec):
    """diffusers' converter; where it writes the full-size model's widths as constants (Flux's `inner_dim = 3072`,
    Lumina 2's `q_dim = 2304`), the same code with the tiny model's widths put in their place."""
    import inspect

    from diffusers.loaders import single_file_utils

    function = getattr(single_file_utils, spec["converter"])
    if not spec.get("converter_widths"):
        return function
    source = inspect.getsource(function)
    for full, tiny in spec["converter_widths"]:
        assert full in source, f"{spec['converter']} no longer says {full!r}: update the test's widths"
        source = source.replace(full, tiny)
    namespace = dict(vars(single_file_utils))
    exec(compile(source, inspect.getsourcefile(function), "exec"), namespace)  # noqa: S102 (diffusers' own code)
    return namespace[spec["converter"]]


def running_numbers(state: dict, order: list) -> dict:
    out, start = {}, 0
    for key in order:
        n = state[key].numel()
        out[key] = torch.arange(start, start + n, dtype=torch.float64).reshape(state[key].shape)
        start += n
    return out


def main(spec_path, native_path, out_dir):
    import diffusers
    from peft import WaveFTConfig

    spec = json.loads(Path(spec_path).read_text())
    out = Path(out_dir)
    native = {k: v.double() for k, v in load_file(native_path).items()}
    order = spec["order"]
    index = {
        k: v.round().long() for k, v in convert(spec, running_numbers(native, order)).items() if v.is_floating_point()
    }
    torch.manual_seed(0)
    if not hasattr(diffusers, spec["diffusers_class"]):
        raise SystemExit(
            f"diffusers {diffusers.__version__} has no {spec['diffusers_class']}: the family's reference "
            "needs a newer diffusers (pip install -U diffusers; tested with 0.42.1)"
        )
    model = getattr(diffusers, spec["diffusers_class"])(**spec["diffusers_config"]).double()
    missing, unexpected = model.load_state_dict(convert(spec, native), strict=False)
    if missing or unexpected:
        raise SystemExit(
            f"the tiny config does not match the ComfyUI model: missing {missing[:8]}, unexpected {unexpected[:8]}"
        )
    linear = [n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    targets = [n for n in linear if not any(skip in n for skip in spec.get("skip", []))]
    model.add_adapter(
        WaveFTConfig(n_frequency=40, scaling=3.0, wavelet_family="db2", random_loc_seed=11, target_modules=targets)
    )
    g = torch.Generator().manual_seed(5)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "waveft_spectrum" in name:
                p.copy_(torch.randn(p.shape, generator=g, dtype=p.dtype))
    model.save_lora_adapter(out / "adapter")
    merged = {}
    for name, module in model.named_modules():
        if hasattr(module, "waveft_spectrum"):
            base = module.get_base_layer().weight.detach()
            merged[name + ".weight"] = base + module.get_delta_weight("default").detach().double()
    base_state = {k.replace(".base_layer.", "."): v for k, v in model.state_dict().items() if "waveft" not in k}
    for key, value in base_state.items():
        merged.setdefault(key, value.detach().double())
    save_file({k: v.contiguous() for k, v in merged.items() if k in index}, str(out / "merged.safetensors"))
    save_file({k: v.contiguous() for k, v in index.items() if k in merged}, str(out / "index.safetensors"))
    (out / "targets.json").write_text(json.dumps(targets))


if __name__ == "__main__":
    main(*sys.argv[1:])
