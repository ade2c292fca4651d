"""Train WaveFT inside a real ComfyUI (in-process, tiny SD1.5): the loss falls, save -> load gives the
trained model, resume continues exactly, Cancel keeps a partial file, the base model is untouched."""

import dataclasses
import json

import pytest
import torch
from host_tools import train_inputs

import waveft_core as wft

# host_tools.TRAIN_INPUTS with these
SETTINGS = dict(
    steps=30, learning_rate=2e-3, n_coefficients=400, seed=3, gradient_checkpointing=True, filename_prefix="t"
)


@pytest.fixture(scope="module")
def data(sd15):
    _, clip, _ = sd15
    cond = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of sks cat"))
    latent = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(11)) * 0.5}
    return latent, cond


def train(pack, model, latent, cond, **over):
    kw = train_inputs(**{**SETTINGS, **over})
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        return pack.nodes.train_nodes.WaveFTTrain().train([model], [latent], [cond], **kw)[:4]  # previews: own tests


def eval_loss(pack, model, latent, cond, sigmas=(0.3, 1.0, 3.0, 8.0)):
    """Denoising MSE at fixed noise levels and noise, through the same guider the trainer uses."""
    import comfy.model_management as mm

    training = pack.nodes.train_loop
    out = []

    def loop(model_wrap, extra_args):
        inner = model_wrap.inner_model
        x0 = inner.process_latent_in(latent["samples"].to(mm.get_torch_device()))
        noise = torch.randn(x0.shape, generator=torch.Generator().manual_seed(5))
        with torch.no_grad():
            for s in sigmas:
                sigma = torch.tensor([s])
                pred = model_wrap(
                    inner.model_sampling.noise_scaling(sigma.view(-1, 1, 1, 1), noise, x0), sigma, **extra_args
                )
                out.append(float(torch.nn.functional.mse_loss(pred, x0)))

    guider = training.PositiveGuider(model)
    guider.set_positive(cond)
    z = torch.zeros_like(latent["samples"])
    guider.sample(z, z, training.LoopSampler(loop), torch.tensor([1.0, 0.0]), seed=0, disable_pbar=True)
    return sum(out) / len(out)


def test_loss_falls_and_base_model_is_untouched(pack, sd15, data, waveft_dir):
    model, _, _ = sd15
    latent, cond = data
    key = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q.weight"
    before_w = model.model.state_dict()[key].clone()
    base_loss = eval_loss(pack, model, latent, cond)
    trained, adapter, loss_map, steps = train(pack, model, latent, cond)
    assert steps == 30 and len(loss_map["loss"]) == 30
    assert len(adapter.layers) == 32  # every attention q/k/v/out of the tiny UNet
    after_loss = eval_loss(pack, trained, latent, cond)
    assert after_loss < 0.9 * base_loss, (base_loss, after_loss)
    # the input model: no patches; once ComfyUI unloads the patched clone its weights are the originals,
    # and sampling with it gives what it gave before training
    import comfy.model_management as mm

    # the training clone's weight wrappers are off the modules it shared with the input model
    assert not any(getattr(m, "weight_function", None) for m in model.model.modules())
    mm.unload_all_models()
    assert torch.equal(model.model.state_dict()[key], before_w) and not model.patches
    assert eval_loss(pack, model, latent, cond) == pytest.approx(base_loss, rel=1e-6)
    # PEFT's positions for the stored seed
    from waveft_core.convert.peft_io import peft_positions

    layer = adapter.layers[key[: -len(".weight")]]
    assert torch.equal(layer.indices, peft_positions(layer.shape, 400, 3))
    assert adapter.metadata["waveft.seed"] == "3"


def test_saved_file_loads_back_to_the_same_model(pack, sd15, data, waveft_dir):
    model, clip, _ = sd15
    latent, cond = data
    trained, adapter, _, _ = train(pack, model, latent, cond, steps=8)
    out = pack.nodes.train_nodes.WaveFTSave().save(adapter, "cats/sks", "Sks cat", "sks cat", "test run")
    name = out["result"][0]
    assert name == "cats/sks.safetensors" and (waveft_dir / name).is_file()
    again = pack.nodes.train_nodes.WaveFTSave().save(adapter, "cats/sks", "", "", "")["result"][0]
    assert again == "cats/sks_2.safetensors"  # never overwrites
    md = wft.load(waveft_dir / name).metadata
    assert md["modelspec.title"] == "Sks cat" and md["modelspec.trigger_phrase"] == "sks cat"
    assert md["ss_base_model_version"] == "sd_1.5"
    settings = json.loads(md["waveft.training"])
    assert settings["steps_done"] == 8 and settings["lr"] == SETTINGS["learning_rate"]
    loaded, _ = pack.nodes.loader.WaveFTLoader().load(model, clip, name, 1.0, 1.0)["result"]
    assert eval_loss(pack, loaded, latent, cond) == eval_loss(pack, trained, latent, cond)
    with pytest.raises(ValueError, match="leaves models/waveft"):
        pack.nodes.train_nodes.WaveFTSave().save(adapter, "../escape", "", "", "")


