"""Train WaveFT, Save WaveFT, Apply WaveFT (thin: the loop is in train_loop.py, the training state and the math
in waveft_core)."""

from __future__ import annotations

import datetime
import logging
import os
import time

import comfy.model_management as mm
import torch

from ..waveft_core import SUPPORTED_WAVELETS, Adapter
from ..waveft_core.files import fileformat, metadata, reporting_file_errors
from ..waveft_core.keys import META_BASE_MODEL, META_DATE, META_DESCRIPTION, META_TAG_FREQUENCY, META_TITLE
from ..waveft_core.training import NODE_DEFAULTS as DEFAULTS
from ..waveft_core.training import (
    OPTIMIZERS,
    SCHEDULES,
    TARGET_PRESETS,
    TrainableLayer,
    TrainConfig,
    TrainingState,
    TrainRecord,
    layer_patterns,
)
from . import catalog, host, loader, previews, train_loop

log = logging.getLogger("ComfyUI-WaveFT")
NONE = "none"


def _first(x):
    return x[0] if isinstance(x, list) else x


class WaveFTTrain:
    INPUT_IS_LIST = True

    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": (
                    "MODEL",
                    {"tooltip": "The diffusion model to fine-tune. It is not changed: training works on a clone."},
                ),
                "latents": (
                    "LATENT",
                    {
                        "tooltip": "Training images as latents: from VAE Encode, or a list from the "
                        "dataset nodes (Make Training Dataset, Resolution Bucket)."
                    },
                ),
                "positive": (
                    "CONDITIONING",
                    {"tooltip": "The caption conditioning: one for all latents, or one per latent in the same order."},
                ),
                "steps": (
                    "INT",
                    {
                        "default": DEFAULTS.steps,
                        "min": 1,
                        "max": 100000,
                        "tooltip": "Optimizer steps (each one sees batch_size x grad_accumulation_steps images).",
                    },
                ),
                "learning_rate": (
                    "FLOAT",
                    {
                        "default": DEFAULTS.learning_rate,
                        "min": 1e-7,
                        "max": 1.0,
                        "step": 1e-6,
                        "tooltip": "Base learning rate (the paper uses 1e-4 with scaling 25).",
                    },
                ),
                "batch_size": (
                    "INT",
                    {"default": DEFAULTS.batch_size, "min": 1, "max": 64, "tooltip": "Images per micro-batch."},
                ),
                "grad_accumulation_steps": (
                    "INT",
                    {
                        "default": DEFAULTS.grad_accumulation_steps,
                        "min": 1,
                        "max": 256,
                        "tooltip": "Micro-batches summed before each optimizer step.",
                    },
                ),
                "n_coefficients": (
                    "INT",
                    {
                        "default": DEFAULTS.n_coefficients,
                        "min": 1,
                        "max": 10**7,
                        "tooltip": f"Trainable wavelet coefficients per layer ({DEFAULTS.n_coefficients} is about a "
                        "rank-1 LoRA on SDXL).",
                    },
                ),
                "scaling": (
                    "FLOAT",
                    {
                        "default": DEFAULTS.scaling,
                        "min": 0.001,
                        "max": 10000.0,
                        "step": 0.5,
                        "tooltip": "Multiplier of the reconstructed ΔW (PEFT's scaling).",
                    },
                ),
                "wavelet": (
                    list(SUPPORTED_WAVELETS),
                    {
                        "default": DEFAULTS.wavelet,
                        "tooltip": "Wavelet family; db1 (Haar) is fastest and the paper's choice.",
                    },
                ),
                "targets": (
                    list(TARGET_PRESETS),
                    {
                        "default": DEFAULTS.targets,
                        "tooltip": "Which layers of the "
                        "diffusion model get coefficients, the same on every model family: every attention "
                        "projection (q, k, v, out; self and cross; image and text streams; fused qkv weights and "
                        "Flux-style single blocks' fused linear1/linear2 whole), + the blocks' feed-forward "
                        "layers, or every linear layer (+ convolutions).",
                    },
                ),
                "seed": (
                    "INT",
                    {
                        "default": DEFAULTS.seed,
                        "min": 0,
                        "max": 0xFFFFFFFF,
                        "tooltip": "Seeds the coefficient positions "
                        "(PEFT's rule, stored in the file), the noise, the timesteps and the batches.",
                    },
                ),
                "optimizer": (
                    list(OPTIMIZERS),
                    {"default": DEFAULTS.optimizer, "tooltip": "Optimizer of the coefficients."},
                ),
                "lr_schedule": (
                    list(SCHEDULES),
                    {"default": DEFAULTS.lr_schedule, "tooltip": "Learning-rate schedule after warmup."},
                ),
                "warmup_steps": (
                    "INT",
                    {"default": DEFAULTS.warmup_steps, "min": 0, "max": 100000, "tooltip": "Linear warmup steps."},
                ),
                "training_dtype": (
                    ["bf16", "fp32"],
                    {
                        "default": DEFAULTS.training_dtype,
                        "tooltip": "Compute dtype of the model's forward and backward; the coefficients stay fp32.",
                    },
                ),
                "gradient_checkpointing": (
                    "BOOLEAN",
                    {
                        "default": DEFAULTS.gradient_checkpointing,
                        "tooltip": "Recompute each ResBlock's, "
                        "transformer's and DiT block's activations in the backward: much less memory "
                        "(at 512 px about half), each layer runs twice; the same result as off.",
                    },
                ),
                "save_every_n_steps": (
                    "INT",
                    {
                        "default": DEFAULTS.save_every_n_steps,
                        "min": 0,
                        "max": 100000,
                        "tooltip": "Write a checkpoint (with optimizer state, for resuming) every N steps; 0 = never.",
                    },
                ),
                "filename_prefix": (
                    "STRING",
                    {
                        "default": "waveft_trained",
                        "tooltip": "Name of checkpoints and of the "
                        "partial file written on Cancel, inside models/waveft.",
                    },
                ),
                "resume_from": (
                    [NONE] + catalog.list_adapters(),
                    {
                        "default": NONE,
                        "tooltip": "Continue a saved run: its "
                        "coefficients, positions, step count and (when saved) optimizer state.",
                    },
                ),
            },
            "optional": {
                "captions": (
                    "STRING",
                    {
                        "forceInput": True,
                        "tooltip": "Optional: the captions (e.g. the dataset "
                        "loader's texts), recorded as tag frequencies in the file's metadata.",
                    },
                ),
                **previews.optional_inputs(),
            },
        }

    RETURN_TYPES = ("MODEL", "WAVEFT", "LOSS_MAP", "INT", "IMAGE")
    RETURN_NAMES = ("model", "waveft", "loss_map", "steps", "previews")
    OUTPUT_TOOLTIPS = (
        "The input model with the trained adapter applied, ready for a KSampler.",
        "The trained adapter: connect Save WaveFT or Apply WaveFT.",
        "Loss per step (ComfyUI's loss graph node shows it).",
        "Optimizer steps done in total (a resumed run counts the earlier ones).",
        "Every preview in order, one batch (Save Image shows it as a grid); empty without previews.",
    )
    FUNCTION = "train"
    CATEGORY = "training/waveft"
    DESCRIPTION = (
        "Fine-tunes a WaveFT adapter: a few thousand wavelet coefficients per layer, trained on your "
        "latents and captions. Cancel keeps what was learned in a partial file."
    )

    def train(self, model, latents, positive, **kw):
        # ComfyUI runs nodes in inference mode, whose tensors autograd cannot keep: everything this run
        # trains with is created (or copied) outside it.
        with torch.inference_mode(False):
            return self._train(model, train_loop.clone_tensors(latents), train_loop.clone_tensors(positive), **kw)

    def _train(self, model, latents, positive, captions=None, **kw):
        kw = {k: _first(v) for k, v in kw.items()}
        previewer = previews.Previewer.from_inputs(kw, kw["seed"])
        model = _first(model)
        images = train_loop.flatten_latents(latents)
        if not images:
            raise ValueError("WaveFT Train: no latents; connect VAE Encode or the dataset nodes")
        try:
            config = TrainConfig.from_inputs(kw)
        except ValueError as e:
            raise ValueError(f"WaveFT Train: {e}") from None
        conds = train_loop.expand_conditioning(positive, len(images))
        shapes = train_loop.target_weights(model, config.targets)
        if not shapes:
            found = [n.split(".", 1)[-1] for n in train_loop.target_weights(model, "all linear + conv")]
            raise ValueError(
                f"WaveFT Train: no layer of this model ({host.model_family(model)}) matches targets "
                f"'{config.targets}'. Its layers are: {layer_patterns(found) or 'none trainable'}. "
                "Choose 'all linear', or report the model so the targets learn its layer names"
            )

        if kw["resume_from"] != NONE:
            state = self._resume(kw["resume_from"], shapes)
        else:
            trainables = {
                name: TrainableLayer(
                    shape,
                    min(config.n_coefficients, torch.Size(shape).numel()),
                    config.wavelet,
                    config.scaling,
                    seed=config.seed,
                )
                for name, shape in shapes.items()
            }
            state = TrainingState(trainables, step=0, seed=config.seed)
        start = state.step
        first = next(iter(state.trainables.values()))
        # A resumed run draws from the seed input (randomness.py), as the run it continues did when given the same.
        state.record = TrainRecord(
            config,
            steps_total=start + config.steps,
            dataset_size=len(images),
            resumed_from_step=start,
            started_at=int(time.time()),
            resolution=host.image_size(model, images),
            base_checkpoint=host.checkpoint_name(model),
            wavelet=first.wavelet,
            n_coefficients=first.spectrum.numel(),
            scaling=first.scaling,
        )
        state.metadata[META_DATE] = datetime.date.today().isoformat()
        if train_loop.base_model_version(model):
            state.metadata[META_BASE_MODEL] = train_loop.base_model_version(model)
        if captions:
            state.metadata[META_TAG_FREQUENCY] = metadata.tag_frequency(captions)
        run = train_loop.TrainRun(model, images, conds, state, kw["filename_prefix"])
        run.after_step = previewer
        try:
            adapter = run.run()
        except mm.InterruptProcessingException:
            if run.step > start:
                path = run.save_checkpoint(f"_partial_{run.step:05d}")
                log.warning("WaveFT Train: cancelled at step %d; what was learned is in %s", run.step, path)
            raise
        # Trained layer names are the model's own weight keys: no name matching needed.
        out_model = model.clone()
        out_model.add_patches(
            {f"{n}.weight": host.WaveFTAdapter.from_layer(layer) for n, layer in adapter.layers.items()}, 1.0
        )
        shown = previewer.batch() if previewer is not None else previews.no_previews()
        return (out_model, adapter, {"loss": list(run.losses)}, run.step, shown)

    @staticmethod
    def _resume(name, shapes) -> TrainingState:
        path = catalog.resolve_path(name)
        with reporting_file_errors("WaveFT Train: cannot resume"):
            state = TrainingState.load(path)
        state.check_fits(shapes, f"WaveFT Train: {name}")
        log.info(
            "WaveFT Train: resuming %s at step %d (%s optimizer state)",
            name,
            state.step,
            "with" if state.optimizer_tensors else "no",
        )
        return state


