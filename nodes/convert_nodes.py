"""WaveFT to LoRA, LoRA to WaveFT and Merge into Checkpoint as nodes (the conversions live in waveft_core/convert/)."""

from __future__ import annotations

import os

import torch

from ..waveft_core import SUPPORTED_WAVELETS
from ..waveft_core.convert import extract, lora, merge
from ..waveft_core.files import fileformat, reporting_file_errors
from ..waveft_core.keys import DEFAULT_COEFFICIENTS, DEFAULT_WAVELET
from . import catalog, host, loader


class WaveFTToLoRA:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "waveft_name": (catalog.list_adapters(), {"tooltip": "The WaveFT adapter to export."}),
                "rank": (
                    "INT",
                    {
                        "default": 8,
                        "min": 1,
                        "max": 1024,
                        "tooltip": "LoRA rank: higher keeps more of "
                        "the (high-rank) WaveFT change and makes a bigger file.",
                    },
                ),
                "filename_prefix": (
                    "STRING",
                    {
                        "default": "waveft_as_lora",
                        "tooltip": "File name inside models/loras (never overwrites: a counter is added).",
                    },
                ),
            }
        }

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("lora_name",)
    OUTPUT_TOOLTIPS = ("The LoRA file's name in models/loras.",)
    FUNCTION = "export"
    CATEGORY = "loaders/waveft"
    OUTPUT_NODE = True
    DESCRIPTION = "Writes a LoRA that approximates a WaveFT adapter (truncated SVD per layer) for LoRA-only tools."

    @classmethod
    def IS_CHANGED(cls, waveft_name, **kwargs):
        return catalog.fingerprint(waveft_name)

    def export(self, waveft_name, rank, filename_prefix):
        path = catalog.resolve_path(waveft_name)
        if os.path.isdir(path):
            raise ValueError(
                "WaveFT to LoRA: convert the PEFT folder to a native file first (Load WaveFT reads it "
                "for a model; 'python -m waveft_core convert' writes a file)"
            )
        with reporting_file_errors():
            adapter = fileformat.read(path)
        tensors, metadata, report = lora.to_lora(adapter, rank, dtype=torch.float16)
        out = host.new_adapter_path(filename_prefix, kind="loras")
        lora.save_lora(tensors, metadata, out)
        name = os.path.relpath(out, host.save_folder("loras")).replace(os.sep, "/")
        text = f"saved models/loras/{name}: rank {rank}, {report['energy_kept'] * 100:.1f}% of ΔW's energy kept"
        return {"ui": {"text": [text]}, "result": (name,)}