def test_resume_continues_exactly(pack, sd15, data, waveft_dir):
    model, _, _ = sd15
    latent, cond = data
    _, straight, _, _ = train(pack, model, latent, cond, steps=10, filename_prefix="straight")
    _, first, _, steps = train(pack, model, latent, cond, steps=6, save_every_n_steps=3, filename_prefix="half")
    assert steps == 6 and (waveft_dir / "half_00003.safetensors").is_file()
    wft.save(first, waveft_dir / "half_final.safetensors")  # no optimizer state: resume still works, restarts moments
    _, _, _, _ = train(pack, model, latent, cond, steps=1, filename_prefix="x", resume_from="half_final.safetensors")
    # resuming from the checkpoint written at step 3 (with optimizer state) retraces the straight run
    _, resumed, loss_map, steps = train(pack, model, latent, cond, steps=7, resume_from="half_00003.safetensors")
    assert steps == 10 and len(loss_map["loss"]) == 7
    for name, layer in straight.layers.items():
        torch.testing.assert_close(resumed.layers[name].spectrum, layer.spectrum, rtol=1e-5, atol=1e-7)


def test_cancel_keeps_a_partial_file(pack, sd15, data, waveft_dir):
    """Cancel as the server does it (the interrupt flag), at whichever step the progress hook is first called
    at or after step 4: newer ComfyUI throttles that hook, so the step is not fixed. The run stops at that
    very step, and the partial file holds exactly that many steps."""
    import comfy.model_management as mm
    import comfy.utils

    model, _, _ = sd15
    latent, cond = data
    seen, cancelled_at, flags = [], [], []

    def hook(value, total, preview, node_id=None):
        seen.append(value)
        flags.append(getattr(mm, "in_training", True))
        if value >= 4 and not cancelled_at:
            cancelled_at.append(value)
            mm.interrupt_current_processing(True)

    old = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            train(pack, model, latent, cond, steps=50, filename_prefix="cancelled")
    finally:
        comfy.utils.set_progress_bar_global_hook(old)
        mm.interrupt_current_processing(False)
    # the host's training flag (ComfyUI 0.3x) is up while the loop runs, and down again after Cancel
    assert all(flags) and not getattr(mm, "in_training", False)
    (stopped_at,) = cancelled_at
    assert seen[-1] == stopped_at, "training went on after Cancel"
    partial = waveft_dir / f"cancelled_partial_{stopped_at:05d}.safetensors"
    assert partial.is_file(), sorted(p.name for p in waveft_dir.iterdir())
    assert json.loads(wft.load(partial).metadata["waveft.training"])["steps_done"] == stopped_at


def test_deterministic_on_cpu(pack, sd15, data, waveft_dir):
    model, _, _ = sd15
    latent, cond = data
    a = train(pack, model, latent, cond, steps=5)[1]
    b = train(pack, model, latent, cond, steps=5)[1]
    assert all(torch.equal(a.layers[n].spectrum, b.layers[n].spectrum) for n in a.layers)


def test_clear_errors(pack, sd15, data, waveft_dir):
    model, clip, _ = sd15
    latent, cond = data
    t = pack.nodes.train_nodes.WaveFTTrain()
    kw = train_inputs(**SETTINGS)
    with pytest.raises(ValueError, match="no latents"):
        t.train([model], [{"samples": torch.zeros(0, 4, 8, 8)}], [cond], **kw)
    two = {"samples": torch.randn(2, 4, 8, 8)}
    with pytest.raises(ValueError, match="2 latents but 3 conditionings"):
        t.train([model], [two], [cond, cond, cond], **kw)
    with pytest.raises(ValueError, match="steps must be at least 1"):
        t.train([model], [latent], [cond], **{**kw, "steps": [0]})
    other = wft.Adapter(
        layers={
            "diffusion_model.somewhere.else": wft.Layer(spectrum=torch.ones(3), indices=torch.arange(3), shape=(4, 4))
        }
    )
    wft.save(other, waveft_dir / "other.safetensors")
    with pytest.raises(ValueError, match="trained on another model"):
        t.train([model], [latent], [cond], **{**kw, "resume_from": ["other.safetensors"]})


def test_the_nodes_inputs_keep_their_defaults_and_they_are_the_configs(pack):
    """Train WaveFT's inputs (what saved workflows hold) are as they were; the node takes them from the one
    typed config (waveft_core/training/config.py)."""
    from waveft_core.training.config import NODE_DEFAULTS

    required = pack.nodes.train_nodes.WaveFTTrain.INPUT_TYPES()["required"]
    defaults = {name: spec[1]["default"] for name, spec in required.items() if "default" in spec[1]}
    # tests/test_train_config.py pins NODE_DEFAULTS' values; here: every setting is an input with that default
    settings = dataclasses.asdict(NODE_DEFAULTS)
    assert {name: defaults[name] for name in settings} == settings
    assert set(defaults) - set(settings) == {"filename_prefix", "resume_from"}  # the node's own two
    assert (defaults["filename_prefix"], defaults["resume_from"]) == ("waveft_trained", "none")
    assert required["training_dtype"][0] == ["bf16", "fp32"]
    assert "2592 is about a rank-1 LoRA" in required["n_coefficients"][1]["tooltip"]


