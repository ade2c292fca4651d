"""Where a base model keeps each weight: ComfyUI-native module name -> tensor (or rows of a fused tensor) and
shape, for single-file checkpoints, diffusers pipeline folders and in-memory state dicts.

A PEFT or diffusers WaveFT adapter stores no positions and no shapes: each layer's positions are drawn from
the shape of the base weight it adapts (FORMAT.md section 2). So importing one needs this module's answer to
"what is the shape of native module X in that base", asked for exactly one module at a time: a layer of
CLIP-G must never take a shape from CLIP-L because a bare name fits both."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping

from ..files.storage import checked_safetensors, read_header
from .families import ENCODERS, TE_PREFIX, UNET_PREFIX, diffusers_unet_to_ldm, family_tag_of_comfy, hf_text_model_name

_CLIP_L_PREFIXES = ("cond_stage_model.transformer.", "conditioner.embedders.0.transformer.")
_OPENCLIP_PREFIXES = {"conditioner.embedders.1.model.": "clip_g", "cond_stage_model.model.": "clip_h"}
_OPENCLIP_PARTS = {
    "attn.out_proj.weight": "self_attn.out_proj",
    "mlp.c_fc.weight": "mlp.fc1",
    "mlp.c_proj.weight": "mlp.fc2",
}
# A diffusers pipeline's text encoders, by folder: which ComfyUI encoder each one is.
_PIPELINE_ENCODERS = {"text_encoder_2": "clip_g"}


@dataclass(frozen=True)
class Location:
    """Where a native module's weight lives in a checkpoint: a tensor, or rows [start, stop) of one."""

    key: str
    rows: tuple[int, int] | None = None


def checkpoint_layout(header: Mapping[str, Mapping]) -> dict[str, Location]:
    """Native module name -> Location for every weight of a single-file SD checkpoint (or a file that already
    uses native keys). `header` maps keys to at least {'shape': [...]}, as a safetensors header does."""
    layout: dict[str, Location] = {}

    def add(native: str, loc: Location):
        layout.setdefault(native, loc)  # the first spelling wins should a file hold two

    for key, info in header.items():
        if key == "__metadata__":
            continue
        if key.startswith("model.diffusion_model.") and key.endswith(".weight"):
            add(key[len("model.") : -len(".weight")], Location(key))
        elif key.startswith((UNET_PREFIX, TE_PREFIX)) and key.endswith(".weight"):
            add(key[: -len(".weight")], Location(key))
        elif key.startswith(_CLIP_L_PREFIXES) and key.endswith(".weight"):
            rest = key.split(".transformer.", 1)[1][: -len(".weight")]
            add(f"{TE_PREFIX}clip_l.transformer.{rest}", Location(key))
        else:
            for prefix, clip in _OPENCLIP_PREFIXES.items():
                m = re.fullmatch(re.escape(prefix) + r"transformer\.resblocks\.(\d+)\.(.+)", key)
                if not m:
                    continue
                hf = f"{TE_PREFIX}{clip}.transformer.text_model.encoder.layers.{m[1]}."
                if m[2] == "attn.in_proj_weight":
                    d = int(info["shape"][0]) // 3
                    for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
                        add(hf + "self_attn." + proj, Location(key, (i * d, (i + 1) * d)))
                elif m[2] in _OPENCLIP_PARTS:
                    add(hf + _OPENCLIP_PARTS[m[2]], Location(key))
    return layout


def location_shape(header: Mapping[str, Mapping], loc: Location) -> tuple[int, ...]:
    shape = tuple(int(s) for s in header[loc.key]["shape"])
    if loc.rows is not None:
        shape = (loc.rows[1] - loc.rows[0],) + shape[1:]
    return shape


def detect_base_model(keys: Iterable[str]) -> str:
    """ss_base_model_version of a single-file checkpoint by its keys ('' when unknown)."""
    keys = set(keys)
    if any(k.startswith("conditioner.embedders.1.") for k in keys):
        return family_tag_of_comfy("SDXL")
    if any(k.startswith("cond_stage_model.model.") for k in keys):
        return family_tag_of_comfy("SD20")
    if any(k.startswith("cond_stage_model.transformer.") for k in keys):
        return family_tag_of_comfy("SD15")
    return ""


def checkpoint_module_names(path) -> set[str]:
    """Native names of every weight in a safetensors checkpoint (reads the header only)."""
    return set(checkpoint_layout(read_header(checked_safetensors(path, "checkpoint")).tensors))


# --- a base model as a whole ---------------------------------------------------------------------


@dataclass
class BaseShapes:
    """The weights of a base model, by ComfyUI-native module name (SD1.x/SD2/SDXL UNets and text encoders)
    or, for other models, by the module name as it is. `family` is the ss_base_model_version tag ('' when
    unknown); `encoders` the text encoders it has, in ComfyUI's names."""

    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    family: str = ""
    label: str = "the base model"

    @property
    def encoders(self) -> tuple[str, ...]:
        present = {name[len(TE_PREFIX) :].split(".", 1)[0] for name in self.shapes if name.startswith(TE_PREFIX)}
        return tuple(e for e in ENCODERS if e in present) + tuple(sorted(present - set(ENCODERS)))

    def shape(self, native: str) -> tuple[int, ...] | None:
        return self.shapes.get(native)

    def __call__(self, peft_name: str, native: str) -> tuple[int, ...] | None:
        """The lookup form peft_io.import_source takes: exactly the native module's weight, nothing near it."""
        return self.shapes.get(native)


