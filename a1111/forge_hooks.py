"""WaveFT in the Forge family: Stable Diffusion WebUI Forge (its `backend/`, 2024-08-30 on), reForge and Forge
Classic (both on `ldm_patched`, the ComfyUI code Forge was built on before August 2024).

All three apply LoRAs as ComfyUI-like patches on the UNet and CLIP patchers: `networks.load_lora_for_models` (the
name sd_forge_lora / the Lora extension calls) clones them and adds {param_key: value}; the patcher then merges
each value into a float32 copy of the weight. What a value may be differs, and is a `Flavor` here:

- Forge and Forge Classic: `(patch_type, payload)` with patch_type a key of `extra_weight_calculators`
  (backend.patcher.lora / ldm_patched.modules.model_patcher); WaveFT registers "waveft", whose calculator adds
  strength * ΔW sparsely in place (`Layer.add_to_`).
- reForge: an instance of its `ldm_patched.modules.weight_adapter.WeightAdapterBase`, ComfyUI's adapter protocol;
  the WaveFT adapter is waveft_core/hosts/weight_adapter.py's, built on reForge's base (and registered with its stock
  loader too).

`networks.load_lora_for_models` is wrapped: a WaveFT file is loaded and validated by waveft_core (clear errors), its
native module names are the patchers' parameter names plus `.weight` (keymap.forge_key), and the patches go on
clones of the UNet and CLIP patchers with the prompt's unet/te weights as strengths, as the host does for LoRAs.
Other files go to the host's own function with exactly the arguments it accepts (Forge between 2024-08-13 and
08-29 has no `online_mode`). `networks.load_lora_state_dict` is wrapped too, so that a WaveFT file is read once,
by waveft_core, and a damaged one is reported instead of failing the generation.
"""

from __future__ import annotations

import inspect
import logging
import os
import traceback

import waveft_core as wft
from waveft_core.hosts import PatchPlan, plan_patches
from waveft_core.keys import SUFFIX_SPECTRUM

from . import keymap
from .common import load_adapter, log, patch_version_detection, redetect_versions

PATCH_TYPE = "waveft"
MARK = "_waveft_hooked"


class WaveFTPatch:
    """Payload of a Forge patch: one validated waveft_core Layer."""

    __slots__ = ("layer", "name", "source")

    def __init__(self, layer, name: str, source: str = ""):
        self.layer, self.name, self.source = layer, name, source

    def __repr__(self):
        return f"WaveFTPatch({self.name}, p={self.layer.n_coefficients})"


_warned: set = set()


def weight_calculator(weight, strength, patch):
    """Forge's `extra_weight_calculators` signature: (weight, strength, payload) -> weight. `weight` is the
    patcher's float32 working copy (or a narrowed view of it), so it is updated in place."""
    layer = patch.layer
    if tuple(weight.shape) != layer.shape:
        if (patch.source, patch.name) not in _warned:
            _warned.add((patch.source, patch.name))
            log(
                f"{os.path.basename(patch.source)}: layer {patch.name} has shape {list(layer.shape)} but the model's "
                f"weight is {list(weight.shape)}; not applied"
            )
        return weight
    if strength == 0:
        return weight
    try:
        layer.add_to_(weight, strength=float(strength))
    except Exception as e:  # never fail a generation over one layer
        log(f"{os.path.basename(patch.source)}: layer {patch.name} not applied: {e}")
    return weight


class _WaveFTFile(dict):
    """What the wrapped load_lora_state_dict returns for a WaveFT file: a marker; waveft_core reads the file."""

    def __init__(self, path):
        super().__init__({f"waveft_file.{SUFFIX_SPECTRUM}": None})  # read by keymap.is_waveft_state_dict
        self.path = path


class Flavor:
    """How one webui of the Forge family takes a WaveFT patch (see the module docstring)."""

    def __init__(self, name: str, patch_value, add_patches_style: str):
        self.name = name
        self.patch_value = patch_value  # (layer, native, source) -> the value of one patch
        self.add_patches_style = add_patches_style  # 'forge': add_patches(filename=, patches=, strength_patch=, ...)
        #                                              'comfy': add_patches(patches, strength_patch)


