"""Sample previews while Train WaveFT runs: every N optimizer steps one image is sampled with the adapter as
trained so far (the training clone itself, its weight wrappers applied), shown as the node's progress preview
with the loss curve under it, and kept for the node's IMAGE output.

A preview never changes the run: it samples in eval mode under no_grad, between optimizer steps (no gradient
is pending), with the random state of every generator put back afterwards (the host's noise seeds the global
generator), and the training's own randomness comes from its own generator anyway."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import comfy.model_management as mm
import comfy.sample
import torch

from .train_loop import loss_curve

log = logging.getLogger("ComfyUI-WaveFT")

PREVIEW_SAMPLER, PREVIEW_SCHEDULER = "euler", "normal"
LOSS_STRIP = 64  # pixels of loss curve under the sample in the progress preview


def optional_inputs() -> dict:
    """Train WaveFT's optional preview inputs."""
    return {
        "preview_vae": (
            "VAE",
            {
                "tooltip": "Previews: the VAE that decodes them (the checkpoint's). Connect it and "
                "preview_positive to see a sample every preview_every_n_steps."
            },
        ),
        "preview_positive": (
            "CONDITIONING",
            {"tooltip": "Previews: the prompt to sample, e.g. your trigger word in a new scene."},
        ),
        "preview_negative": (
            "CONDITIONING",
            {
                "tooltip": "Previews: optional negative prompt (used with "
                "preview_cfg; without it the preview samples at cfg 1)."
            },
        ),
        "preview_every_n_steps": (
            "INT",
            {
                "default": 0,
                "min": 0,
                "max": 100000,
                "tooltip": "Sample a preview every N optimizer steps (and after the last); 0 = no previews.",
            },
        ),
        "preview_width": (
            "INT",
            {"default": 512, "min": 64, "max": 4096, "step": 8, "tooltip": "Preview width in pixels."},
        ),
        "preview_height": (
            "INT",
            {"default": 512, "min": 64, "max": 4096, "step": 8, "tooltip": "Preview height in pixels."},
        ),
        "preview_steps": (
            "INT",
            {
                "default": 20,
                "min": 1,
                "max": 200,
                "tooltip": "Sampler steps of each preview "
                "(euler, normal schedule, the run's seed: previews differ only by what was learned).",
            },
        ),
        "preview_cfg": (
            "FLOAT",
            {
                "default": 6.0,
                "min": 1.0,
                "max": 30.0,
                "step": 0.5,
                "tooltip": "Guidance of the previews when a negative prompt is connected.",
            },
        ),
    }


@dataclass
class Previewer:
    """Called by the training loop after every optimizer step (TrainRun.after_step); returns the progress
    preview to show, or None."""

    vae: object
    positive: list
    negative: list | None
    every: int
    width: int
    height: int
    steps: int
    cfg: float
    seed: int
    images: list = field(default_factory=list)
    seconds: list = field(default_factory=list)

    @classmethod
    def from_inputs(cls, kw: dict, seed: int) -> Previewer | None:
        every = int(kw.get("preview_every_n_steps") or 0)
        if every <= 0:
            return None
        if kw.get("preview_vae") is None or kw.get("preview_positive") is None:
            raise ValueError(
                "WaveFT Train: preview_every_n_steps is set, but previews need preview_vae and "
                "preview_positive connected (or set preview_every_n_steps to 0)"
            )
        return cls(
            kw["preview_vae"],
            kw["preview_positive"],
            kw.get("preview_negative"),
            every,
            int(kw.get("preview_width") or 512),
            int(kw.get("preview_height") or 512),
            int(kw.get("preview_steps") or 20),
            float(kw.get("preview_cfg") or 6.0),
            int(seed),
        )

    def __call__(self, run):
        total = run.steps_total
        if run.step % self.every == 0 or run.step == total:
            started = time.perf_counter()
            self.images.append(self.sample(run.patcher))
            self.seconds.append(time.perf_counter() - started)
            log.info("WaveFT Train: preview at step %d (%.2f s)", run.step, self.seconds[-1])
            return self.progress_preview(run.losses)
        if run.step % 5 == 0:
            return self.progress_preview(run.losses)
        return None

    def sample(self, patcher) -> torch.Tensor:
        """One image (H, W, 3) from the model as trained so far, without touching the run."""
        model = patcher.model
        was_training = model.training
        # The preview samples inside the training's own sampling call; the host's sampler ends by clearing the
        # model's current patcher, which the training's next forward still needs.
        current_patcher = getattr(model, "current_patcher", None)
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices), torch.no_grad():
            model.eval()
            try:
                latent = torch.zeros(1, 4, self.height // 8, self.width // 8)
                latent = comfy.sample.fix_empty_latent_channels(patcher, latent)
                noise = comfy.sample.prepare_noise(latent, self.seed)
                negative, cfg = (self.negative, self.cfg) if self.negative is not None else (self.positive, 1.0)
                samples = comfy.sample.sample(
                    patcher,
                    noise,
                    self.steps,
                    cfg,
                    PREVIEW_SAMPLER,
                    PREVIEW_SCHEDULER,
                    self.positive,
                    negative,
                    latent,
                    denoise=1.0,
                    disable_pbar=True,
                    seed=self.seed,
                )
                image = self.vae.decode(samples)
            finally:
                model.train(was_training)
                if hasattr(model, "current_patcher"):
                    model.current_patcher = current_patcher
        image = image.reshape(-1, *image.shape[-3:])[0]  # (H, W, C); video VAEs add a frame axis
        return image.float().clamp(0, 1).to(mm.intermediate_device())

    def progress_preview(self, losses):
        """The latest sample with the loss curve under it, in the host's preview format."""
        from PIL import Image

        if not self.images:
            return loss_curve(losses)
        picture = self.images[-1]
        pixels = (picture * 255).round().to(torch.uint8).cpu().numpy()
        sample = Image.fromarray(pixels[..., :3])
        curve = loss_curve(losses, width=sample.width, height=LOSS_STRIP)
        canvas = Image.new("RGB", (sample.width, sample.height + LOSS_STRIP))
        canvas.paste(sample, (0, 0))
        if curve is not None:
            canvas.paste(curve[1], (0, sample.height))
        return ("JPEG", canvas, max(canvas.size))

    def batch(self) -> torch.Tensor:
        """Every preview in order, one IMAGE batch (empty when there were none)."""
        return torch.stack(self.images) if self.images else no_previews()


def no_previews() -> torch.Tensor:
    return torch.zeros(0, 64, 64, 3)
