"""Training inside ComfyUI's graph: trainable WaveFT layers become the host's weight wrappers, a guider
with positive conditioning only turns (latent, sigma) into a denoised prediction for any model family, and
a sampler whose 'sampling' is the optimisation loop runs inside the host's own loading machinery."""

from __future__ import annotations

import dataclasses
import logging
import math
import time

import comfy.model_management as mm
import comfy.samplers
import comfy.utils
import torch

from ..waveft_core import Adapter
from ..waveft_core.names import UNET_PREFIX, family_tag_of_comfy
from ..waveft_core.training import (
    TrainableLayer,
    TrainingState,
    checkpointed,
    is_target,
    lr_factor,
    make_optimizer,
    randomness,
    saved_tensors_guard,
)
from . import host

log = logging.getLogger("ComfyUI-WaveFT")

try:
    from comfy.weight_adapter.base import WeightAdapterTrainBase as _TrainBase
except Exception:  # older hosts: a plain module works as a weight wrapper too
    _TrainBase = torch.nn.Module


class TrainWrapper(_TrainBase):
    """The host calls weight_function(w) on every forward with a fresh copy of the weight; this returns
    w + ΔW(spectrum), differentiable (a scatter into that copy, a gather on the way back)."""

    def __init__(self, trainable: TrainableLayer):
        super().__init__()
        self.trainable = trainable

    def __call__(self, w):
        return self.trainable(w)

    def passive_memory_usage(self):
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def move_to(self, device):
        self.to(device)
        return self.passive_memory_usage()


def _unchanged(w):
    return w


class PositiveGuider(comfy.samplers.CFGGuider):
    """Conditioning without a negative, cfg 1: one model call per prediction."""

    def set_positive(self, positive):
        self.inner_set_conds({"positive": positive})

    def predict_noise(self, x, timestep, model_options={}, seed=None):
        return comfy.samplers.sampling_function(
            self.inner_model, x, timestep, None, self.conds.get("positive"), 1.0, model_options=model_options, seed=seed
        )


class LoopSampler(comfy.samplers.Sampler):
    """Runs `loop(model_wrap, extra_args)` where a sampler would denoise."""

    def __init__(self, loop):
        self.loop = loop

    def sample(
        self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None, disable_pbar=False
    ):
        self.loop(model_wrap, extra_args)
        return torch.zeros_like(latent_image)


# --- inputs --------------------------------------------------------------------------------------


def flatten_latents(latents) -> list[torch.Tensor]:
    """One (C, H, W) tensor per image from a LATENT, a list of them (dataset nodes), or batches of them."""
    out = []
    for item in latents if isinstance(latents, list) else [latents]:
        samples = item["samples"] if isinstance(item, dict) else item
        if samples.is_nested:
            samples = list(samples.unbind())
        for s in samples if isinstance(samples, list) else samples.unbind(0):
            out.append(s)
    return out


def expand_conditioning(positive, n_images: int) -> list:
    """One CONDITIONING per image: a single one is shared; a list must have one per image."""
    items = positive if isinstance(positive, list) and positive and _is_conditioning(positive[0]) else [positive]
    if len(items) == 1:
        return items * n_images
    if len(items) != n_images:
        raise ValueError(
            f"WaveFT Train: {n_images} latents but {len(items)} conditionings; give one conditioning "
            "for all, or exactly one per latent (in the same order)"
        )
    return items


