"""Train a WaveFT adapter on a diffusers pipeline folder, on one process or many, through Hugging Face accelerate.

    accelerate launch [accelerate's options] -m waveft_core train --base <pipeline folder> --data <folder>
        --output <file.safetensors> --steps N --seed S [options]

accelerate owns the processes, devices, mixed precision and gradient synchronisation; diffusers gives the UNet, VAE
and noise scheduler, transformers the text encoders (SD1.x/2.x: one CLIP; SDXL: two, with the pooled embedding and
size ids). Only the coefficients train. What a step sees is a function of (seed, step) alone, never of the number
of processes: the global batch is drawn from the seed, each process takes its share, and every sample's noise and
timestep come from a generator seeded by its place in the global batch (randomness.py, the node's rule too). So N
processes with batch b train what one process with batch N*b trains, and a resumed run retraces an uninterrupted one.

The result is the node's native file (ComfyUI-native layer names, PEFT's positions for the seed, the same metadata),
written by the main process only, atomically; checkpoints carry the optimizer state for --resume.

accelerate, diffusers and transformers are an optional extra (`pip install waveft[train]`), never needed in ComfyUI.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import math
import time
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from ..files.metadata import tag_frequency
from ..files.storage import refuse_overwrite
from ..keys import META_BASE_MODEL, META_DATE, META_TAG_FREQUENCY
from ..names.families import UNET_PREFIX, diffusers_unet_to_ldm, family_tag_of_comfy
from ..wavelets import SUPPORTED_WAVELETS
from . import randomness
from .config import CLI_DEFAULTS, TrainConfig, TrainRecord
from .trainable import (
    OPTIMIZERS,
    SCHEDULES,
    TARGET_PRESETS,
    TrainableLayer,
    TrainingState,
    is_target,
    lr_factor,
    make_optimizer,
)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
# The options' defaults: the paper's DreamBooth recipe (Bilican et al., SDXL: attention projections, 2592
# coefficients, scaling 25, db1), the node's settings but for grad accumulation (config.py).
RECIPE = CLI_DEFAULTS
MIXED_PRECISIONS = ("no", "fp16", "bf16")  # accelerate's names; TrainConfig.training_dtype: fp32, fp16, bf16


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--base",
        required=True,
        help="a diffusers pipeline folder (model_index.json, unet/, vae/, text_encoder/, tokenizer/...); local only",
    )
    p.add_argument(
        "--data",
        required=True,
        help="a folder of images, each with a .txt caption of the same name (an image without one uses --caption)",
    )
    p.add_argument("--output", required=True, help="the adapter file to write (.safetensors)")
    p.add_argument("--steps", type=int, required=True, help="optimizer steps (the total, when resuming)")
    p.add_argument("--seed", type=int, default=RECIPE.seed, help="seeds positions, batches, noise and timesteps")
    p.add_argument("--caption", default="", help="caption of images without a .txt file")
    p.add_argument(
        "--resolution",
        type=int,
        help="square training size in pixels (default: the UNet's sample "
        "size x the VAE's factor, 512 for SD1.5, 1024 for SDXL)",
    )
    p.add_argument("--batch-size", type=int, default=RECIPE.batch_size, help="images per process per micro-batch")
    p.add_argument("--grad-accumulation-steps", type=int, default=RECIPE.grad_accumulation_steps)
    p.add_argument("--learning-rate", type=float, default=RECIPE.learning_rate)
    p.add_argument("--lr-schedule", choices=SCHEDULES, default=RECIPE.lr_schedule)
    p.add_argument("--warmup-steps", type=int, default=RECIPE.warmup_steps)
    p.add_argument("--optimizer", choices=OPTIMIZERS, default=RECIPE.optimizer)
    p.add_argument(
        "--targets",
        choices=[t for t in TARGET_PRESETS if "conv" not in t],
        default=RECIPE.targets,
        help="which Linear layers of the UNet train (convolutions: the ComfyUI node)",
    )
    p.add_argument(
        "--coefficients",
        dest="n_coefficients",
        type=int,
        default=RECIPE.n_coefficients,
        help="coefficients per layer",
    )
    p.add_argument("--scaling", type=float, default=RECIPE.scaling)
    p.add_argument("--wavelet", choices=list(SUPPORTED_WAVELETS), default=RECIPE.wavelet)
    p.add_argument(
        "--mixed-precision",
        choices=MIXED_PRECISIONS,
        default=RECIPE.mixed_precision,
        help="compute precision (accelerate's); the coefficients stay fp32",
    )
    p.add_argument(
        "--no-gradient-checkpointing",
        dest="gradient_checkpointing",
        action="store_false",
        help="keep activations instead of recomputing them (more memory, faster)",
    )
    p.add_argument(
        "--save-every",
        dest="save_every_n_steps",
        type=int,
        default=RECIPE.save_every_n_steps,
        help="write a checkpoint with optimizer state every N "
        "steps, next to the output (<name>_<step>.safetensors); 0 = never",
    )
    p.add_argument("--resume", help="a checkpoint of this run to continue from")
    p.add_argument("--overwrite", action="store_true", help="replace --output when it exists")


# --- data --------------------------------------------------------------------------------------------------------


@dataclass
class Example:
    image: Path
    caption: str


def find_examples(folder, default_caption: str = "") -> list[Example]:
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"--data {folder}: not a folder of images")
    out = []
    for path in sorted(folder.iterdir()):
        if path.suffix.lower() in IMAGE_SUFFIXES:
            text = path.with_suffix(".txt")
            out.append(Example(path, text.read_text(encoding="utf-8").strip() if text.is_file() else default_caption))
    if not out:
        raise ValueError(f"--data {folder}: no images ({', '.join(IMAGE_SUFFIXES)})")
    return out


def load_image(path: Path, size: int) -> torch.Tensor:
    """RGB in [-1, 1], (3, size, size): the shorter side scaled to `size`, then the centre cropped."""
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB")
        scale = size / min(im.size)
        im = im.resize(
            (max(size, round(im.size[0] * scale)), max(size, round(im.size[1] * scale))), Image.Resampling.BICUBIC
        )
        left, top = (im.size[0] - size) // 2, (im.size[1] - size) // 2
        im = im.crop((left, top, left + size, top + size))
        data = torch.frombuffer(bytearray(im.tobytes()), dtype=torch.uint8).reshape(size, size, 3)
    return data.permute(2, 0, 1).float() / 127.5 - 1.0


# --- the pipeline ------------------------------------------------------------------------------------------------


@dataclass
class Pipeline:
    unet: torch.nn.Module
    vae: torch.nn.Module
    scheduler: object
    encoders: list  # [(tokenizer, text encoder)], one for SD1.x/2.x, two for SDXL
    family: str  # ss_base_model_version

    @property
    def is_xl(self) -> bool:
        return len(self.encoders) == 2


def load_pipeline(base) -> Pipeline:
    """The parts of a local diffusers pipeline folder; a clear error for anything else (hub ids are not fetched)."""
    base = Path(base)
    if not (base / "model_index.json").is_file():
        hint = (
            " It looks like a Hugging Face id: download the pipeline first (huggingface-cli download <id> "
            "--local-dir <folder>) and pass the folder."
            if not base.exists() and "/" in str(base)
            else ""
        )
        raise ValueError(f"--base {base}: not a diffusers pipeline folder (no model_index.json).{hint}")
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTextModelWithProjection, CLIPTokenizer

    kw = dict(local_files_only=True)
    unet = UNet2DConditionModel.from_pretrained(base, subfolder="unet", **kw)
    vae = AutoencoderKL.from_pretrained(base, subfolder="vae", **kw)
    scheduler = DDPMScheduler.from_pretrained(base, subfolder="scheduler", **kw)
    encoders = [
        (
            CLIPTokenizer.from_pretrained(base, subfolder="tokenizer", **kw),
            CLIPTextModel.from_pretrained(base, subfolder="text_encoder", **kw),
        )
    ]
    if (base / "text_encoder_2").is_dir():
        encoders.append(
            (
                CLIPTokenizer.from_pretrained(base, subfolder="tokenizer_2", **kw),
                CLIPTextModelWithProjection.from_pretrained(base, subfolder="text_encoder_2", **kw),
            )
        )
    cross = unet.config.cross_attention_dim
    comfy_class = "SDXL" if len(encoders) == 2 else ("SD20" if cross == 1024 else "SD15")
    return Pipeline(unet, vae, scheduler, encoders, family_tag_of_comfy(comfy_class))


@torch.no_grad()
def encode_prompt(pipe: Pipeline, caption: str, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(hidden states, pooled) as the pipelines make them: SD1.x/2.x the last hidden state; SDXL both encoders'
    penultimate states side by side and the second encoder's projected pooled output."""
    states, pooled = [], None
    for tokenizer, encoder in pipe.encoders:
        ids = tokenizer(
            caption, padding="max_length", max_length=tokenizer.model_max_length, truncation=True, return_tensors="pt"
        ).input_ids.to(device)
        out = encoder(ids, output_hidden_states=pipe.is_xl)
        if pipe.is_xl:
            states.append(out.hidden_states[-2])
            pooled = out.text_embeds if hasattr(out, "text_embeds") else pooled
        else:
            states.append(out.last_hidden_state)
    return torch.cat(states, dim=-1)[0], (pooled[0] if pooled is not None else None)


