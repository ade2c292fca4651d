"""WaveFT adapters as PEFT, diffusers and transformers save them: spectra without positions, with whatever
settings the tool stored.

- PEFT folders (`save_pretrained`): adapter_config.json + adapter_model.safetensors; several adapters of one
  model (the first at the top, the others in sub-folders named after them, or only sub-folders after a
  `selected_adapters` save); one sub-folder per pipeline component (unet/, text_encoder/, text_encoder_2/,
  as this project's PEFT export writes them).
- diffusers single files: `save_lora_adapter` (bare PEFT names, the config as JSON in the safetensors
  metadata `lora_adapter_metadata`) and a pipeline's `save_lora_weights` (`unet.`/`text_encoder.`/
  `text_encoder_2.`/`transformer.` prefixed names, with per-component configs flattened into that metadata as
  `<component>.<setting>`, or none).

Each becomes a Source: one Part per component, each with its spectra, the settings it stored and where
they came from. Turning a Source into an Adapter needs the base model's shapes (peft_io.import_source)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..files.fileformat import read_tensors_and_metadata
from ..files.limits import check_setting
from ..files.storage import PICKLE_SUFFIXES, WaveFTFileError
from ..keys import (
    DEFAULT_SCALING,
    DIFFUSERS_METADATA_KEY,
    DIFFUSERS_WEIGHTS_NAME,
    META_ARCHITECTURE,
    META_BASE_MODEL,
    META_SPEC_VERSION,
    META_TAG_FREQUENCY,
    PEFT_CONFIG_NAME,
    PEFT_DEFAULTS,
    PEFT_WEIGHTS_NAME,
    SPEC_PREFIX,
    SUFFIX_INDICES,
    SUFFIX_SPECTRUM,
)
from ..names.families import TEXT_COMPONENTS

COMPONENTS = ("unet", "transformer", *TEXT_COMPONENTS)


@dataclass
class Part:
    """The spectra of one model (a pipeline component, or the one model of a plain PEFT folder)."""

    component: str  # one of COMPONENTS, or '' when the source does not say
    spectra: dict[str, torch.Tensor]  # module name (no component or base_model.model. prefix) -> spectrum
    config: dict | None  # the PEFT config the source stored for it, or None
    origin: str  # where `config` came from, for reports ('' when nothing was stored)
    metadata: dict = field(default_factory=dict)  # title, trigger words, base model tag... stored with it
    path: Path | None = None  # the file `config` was read from, for messages


@dataclass
class Source:
    path: Path
    kind: str  # 'PEFT folder' | 'diffusers file'
    parts: list[Part]
    notes: list[str] = field(default_factory=list)  # what a user should know (other adapters, defaults used)


def carried_metadata(metadata: dict) -> dict:
    """The descriptive metadata that travels with an adapter between formats (title, description, trigger
    words, base model, tag frequencies), not what describes one container."""
    return {
        k: str(v)
        for k, v in metadata.items()
        if k.startswith(SPEC_PREFIX)
        and k not in (META_SPEC_VERSION, META_ARCHITECTURE)
        or k in (META_BASE_MODEL, META_TAG_FREQUENCY)
    }


def is_spectra_file(keys) -> bool:
    """A safetensors file of spectra without stored positions (diffusers, or a PEFT adapter_model)."""
    keys = list(keys)
    return any(k.endswith("." + SUFFIX_SPECTRUM) for k in keys) and not any(
        k.endswith("." + SUFFIX_INDICES) for k in keys
    )


def read_source(path, adapter: str | None = None, adapter_option: str = "adapter=", component: str = "") -> Source:
    """The spectra and settings at `path`: a PEFT folder (or its adapter_config.json), a folder holding
    adapters in sub-folders, or a diffusers .safetensors file (or the folder diffusers saved it in).
    `adapter` picks one adapter of a folder that holds several; `adapter_option` is how the caller spells
    that choice in messages. A folder named after a pipeline component (text_encoder_2/, …) says what its
    adapters adapt, the named adapters in its sub-folders included."""
    path = Path(path)
    if path.is_dir() and path.name in COMPONENTS:
        component = path.name
    if path.is_file() and path.name == PEFT_CONFIG_NAME:
        path = path.parent
    if path.is_file():
        if path.name == PEFT_WEIGHTS_NAME and (path.parent / PEFT_CONFIG_NAME).is_file():
            return read_source(path.parent, adapter, adapter_option)
        return _diffusers_file(path)
    if not path.is_dir():
        raise WaveFTFileError(path, "no such file or folder")
    subs = sorted(p for p in path.iterdir() if p.is_dir() and (p / PEFT_CONFIG_NAME).is_file())
    components = [p for p in subs if p.name in COMPONENTS]
    named = [p for p in subs if p.name not in COMPONENTS]
    if adapter is not None and adapter != "default":
        chosen = next((p for p in named if p.name == adapter), None)
        if chosen is None:
            have = ["default"] * (path / PEFT_CONFIG_NAME).is_file() + [p.name for p in named]
            raise WaveFTFileError(
                path, f"holds no adapter named '{adapter}'", advice=f"Adapters here: {', '.join(have) or 'none'}"
            )
        source = read_source(chosen, component=component)
        source.notes.insert(0, f"adapter '{adapter}' of {path.name}")
        return source
    if (path / PEFT_CONFIG_NAME).is_file():
        source = Source(path, "PEFT folder", [_peft_part(path, component)])
        if named:
            source.notes.append(
                f"{path.name} also holds the adapters {', '.join(p.name for p in named)}; this is "
                f"the default one (pick another with {adapter_option}<name>)"
            )
        return source
    if components:
        return Source(path, "PEFT folder", [_peft_part(p, component=p.name) for p in components])
    if (path / DIFFUSERS_WEIGHTS_NAME).is_file():
        return _diffusers_file(path / DIFFUSERS_WEIGHTS_NAME)
    if len(named) == 1:
        source = read_source(named[0], component=component)
        source.notes.insert(0, f"{path.name} has no adapter at its top; using the one in {named[0].name}/")
        return source
    if named:
        raise WaveFTFileError(
            path,
            f"has no {PEFT_CONFIG_NAME} of its own but holds the PEFT adapters "
            f"{', '.join(p.name for p in named)} in sub-folders",
            advice=f"Load one of those folders, or pick one with {adapter_option}<name>",
        )
    pickled = [p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES]
    if pickled:
        raise WaveFTFileError(
            path / pickled[0],
            "is a pickle, which WaveFT never loads (it can run code)",
            advice="Save the adapter with safe_serialization=True (.safetensors)",
        )
    raise WaveFTFileError(
        path,
        f"is not a WaveFT adapter: no {PEFT_CONFIG_NAME}, no {DIFFUSERS_WEIGHTS_NAME} and no adapter sub-folders",
        advice="Give the folder PEFT or diffusers saved, or the file in it",
    )


def adapter_folders(root, depth: int = 3) -> list[str]:
    """PEFT WaveFT adapter folders below `root` (not `root` itself), as '/'-separated relative names, at most
    `depth` levels down: the folders a loader lists. A folder whose config names another PEFT type is left out."""
    root = Path(root)
    found = []
    if not root.is_dir():
        return found
    for level in range(1, depth + 1):
        for config in root.glob("/".join(["*"] * level) + "/" + PEFT_CONFIG_NAME):
            folder = config.parent
            if any(part.startswith(".") for part in folder.relative_to(root).parts):
                continue
            if listed_peft_type(config) == "WAVEFT":
                found.append(folder.relative_to(root).as_posix())
    return sorted(found)


_PEFT_TYPES: dict = {}  # config path -> (size, mtime_ns, inode, peft_type): listings read a config once
_CONFIG_SNIFF = 64 << 10
_PEFT_TYPE = re.compile(rb'"peft_type"\s*:\s*"([A-Za-z_]+)"')


def listed_peft_type(config: Path) -> str:
    """The upper-cased peft_type of an adapter_config.json for a listing ('' when unreadable): read again only
    when the file changed, and from its first 64 KiB when it is larger (every listing and every prompt's
    validation lists the folders; a bloated config must not be read in full each time)."""
    try:
        st = config.stat()
        stamp = (st.st_size, st.st_mtime_ns, st.st_ino)
        cached = _PEFT_TYPES.get(str(config))
        if cached and cached[0] == stamp:
            return cached[1]
        with open(config, "rb") as f:
            head = f.read(_CONFIG_SNIFF + 1)
        if len(head) <= _CONFIG_SNIFF:
            peft_type = json.loads(head.decode("utf-8")).get("peft_type", "")
        else:
            found = _PEFT_TYPE.search(head)
            peft_type = found.group(1).decode() if found else ""
    except (OSError, ValueError, AttributeError):
        return ""
    _PEFT_TYPES[str(config)] = (stamp, str(peft_type).upper())
    return str(peft_type).upper()


def _peft_part(folder: Path, component: str) -> Part:
    config_path = folder / PEFT_CONFIG_NAME
    try:
        config = json.loads(config_path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise WaveFTFileError(config_path, f"is not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise WaveFTFileError(config_path, "is not a JSON object")
    _check_config(config_path, config)
    weights = folder / PEFT_WEIGHTS_NAME
    if not weights.is_file():
        pickled = [p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES]
        if pickled:
            raise WaveFTFileError(
                folder / pickled[0],
                "is a pickle, which WaveFT never loads (it can run code)",
                advice="Save the adapter with safe_serialization=True (adapter_model.safetensors)",
            )
        raise WaveFTFileError(folder, f"has no {PEFT_WEIGHTS_NAME}")
    tensors, file_metadata = read_tensors_and_metadata(weights)
    spectra = _spectra(weights, tensors)
    grouped = _by_component(spectra)
    if set(grouped) - {""}:
        # a PEFT save of a whole pipeline-like model keeps component prefixes in its names
        if len(grouped) > 1 or component:
            raise WaveFTFileError(
                weights,
                "mixes modules of several pipeline components in one PEFT adapter",
                advice="Save one adapter per component (unet, text_encoder, ...)",
            )
        component, spectra = next(iter(grouped.items()))
    return Part(component, spectra, config, PEFT_CONFIG_NAME, carried_metadata(file_metadata), config_path)


def _diffusers_file(path: Path) -> Source:
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise WaveFTFileError(
            path,
            f"'{path.suffix}' files are pickles, which WaveFT never loads (they can run code)",
            advice="Save the adapter with safe_serialization=True (.safetensors)",
        )
    tensors, metadata = read_tensors_and_metadata(path)
    if not is_spectra_file(tensors):
        raise WaveFTFileError(
            path,
            "holds no WaveFT spectra without positions",
            advice="Load it as a native WaveFT file, or as a LoRA with a LoRA loader",
        )
    spectra = _spectra(path, tensors)
    configs = _metadata_configs(path, metadata)
    parts = []
    for component, group in _by_component(spectra).items():
        config = configs.get(component, configs.get(""))
        if config is not None:
            _check_config(path, config, key=DIFFUSERS_METADATA_KEY)
        parts.append(
            Part(
                component,
                group,
                config,
                f"the file's {DIFFUSERS_METADATA_KEY}" if config is not None else "",
                carried_metadata(metadata),
                path,
            )
        )
    return Source(path, "diffusers file", parts)


def _metadata_configs(path: Path, metadata: dict) -> dict[str, dict]:
    """component ('' for all) -> config from `lora_adapter_metadata`: one flat config (save_lora_adapter), or
    settings prefixed with their component (a pipeline's save_lora_weights)."""
    text = metadata.get(DIFFUSERS_METADATA_KEY)
    if not text:
        return {}
    try:
        data = json.loads(text)
    except ValueError as e:
        raise WaveFTFileError(path, f"is not valid JSON ({e})", key=DIFFUSERS_METADATA_KEY) from None
    if not isinstance(data, dict):
        raise WaveFTFileError(path, "is not a JSON object", key=DIFFUSERS_METADATA_KEY)
    out: dict[str, dict] = {}
    for key, value in data.items():
        component, _, setting = key.partition(".")
        if component in COMPONENTS and setting:
            out.setdefault(component, {})[setting] = value
        else:
            out.setdefault("", {})[key] = value
    return out


def _check_config(path: Path, config: dict, key: str | None = None) -> None:
    peft_type = config.get("peft_type")
    if peft_type is not None and str(peft_type).upper() != "WAVEFT":
        raise WaveFTFileError(
            path,
            f"peft_type is '{peft_type}', not 'WAVEFT'",
            key=key or "peft_type",
            advice="Load LoRA adapters with a LoRA loader",
        )
    if config.get("fan_in_fan_out"):
        raise WaveFTFileError(
            path, "fan_in_fan_out=true (GPT-2 style Conv1D layers) is not supported", key=key or "fan_in_fan_out"
        )


def _spectra(path: Path, tensors: dict) -> dict[str, torch.Tensor]:
    spectra = {}
    for key, t in tensors.items():
        if not key.endswith("." + SUFFIX_SPECTRUM):
            continue
        if not t.dtype.is_floating_point or t.dim() != 1:
            raise WaveFTFileError(path, f"must be a 1-D float tensor, got {t.dtype} {list(t.shape)}", key=key)
        if not torch.isfinite(t).all():
            raise WaveFTFileError(path, "has NaN or infinite coefficients", key=key)
        name = key[: -len("." + SUFFIX_SPECTRUM)]
        if name.endswith(".default"):  # PEFT drops the adapter name when saving; hand-made files may not
            name = name[: -len(".default")]
        spectra[name] = t
    if not spectra:
        raise WaveFTFileError(path, f"holds no '*.{SUFFIX_SPECTRUM}' tensors")
    return spectra


def _by_component(spectra: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Group by a leading pipeline component (`unet.`, `text_encoder_2.`, …), dropping it and PEFT's
    `base_model.model.` wrapper from the names."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    for name, t in spectra.items():
        head, _, rest = name.partition(".")
        component = head if head in COMPONENTS and rest else ""
        module = rest if component else name
        module = module.removeprefix("base_model.model.")
        groups.setdefault(component, {})[module] = t
    return groups


def settings(part: Part, overrides: dict | None = None) -> tuple[dict, list[str]]:
    """The part's wavelet_family, scaling, random_loc_seed and use_idwt: what it stored, what the caller
    overrides, PEFT's defaults for the rest; and which settings came from those defaults."""
    config = dict(part.config or {})
    overrides = {k: v for k, v in (overrides or {}).items() if v is not None}
    out, defaulted = {}, []
    for name in PEFT_DEFAULTS:
        if name in overrides:
            out[name] = overrides[name]
        elif config.get(name) is not None:
            out[name] = config[name]
        else:
            out[name] = PEFT_DEFAULTS[name]
            defaulted.append(name)
    source = part.path or part.origin or "the adapter"
    out["scaling"] = check_setting(_number(out["scaling"], source, "scaling"), source, "scaling")
    out["random_loc_seed"] = _seed(out["random_loc_seed"], source)
    out["use_idwt"] = _peft_bool(out["use_idwt"], source, "use_idwt")
    return out, defaulted


def _number(value, source, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise WaveFTFileError(
            source, f"{value!r} is not a number", key=key, advice=f"Set a number such as {DEFAULT_SCALING}"
        )
    try:
        return float(value)
    except ValueError:
        raise WaveFTFileError(
            source, f"{value!r} is not a number", key=key, advice=f"Set a number such as {DEFAULT_SCALING}"
        ) from None


def _seed(value, source) -> int:
    number = _number(value, source, "random_loc_seed")
    if not number.is_integer() or not 0 <= number < 2**63:
        raise WaveFTFileError(source, f"{value!r} is not a seed (a whole number from 0)", key="random_loc_seed")
    return int(number)


def _peft_bool(value, source, key: str) -> bool:
    """A JSON true/false (what PEFT writes), 0/1, or the words for them; anything else is refused: PEFT itself
    would take any non-empty string, 'false' included, as true."""
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)) and value in (0, 1):
        return bool(value)
    word = str(value).strip().lower()
    if word in ("true", "1", "yes"):
        return True
    if word in ("false", "0", "no"):
        return False
    raise WaveFTFileError(
        source,
        f"{value!r} is not true or false",
        key=key,
        advice="Write true or false (JSON booleans, as PEFT saves them)",
    )


def describe(source: Source, overrides: dict | None = None) -> str:
    """What a source holds and the settings it will be read with, without a base model."""
    lines = [f"{source.path.name}: {source.kind}, which stores no coefficient positions (a base model draws them)"]
    for part in source.parts:
        values, defaulted = settings(part, overrides)
        count = sum(t.numel() for t in part.spectra.values())
        where = part.origin or "nothing stored"
        lines.append(
            f"{part.component or 'model'}: {len(part.spectra)} layers, {count:,} coefficients; wavelet "
            f"{values['wavelet_family']}, scaling {values['scaling']:g}, seed {values['random_loc_seed']}, "
            f"transform {'inverse DWT' if values['use_idwt'] else 'none (use_idwt=false)'} "
            f"(from {where}{'; PEFT defaults for ' + ', '.join(defaulted) if defaulted else ''})"
        )
        base = (part.config or {}).get("base_model_name_or_path")
        if base:
            lines.append(f"{part.component or 'model'} was trained on: {base}")
    lines += source.notes
    return "\n".join(lines)


def select_components(source: Source, components) -> Source:
    """Only the parts of these pipeline components; asking for one the source lacks is an error."""
    wanted = list(components)
    have = [p.component or "(model)" for p in source.parts]
    missing = [c for c in wanted if c not in have]
    if missing:
        raise WaveFTFileError(source.path, f"has no {', '.join(missing)} part", advice=f"It has: {', '.join(have)}")
    return Source(
        source.path, source.kind, [p for p in source.parts if (p.component or "(model)") in wanted], list(source.notes)
    )
