"""WaveFT in AUTOMATIC1111's built-in Lora extension (extensions-builtin/Lora, webui 1.5 to 1.10).

Tested against the real code of 1.10.1; what differs before 1.9 (every part of a fused MultiheadAttention is handed
the whole in_proj_weight) is served by stand-ins that know their own part's shape.

A1111 splits every key of a LoRA file at its first dot and looks the part before it up in
`sd_model.network_layer_mapping`; a native WaveFT key (`diffusion_model.input_blocks...waveft_spectrum`) would give
`diffusion_model`, the whole UNet. So WaveFT files get their own loader (`networks.load_network` is wrapped; other
files go to A1111's), which maps each native module to A1111's layer name (keymap.a1111_targets), checks the shape,
and builds the modules through A1111's own `networks.module_types` registry, to which `ModuleTypeWaveFT` is added.
A1111's `network_apply_weights` then applies them like any LoRA: weight += multiplier * ΔW, where ΔW is
`Layer.delta()` (scaling included) and multiplier is the prompt's te/unet weight (`<lora:name:0.8>`).

OpenCLIP-G (SDXL) and OpenCLIP-H (SD2) fuse q, k, v into a MultiheadAttention, which A1111 updates only when the
network has modules for all of `<attn>_q_proj`, `_k_proj`, `_v_proj` and `_out_proj`; parts the file does not
adapt get a module whose update is zero, so a file adapting only q and v still applies.
"""

from __future__ import annotations

import os

import torch

import waveft_core as wft
from waveft_core.hosts import plan_patches
from waveft_core.keys import SUFFIX_INDICES, SUFFIX_SCALING, SUFFIX_SHAPE, SUFFIX_SPECTRUM

from . import keymap
from .common import load_adapter, log, patch_version_detection, redetect_versions

MARK = "_waveft_hooked"
TYPE_NAME = "ModuleTypeWaveFT"
PATCHED_TYPES = (torch.nn.Linear, torch.nn.Conv2d)  # layers A1111 patches that can hold a 2-D+ weight
_warned: set = set()


def make_module_types(network):
    """(ModuleTypeWaveFT, NetworkModuleWaveFT) built on the host's `network` module."""

    class NetworkModuleWaveFT(network.NetworkModule):
        """A1111 module for one WaveFT layer. `weights.w['waveft_layer']` is the validated waveft_core Layer, or None
        for a zero update (a MultiheadAttention part the file does not adapt)."""

        def __init__(self, net, weights):
            super().__init__(net, weights)
            self.waveft_layer = weights.w.get("waveft_layer")
            self.zero_shape = weights.w.get("waveft_zero_shape")  # a stand-in's own shape, e.g. (d, d) for k

        def calc_updown(self, orig_weight):
            try:
                if self.waveft_layer is None:
                    # before 1.9 A1111 hands every part of a MultiheadAttention the whole (3d, d) in_proj_weight:
                    # the stand-in's update must still be its own part's (d, d)
                    shape = tuple(self.zero_shape) if self.zero_shape is not None else tuple(orig_weight.shape)
                    updown = torch.zeros(shape, dtype=torch.float32, device=orig_weight.device)
                else:
                    updown = self.waveft_layer.delta(dtype=torch.float32, device=orig_weight.device)
            except Exception as e:  # A1111 counts a RuntimeError as an error of this network and goes on
                if (self.network.name, self.network_key) not in _warned:  # A1111 logs it at debug level only
                    _warned.add((self.network.name, self.network_key))
                    log(f"{self.network.name}: layer {self.network_key} not applied: {e}")
                raise RuntimeError(f"WaveFT layer {self.network_key}: {e}") from e
            # no alpha/scale/bias/dora keys: finalize_updown only multiplies by the prompt's te/unet multiplier
            return self.finalize_updown(updown, orig_weight, updown.shape)

        def forward(self, x, y):
            """A1111's "old method" (Lora settings, lora_functional): the update runs as a layer of its own on the
            layer's input, so it is cast to the input's dtype (fp16/bf16 models) and device."""
            updown, ex_bias = self.calc_updown(self.sd_module.weight)
            weight = updown.to(device=x.device, dtype=x.dtype)
            bias = ex_bias.to(device=x.device, dtype=x.dtype) if ex_bias is not None else None
            module = self.sd_module
            if isinstance(module, torch.nn.Conv2d):
                return y + torch.nn.functional.conv2d(
                    x,
                    weight.reshape(module.weight.shape),
                    bias,
                    module.stride,
                    module.padding,
                    module.dilation,
                    module.groups,
                )
            return y + torch.nn.functional.linear(x, weight.reshape(module.weight.shape), bias)

    class ModuleTypeWaveFT(network.ModuleType):
        def create_module(self, net, weights):
            if "waveft_layer" in weights.w:
                return NetworkModuleWaveFT(net, weights)
            return None

    return ModuleTypeWaveFT, NetworkModuleWaveFT


def shape_fits(layer_shape, expected) -> bool:
    layer_shape, expected = tuple(layer_shape), tuple(expected)
    if layer_shape == expected:
        return True
    # inpainting UNets have 9 input channels where the adapter's base had 4; A1111 zero-pads the update itself
    return (
        len(expected) == 4
        and len(layer_shape) == 4
        and expected[1] == 9
        and layer_shape[1] == 4
        and expected[0] == layer_shape[0]
        and expected[2:] == layer_shape[2:]
    )