class WaveFTFromLoRA:
    @classmethod
    def INPUT_TYPES(cls):
        loras = [f for f in host.filename_list("loras") if f.lower().endswith(".safetensors")]
        return {
            "required": {
                "lora_name": (loras, {"tooltip": "The LoRA to convert (its layers' up @ down products)."}),
                "n_coefficients": (
                    "INT",
                    {
                        "default": DEFAULT_COEFFICIENTS,
                        "min": 1,
                        "max": 10**7,
                        "tooltip": "Wavelet coefficients "
                        "kept per layer: the largest ones, then refined by least squares.",
                    },
                ),
                "wavelet": (
                    list(SUPPORTED_WAVELETS),
                    {"default": DEFAULT_WAVELET, "tooltip": "Wavelet of the new adapter."},
                ),
                "filename_prefix": (
                    "STRING",
                    {
                        "default": "lora_as_waveft",
                        "tooltip": "File name inside the folder "
                        "chosen in save_to (never overwrites: a counter is added).",
                    },
                ),
            },
            "optional": {
                "save_to": (
                    list(host.SAVE_FOLDERS),
                    {
                        "default": host.FOLDER,
                        "tooltip": "models/waveft, or "
                        "models/loras where the stock LoRA loaders and LoRA managers list files.",
                    },
                ),
            },
        }

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("waveft_name",)
    OUTPUT_TOOLTIPS = ("The new WaveFT file's name, as Load WaveFT lists it.",)
    FUNCTION = "convert"
    CATEGORY = "loaders/waveft"
    OUTPUT_NODE = True
    DESCRIPTION = "Approximates a LoRA with a WaveFT adapter of n coefficients per layer and reports the error."

    @classmethod
    def IS_CHANGED(cls, lora_name, **kwargs):
        path = host.full_path("loras", lora_name)
        return catalog.fingerprint_path(path) if path else lora_name

    def convert(self, lora_name, n_coefficients, wavelet, filename_prefix, save_to=host.FOLDER):
        path = host.full_path("loras", lora_name)
        if not path:
            raise ValueError(f"WaveFT: LoRA '{lora_name}' not found in models/loras")
        with reporting_file_errors():
            state, _ = fileformat.read_tensors_and_metadata(path)
        deltas = lora.lora_deltas(state, source=path)
        if not deltas:
            raise ValueError(f"WaveFT: {lora_name} holds no LoRA layers this converter understands")
        adapter, report = extract.extract(deltas, n_coefficients, wavelet=wavelet)
        out = str(fileformat.write(adapter, host.new_adapter_path(filename_prefix, kind=save_to)))
        rel = os.path.relpath(out, host.save_folder(save_to)).replace(os.sep, "/")
        text = (
            f"saved models/{save_to}/{rel}: {len(adapter.layers)} layers, relative error {report['relative_error']:.3f}"
        )
        return {"ui": {"text": [text]}, "result": (catalog.listed_name(out, save_to),)}


class WaveFTMergeCheckpoint:
    @classmethod
    def INPUT_TYPES(cls):
        ckpts = [f for f in host.filename_list("checkpoints") if f.lower().endswith(".safetensors")]
        return {
            "required": {
                "ckpt_name": (ckpts, {"tooltip": "The single-file checkpoint (.safetensors) to merge into."}),
                "waveft_name": (catalog.list_adapters(), {"tooltip": "The adapter to bake in."}),
                "strength": ("FLOAT", {**loader.STRENGTH, "tooltip": "Multiplier of the weight change."}),
                "filename_prefix": (
                    "STRING",
                    {
                        "default": "merged_waveft",
                        "tooltip": "New checkpoint's name inside "
                        "models/checkpoints (never overwrites: a counter is added).",
                    },
                ),
            }
        }

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("ckpt_name",)
    OUTPUT_TOOLTIPS = ("The merged checkpoint's file name in models/checkpoints.",)
    FUNCTION = "merge"
    CATEGORY = "loaders/waveft"
    OUTPUT_NODE = True
    DESCRIPTION = (
        "Writes a new checkpoint with the adapter merged in at a strength, tensor by tensor (low memory); "
        "everything else is copied unchanged."
    )

    @classmethod
    def IS_CHANGED(cls, ckpt_name, waveft_name, **kwargs):
        path = host.full_path("checkpoints", ckpt_name)
        return (catalog.fingerprint_path(path) if path else ckpt_name) + catalog.fingerprint(waveft_name)

    def merge(self, ckpt_name, waveft_name, strength, filename_prefix):
        src = host.full_path("checkpoints", ckpt_name)
        if not src:
            raise ValueError(f"WaveFT: checkpoint '{ckpt_name}' not found in models/checkpoints")
        path = catalog.resolve_path(waveft_name)
        if os.path.isdir(path):
            raise ValueError(
                "WaveFT merge: convert the PEFT folder to a native file first "
                "('python -m waveft_core convert <folder> <file> --base <checkpoint>')"
            )
        folders = host.folder_dirs("checkpoints")
        out = host.free_path(
            folders[0] if folders else os.path.dirname(src), filename_prefix, label="models/checkpoints"
        )
        with reporting_file_errors():
            report = merge.merge_into_checkpoint(src, fileformat.read(path), strength, out)
        name = os.path.basename(out)
        text = f"saved models/checkpoints/{name}: {report['merged']} layers merged at strength {strength:g}"
        return {"ui": {"text": [text]}, "result": (name,)}
