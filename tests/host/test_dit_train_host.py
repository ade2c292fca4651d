"""Train WaveFT on every DiT family ComfyUI runs (tiny models built by the host's own classes, tests/host/
dit_models.py), with the default targets: checkpointed and uncheckpointed runs train the very same coefficients
(bit for bit; the checkpointed one really recomputes every block), Save WaveFT -> Load WaveFT gives back the
trained weights bit for bit, and each target preset selects what it says on every family."""

import pytest
import torch
from dit_models import FAMILIES, build, conditioning, latent
from host_tools import patched_weights, train_inputs

import waveft_core as wft

# host_tools.TRAIN_INPUTS with these
SETTINGS = dict(steps=2, learning_rate=5e-3, n_coefficients=200, gradient_checkpointing=True, filename_prefix="dit")

# Selected layers per preset (attention q/k/v/out, + feed-forward, all linear) on the tiny models. Attention:
# every projection of self and cross attention, image and text streams (a fused qkv weight is one layer), and
# the fused linear1/linear2 of Flux-style single blocks.
LAYER_COUNTS = {
    "flux": (12, 20, 36),  # 2 double x (img, txt) x (qkv, proj) + 2 single x (linear1, linear2); + 2 x 4 MLP
    "flux2": (12, 20, 29),
    "chroma": (12, 20, 29),
    "sd3": (7, 13, 24),  # 2 joint x (x, context) x (qkv, proj), the last context block has no proj
    "lumina2": (8, 20, 29),  # 2 layers, a noise and a context refiner: attention.qkv, .out; + w1, w2, w3
    "z_image": (8, 20, 29),
    "qwen_image": (16, 24, 34),  # 2 x (to_q, to_k, to_v, to_out.0, add_q/k/v_proj, to_add_out)
    "hidream": (12, 45, 57),  # double: to_q/k/v/out and the text stream's *_t; single: to_q/k/v/out; + MoE
    "hunyuan_video": (16, 28, 49),  # Flux's 12 + the token refiner's 2 x self_attn (qkv, proj)
    "wan21": (16, 20, 26),  # 2 x (self_attn, cross_attn) x (q, k, v, o); + ffn.0, ffn.2
    "wan22": (16, 20, 26),
    "ltxv": (16, 20, 27),  # 2 x (attn1, attn2) x (to_q, to_k, to_v, to_out.0)
    "anima": (64, 80, 100),  # 2 x (self, cross) x 4 + the LLM adapter's 6 x (self, cross) x 4
}
PRESETS = ("attention q/k/v/out", "attention + feed-forward", "all linear")


def _params(with_rope_mark=True):
    out = []
    for fam in FAMILIES:
        marks = []
        if fam.name == "anima":
            marks.append(pytest.mark.host_feature("anima"))
        if fam.rope and with_rope_mark:
            marks.append(pytest.mark.host_feature("rope_backward"))
        out.append(pytest.param(fam, id=fam.name, marks=marks))
    return out


def train(pack, model, fam, **over):
    """The node's first four outputs (model, waveft, loss_map, steps); newer versions add more after them."""
    kw = train_inputs(**{**SETTINGS, **over})
    with torch.inference_mode():  # as ComfyUI's executor runs nodes
        return pack.nodes.train_nodes.WaveFTTrain().train([model], [latent(fam)], [conditioning(fam)], **kw)


@pytest.mark.parametrize("fam", _params())
def test_family_trains_checkpointed_as_uncheckpointed_and_reloads_bitwise(pack, fam, waveft_dir):
    model = build(fam)
    calls = []
    wrapper = pack.nodes.train_loop.TrainWrapper
    original = wrapper.__call__
    wrapper.__call__ = lambda self, w: (calls.append(1), original(self, w))[1]
    try:
        trained, with_ckpt, loss_map, steps = train(pack, model, fam, gradient_checkpointing=True)[:4]
        recomputed = len(calls)
        calls.clear()
        _, without, _, _ = train(pack, model, fam, gradient_checkpointing=False)[:4]
    finally:
        wrapper.__call__ = original
    assert steps == 2 and all(v == v for v in loss_map["loss"])
    # each trained weight is rebuilt once more per step in the backward: the recompute happens
    assert recomputed == 2 * len(calls) > 0
    assert with_ckpt.layers.keys() == without.layers.keys() and len(with_ckpt.layers) == LAYER_COUNTS[fam.name][0]
    for name, layer in with_ckpt.layers.items():
        assert torch.equal(layer.spectrum, without.layers[name].spectrum), name
    assert any(float(layer.spectrum.abs().max()) > 0 for layer in with_ckpt.layers.values())
    # the model's weights are untouched and its modules unpatched after training
    assert not any("forward" in m.__dict__ for m in model.model.diffusion_model.modules())

    # Save WaveFT -> Load WaveFT: the file holds the trained coefficients, and the loaded model the same weights
    name = pack.nodes.train_nodes.WaveFTSave().save(with_ckpt, f"{fam.name}/run", "", "", "")["result"][0]
    saved = wft.load(waveft_dir / name)
    for layer_name, layer in with_ckpt.layers.items():
        assert torch.equal(saved.layers[layer_name].spectrum, layer.spectrum)
        assert torch.equal(saved.layers[layer_name].indices, layer.indices)
    (loaded,) = pack.nodes.loader.WaveFTLoaderModelOnly().load(model, name, 1.0)["result"]
    keys = [f"{n}.weight" for n in with_ckpt.layers]
    expected = patched_weights(trained, keys)
    got = patched_weights(loaded, keys)
    base = {k: v.float() for k, v in model.model.state_dict().items() if k in keys}
    assert any(not torch.equal(got[k], base[k]) for k in keys)
    for k in keys:
        assert torch.equal(got[k], expected[k]), k