def _family_from_encoders(encoders: set, has_unet: bool) -> str:
    if "clip_g" in encoders:
        return family_tag_of_comfy("SDXL")
    if "clip_h" in encoders:
        return family_tag_of_comfy("SD20")
    if "clip_l" in encoders and has_unet:
        return family_tag_of_comfy("SD15")
    return ""


def from_header(header: Mapping[str, Mapping], label: str = "the base model") -> BaseShapes:
    """A single-file checkpoint (or any file with native keys) from its safetensors header; other keys are kept
    under their own module names, so plain models work too."""
    layout = checkpoint_layout(header)
    shapes = {native: location_shape(header, loc) for native, loc in layout.items()}
    taken = {loc.key for loc in layout.values()}
    for key, info in header.items():
        if key != "__metadata__" and key.endswith(".weight") and key not in taken:
            shapes.setdefault(key[: -len(".weight")], tuple(int(s) for s in info["shape"]))
    family = detect_base_model(header) or _family_from_encoders(
        {n[len(TE_PREFIX) :].split(".", 1)[0] for n in shapes if n.startswith(TE_PREFIX)},
        any(n.startswith(UNET_PREFIX) for n in shapes),
    )
    return BaseShapes(shapes, family, label)


def from_state_dict(state: Mapping[str, object], label: str = "the base model") -> BaseShapes:
    """A state dict (tensors or shapes): single-file checkpoint keys, ComfyUI-native keys (a ComfyUI CLIP's
    `clip_l.transformer.…` too), diffusers pipeline keys (`unet.…`, `text_encoder.…`, `text_encoder_2.…`), or
    a plain model's own keys."""
    header = {}
    components: dict[str, dict] = {}
    for key, value in state.items():
        shape = [int(s) for s in (value.shape if hasattr(value, "shape") else value)]
        component, _, rest = key.partition(".")
        if component in ("unet", "text_encoder", "text_encoder_2") and rest:
            components.setdefault(component, {})[rest] = {"shape": shape}
        elif component in ENCODERS and rest.startswith("transformer."):  # a ComfyUI CLIP's own state dict
            header[TE_PREFIX + key] = {"shape": shape}
        else:
            header[key] = {"shape": shape}
    base = from_header(header, label)
    if components:
        pipeline = _pipeline_shapes(components)
        base.shapes.update({k: v for k, v in pipeline.shapes.items() if k not in base.shapes})
        base.family = base.family or pipeline.family
    return base


def from_diffusers_folder(folder: Path) -> BaseShapes:
    """A diffusers pipeline folder (unet/, text_encoder/, text_encoder_2/, … holding .safetensors files), read
    from the headers only. Text encoders saved by transformers 5 (no `text_model.` wrapper) count as well."""
    components: dict[str, dict] = {}
    for sub in ("unet", "text_encoder", "text_encoder_2"):
        files = sorted((folder / sub).glob("*.safetensors")) if (folder / sub).is_dir() else []
        for f in files:
            components.setdefault(sub, {}).update(read_header(f).tensors)
    if not components:
        raise ValueError(
            f"{folder}: no unet/, text_encoder/ or text_encoder_2/ with .safetensors weights; give a "
            "diffusers pipeline folder or a single-file checkpoint"
        )
    base = _pipeline_shapes(components, f"the diffusers folder {folder.name}")
    return base


def _pipeline_shapes(components: Mapping[str, Mapping[str, Mapping]], label: str = "the base model") -> BaseShapes:
    shapes: dict[str, tuple] = {}
    encoders = set()
    for component, header in components.items():
        weights = {
            k[: -len(".weight")]: tuple(int(s) for s in v["shape"]) for k, v in header.items() if k.endswith(".weight")
        }
        if component == "unet":
            for name, shape in weights.items():
                ldm = diffusers_unet_to_ldm(name)
                if ldm is not None:
                    shapes[UNET_PREFIX + ldm] = shape
            continue
        encoder = _PIPELINE_ENCODERS.get(component) or _first_encoder(weights)
        encoders.add(encoder)
        for name, shape in weights.items():
            shapes[f"{TE_PREFIX}{encoder}.transformer.{hf_text_model_name(name)}"] = shape
    return BaseShapes(shapes, _family_from_encoders(encoders, "unet" in components), label)


def _first_encoder(weights: Mapping[str, tuple]) -> str:
    """A pipeline's first text encoder: CLIP-L (768 wide) in SD1.x and SDXL, OpenCLIP-H (1024) in SD2."""
    q = weights.get(hf_text_model_name("encoder.layers.0.self_attn.q_proj"))
    return "clip_h" if q is not None and q[0] == 1024 else "clip_l"


def base_shapes(base) -> BaseShapes | None:
    """BaseShapes of whatever a caller gave as the base: a checkpoint file, a diffusers folder, a state dict or
    {name: shape}; None for a lookup function (which is used as it is)."""
    if isinstance(base, BaseShapes):
        return base
    if isinstance(base, (str, Path)):
        path = Path(base)
        if path.is_dir():
            return from_diffusers_folder(path)
        return from_header(read_header(path).tensors, f"the base model {path}")
    if isinstance(base, Mapping):
        return from_state_dict(base)
    return None