class WaveFTLinear(torch.nn.Module):
    """A frozen Linear whose weight gets ΔW(spectrum) on every forward; the spectrum is the only parameter."""

    def __init__(self, base: torch.nn.Linear, trainable: TrainableLayer):
        super().__init__()
        self.base = base
        self.trainable = trainable

    def forward(self, x):
        return torch.nn.functional.linear(
            x,
            self.trainable(self.base.weight.to(x.dtype)),
            None if self.base.bias is None else self.base.bias.to(x.dtype),
        )


def attach(unet: torch.nn.Module, trainables: dict[str, TrainableLayer]) -> None:
    """Put a WaveFTLinear around each trained Linear; `trainables` is keyed by ComfyUI-native names."""
    for native, trainable in trainables.items():
        name = diffusers_name(native)
        parent_name, _, leaf = name.rpartition(".")
        parent = unet.get_submodule(parent_name) if parent_name else unet
        setattr(parent, leaf, WaveFTLinear(getattr(parent, leaf), trainable))


def native_name(diffusers_module: str) -> str | None:
    ldm = diffusers_unet_to_ldm(diffusers_module)
    return UNET_PREFIX + ldm if ldm else None


def diffusers_name(native: str) -> str:
    from ..names.families import ldm_unet_to_diffusers

    name = ldm_unet_to_diffusers(native[len(UNET_PREFIX) :])
    if name is None:
        raise ValueError(f"{native}: not a layer of a diffusers SD1.x/SDXL UNet")
    return name