@pytest.mark.parametrize("fam", _params(with_rope_mark=False))
def test_presets_select_the_same_kinds_of_layer_on_every_family(pack, fam):
    model = build(fam)
    counts = tuple(len(pack.nodes.train_loop.target_weights(model, p)) for p in PRESETS)
    print(f"[layers] {fam.name}: " + ", ".join(f"{p}={c}" for p, c in zip(PRESETS, counts)))
    assert counts == LAYER_COUNTS[fam.name]
    attention = pack.nodes.train_loop.target_weights(model, PRESETS[0])
    assert not any(
        n.endswith(("_mod.lin", "modulation.1", "adaLN_modulation.1", "img_in", "x_embedder")) for n in attention
    )


def test_a_model_the_presets_do_not_know_gets_its_layer_names(pack, monkeypatch):
    import sys

    trainable = sys.modules[pack.__name__ + ".waveft_core.training.trainable"]  # the pack's own copy
    fam = FAMILIES[0]
    monkeypatch.setattr(trainable, "_ATTENTION_MODULES", frozenset())
    monkeypatch.setattr(trainable, "_FUSED_ATTENTION", {})
    with pytest.raises(
        ValueError,
        match=r"matches targets 'attention q/k/v/out'\. Its layers are: .*"
        r"double_blocks\.N\.img_attn\.qkv.*Choose 'all linear'",
    ):
        train(pack, build(fam), fam)


@pytest.mark.host_feature("rope_backward")
def test_on_real_flux_blocks_torch_checkpoint_is_silently_wrong_and_ours_is_exact(pack):
    """The host's own Flux blocks, one weight trained: plain autograd refuses their in-place adds; torch.utils.
    checkpoint around the whole model (Train LoRA's default depth) runs but gives other gradients; the guard, and
    the pack's per-block checkpoint on it, give the same gradients bit for bit."""
    import sys

    import comfy.model_management as mm
    import comfy.supported_models as sm
    from dit_models import BY_NAME

    checkpointing = sys.modules[pack.__name__ + ".waveft_core.training.checkpointing"]
    train_loop = pack.nodes.train_loop
    fam = BY_NAME["flux"]
    torch.manual_seed(0)
    with torch.no_grad():
        dm = sm.Flux(dict(fam.unet_config)).get_model({}).diffusion_model
        for p in dm.parameters():
            p.normal_(0, 0.05) if p.dim() > 1 else p.fill_(1.0)
    dm.requires_grad_(False)
    trained = dm.double_blocks[0].img_attn.qkv.weight
    trained.requires_grad_(True)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(fam.latent, generator=g)
    context = torch.randn(fam.context, generator=g)
    y = torch.randn(fam.extra["pooled_output"], generator=g)
    inputs = dict(timestep=torch.tensor([0.5]), context=context, y=y, guidance=torch.tensor([3.5]))

    def grad(mode):
        trained.grad = None
        if mode == "whole-torch":
            loss = torch.utils.checkpoint.checkpoint(lambda: dm(x, **inputs), use_reentrant=False).square().mean()
        elif mode == "plain":
            loss = dm(x, **inputs).square().mean()
        else:
            with checkpointing.saved_tensors_guard():
                loss = dm(x, **inputs).square().mean()
        loss.backward()
        return trained.grad.clone()

    before = getattr(mm, "in_training", False)
    mm.in_training = True  # the host's plain-torch rotary path, as in training
    try:
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            grad("plain")
        reference = grad("guarded")
        patched = train_loop.enable_checkpointing(dm)
        try:
            ours = grad("guarded")
        finally:
            train_loop.disable_checkpointing(patched)
        torch_whole = grad("whole-torch")
    finally:
        mm.in_training = before
    assert torch.equal(ours, reference)
    assert float(reference.abs().max()) > 0
    assert not torch.allclose(torch_whole, reference, rtol=1e-3, atol=1e-7)
