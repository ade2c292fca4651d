"""Hugging Face PEFT WaveFT adapters (FORMAT.md section 2): import with PEFT's positions, export back.

PEFT stores only the spectra; it draws each layer's positions from `random_loc_seed` and the layer's
m x n. So an import needs the shape of every target layer (from the model or a base checkpoint) and
an export is only possible when the positions follow that rule."""
from __future__ import annotations

import functools
import json
import os
import tempfile
from collections import Counter
from pathlib import Path
from typing import Callable, Mapping

import torch

from .adapter import DEFAULT_SCALING, DEFAULT_SEED, Adapter, Layer
from .delta import matrix_shape
from .fileformat import PICKLE_SUFFIXES, WaveFTFileError, read_tensors_and_metadata
from .names import split_component, to_native, to_peft
from .wavelets import UnknownWaveletError, check_wavelet, peft_name

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
SPECTRUM_SUFFIX = ".waveft_spectrum"


def peft_positions(shape, count: int, seed: int = DEFAULT_SEED) -> torch.Tensor:
    """The flat positions PEFT draws for a layer: randperm(m*n) from a generator seeded with `seed`.
    Layers of one size share them (a read-only tensor: clone before changing it)."""
    m, n = matrix_shape(tuple(shape))
    return _positions(m * n, int(count), int(seed))


@functools.lru_cache(maxsize=64)
def _positions(size: int, count: int, seed: int) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    # int32 draws the same permutation as PEFT's int64 one (checked in the tests) with half the memory.
    dtype = torch.int32 if size < 2**31 else torch.int64
    return torch.randperm(size, generator=generator, dtype=dtype)[:count].clone()


def is_peft_dir(path) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()


def read_peft_dir(path) -> tuple[dict, dict[str, torch.Tensor]]:
    """(adapter_config, {module name as PEFT wrote it: spectrum}) with the checks a loader needs."""
    path = Path(path)
    if path.is_file() and path.name == CONFIG_NAME:
        path = path.parent
    config_path = path / CONFIG_NAME
    if not config_path.is_file():
        raise WaveFTFileError(path, f"is not a PEFT adapter folder (no {CONFIG_NAME})")
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise WaveFTFileError(config_path, f"is not valid JSON ({e})") from None
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type != "WAVEFT":
        raise WaveFTFileError(config_path, f"peft_type is '{config.get('peft_type')}', not 'WAVEFT'",
                              key="peft_type", advice="Load LoRA folders with a LoRA loader")
    if config.get("fan_in_fan_out"):
        raise WaveFTFileError(config_path, "fan_in_fan_out=true (GPT-2 style Conv1D layers) is not supported",
                              key="fan_in_fan_out")
    try:
        check_wavelet(config.get("wavelet_family", "db1"))
    except UnknownWaveletError as e:
        raise WaveFTFileError(config_path, str(e), key="wavelet_family") from None
    weights = path / WEIGHTS_NAME
    if not weights.is_file():
        pickled = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickled:
            raise WaveFTFileError(path / pickled[0], "is a pickle, which WaveFT never loads (it can run code)",
                                  advice="Save the adapter with safe_serialization=True (adapter_model.safetensors)")
        raise WaveFTFileError(path, f"has no {WEIGHTS_NAME}")
    tensors, _ = read_tensors_and_metadata(weights)
    spectra = {}
    for key, t in tensors.items():
        if not key.endswith(SPECTRUM_SUFFIX):
            continue
        if not t.dtype.is_floating_point or t.dim() != 1:
            raise WaveFTFileError(weights, f"must be a 1-D float tensor, got {t.dtype} {list(t.shape)}", key=key)
        if not torch.isfinite(t).all():
            raise WaveFTFileError(weights, "has NaN or infinite coefficients", key=key)
        spectra[key[: -len(SPECTRUM_SUFFIX)]] = t
    if not spectra:
        raise WaveFTFileError(weights, "holds no '*.waveft_spectrum' tensors")
    return config, spectra


def _strip_adapter_name(module: str) -> str:
    # PEFT removes the adapter name when saving; older or hand-made files may keep '.default'.
    return module[: -len(".default")] if module.endswith(".default") else module


ShapeLookup = Callable[[str, str], "tuple[int, ...] | None"]  # (peft name, native name) -> weight shape