def calculator_flavor(name: str) -> Flavor:
    return Flavor(
        name,
        lambda layer, native, source: (PATCH_TYPE, WaveFTPatch(layer, native, source)),
        "forge" if name == "forge" else "comfy",
    )


def adapter_flavor(adapter_cls) -> Flavor:
    return Flavor("reforge", lambda layer, native, source: adapter_cls.from_layer(layer), "comfy")


def plan_forge(adapter, unet_params: dict, clip_params: dict, source: str = "") -> PatchPlan:
    """The patch plan on Forge's patchers: each layer's target is ('unet' | 'clip', parameter key)."""

    def place(native, layer):
        where = keymap.forge_key(native)
        if where is None:
            return None, "not a UNet or text-encoder module name"
        which, key = where
        param = (unet_params if which == "unet" else clip_params).get(key)
        if param is None:
            return None, f"the loaded model has no {key}"
        if tuple(param.shape) != layer.shape:
            return None, f"shape {list(layer.shape)}, the model's is {list(param.shape)}"
        return where, ""

    return plan_patches(adapter.layers, place, source or "the adapter", adapter.base_model)


def patches_of(plan: PatchPlan, adapter, source: str = "", flavor: Flavor | None = None):
    """({param_key: patch value} for the UNet, the same for CLIP) of a plan."""
    flavor = flavor or calculator_flavor("forge")
    unet, clip = {}, {}
    for native, (which, key) in plan.targets.items():
        (unet if which == "unet" else clip)[key] = flavor.patch_value(adapter.layers[native], native, source)
    return unet, clip


def build_patches(adapter, unet_params: dict, clip_params: dict, source: str = "", flavor: Flavor | None = None):
    """({param_key: patch value} for the UNet, the same for CLIP, [skipped 'name: reason'])."""
    plan = plan_forge(adapter, unet_params, clip_params, source)
    return (*patches_of(plan, adapter, source, flavor), plan.skipped)


def _params(patcher):
    model = getattr(patcher, "model", None)
    return dict(model.named_parameters()) if model is not None else {}


def _add_patches(patcher, patches, strength, filename, online_mode, flavor: Flavor):
    if flavor.add_patches_style == "forge":
        kwargs = {"filename": filename, "patches": patches, "strength_patch": strength}
        if _accepts(patcher.add_patches, "online_mode"):
            kwargs["online_mode"] = online_mode
        patcher.add_patches(**kwargs)
    else:
        patcher.add_patches(patches, strength)


def apply_waveft(model, clip, filename, strength_model, strength_clip, online_mode=False, flavor: Flavor | None = None):
    flavor = flavor or calculator_flavor("forge")
    adapter = load_adapter(filename)
    clip_patcher = getattr(clip, "patcher", None)
    plan = plan_forge(
        adapter,
        _params(model) if model is not None else {},
        _params(clip_patcher) if clip is not None else {},
        source=str(filename),
    )
    name = os.path.basename(str(filename))
    if plan.none_fit:
        log(plan.none_fit_line(name))
        return model, clip
    unet, clip_patches = patches_of(plan, adapter, str(filename), flavor)
    if unet:
        model = model.clone()
        _add_patches(model, unet, strength_model, filename, online_mode, flavor)
    if clip_patches:
        clip = clip.clone()
        _add_patches(clip, clip_patches, strength_clip, filename, online_mode, flavor)
    log(
        f"{name}: {len(unet)} UNet layers at weight {strength_model}, {len(clip_patches)} text-encoder layers at "
        f"weight {strength_clip}{plan.not_applied_note()}"
    )
    return model, clip


def _accepts(function, parameter: str) -> bool:
    try:
        params = inspect.signature(function).parameters
    except (TypeError, ValueError):
        return False
    return parameter in params or any(p.kind == p.VAR_KEYWORD for p in params.values())


