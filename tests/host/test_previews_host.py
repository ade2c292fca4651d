"""Sample previews in Train WaveFT (nodes/previews.py), in-process on the tiny SD1.5: every N steps one image is
sampled with the adapter as trained so far and shown as the node's progress preview; the IMAGE output holds them
in order; the run's coefficients and losses are exactly those of a run without previews."""

import pytest
import torch
from host_tools import train_inputs

# host_tools.TRAIN_INPUTS with these
SETTINGS = dict(steps=5, learning_rate=2e-3, n_coefficients=300, gradient_checkpointing=False, filename_prefix="p")
PREVIEW = dict(preview_every_n_steps=2, preview_width=64, preview_height=64, preview_steps=2, preview_cfg=4.0)


@pytest.fixture(scope="module")
def data(sd15):
    _, clip, vae = sd15
    with torch.inference_mode():
        cond = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of sks cat"))
        negative = clip.encode_from_tokens_scheduled(clip.tokenize("blurry"))
    latent = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(11)) * 0.5}
    return latent, cond, negative, vae


def train(pack, model, latent, cond, **over):
    kw = train_inputs(**{**SETTINGS, **over})
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        return pack.nodes.train_nodes.WaveFTTrain().train([model], [latent], [cond], **kw)


def test_previews_show_progress_and_never_change_the_run(pack, sd15, data, waveft_dir, monkeypatch):
    import comfy.sample
    import comfy.utils

    model, _, _ = sd15
    latent, cond, negative, vae = data
    _, plain, plain_losses, _, none = train(pack, model, latent, cond)
    assert none.shape[0] == 0  # no previews asked: an empty batch

    shown, states = [], []
    original_sample = comfy.sample.sample

    def sample(patcher, *args, **kwargs):
        states.append((torch.is_grad_enabled(), patcher.model.training))
        return original_sample(patcher, *args, **kwargs)

    monkeypatch.setattr(comfy.sample, "sample", sample)
    old = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(lambda value, total, preview, node_id=None: shown.append((value, preview)))
    try:
        _, adapter, losses, steps, images = train(
            pack, model, latent, cond, preview_vae=vae, preview_positive=cond, preview_negative=negative, **PREVIEW
        )
    finally:
        comfy.utils.set_progress_bar_global_hook(old)
    assert steps == 5
    # the run is the run without previews, exactly
    assert losses["loss"] == plain_losses["loss"]
    assert set(adapter.layers) == set(plain.layers)
    assert all(torch.equal(adapter.layers[n].spectrum, plain.layers[n].spectrum) for n in plain.layers)
    # previews at steps 2, 4 and the last, sampled with no gradient in eval mode
    assert images.shape == (3, 64, 64, 3) and images.dtype == torch.float32
    assert 0 <= float(images.min()) and float(images.max()) <= 1
    assert states == [(False, False)] * 3
    # the adapter as trained so far: each preview differs from the one before
    assert not torch.equal(images[0], images[1]) and not torch.equal(images[1], images[2])
    # shown as the node's progress preview: the latest sample above the loss curve
    samples = [(v, p) for v, p in shown if p is not None and p[0] == "JPEG"]
    assert [v for v, _ in samples][:2] == [2, 4] and samples[-1][0] == 5
    assert samples[0][1][1].size == (64, 64 + 64)


def test_the_first_preview_is_the_adapter_after_its_steps(pack, sd15, data, waveft_dir):
    """A preview samples the model as trained so far: the step-2 preview of a 5-step run is the final preview of
    a 2-step run (same seed, same weights), and not the base model's picture."""
    model, _, _ = sd15
    latent, cond, _, vae = data
    kw = dict(preview_vae=vae, preview_positive=cond, **PREVIEW)
    *_, five = train(pack, model, latent, cond, **kw)
    *_, two = train(pack, model, latent, cond, steps=2, **kw)
    assert two.shape[0] == 1 and torch.equal(five[0], two[0])
    *_, base = train(pack, model, latent, cond, steps=1, learning_rate=1e-7, **{**kw, "preview_every_n_steps": 1})
    assert not torch.equal(base[0], two[0])


def test_previews_without_a_vae_or_prompt_are_refused_before_training(pack, sd15, data, waveft_dir):
    model, _, _ = sd15
    latent, cond, _, _ = data
    with pytest.raises(ValueError, match="preview_vae and preview_positive"):
        train(pack, model, latent, cond, preview_every_n_steps=2)
