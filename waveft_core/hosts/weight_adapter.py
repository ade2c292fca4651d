"""The weight-adapter protocol of ComfyUI and the hosts built on its code (reForge's ldm_patched), without
importing any of them: `adapter_class(<the host's WeightAdapterBase>)` makes the host's WaveFT adapter.

The contract (ComfyUI 0.8 to 0.33): the constructor is (loaded_keys, weights); `load(prefix, state_dict, ...)`
claims a layer of a file for the stock LoRA loader; `calculate_weight(weight, key, strength, ...)` adds
strength * ΔW to `weight` in place and returns it (with an offset the host keeps only the view);
`calculate_shape` says whether the shape changes; `h(x, base_out)`/`g(y)` serve the bypass mode. Since ComfyUI
0.21 the host rebuilds adapters as type(v)(v.loaded_keys, <v.weights moved into a buffer on the GPU>) for
low-VRAM and dynamic-VRAM loads, and the bypass hook moves and casts the top-level tensors of `weights`: so
`weights` is `packed(layer)`, and every method computes from the tensors it holds now, on their device."""

from __future__ import annotations

import logging

import torch

from ..adapter import Layer
from ..delta import DeltaPlan, compute_dtype, dense_delta
from ..files import kinds
from ..files.fileformat import FORMAT_VERSION, adapter_from_tensors
from ..files.kohya import PendingLayer, seed_hint_of_file
from ..files.kohya import read as read_kohya
from ..files.printable import printable
from ..files.storage import WaveFTFileError
from ..keys import (
    DEFAULT_SCALING,
    KOHYA_ONLY_SUFFIXES,
    KOHYA_SUFFIXES,
    META_FORMAT_VERSION,
    META_NETWORK_MODULE,
    META_SCALING,
    META_USE_IDWT,
    META_WAVELET,
    MIRROR_KEYS,
    NATIVE_SUFFIXES,  # with format 2's per-layer wavelet and use_idwt
    NETWORK_MODULE,
    SUFFIX_INDICES,
    SUFFIX_SPECTRUM,
    SUFFIX_STOCK_LAYOUT,
)
from ..names.matching import same_matrix
from ..separable import add_delta, bypass_output, conv_arguments, separable_plan
from .stock import SPECTRUM, StockTrainable, stock_layer

SPARSE_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_CONV = {1: torch.nn.functional.conv1d, 2: torch.nn.functional.conv2d, 3: torch.nn.functional.conv3d}


def _is_identity(function) -> bool:
    if function is None:
        return True
    probe = torch.zeros(2)
    try:
        return function(probe) is probe
    except Exception:
        return False


def mirrored_metadata(tensors: dict) -> dict:
    """The metadata a native file's mirrored settings tensors stand for (a stock LoRA loader hands an adapter
    the tensors only, not the file's metadata). KeyError when the file has no mirrors."""
    if META_WAVELET not in tensors:
        raise KeyError(
            f"it is a WaveFT file without the settings tensors ('{META_WAVELET}', '{META_SCALING}', "
            f"'{META_USE_IDWT}'; FORMAT.md extension 1), and a stock LoRA loader is given no metadata, "
            "so it cannot tell the wavelet. Load it with the 'Load WaveFT' node instead, or re-save it "
            "with this version: python -m waveft_core convert <file> <new.safetensors>"
        )
    wavelet = bytes(tensors[META_WAVELET].to(torch.uint8).tolist()).decode("ascii", "replace")
    md = {META_FORMAT_VERSION: str(FORMAT_VERSION), META_WAVELET: wavelet, META_NETWORK_MODULE: NETWORK_MODULE}
    md[META_SCALING] = repr(float(tensors[META_SCALING]) if META_SCALING in tensors else DEFAULT_SCALING)
    if META_USE_IDWT in tensors:
        md[META_USE_IDWT] = "true" if bool(tensors[META_USE_IDWT]) else "false"
    return md


# --- a layer as a bundle the host moves itself ----------------------------------------------------------


def packed(layer: Layer) -> tuple:
    """(spectrum, plan tensors, layer): everything the weight change needs, for a host that moves and rebuilds an
    adapter's tensors itself (ComfyUI's adapter rebuild and bypass hook). The per-layer plan travels as tensors,
    so a rebuilt adapter never recomputes it and finds it on the device the host put it; the layer itself is a
    plain value a host passes through, holding the scaling and the plan's plain fields, and a fallback when a
    host has cast the plan tensors (see `unpack`)."""
    return (layer.spectrum, layer.plan(torch.device("cpu"), torch.float32).tensors(), layer)