def clone_tensors(x):
    """A copy of nested lists/tuples/dicts with every tensor cloned (outside inference mode, by the caller)."""
    if isinstance(x, torch.Tensor):
        return x.clone()
    if isinstance(x, dict):
        return {k: clone_tensors(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return type(x)(clone_tensors(v) for v in x)
    return x


def _is_conditioning(x) -> bool:
    return isinstance(x, list) and (not x or (isinstance(x[0], (list, tuple)) and len(x[0]) == 2))


def target_weights(diffusion_patcher, preset: str) -> dict:
    """native module name -> weight shape, for the host's layers (those with a weight function) that
    the preset selects."""
    out = {}
    for name, module in diffusion_patcher.model.named_modules():
        w = getattr(module, "weight", None)
        if not hasattr(module, "weight_function") or not isinstance(w, torch.Tensor):
            continue
        if name.startswith(UNET_PREFIX) and is_target(name[len(UNET_PREFIX) :], tuple(w.shape), preset):
            out[name] = tuple(w.shape)
    return out


def base_model_version(model) -> str:
    return family_tag_of_comfy(host.model_family(model))


# --- gradient checkpointing ----------------------------------------------------------------------


_CONTAINERS = (torch.nn.ModuleList, torch.nn.Sequential, torch.nn.ModuleDict)


def checkpoint_units(module: torch.nn.Module) -> list:
    """The outermost modules below `module` that are not containers: each ResBlock and transformer of a UNet
    block (TimestepEmbedSequential is a Sequential), each block of a DiT. Recomputing units this small keeps the
    backward's peak at one unit's activations; whole UNet blocks held a ResBlock's and a transformer's at once."""
    units = []
    for child in module.children():
        units.extend(checkpoint_units(child) if isinstance(child, _CONTAINERS) else [child])
    return units


def enable_checkpointing(diffusion_model: torch.nn.Module) -> list:
    """Recompute each checkpoint unit in the backward instead of keeping its activations. Not with
    torch.utils.checkpoint: DiT blocks write into their inputs in place, which it either refuses or recomputes
    from (waveft_core/training/checkpointing.py)."""
    patched = []
    for unit in checkpoint_units(diffusion_model):
        unit.forward = checkpointed(unit.forward)
        patched.append(unit)
    return patched


def disable_checkpointing(patched: list) -> None:
    for block in patched:
        if "forward" in block.__dict__:
            del block.forward


def normal_copies_of_plain_tensors(diffusion_model: torch.nn.Module) -> list:
    """Tensors a model uses without a weight function (HiDream's MoE gate weights, tables, buffers) are inference
    tensors, which autograd cannot keep: a plain copy of each serves the run (restore_tensors puts them back)."""
    swapped = []
    for module in diffusion_model.modules():
        if hasattr(module, "weight_function"):
            continue
        for table in (module._parameters, module._buffers):
            for name, t in table.items():
                if isinstance(t, torch.Tensor) and t.is_inference():
                    copy = t.clone()
                    table[name] = torch.nn.Parameter(copy, requires_grad=False) if table is module._parameters else copy
                    swapped.append((table, name, t))
    return swapped


def restore_tensors(swapped: list) -> None:
    for table, name, t in swapped:
        table[name] = t


# --- saving --------------------------------------------------------------------------------------


# --- the loop ------------------------------------------------------------------------------------


class TrainRun:
    """One WaveFTTrain execution: `run()` trains `state` (a waveft_core TrainingState whose record holds the
    run's settings) from its step to the record's steps_total and returns the adapter; `save_checkpoint` writes
    the state with its optimizer."""

    after_step = None  # optional callable(run) -> progress preview or None, after each optimizer step (previews.py)

    def __init__(self, model, latents, conditionings, state: TrainingState, save_prefix=""):
        self.model = model
        self.latents = latents
        self.conditionings = conditionings
        self.state = state
        self.trainables = state.trainables
        self.config = state.record.config
        self.dtype = torch.bfloat16 if self.config.training_dtype == "bf16" else torch.float32
        self.start_step = state.step
        self.save_prefix = save_prefix
        self.losses: list[float] = []
        params = [t.spectrum for t in self.trainables.values()]
        self.optimizer = make_optimizer(self.config.optimizer, params, self.config.learning_rate)
        self.param_names = {t.spectrum: name for name, t in self.trainables.items()}
        if state.optimizer_tensors and not state.restore(self.optimizer, self.param_names):
            log.info("WaveFT Train: the saved optimizer state does not fit these layers; its moments start afresh")

    @property
    def step(self) -> int:
        return self.state.step

    @property
    def steps_total(self) -> int:
        """The step the run ends at."""
        return self.state.record.steps_total

    def adapter(self) -> Adapter:
        return self.state.adapter()

    def save_checkpoint(self, suffix: str) -> str:
        self.state.capture(self.optimizer, self.param_names)
        path = self.state.save(host.new_adapter_path(self.save_prefix, suffix))
        log.info("WaveFT: saved %s", path)
        return str(path)

    def run(self):
        dtype = self.dtype
        mp = host.training_clone(self.model)
        mp.set_model_compute_dtype(dtype)
        self.patcher = mp  # the model as trained so far, for after_step
        patched = []
        with torch.inference_mode(False), torch.enable_grad():
            for name, t in self.trainables.items():
                mp.add_weight_wrapper(f"{name}.weight", TrainWrapper(t))
            # ComfyUI loads models in inference mode, and autograd cannot keep such tensors for the backward.
            # A weight function makes the host hand each layer a fresh copy of its weight (as its own trainer
            # does for every layer), so the frozen layers get an identity one.
            for name, module in mp.model.named_modules():
                if not hasattr(module, "weight_function"):
                    continue
                for attr in ("weight", "bias"):
                    if isinstance(getattr(module, attr, None), torch.Tensor) and not (
                        attr == "weight" and name in self.trainables
                    ):
                        mp.add_weight_wrapper(f"{name}.{attr}", _unchanged)
            mp.model.requires_grad_(False)
            if self.config.gradient_checkpointing:
                patched = enable_checkpointing(mp.model.diffusion_model)
            swapped = normal_copies_of_plain_tensors(mp.model.diffusion_model)
            try:
                mm.load_models_gpu([mp], memory_required=1e20, force_full_load=True)
                flat, owners = [], []
                for i, cond in enumerate(self.conditionings):
                    for entry in cond:
                        flat.append(entry)
                        owners.append(i)
                self.owners = owners
                guider = PositiveGuider(mp)
                guider.set_positive(flat)
                first = self.latents[0].unsqueeze(0).float()
                with host.in_training():
                    guider.sample(
                        torch.zeros_like(first),
                        torch.zeros_like(first),
                        LoopSampler(self._loop),
                        torch.tensor([1.0, 0.0]),
                        seed=self.config.seed,
                        disable_pbar=True,
                    )
            finally:
                restore_tensors(swapped)
                disable_checkpointing(patched)
                host.unload_patcher(mp)
                for t in self.trainables.values():
                    t.spectrum.requires_grad_(False)
        self.state.record = dataclasses.replace(self.state.record, finished_at=int(time.time()))
        return self.adapter()

    def _loop(self, model_wrap, extra_args):
        c = self.config
        device = mm.get_torch_device()
        dtype = self.dtype
        processed = list(model_wrap.conds["positive"])
        per_image = [[c for c, o in zip(processed, self.owners) if o == i] for i in range(len(self.conditionings))]
        inner = model_wrap.inner_model
        sampling = inner.model_sampling
        latents = [inner.process_latent_in(x.unsqueeze(0).to(device, torch.float32)) for x in self.latents]
        total = self.steps_total
        bar = host.Progress(total - self.start_step)
        autocast = dtype != torch.float32
        t0 = time.perf_counter()
        for t in self.trainables.values():
            t.spectrum.requires_grad_(True)
        while self.state.step < total:
            for group in self.optimizer.param_groups:
                group["lr"] = c.learning_rate * lr_factor(self.step, total, c.lr_schedule, c.warmup_steps)
            step_loss = 0.0
            images = c.batch_size * c.grad_accumulation_steps
            # What a step draws is a function of (seed, step) and its place alone (randomness.py): a resumed run
            # sees the same batches, noise and noise levels as an uninterrupted one.
            seed, step = c.seed, self.step
            for micro in range(c.grad_accumulation_steps):
                picks = randomness.picks(seed, step, micro, c.batch_size, len(latents))
                groups: dict = {}
                for place, i in enumerate(picks):  # images sharing conditioning and size run as one batch
                    key = (id(self.conditionings[i]), tuple(latents[i].shape))
                    groups.setdefault(key, []).append((place, i))
                for group in groups.values():
                    members = [i for _, i in group]
                    x0 = torch.cat([latents[i] for i in members])
                    noise = torch.cat([randomness.noise(seed, step, micro, p, latents[i].shape) for p, i in group])
                    noise = noise.to(device)
                    fractions = [randomness.fraction(seed, step, micro, p) for p, _ in group]
                    sigma = torch.tensor([float(sampling.percent_to_sigma(f)) for f in fractions], device=device)
                    xt = sampling.noise_scaling(sigma.view(-1, *([1] * (x0.dim() - 1))), noise, x0)
                    model_wrap.conds["positive"] = per_image[members[0]]
                    # the guard: DiT blocks add into tensors autograd keeps (waveft_core/training/checkpointing.py)
                    with torch.autocast(device.type, dtype=dtype, enabled=autocast), saved_tensors_guard():
                        pred = model_wrap(xt, sigma, **extra_args)
                    loss = torch.nn.functional.mse_loss(pred.float(), x0.float())
                    (loss * len(members) / images).backward()
                    step_loss += float(loss.detach()) * len(members) / images
            if not math.isfinite(step_loss):
                raise ValueError(
                    f"WaveFT Train: the loss became {step_loss} at step {self.step + 1}; lower the "
                    "learning_rate or use fp32"
                )
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            self.state.step += 1
            self.losses.append(step_loss)
            every = c.save_every_n_steps
            if every and self.step % every == 0 and self.step < total:
                self.save_checkpoint(f"_{self.step:05d}")
            if self.step % 10 == 0 or self.step == total:
                log.info(
                    "WaveFT train step %d/%d loss %.5f (%.2f s/step)",
                    self.step,
                    total,
                    step_loss,
                    (time.perf_counter() - t0) / max(1, self.step - self.start_step),
                )
            # The node's progress bar, with the loss curve as its preview; raises when the user presses Cancel
            # (the caller then saves what was learned).
            if self.after_step is not None:
                preview = self.after_step(self)
            else:
                preview = loss_curve(self.losses) if self.step % 5 == 0 or self.step == total else None
            bar.update(1, preview=preview)


def loss_curve(losses: list[float], width: int = 256, height: int = 128):
    """A small loss plot for the progress preview (host format: ('PNG', image, max size))."""
    try:
        from PIL import Image, ImageDraw
    except ImportError:
        return None
    img = Image.new("RGB", (width, height), (24, 24, 24))
    draw = ImageDraw.Draw(img)
    values = [v for v in losses if math.isfinite(v)]
    if len(values) >= 2:
        lo, hi = min(values), max(values)
        span = (hi - lo) or 1.0
        pts = [
            (4 + (width - 8) * i / (len(values) - 1), height - 14 - (height - 24) * (v - lo) / span)
            for i, v in enumerate(values)
        ]
        draw.line(pts, fill=(90, 200, 250), width=2)
    draw.text((4, height - 12), f"step {len(losses)}  loss {losses[-1]:.4f}" if losses else "", fill=(230, 230, 230))
    return ("PNG", img, width)