def target_shapes(unet: torch.nn.Module, targets: str) -> dict[str, tuple]:
    """Native name -> weight shape of each Linear the preset trains (convolutions are not supported here)."""
    out = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and is_target(name, tuple(module.weight.shape), targets):
            native = native_name(name)
            if native:
                out[native] = tuple(module.weight.shape)
    if not out:
        raise ValueError(f"no Linear layer of this UNet matches --targets '{targets}'")
    return out


# --- the run -----------------------------------------------------------------------------------------------------


def run(args) -> Path:
    from accelerate import Accelerator

    output = Path(args.output)
    if output.suffix.lower() != ".safetensors":
        raise ValueError(f"--output {output}: give a .safetensors file name")
    # resuming too: an existing output is a finished run's result, not the checkpoint's
    refuse_overwrite(output, args.base, args.data, args.resume, overwrite=args.overwrite, label="--output")
    if args.steps < 1 or args.batch_size < 1 or args.grad_accumulation_steps < 1:
        raise ValueError("--steps, --batch-size and --grad-accumulation-steps must be at least 1")
    config = config_from_args(args)  # --steps is the total here; config.steps the steps this run makes

    accelerator = Accelerator(mixed_precision=config.mixed_precision, cpu=_processes_without_accelerator())
    device = accelerator.device
    world, rank = accelerator.num_processes, accelerator.process_index
    pipe = load_pipeline(args.base)
    examples = find_examples(args.data, args.caption)
    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(config.training_dtype, torch.float32)
    factor = 2 ** (len(pipe.vae.config.block_out_channels) - 1)
    resolution = args.resolution or pipe.unet.config.sample_size * factor

    # Frozen parts in the compute dtype; latents and text states computed once, the same on every process.
    for part in [pipe.unet, pipe.vae] + [enc for _, enc in pipe.encoders]:
        part.requires_grad_(False)
        part.to(device) if weight_dtype == torch.float32 else part.to(device, weight_dtype)
    latents, states, pooled = [], [], []
    with torch.no_grad():
        for ex in examples:
            pixels = load_image(ex.image, resolution).to(device, weight_dtype)[None]
            latents.append((pipe.vae.encode(pixels).latent_dist.mode() * pipe.vae.config.scaling_factor)[0].float())
            state, pool = encode_prompt(pipe, ex.caption, device)
            states.append(state)
            pooled.append(pool)
    pipe.vae.to("cpu")

    shapes = target_shapes(pipe.unet, config.targets)
    if args.resume:
        state = TrainingState.load(args.resume)
        state.check_fits(shapes, f"--resume {args.resume}")
    else:
        state = TrainingState(
            {
                n: TrainableLayer(
                    s, min(config.n_coefficients, math.prod(s)), config.wavelet, config.scaling, seed=config.seed
                )
                for n, s in shapes.items()
            },
            step=0,
            seed=config.seed,
        )
    if state.step >= args.steps:
        raise ValueError(f"--resume {args.resume} is at step {state.step}; --steps {args.steps} leaves nothing to do")
    # a resumed run goes on with its checkpoint's seed, so that it retraces the run it continues
    config = replace(config, steps=args.steps - state.step, seed=state.seed)
    attach(pipe.unet, state.trainables)
    for t in state.trainables.values():
        t.spectrum.requires_grad_(True)
    if config.gradient_checkpointing:
        pipe.unet.enable_gradient_checkpointing()
    params = [t.spectrum for t in state.trainables.values()]
    optimizer = make_optimizer(config.optimizer, params, config.learning_rate)
    param_names = {t.spectrum: n for n, t in state.trainables.items()}
    unet, optimizer = accelerator.prepare(pipe.unet, optimizer)
    if state.optimizer_tensors and not state.restore(optimizer.optimizer, param_names):
        accelerator.print("note: the checkpoint's optimizer state does not fit; its moments start afresh")

    first = next(iter(state.trainables.values()))
    state.record = TrainRecord(
        config,
        steps_total=args.steps,
        dataset_size=len(examples),
        resumed_from_step=state.step,
        started_at=int(time.time()),
        resolution=[resolution, resolution],
        base_checkpoint=Path(args.base).name,
        wavelet=first.wavelet,
        n_coefficients=first.spectrum.numel(),
        scaling=first.scaling,
        processes=world,
        trainer="accelerate",
    )
    state.metadata.setdefault(META_BASE_MODEL, pipe.family)
    state.metadata[META_DATE] = datetime.date.today().isoformat()
    state.metadata[META_TAG_FREQUENCY] = tag_frequency([ex.caption for ex in examples])

    sched = pipe.scheduler
    alphas = sched.alphas_cumprod.to(device)
    prediction = sched.config.prediction_type
    time_ids = torch.tensor([resolution, resolution, 0, 0, resolution, resolution], device=device, dtype=weight_dtype)
    from tqdm.auto import tqdm

    bar = tqdm(total=args.steps, initial=state.step, disable=not accelerator.is_main_process, desc="WaveFT")
    unet.train()
    while state.step < args.steps:
        for g in optimizer.param_groups:
            g["lr"] = config.learning_rate * lr_factor(state.step, args.steps, config.lr_schedule, config.warmup_steps)
        step_loss = 0.0
        accumulation = config.grad_accumulation_steps
        for micro in range(accumulation):
            seed, step = config.seed, state.step
            picks = randomness.picks(seed, step, micro, config.batch_size * world, len(examples))
            mine = range(rank * config.batch_size, (rank + 1) * config.batch_size)  # places in the global batch
            x0 = torch.stack([latents[picks[i]] for i in mine])
            noise = torch.stack([randomness.noise(seed, step, micro, i, latents[0].shape) for i in mine]).to(device)
            n_timesteps = sched.config.num_train_timesteps
            t = torch.tensor([randomness.timestep(seed, step, micro, i, n_timesteps) for i in mine], device=device)
            a = alphas[t].view(-1, 1, 1, 1)
            noisy = (a.sqrt() * x0 + (1 - a).sqrt() * noise).to(weight_dtype)
            target = noise if prediction == "epsilon" else a.sqrt() * noise - (1 - a).sqrt() * x0
            extra = {}
            if pipe.is_xl:
                extra["added_cond_kwargs"] = {
                    "text_embeds": torch.stack([pooled[picks[i]] for i in mine]),
                    "time_ids": time_ids.expand(len(mine), -1),
                }
            cond = torch.stack([states[picks[i]] for i in mine])
            sync = micro == accumulation - 1
            with accelerator.autocast(), accelerator.no_sync(unet) if not sync else contextlib.nullcontext():
                pred = unet(noisy, t, encoder_hidden_states=cond, **extra).sample
                loss = torch.nn.functional.mse_loss(pred.float(), target.float()) / accumulation
                accelerator.backward(loss)
            step_loss += float(loss.detach())
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        state.step += 1
        bar.update(1)
        bar.set_postfix(loss=f"{step_loss:.4f}")
        every = config.save_every_n_steps
        if every and state.step % every == 0 and state.step < args.steps:
            _save(accelerator, state, optimizer, param_names, checkpoint_path(output, state.step))
    bar.close()
    state.record = replace(state.record, finished_at=int(time.time()))
    state.optimizer_tensors = {}
    _save(accelerator, state, None, param_names, output)
    return output