def check_packed(weights) -> None:
    """TypeError unless `weights` has the form `packed()` gives (cheap: no tensor is looked at)."""
    # duck-typed: a second import of this library under another package name makes another Layer class
    if not (
        isinstance(weights, (tuple, list))
        and len(weights) == 3
        and isinstance(weights[0], torch.Tensor)
        and callable(getattr(weights[2], "plan", None))
        and hasattr(weights[2], "scaling")
    ):
        raise TypeError(
            "not a packed WaveFT layer: expected (spectrum, plan tensors, Layer) from weight_adapter.packed()"
        )


def unpack(weights, device) -> tuple[Layer, torch.Tensor, DeltaPlan]:
    """(layer, spectrum, plan) from what `packed()` made, after a host moved its tensors. The tensors are used
    where they are; a plan whose tensors are not on `device`, or were cast, comes from the layer's own cache for
    that device instead (built once per device)."""
    check_packed(weights)
    spectrum, plan_tensors, layer = weights
    device = torch.device(device)  # from a tensor, so it carries its index (cuda:0)
    plan = layer.plan(torch.device("cpu"), torch.float32).with_tensors(plan_tensors)
    if plan is None or plan.order.device != device:
        plan = layer.plan(device, torch.float32)
    return layer, spectrum, plan


def _is_pending(weights) -> bool:
    """weights of a layer whose shape is not known yet (kohya.PendingLayer), duck-typed like check_packed."""
    return (
        isinstance(weights, (tuple, list))
        and len(weights) == 3
        and isinstance(weights[0], torch.Tensor)
        and callable(getattr(weights[2], "bind", None))
    )