class WaveFTSave:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "waveft": ("WAVEFT", {"tooltip": "The adapter from Train WaveFT."}),
                "filename_prefix": (
                    "STRING",
                    {
                        "default": "my_waveft",
                        "tooltip": "File name inside the folder chosen "
                        "in save_to (sub-folders allowed; an existing file is never overwritten).",
                    },
                ),
                "title": (
                    "STRING",
                    {"default": "", "tooltip": "Shown by loaders, LoRA managers and A1111's Lora tab."},
                ),
                "trigger_words": (
                    "STRING",
                    {
                        "default": "",
                        "tooltip": "Words to put in the prompt, comma-separated "
                        "(e.g. 'sks dog'). Written where LoRA managers look: ss_tag_frequency, ss_datasets' "
                        "class_tokens and modelspec.trigger_phrase.",
                    },
                ),
                "description": ("STRING", {"default": "", "multiline": True, "tooltip": "Free text kept in the file."}),
            },
            "optional": {
                "save_to": (
                    list(host.SAVE_FOLDERS),
                    {
                        "default": host.FOLDER,
                        "tooltip": "models/waveft, or "
                        "models/loras: where the stock Load LoRA node, LoRA stacks and LoRA managers list files "
                        "(they load WaveFT files through this pack). Load WaveFT lists both.",
                    },
                ),
                "author": ("STRING", {"default": "", "tooltip": "Your name, kept as modelspec.author."}),
                "license": (
                    "STRING",
                    {
                        "default": "",
                        "tooltip": "The license you publish it under (e.g. "
                        "'CreativeML Open RAIL-M'), kept as modelspec.license.",
                    },
                ),
                "thumbnail": (
                    "IMAGE",
                    {
                        "tooltip": "Optional preview image, kept (at most 256 pixels a side) as "
                        "modelspec.thumbnail, which model browsers show."
                    },
                ),
            },
        }

    RETURN_TYPES = ("STRING",)
    RETURN_NAMES = ("filename",)
    OUTPUT_TOOLTIPS = ("The saved file's name, as Load WaveFT lists it.",)
    FUNCTION = "save"
    CATEGORY = "training/waveft"
    OUTPUT_NODE = True
    DESCRIPTION = (
        "Saves a WaveFT adapter as a native .safetensors file (format v1) with the metadata LoRA "
        "managers read: trigger words, training details, content hash, base model."
    )

    def save(
        self,
        waveft: Adapter,
        filename_prefix,
        title,
        trigger_words,
        description,
        save_to=host.FOLDER,
        author="",
        license="",
        thumbnail=None,
    ):
        md = dict(waveft.metadata)
        for key, value in (
            (META_TITLE, title),
            (META_DESCRIPTION, description),
            ("modelspec.author", author),
            ("modelspec.license", license),
        ):
            if value.strip():
                md[key] = value.strip()
        md = metadata.with_trigger_words(md, trigger_words)
        if thumbnail is not None:
            md["modelspec.thumbnail"] = metadata.data_uri(host.thumbnail_png(thumbnail))
        path = host.new_adapter_path(filename_prefix, kind=save_to)
        stem = os.path.splitext(os.path.basename(path))[0]
        md.setdefault(META_TITLE, stem)
        md["ss_output_name"] = stem
        fileformat.write(Adapter(layers=waveft.layers, metadata=md), path)
        log.info("WaveFT: saved %s", path)
        rel = os.path.relpath(path, host.save_folder(save_to)).replace(os.sep, "/")
        return {"ui": {"text": [f"saved models/{save_to}/{rel}"]}, "result": (catalog.listed_name(path, save_to),)}