def resolve(native: str, mapping: dict):
    """(target, sd_module, expected weight shape) for a native module in A1111's loaded model, or
    (None, None, reason)."""
    candidates = keymap.a1111_targets(native)
    if not candidates:
        return None, None, keymap.unsupported_reason(native)
    for target in candidates:
        module = mapping.get(target.lookup)
        if module is None:
            continue
        if target.part in keymap.QKV:
            w = getattr(module, "in_proj_weight", None)
            if not isinstance(module, torch.nn.MultiheadAttention) or w is None:
                return None, None, f"{target.lookup} is not a fused MultiheadAttention"
            return target, module, (w.shape[0] // 3, w.shape[1])
        if isinstance(module, PATCHED_TYPES):
            return target, module, tuple(module.weight.shape)
        return None, None, f"{target.lookup} is a {type(module).__name__}, which A1111's Lora code does not patch"
    return None, None, "the loaded model has no such layer (a file for another base model?)"


def _create(networks, module_type, net, weights):
    for nettype in networks.module_types:  # A1111's own registry, where ModuleTypeWaveFT was added
        module = nettype.create_module(net, weights)
        if module is not None:
            return module
    return module_type.create_module(net, weights)


def load_waveft_network(networks, network, module_type, name, network_on_disk):
    """Build an A1111 `network.Network` from a native WaveFT file. Raises wft.WaveFTFileError for a bad file."""
    path = network_on_disk.filename
    adapter = load_adapter(path)
    sd_model = networks.shared.sd_model
    if not hasattr(sd_model, "network_layer_mapping"):
        networks.assign_network_names_to_compvis_modules(sd_model)
    mapping = sd_model.network_layer_mapping

    net = network.Network(name, network_on_disk)
    net.mtime = os.path.getmtime(path)

    def place(native, layer):
        target, module, expected = resolve(native, mapping)
        if target is None:
            return None, expected
        if not shape_fits(layer.shape, expected):
            return None, f"shape {list(layer.shape)}, the model's layer is {list(expected)}"
        return (target, module), ""

    plan = plan_patches(adapter.layers, place, path, adapter.base_model, weight_of=lambda placed: placed[0].module_key)
    attentions: dict[str, set] = {}  # MultiheadAttention key -> parts the file adapts
    for native, (target, module) in plan.targets.items():
        layer = adapter.layers[native]
        w = {
            SUFFIX_SPECTRUM: layer.spectrum,  # the file's tensors of the layer, as A1111 keeps a network's
            SUFFIX_INDICES: layer.indices,
            SUFFIX_SHAPE: torch.tensor(layer.shape, dtype=torch.int64),
            SUFFIX_SCALING: torch.tensor(float(layer.scaling)),
            "waveft_layer": layer,
        }
        weights = network.NetworkWeights(network_key=native, sd_key=target.module_key, w=w, sd_module=module)
        net.modules[target.module_key] = _create(networks, module_type, net, weights)
        if target.mha_key is not None:
            attentions.setdefault(target.mha_key, set()).add(target.part)

    for mha_key, parts in attentions.items():  # A1111 updates a MultiheadAttention only with all four parts
        mha = mapping.get(mha_key)
        if not isinstance(mha, torch.nn.MultiheadAttention):
            continue
        for part in ("q", "k", "v", "out"):
            if part in parts:
                continue
            key = f"{mha_key}_{part}_proj"
            module = mha.out_proj if part == "out" else mha
            shape = (
                tuple(mha.out_proj.weight.shape)
                if part == "out"
                else (mha.in_proj_weight.shape[0] // 3, mha.in_proj_weight.shape[1])
            )
            weights = network.NetworkWeights(
                network_key=f"{key} (zero)",
                sd_key=key,
                sd_module=module,
                w={"waveft_layer": None, "waveft_zero_shape": shape},
            )
            net.modules[key] = _create(networks, module_type, net, weights)

    if plan.none_fit:
        log(plan.none_fit_line(os.path.basename(path)))
    elif plan.skipped:
        log(plan.not_applied_line(os.path.basename(path)))
    return net


def _count_error(networks, name):
    extra = getattr(networks, "extra_network_lora", None)
    errors = getattr(extra, "errors", None)
    if isinstance(errors, dict):  # shown as "Networks with errors: name (n)" under the image
        errors[name] = errors.get(name, 0) + 1


def make_loader(networks, network, module_type, original):
    def load_network(name, network_on_disk):
        if not keymap.is_waveft_file(network_on_disk.filename, getattr(network_on_disk, "metadata", None)):
            return original(name, network_on_disk)
        try:
            return load_waveft_network(networks, network, module_type, name, network_on_disk)
        except wft.WaveFTFileError as e:
            _count_error(networks, name)
            log(f"cannot use {network_on_disk.filename}: {e}")
            raise e.with_traceback(None)  # A1111 prints it and goes on without this network

    load_network._waveft_original = original
    return load_network


def install(networks, network) -> None:
    """Hook into A1111's Lora extension (its `networks` and `network` modules). Idempotent."""
    if getattr(networks, MARK, False):
        return
    for attr in ("module_types", "load_network", "assign_network_names_to_compvis_modules", "shared"):
        if not hasattr(networks, attr):
            raise RuntimeError(f"A1111's Lora extension has no networks.{attr}; this webui version is not supported")
    type_cls, _ = make_module_types(network)
    module_type = next((t for t in networks.module_types if type(t).__name__ == TYPE_NAME), None)
    if module_type is None:
        module_type = type_cls()
        networks.module_types.append(module_type)
    if not getattr(networks.load_network, "_waveft_original", None):
        networks.load_network = make_loader(networks, network, module_type, networks.load_network)
    patch_version_detection(network)
    redetect_versions(networks)
    setattr(networks, MARK, True)