def import_peft(path, shape_of: ShapeLookup, clip: str | None = None, native_names: bool = True) -> Adapter:
    """A PEFT WaveFT folder -> Adapter with explicit positions, named ComfyUI-native (SD1.x/SDXL rule of
    names.py) or, with native_names=False, as PEFT wrote them minus `base_model.model.` (a host that
    resolves names against the actual model does better than the fixed SD1.x/SDXL rule).

    `shape_of(peft_name, native_name)` returns the target weight's shape or None when unknown."""
    config, spectra = read_peft_dir(path)
    wavelet = config.get("wavelet_family", "db1")
    scaling = float(config.get("scaling", DEFAULT_SCALING))
    seed = int(config.get("random_loc_seed", DEFAULT_SEED))
    use_idwt = bool(config.get("use_idwt", True))
    layers: dict[str, Layer] = {}
    missing = []
    # A text encoder saved without its pipeline prefix could be CLIP-L or CLIP-G: take the first
    # encoder of the base model that has every layer.
    choices = [clip] if clip else ["clip_l", "clip_g", "clip_h"]
    for choice in choices:
        resolved = {}
        missing = []
        for raw_name, spectrum in spectra.items():
            peft_module = _strip_adapter_name(raw_name)
            native = to_native(peft_module, clip=choice)
            shape = shape_of(peft_module, native)
            if not native_names:
                native = peft_module.removeprefix("base_model.model.")
            if shape is None:
                missing.append(peft_module)
            else:
                resolved[raw_name] = (native, tuple(shape))
        if not missing:
            break
    for raw_name, (native, shape) in resolved.items():
        spectrum = spectra[raw_name]
        m, n = matrix_shape(shape)
        if spectrum.numel() > m * n:
            raise WaveFTFileError(Path(path) / WEIGHTS_NAME, f"{spectrum.numel()} coefficients do not fit a "
                                  f"weight of shape {list(shape)}: the base model is not the one it was trained on",
                                  key=raw_name + SPECTRUM_SUFFIX)
        indices = peft_positions(shape, spectrum.numel(), seed)
        layers[native] = Layer(spectrum=spectrum.float(), indices=indices, shape=shape, scaling=scaling,
                               wavelet=wavelet, use_idwt=use_idwt)
    if missing:
        listed = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise WaveFTFileError(path, f"the base model has no weight for {len(missing)} of {len(spectra)} layers "
                              f"({listed})", advice="Give the base model this adapter was trained on")
    metadata = {
        "waveft.seed": str(seed),
        "waveft.source": "peft",
    }
    base_model = config.get("base_model_name_or_path")
    if base_model:
        metadata["modelspec.description"] = f"converted from a PEFT adapter for {base_model}"
    return Adapter(layers=layers, metadata=metadata, source=str(path))


def export_peft(adapter: Adapter, out_dir, base_model_name: str | None = None) -> list[Path]:
    """Write PEFT folders for `adapter`: one folder when all layers belong to one model, else one
    sub-folder per pipeline component (unet/, text_encoder/, text_encoder_2/). Returns the folders.

    Refuses (ValueError) when a layer's positions are not the ones PEFT would draw for the file's seed."""
    seed = int(adapter.metadata.get("waveft.seed", DEFAULT_SEED))
    scalings = {float(layer.scaling) for layer in adapter.layers.values()}
    if len(scalings) > 1:
        raise ValueError(f"PEFT has one scaling per adapter but the layers use {sorted(scalings)}")
    groups: dict[str, dict[str, Layer]] = {}
    for native, layer in adapter.layers.items():
        expected = peft_positions(layer.shape, layer.n_coefficients, seed)
        if not torch.equal(expected.long(), layer.indices.to(torch.int64).cpu()):
            raise ValueError(
                f"layer {native}: its positions are not the ones PEFT draws with random_loc_seed={seed}, so PEFT "
                "could not load them (PEFT stores no positions). Adapters trained by this project or converted "
                "from PEFT keep PEFT's positions; adapters extracted from LoRAs or weight differences do not"
            )
        component, name = to_peft(native)
        groups.setdefault(component, {})[name] = layer
    out_dir = Path(out_dir)
    written = []
    for component, layers in groups.items():
        folder = out_dir / component if len(groups) > 1 and component else out_dir
        _write_peft_folder(folder, layers, seed, base_model_name)
        written.append(folder)
    return written


def _write_peft_folder(folder: Path, layers: Mapping[str, Layer], seed: int, base_model_name) -> None:
    from safetensors.torch import save_file

    first = next(iter(layers.values()))
    counts = Counter(layer.n_coefficients for layer in layers.values())
    n_frequency = counts.most_common(1)[0][0]
    config = {
        "peft_type": "WAVEFT",
        "task_type": None,
        "base_model_name_or_path": base_model_name,
        "n_frequency": n_frequency,
        "n_frequency_pattern": {name: layer.n_coefficients for name, layer in layers.items()
                                if layer.n_coefficients != n_frequency},
        "scaling": float(first.scaling),
        "wavelet_family": peft_name(first.wavelet),
        "use_idwt": bool(first.use_idwt),
        "random_loc_seed": seed,
        "target_modules": sorted(layers),
        "fan_in_fan_out": False,
        "bias": "none",
        "proportional_parameters": False,
        "init_weights": True,
        "inference_mode": True,
    }
    tensors = {f"base_model.model.{name}{SPECTRUM_SUFFIX}": layer.spectrum.detach().float().cpu().contiguous()
               for name, layer in layers.items()}
    folder.mkdir(parents=True, exist_ok=True)
    # Both files go to temporary names first, so an error leaves any earlier export whole.
    tmp_weights = tempfile.NamedTemporaryFile(dir=folder, prefix=".adapter_model.", suffix=".tmp", delete=False)
    tmp_config = tempfile.NamedTemporaryFile(dir=folder, prefix=".adapter_config.", suffix=".tmp", delete=False,
                                             mode="w", encoding="utf-8")
    try:
        tmp_weights.close()
        save_file(tensors, tmp_weights.name, metadata={"format": "pt"})
        json.dump(config, tmp_config, indent=2)
        tmp_config.close()
        os.replace(tmp_weights.name, folder / WEIGHTS_NAME)
        os.replace(tmp_config.name, folder / CONFIG_NAME)
    except BaseException:
        tmp_config.close()
        for name in (tmp_weights.name, tmp_config.name):
            if os.path.exists(name):
                os.unlink(name)
        raise