class WaveFTApply:
    @classmethod
    def INPUT_TYPES(cls):
        return {
            "required": {
                "model": ("MODEL", {"tooltip": "The model to patch (a clone is returned)."}),
                "waveft": ("WAVEFT", {"tooltip": "An adapter from Train WaveFT, applied without saving it."}),
                "strength_model": ("FLOAT", {**loader.STRENGTH, "tooltip": "Multiplier of the model's weight change."}),
            },
            "optional": {
                "clip": ("CLIP", {"tooltip": "Optional text encoder, for adapters with text-encoder layers."}),
                "strength_clip": ("FLOAT", {**loader.STRENGTH, "tooltip": "Multiplier of the text encoder's change."}),
            },
        }

    RETURN_TYPES = ("MODEL", "CLIP")
    OUTPUT_TOOLTIPS = ("The patched model.", "The patched text encoder (or the input, when none was connected).")
    FUNCTION = "apply"
    CATEGORY = "training/waveft"
    DESCRIPTION = "Applies an in-graph WaveFT adapter to a model (and text encoder) at a chosen strength."

    def apply(self, model, waveft, strength_model, clip=None, strength_clip=1.0):
        out_model, out_clip, summary = loader.apply_adapter(
            waveft, model, clip, strength_model, strength_clip, "WaveFT"
        )
        return {"ui": {"text": [summary]}, "result": (out_model, out_clip)}