def make_loader(original, flavor: Flavor):
    takes_online_mode = _accepts(original, "online_mode")

    def load_lora_for_models(model, clip, lora, strength_model, strength_clip, filename="default", online_mode=False):
        if not keymap.is_waveft_state_dict(lora):
            if takes_online_mode:
                return original(
                    model, clip, lora, strength_model, strength_clip, filename=filename, online_mode=online_mode
                )
            return original(model, clip, lora, strength_model, strength_clip, filename)
        path = getattr(lora, "path", filename)
        try:
            return apply_waveft(model, clip, path, strength_model, strength_clip, online_mode, flavor)
        except wft.WaveFTFileError as e:
            log(f"cannot use {path}: {e}")
        except Exception as e:  # the host does not catch errors here: one bad file must not stop the generation
            log(f"{path}: not applied ({type(e).__name__}: {e})\n{traceback.format_exc()}")
        return model, clip

    load_lora_for_models._waveft_original = original
    return load_lora_for_models


def make_state_dict_reader(original):
    def load_lora_state_dict(filename):
        if keymap.is_waveft_file(filename):
            return _WaveFTFile(filename)
        return original(filename)

    load_lora_state_dict._waveft_original = original
    return load_lora_state_dict


def _hook_networks(networks, network, flavor: Flavor) -> None:
    if getattr(networks, MARK, False):
        return
    if not hasattr(networks, "load_lora_for_models"):
        raise RuntimeError("the Lora extension's networks has no load_lora_for_models; this version is not supported")
    if not getattr(networks.load_lora_for_models, "_waveft_original", None):
        networks.load_lora_for_models = make_loader(networks.load_lora_for_models, flavor)
    reader = getattr(networks, "load_lora_state_dict", None)
    if reader is not None and not getattr(reader, "_waveft_original", None):
        networks.load_lora_state_dict = make_state_dict_reader(reader)
    if network is not None:
        patch_version_detection(network)
    redetect_versions(networks)
    setattr(networks, MARK, True)


def _install_calculator(owner, flavor_name: str, networks, network, missing: str) -> None:
    """Register the WaveFT patch type in `owner.extra_weight_calculators`, then hook the Lora extension."""
    calculators = getattr(owner, "extra_weight_calculators", None)
    if not isinstance(calculators, dict):
        raise UnsupportedWebui(missing)
    calculators[PATCH_TYPE] = weight_calculator
    _hook_networks(networks, network, calculator_flavor(flavor_name))


def install(networks, network, lora_backend) -> None:
    """Hook into Forge: its sd_forge_lora `networks`/`network` modules and `backend.patcher.lora`. Idempotent."""
    _install_calculator(
        lora_backend,
        "forge",
        networks,
        network,
        "this Forge (2024-08-02 to 08-12) has no extra_weight_calculators, so WaveFT files cannot be "
        "applied; ordinary LoRAs are untouched. Update Forge to use WaveFT",
    )


def install_forge_classic(networks, network, model_patcher) -> None:
    """Hook into Forge Classic (and Forge before August 2024): `ldm_patched.modules.model_patcher`'s calculators."""
    _install_calculator(
        model_patcher,
        "forge-classic",
        networks,
        network,
        "ldm_patched.modules.model_patcher has no extra_weight_calculators, so WaveFT files cannot "
        "be applied; ordinary LoRAs are untouched",
    )


def install_reforge(networks, network, weight_adapter) -> None:
    """Hook into reForge: its ldm_patched.modules.weight_adapter registry gets the WaveFT adapter (so its stock
    loaders understand WaveFT files too) and the Lora extension's load_lora_for_models is wrapped."""
    from waveft_core.hosts import adapter_class

    base = getattr(weight_adapter, "WeightAdapterBase", None)
    registry = getattr(weight_adapter, "adapters", None)
    if base is None or not isinstance(registry, list):
        raise UnsupportedWebui(
            "ldm_patched.modules.weight_adapter has no WeightAdapterBase/adapters registry, so "
            "WaveFT files cannot be applied; ordinary LoRAs are untouched"
        )
    cls = next((a for a in registry if getattr(a, "name", None) == "waveft"), None)
    if cls is None:
        cls = adapter_class(base, log=_LOGGER, name="WaveFTAdapterReForge")
        registry.append(cls)
    _hook_networks(networks, network, adapter_flavor(cls))


class UnsupportedWebui(RuntimeError):
    """This webui cannot apply WaveFT (said once per start); its own LoRA loading is left as it is."""


_LOGGER = logging.getLogger("WaveFT")