def test_train_takes_dataset_lists_and_per_image_captions(pack, sd15, waveft_dir):
    """Dataset nodes hand over lists: several latents (even of different sizes) with one caption each."""
    model, clip, _ = sd15
    lats = [{"samples": torch.randn(1, 4, 8, 8)}, {"samples": torch.randn(1, 4, 8, 12)}]
    conds = [clip.encode_from_tokens_scheduled(clip.tokenize(t)) for t in ("a cat", "a dog")]
    kw = train_inputs(**{**SETTINGS, "steps": 3, "batch_size": 2})
    _, adapter, loss_map, steps, _ = pack.nodes.train_nodes.WaveFTTrain().train([model], lats, conds, **kw)
    assert steps == 3 and all(v == v for v in loss_map["loss"])
    assert json.loads(adapter.metadata["waveft.training"])["dataset_size"] == 2


def test_captions_become_tag_frequencies(pack, sd15, data, waveft_dir):
    model, _, _ = sd15
    latent, cond = data
    kw = train_inputs(**{**SETTINGS, "steps": 1})
    with torch.inference_mode():
        _, adapter, *_ = pack.nodes.train_nodes.WaveFTTrain().train(
            [model], [latent], [cond], captions=["sks cat, sitting", "sks cat, on grass"], **kw
        )
    assert json.loads(adapter.metadata["ss_tag_frequency"]) == {"img": {"sks cat": 2, "sitting": 1, "on grass": 1}}


@pytest.mark.host_feature("dynamic_vram")
def test_a_dynamic_vram_model_trains_on_its_own_copy(pack, checkpoint_state, waveft_dir, tmp_path):
    """On NVIDIA, ComfyUI 0.3x loads models as ModelPatcherDynamic (it cannot start on a CPU, so the model here
    only reports being dynamic). Training then works on the host's non-dynamic copy, loaded afresh from the
    checkpoint, and never puts its weight wrappers on the modules the input model shares with other clones."""
    import comfy.sd
    import comfy.utils
    from safetensors.torch import save_file

    path = tmp_path / "tiny.safetensors"
    save_file(checkpoint_state, str(path))
    with torch.inference_mode():
        model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(str(path))
    model.is_dynamic = lambda: True
    cond = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of sks cat"))
    latent = {"samples": torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4))}
    wrapped_shared = []

    def hook(value, total, preview, node_id=None):
        wrapped_shared.append(any(getattr(m, "weight_function", None) for m in model.model.modules()))

    old = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        trained, adapter, loss_map, steps = train(pack, model, latent, cond, steps=3)
    finally:
        comfy.utils.set_progress_bar_global_hook(old)
    assert steps == 3 and wrapped_shared and not any(wrapped_shared)
    assert any(float(layer.spectrum.abs().max()) > 0 for layer in adapter.layers.values())
    assert trained.model is model.model  # the output samples with the input model plus the adapter's patches


def test_checkpointing_recomputes_each_resblock_and_transformer_and_changes_nothing(pack, sd15, data, waveft_dir):
    """Gradient checkpointing wraps the smallest units ComfyUI's own trainer wraps (each ResBlock and
    SpatialTransformer, not whole UNet blocks: the backward's peak is one unit's activations), and the trained
    coefficients are the same with it as without it."""
    model, _, _ = sd15
    latent, cond = data
    units = pack.nodes.train_loop.checkpoint_units(model.model.diffusion_model)
    kinds = {type(u).__name__ for u in units}
    assert {"ResBlock", "SpatialTransformer"} <= kinds and "TimestepEmbedSequential" not in kinds
    assert not any(isinstance(u, (torch.nn.Sequential, torch.nn.ModuleList)) for u in units)
    # it really recomputes: every trained weight is rebuilt once more per step, in the backward (wrapping whole
    # UNet blocks did nothing: ComfyUI's UNet calls the layers of a block, never the block's forward)
    calls = []
    wrapper = pack.nodes.train_loop.TrainWrapper
    original = wrapper.__call__
    wrapper.__call__ = lambda self, w: (calls.append(1), original(self, w))[1]
    try:
        _, with_ckpt, _, _ = train(pack, model, latent, cond, steps=3, gradient_checkpointing=True)
        with_count = len(calls)
        calls.clear()
        _, without, _, _ = train(pack, model, latent, cond, steps=3, gradient_checkpointing=False)
    finally:
        wrapper.__call__ = original
    assert with_count == 2 * len(calls) > 0
    for name, layer in with_ckpt.layers.items():
        assert torch.allclose(layer.spectrum, without.layers[name].spectrum, rtol=1e-5, atol=1e-7), name
    assert not any("forward" in u.__dict__ for u in units)  # unpatched afterwards