def config_from_args(args) -> TrainConfig:
    """The run's settings from the parsed options (accelerate's mixed precision "no" is fp32)."""
    dtype = "fp32" if args.mixed_precision == "no" else args.mixed_precision
    return TrainConfig.from_inputs({**vars(args), "training_dtype": dtype})


def _processes_without_accelerator() -> bool:
    """Several processes (a torchrun-style launch: `accelerate launch --multi_gpu --num_processes N`) on a machine
    with no GPU: accelerate then runs them on the CPU over gloo only when told so (its own `--cpu` flag starts a
    single process unless MPI is set up)."""
    import os

    several = int(os.environ.get("WORLD_SIZE", "1")) > 1
    xpu = getattr(torch, "xpu", None)
    return several and not torch.cuda.is_available() and not (xpu is not None and xpu.is_available())


def checkpoint_path(output: Path, step: int) -> Path:
    return output.with_name(f"{output.stem}_{step:05d}{output.suffix}")


def _save(accelerator, state: TrainingState, optimizer, param_names, path: Path) -> None:
    """The main process writes (atomically); the others wait so nobody reads a half-written file."""
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        if optimizer is not None:
            state.capture(optimizer.optimizer, param_names)
        path.parent.mkdir(parents=True, exist_ok=True)
        state.save(path)
        accelerator.print(f"saved {path.resolve()} (step {state.step})")
    accelerator.wait_for_everyone()