def adapter_class(  # noqa: C901 (a class factory: mccabe counts the methods it defines)
    base: type, packed_types: tuple = (), log: logging.Logger | None = None, name: str = "WaveFTAdapter", source_of=None
):
    """The WaveFT adapter as a subclass of a host's WeightAdapterBase (`object` for a host without one).
    `packed_types` are the host's quantized tensor classes (comfy-kitchen), never written into. `source_of()`
    names the file the host's stock loader is reading, for messages (the loader does not tell an adapter)."""
    log = log or logging.getLogger("WaveFT")

    def source_file() -> str | None:
        try:
            return source_of() if source_of else None
        except Exception:
            return None

    def source() -> str:
        return source_file() or "the file given to the LoRA loader"

    def refuse(layer: str, problem) -> ValueError:
        """No silent no-op: a WaveFT layer the stock loader cannot apply fails the node, naming the file."""
        return ValueError(printable(f"WaveFT: {source()}: layer {layer}: {problem}"))  # names come from the file

    def is_packed_weight(weight) -> bool:
        """Quantized storage whose elements are not the weight's values: a scatter would write packed bytes."""
        return (
            isinstance(weight, packed_types)
            or getattr(weight, "is_quantized", False)
            or not weight.dtype.is_floating_point
        )

    class WaveFTAdapter(base):
        """A WaveFT layer as the host's weight adapter; `weights` is packed(layer) = (spectrum, plan tensors,
        Layer). calculate_weight adds strength * ΔW in place (sparse scatter, computed in fp32, rounded once into
        fp16/bf16). Immutable after creation: clones share it."""

        name = "waveft"

        def __init__(self, loaded_keys: set, weights):
            if not _is_pending(weights):
                check_packed(weights)  # a clear TypeError now, not an AttributeError at the first sampling step
            self.loaded_keys = loaded_keys
            self.weights = weights

        @classmethod
        def from_layer(cls, layer: Layer, loaded_keys: set | None = None):
            return cls(set() if loaded_keys is None else loaded_keys, packed(layer))

        # Called by the stock LoRA loader for every key-map entry with every adapter class: a dict lookup.
        @classmethod
        def load(cls, x, lora, alpha=None, dora_scale=None, loaded_keys=None):
            if f"{x}.{SUFFIX_STOCK_LAYOUT}" in lora:  # saved by the stock Train LoRA node (FORMAT.md extension 4)
                return cls.load_stock(x, lora, loaded_keys)
            if f"{x}.{SUFFIX_SPECTRUM}" not in lora:
                return None
            if loaded_keys is None:
                loaded_keys = set()
            if any(f"{x}.{s}" in lora for s in KOHYA_ONLY_SUFFIXES):
                # a kohya-style file from another trainer: no shape stored; bound to the weight's at first use
                keys = [f"{x}.{s}" for s in KOHYA_SUFFIXES]
                try:
                    stored = read_kohya({k: lora[k] for k in keys if k in lora}, {}, path=source()).layers[x]
                except WaveFTFileError as e:
                    raise ValueError(f"WaveFT: {e}") from None
                loaded_keys.update(k for k in keys if k in lora)
                # the header's seed spares drawing every seed a bf16-rounded one may stand for (verified all the same)
                hint = None if stored.positions_exact else seed_hint_of_file(source_file())
                return cls(loaded_keys, (stored.spectrum.to(torch.float32), (), PendingLayer(stored, source(), hint)))
            if f"{x}.{SUFFIX_INDICES}" not in lora:
                raise refuse(
                    x,
                    f"it is {kinds.DESCRIPTIONS[kinds.SPECTRA]}, so a LoRA loader cannot place its "
                    "coefficients. Load it with the 'Load WaveFT' node (it draws the positions for the "
                    "connected model), or convert it: python -m waveft_core convert <file> "
                    "<new.safetensors> --base <checkpoint>",
                )
            keys = [f"{x}.{s}" for s in NATIVE_SUFFIXES]
            # copies: the host may hand tensors mapped from the file, which a rewrite in place would change
            tensors = {k: lora[k].clone() for k in keys if k in lora}
            try:
                layer = adapter_from_tensors(tensors, mirrored_metadata(lora), path=x).layers[x]
            except KeyError as e:
                raise refuse(x, e.args[0]) from None
            except WaveFTFileError as e:
                raise refuse(x, e) from None
            loaded_keys.update(k for k in keys if k in lora)
            loaded_keys.update(k for k in MIRROR_KEYS if k in lora)
            return cls.from_layer(layer, loaded_keys)

        def _bound(self, device, shape):
            """(layer, spectrum, plan) on `device`; a kohya layer is bound to `shape` first (its file has none)."""
            if not _is_pending(self.weights):
                return self._unpacked(device)
            spectrum, _, pending = self.weights
            layer = pending.bind(shape)  # ValueError naming the file when its positions cannot be right
            return layer, spectrum, layer.plan(device, torch.float32)

        @classmethod
        def load_stock(cls, x, lora, loaded_keys=None):
            try:
                layer = stock_layer(x, lora)
            except WaveFTFileError as e:
                raise refuse(x, e) from None
            if loaded_keys is None:
                loaded_keys = set()
            loaded_keys.update((f"{x}.{SUFFIX_STOCK_LAYOUT}", f"{x}.{SPECTRUM}"))
            return cls.from_layer(layer, loaded_keys)

        # The stock Train LoRA node (algorithm "WaveFT"): a fresh trainable layer per weight, or one that
        # continues a loaded layer (`existing_lora`). `alpha` has no meaning for WaveFT (scaling is fixed).
        @classmethod
        def create_train(cls, weight, rank=1, alpha=1.0):
            return StockTrainable.create(weight, rank)

        def to_train(self):
            layer, _, _ = self._unpacked(torch.device("cpu"))
            return StockTrainable.from_layer(layer)

        def _unpacked(self, device):
            """unpack(self.weights, device), remembered for the weights object it was made from (the
            bypass hook replaces `weights` with a moved copy; a rebuild makes a new adapter)."""
            memo = self.__dict__.get("_memo")
            if memo is not None and memo[0] is self.weights and memo[1] == device:
                return memo[2]
            unpacked = unpack(self.weights, device)
            if unpacked[1].device != unpacked[2].order.device:  # GGUF leaves adapters where they were loaded:
                unpacked = (unpacked[0], unpacked[1].to(unpacked[2].order.device), unpacked[2])  # move once
            self._memo = (self.weights, device, unpacked)
            return unpacked

        def bind_to_weight(self, shape) -> None:
            """Check a kohya layer's positions against its weight's shape now: the host edge calls this in the stock
            loader's node (where the model is known), so a 16-bit save whose positions were lost fails the node
            instead of the first sampling step. The bound layer is kept for the patch. Native layers: nothing."""
            if _is_pending(self.weights):
                self.weights[2].bind(shape)

        def _separable(self, layer, plan, device, dtype):
            """The layer's SeparablePlan for the bypass in `dtype`, remembered with the plan it was made from."""
            memo = self.__dict__.get("_separable_memo")
            if memo is None or memo[0] is not plan:
                memo = self._separable_memo = (plan, {})
            if dtype not in memo[1]:
                wavelet = layer.wavelet if layer.use_idwt else None
                memo[1][dtype] = separable_plan(plan, wavelet, device, dtype)  # from float64 filters
            return memo[1][dtype]

        def calculate_shape(self, key):
            """ΔW never changes the weight's shape (a layer stored as m x n fits an m x n x 1 x 1 conv too)."""
            return None

        def calculate_weight(
            self,
            weight,
            key,
            strength,
            strength_model,
            offset,
            function,
            intermediate_dtype=torch.float32,
            original_weight=None,
        ):
            if strength == 0:
                return weight
            try:
                if is_packed_weight(weight):
                    # The host dequantizes before patching; a packed tensor here would take the scatter into its
                    # packed bytes, and comfy-kitchen's in-place add drops the change.
                    log.error(
                        "WaveFT: %s is stored quantized (%s); WaveFT does not write into packed weights, so "
                        "this layer is left unpatched. Load a non-quantized model, or use 'Load LoRA "
                        "(Bypass)' with the WaveFT file.",
                        key,
                        type(weight).__name__,
                    )
                    return weight
                layer, spectrum, plan = self._bound(weight.device, weight.shape)
                if not same_matrix(layer.shape, tuple(weight.shape)):
                    log.error(
                        "WaveFT: %s has shape %s, the adapter's layer was made for %s; left unpatched",
                        key,
                        list(weight.shape),
                        list(layer.shape),
                    )
                    return weight
                factor = float(layer.scaling) * float(strength)
                if _is_identity(function) and weight.dtype in SPARSE_DTYPES:
                    # in place (with an offset the host keeps the view); fp16/bf16 through the filters where cheaper
                    add_delta(
                        weight, plan, lambda dtype: self._separable(layer, plan, weight.device, dtype), spectrum, factor
                    )
                else:
                    # a function (swap_scale_shift on a DiT's modulation) needs the dense delta; fp8 storage has
                    # no sparse write. Either way: W + ΔW in the compute dtype, rounded once into the weight's.
                    compute = compute_dtype(weight.dtype)
                    delta = dense_delta(plan, spectrum, factor, compute).reshape(weight.shape)
                    if function is not None:
                        delta = function(delta)
                    weight.copy_((weight.to(compute) + delta).to(weight.dtype))
            except ValueError as e:
                if _is_pending(self.weights):  # the file's positions cannot be right here: fail, never apply wrong
                    raise
                log.error("WaveFT: could not patch %s: %s", key, e)
            except Exception as e:
                log.error("WaveFT: could not patch %s: %s", key, e)
            return weight

        # The bypass mode adds h(x) to the layer's output instead of merging the weight. The bypass hook has set
        # multiplier/is_conv/conv_dim/kw_dict and moved (and cast) the spectrum to the compute device; the plan
        # comes from the bundle or, once per device, from the layer's cache.
        def h(self, x, base_out):
            shape = None
            if _is_pending(self.weights):  # kohya layers are Linear: (out, in) from the output and the input
                pending = self.weights[2]
                shape = (base_out.shape[-1], x.shape[-1]) if base_out is not None else pending.last_shape
                if shape is None:
                    raise ValueError(
                        f"WaveFT: {pending.source}: layer {pending.stored.name}: its weight shape is "
                        "not known in this mode; load it with the 'Load WaveFT' node"
                    )
            layer, spectrum, plan = self._bound(x.device, shape)
            factor = float(layer.scaling) * float(getattr(self, "multiplier", 1.0))
            out = bypass_output(
                x,
                plan,
                lambda dtype: self._separable(layer, plan, x.device, dtype),
                spectrum,
                factor,
                conv_arguments(self, layer.shape),
            )
            if out is not None:  # the filters and the coefficients, never ΔW: chosen when the shapes make it cheaper
                return out
            delta = dense_delta(plan, spectrum, factor, x.dtype)  # computed in fp32 on x's device, rounded once
            if getattr(self, "is_conv", False):
                kernel = tuple(getattr(self, "kernel_size", ()) or ())  # a conv stored as m x n gets its kernel
                weight_shape = layer.shape if len(layer.shape) > 2 else (plan.rows, -1, *kernel)
                conv = _CONV[int(getattr(self, "conv_dim", 2) or 2)]
                return conv(x, delta.reshape(weight_shape), **dict(getattr(self, "kw_dict", {}) or {}))
            return torch.nn.functional.linear(x, delta)

        def g(self, y):
            return y

    WaveFTAdapter.__name__ = WaveFTAdapter.__qualname__ = name
    WaveFTAdapter.is_packed_weight = staticmethod(is_packed_weight)
    return WaveFTAdapter