def shapes_from_state_dict(state: Mapping[str, object]) -> ShapeLookup:
    """A shape lookup over a base model's tensors (or shapes): diffusers-format component files, ComfyUI
    native names, and single-file SD1.x/SDXL checkpoints (UNet and CLIP-L/CLIP-G, OpenCLIP layout included)."""
    shapes = {k: tuple(v.shape) if hasattr(v, "shape") else tuple(v) for k, v in state.items()}

    def lookup(peft_name: str, native: str):
        _, bare = split_component(peft_name)
        for key in _candidate_keys(bare, native):
            if key in shapes:
                return shapes[key]
        return _openclip_shape(shapes, native)

    return lookup


_CHECKPOINT_UNET_PREFIXES = ("model.diffusion_model.", "diffusion_model.", "")
_CHECKPOINT_CLIP_PREFIXES = {
    "clip_l": ("cond_stage_model.transformer.", "conditioner.embedders.0.transformer.", "clip_l.transformer.",
               "text_encoders.clip_l.transformer.", "text_encoder.", ""),
    "clip_g": ("conditioner.embedders.1.model.transformer.", "clip_g.transformer.", "text_encoders.clip_g.transformer.",
               "text_encoder_2.", ""),
}


def _candidate_keys(bare: str, native: str):
    yield f"{bare}.weight"
    yield f"{native}.weight"
    if native.startswith("diffusion_model."):
        ldm = native[len("diffusion_model."):]
        for p in _CHECKPOINT_UNET_PREFIXES:
            yield f"{p}{ldm}.weight"
    elif native.startswith("text_encoders."):
        clip, _, rest = native[len("text_encoders."):].partition(".transformer.")
        for p in _CHECKPOINT_CLIP_PREFIXES.get(clip, ()):
            yield f"{p}{rest}.weight"


def _openclip_shape(shapes, native: str):
    """SDXL single-file checkpoints keep CLIP-G in OpenCLIP layout (fused q/k/v); derive HF shapes."""
    import re

    m = re.fullmatch(r"text_encoders\.clip_g\.transformer\.text_model\.encoder\.layers\.(\d+)\.(.+)", native)
    if not m:
        return None
    base = f"conditioner.embedders.1.model.transformer.resblocks.{m[1]}."
    part = m[2]
    if part in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj"):
        fused = shapes.get(base + "attn.in_proj_weight")
        return (fused[0] // 3, fused[1]) if fused else None
    simple = {"self_attn.out_proj": "attn.out_proj.weight", "mlp.fc1": "mlp.c_fc.weight", "mlp.fc2": "mlp.c_proj.weight"}
    key = simple.get(part)
    return shapes.get(base + key) if key else None


def shapes_from_file(path) -> ShapeLookup:
    """Shape lookup over a safetensors checkpoint, reading only its header (no tensor data)."""
    from safetensors import safe_open

    path = Path(path)
    if path.is_dir():  # a diffusers component folder or a whole pipeline folder
        files = sorted(path.rglob("*.safetensors"))
        if not files:
            raise WaveFTFileError(path, "holds no .safetensors weights to take layer shapes from")
        shapes: dict[str, tuple] = {}
        for f in files:
            if f.name == WEIGHTS_NAME:
                continue
            component = f.parent.name if f.parent != path else ""
            for k, v in _header_shapes(f, safe_open).items():
                shapes[k] = v
                if component:
                    shapes[f"{component}.{k}"] = v
        return _component_aware(shapes)
    return shapes_from_state_dict(_header_shapes(path, safe_open))


def _component_aware(shapes) -> ShapeLookup:
    plain = shapes_from_state_dict(shapes)

    def lookup(peft_name: str, native: str):
        component, bare = split_component(peft_name)
        if component and f"{component}.{bare}.weight" in shapes:
            return shapes[f"{component}.{bare}.weight"]
        return plain(peft_name, native)

    return lookup


def _header_shapes(path: Path, safe_open) -> dict[str, tuple]:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise WaveFTFileError(path, "is a pickle, which WaveFT never loads (it can run code)",
                              advice="Give a .safetensors checkpoint")
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:
        raise WaveFTFileError(path, f"cannot be read as safetensors ({e})") from e

