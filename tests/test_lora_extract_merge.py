"""Conversions: WaveFT -> LoRA, dense ΔW (LoRA or checkpoint difference) -> WaveFT, merging into checkpoints.

References are independent of the code under test where possible: numpy's SVD, the synthesis matrix built
column by column with PyWavelets (reference.reference_delta), and plain tensor arithmetic."""

import subprocess
import sys

import numpy as np
import pytest
import torch
from reference import ROOT, random_layer, reference_delta, rel_err
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import waveft_core as wft
from waveft_core import cli
from waveft_core.convert.extract import SupportOperator, analysis, checkpoint_deltas, extract
from waveft_core.convert.lora import (
    kohya_prefix,
    lora_deltas,
    lora_module_name,
    resolve_underscores,
    save_lora,
    to_lora,
)
from waveft_core.convert.merge import merge_into_checkpoint
from waveft_core.names.families import ldm_unet_to_diffusers
from waveft_core.names.layouts import checkpoint_module_names

Q = "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q"
CONV = "diffusion_model.input_blocks.1.0.in_layers.2"
CLIP_L_Q = "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj"
CLIP_G = "text_encoders.clip_g.transformer.text_model.encoder.layers.1."


def synthesis_matrix(m, n, wavelet):
    """S[:, k] = ΔW (flattened, scaling 1) of a unit coefficient at flat position k, straight from PyWavelets."""
    return np.stack([reference_delta([k], [1.0], (m, n), wavelet).reshape(-1) for k in range(m * n)], axis=1)


def unclipped_layer(shape, p, wavelet, seed, scaling=2.0):
    """A random layer on positions whose patches lie wholly inside the weight: there the transform is orthonormal,
    so the p-sparse representation of its ΔW is unique."""
    m = shape[0]
    n = int(np.prod(shape[1:]))
    norms = analysis(torch.ones(m, n, dtype=torch.float64), wavelet, square_kernels=True).reshape(-1)
    whole = torch.nonzero((norms - 1).abs() < 1e-9).reshape(-1)
    g = torch.Generator().manual_seed(seed)
    idx = whole[torch.randperm(whole.numel(), generator=g)[:p]]
    return wft.Layer(spectrum=torch.randn(p, generator=g), indices=idx, shape=shape, scaling=scaling, wavelet=wavelet)


# ---------------------------------------------------------------------------------------------------- adjoint


@pytest.mark.parametrize("wavelet", ["db1", "db2", "db4", "sym3", "coif1"])
@pytest.mark.parametrize("shape", [(6, 10), (7, 9), (12, 5)])
def test_analysis_is_the_adjoint_of_the_synthesis(wavelet, shape):
    m, n = shape
    s = synthesis_matrix(m, n, wavelet)
    x = np.random.default_rng(0).standard_normal((m, n))
    got = analysis(torch.from_numpy(x), wavelet).numpy().reshape(-1)
    np.testing.assert_allclose(got, s.T @ x.reshape(-1), atol=1e-12)
    norms = analysis(torch.ones(m, n, dtype=torch.float64), wavelet, square_kernels=True).numpy().reshape(-1)
    np.testing.assert_allclose(norms, (s**2).sum(axis=0), atol=1e-12)


@pytest.mark.parametrize("wavelet", ["db1", "db3"])
def test_support_operator_matches_the_reference_and_its_adjoint(wavelet):
    shape = (11, 14)
    g = torch.Generator().manual_seed(1)
    pos = torch.sort(torch.randperm(154, generator=g)[:40]).values
    op = SupportOperator(pos, shape, wavelet, torch.float64, "cpu")
    v = torch.randn(40, generator=g, dtype=torch.float64)
    y = torch.randn(shape, generator=g, dtype=torch.float64)
    assert rel_err(op.synthesize(v), reference_delta(pos, v, shape, wavelet)) < 1e-12
    s = synthesis_matrix(*shape, wavelet)[:, pos.numpy()]
    np.testing.assert_allclose(op.adjoint(y).numpy(), s.T @ y.numpy().reshape(-1), atol=1e-12)


# ---------------------------------------------------------------------------------------------------- to LoRA


def sample_adapter(clip_g=False):
    layers = {
        Q: random_layer((24, 40), 90, "db2", seed=1),
        CONV: random_layer((8, 4, 3, 3), 50, "db2", seed=2),
        CLIP_L_Q: random_layer((16, 16), 30, "db2", seed=3),
    }
    if clip_g:
        layers[CLIP_G + "mlp.fc1"] = random_layer((20, 12), 30, "db2", seed=4)
    return wft.Adapter(
        layers=layers,
        metadata={
            "ss_base_model_version": "sd_v1",
            "modelspec.architecture": "stable-diffusion-v1/waveft",
            "modelspec.title": "t",
            "waveft.training": "{}",
        },
    )


def test_to_lora_is_the_best_rank_r_approximation():
    ad = sample_adapter()
    rank = 4
    tensors, md, report = to_lora(ad, rank, dtype=torch.float32)
    for name, prefix in [
        (Q, "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"),
        (CONV, "lora_unet_input_blocks_1_0_in_layers_2"),
        (CLIP_L_Q, "lora_te_text_model_encoder_layers_0_self_attn_q_proj"),
    ]:
        layer = ad.layers[name]
        d = layer.delta(torch.float64).reshape(layer.matrix_shape).numpy()
        u, s, vt = np.linalg.svd(d)
        best = (u[:, :rank] * s[:rank]) @ vt[:rank]
        up, down = tensors[f"{prefix}.lora_up.weight"], tensors[f"{prefix}.lora_down.weight"]
        assert float(tensors[f"{prefix}.alpha"]) == rank
        assert down.shape == (rank, *layer.shape[1:])
        assert up.shape == (layer.shape[0], rank, *[1] * (len(layer.shape) - 2))
        got = (up.reshape(up.shape[0], rank).double() @ down.reshape(rank, -1).double()).numpy()
        assert np.abs(got - best).max() < 1e-5 * np.abs(best).max()
        r = report["layers"][name]
        assert r["energy_kept"] == pytest.approx((s[:rank] ** 2).sum() / (s**2).sum(), rel=1e-6)
        assert r["relative_error"] == pytest.approx(np.sqrt((s[rank:] ** 2).sum() / (s**2).sum()), rel=1e-4)
    assert 0 < report["energy_kept"] < 1 and 0 < report["relative_error"] < 1
    assert md["ss_network_module"] == "networks.lora" and md["ss_network_dim"] == md["ss_network_alpha"] == "4"
    assert md["ss_base_model_version"] == "sd_v1" and md["modelspec.architecture"] == "stable-diffusion-v1/lora"
    assert md["modelspec.title"] == "t" and "waveft.training" not in md


def test_full_rank_lora_reproduces_the_delta_and_reads_back(tmp_path):
    ad = sample_adapter(clip_g=True)
    tensors, md, report = to_lora(ad, 64, dtype=torch.float32)  # rank >= every layer's true rank
    assert report["relative_error"] < 1e-6 and report["energy_kept"] == pytest.approx(1.0)
    # SDXL spelling once the adapter has CLIP-G layers
    assert "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight" in tensors
    assert "lora_te2_text_model_encoder_layers_1_mlp_fc1.lora_down.weight" in tensors
    path = save_lora(tensors, md, tmp_path / "l.safetensors")
    with safe_open(str(path), "pt") as f:
        assert f.metadata()["ss_network_module"] == "networks.lora"
    back = lora_deltas(load_file(str(path)))
    assert set(back) == set(ad.layers)
    for name, layer in ad.layers.items():
        assert back[name].shape == layer.shape
        assert rel_err(back[name], layer.delta(torch.float64)) < 1e-5, name


def test_kohya_prefixes():
    assert kohya_prefix(Q, False) == "lora_unet_input_blocks_4_1_transformer_blocks_0_attn1_to_q"
    assert kohya_prefix(CLIP_L_Q, False) == "lora_te_text_model_encoder_layers_0_self_attn_q_proj"
    assert kohya_prefix(CLIP_L_Q, True) == "lora_te1_text_model_encoder_layers_0_self_attn_q_proj"
    assert (
        kohya_prefix(CLIP_G + "self_attn.out_proj", True) == "lora_te2_text_model_encoder_layers_1_self_attn_out_proj"
    )
    # no kohya spelling that ComfyUI maps: keep the native name, which ComfyUI reads directly
    other = "text_encoders.clip_l.transformer.text_model.embeddings.token_embedding"
    assert kohya_prefix(other, False) == other
    assert kohya_prefix("transformer.blocks.0.attn.qkv", False) == "transformer.blocks.0.attn.qkv"


# ---------------------------------------------------------------------------------------------------- extraction


@pytest.mark.parametrize(
    "wavelet,shape",
    [("db1", (32, 48)), ("db1", (10, 6, 3, 3)), ("db4", (32, 48)), ("db4", (33, 47)), ("db4", (12, 4, 3, 3))],
)
def test_extraction_recovers_exact_waveft_layers(wavelet, shape):
    for seed in range(3):
        if wavelet == "db1" and shape[0] % 2 == 0 and int(np.prod(shape[1:])) % 2 == 0:
            layer = random_layer(shape, 60, wavelet, scaling=2.0, seed=seed)  # orthonormal: any positions
        else:
            layer = unclipped_layer(shape, 60, wavelet, seed)
        truth = layer.delta(torch.float64)
        ad, report = extract({Q: truth}, 60, wavelet=wavelet, scaling=25.0)
        got = ad.layers[Q]
        assert got.scaling == 25.0 and got.shape == shape and got.n_coefficients == 60
        assert rel_err(got.delta(torch.float64), truth) < 1e-5
        assert set(got.indices.tolist()) == set(layer.indices.tolist())
        assert report["layers"][Q]["relative_error"] < 1e-5
    assert ad.metadata["waveft.source"] == "extracted"


def top_p_without_refinement(d, p, wavelet):
    """The reference: keep the p largest |S^T ΔW| with those very values (S from PyWavelets)."""
    m, n = d.shape
    s = synthesis_matrix(m, n, wavelet)
    proxy = s.T @ d.reshape(-1)
    keep = np.argsort(-np.abs(proxy))[:p]
    approx = s[:, keep] @ proxy[keep]
    return np.linalg.norm(approx - d.reshape(-1)) / np.linalg.norm(d)


@pytest.mark.parametrize("wavelet", ["db1", "db4", "sym3"])
def test_extraction_is_no_worse_than_plain_top_p(tmp_path, wavelet):
    rng = np.random.default_rng(5)
    low_rank = rng.standard_normal((18, 3)) @ rng.standard_normal((3, 27))  # LoRA-like, not sparse
    sparse = random_layer((18, 27), 40, wavelet, seed=5).delta(torch.float64).numpy()  # edges included
    for d in (low_rank, sparse):
        ad, report = extract({Q: torch.from_numpy(d)}, 40, wavelet=wavelet)
        err = rel_err(ad.layers[Q].delta(torch.float64), d)
        assert err == pytest.approx(report["relative_error"], rel=1e-6)
        assert err <= top_p_without_refinement(d, 40, wavelet) + 1e-9
    assert report["relative_error"] < 0.05  # an exactly 40-sparse ΔW comes back closely even with edge atoms
    path = wft.save(ad, tmp_path / "x.safetensors")  # positions and values survive the file
    assert rel_err(wft.load(path).layers[Q].delta(torch.float64), ad.layers[Q].delta(torch.float64)) < 1e-12


def test_extract_skips_zero_layers_and_caps_the_budget():
    ad, report = extract({Q: torch.randn(4, 6), "diffusion_model.zero": torch.zeros(8, 8)}, 1000)
    assert ad.layers[Q].n_coefficients == 24 and report["layers"][Q]["relative_error"] < 1e-6
    assert report["skipped"] == [("diffusion_model.zero", "ΔW is zero")]
    with pytest.raises(ValueError):
        extract({Q: torch.zeros(4, 4)}, 10)


# ---------------------------------------------------------------------------------------------------- LoRA in

LDM_NAMES = [
    "input_blocks.1.1.transformer_blocks.0.attn1.to_q",
    "input_blocks.4.1.transformer_blocks.1.attn2.to_k",
    "input_blocks.7.1.transformer_blocks.9.attn2.to_out.0",
    "input_blocks.4.1.transformer_blocks.0.ff.net.0.proj",
    "input_blocks.4.1.transformer_blocks.0.ff.net.2",
    "input_blocks.4.1.proj_in",
    "input_blocks.8.1.proj_out",
    "input_blocks.4.0.in_layers.2",
    "input_blocks.4.0.emb_layers.1",
    "input_blocks.4.0.out_layers.3",
    "input_blocks.4.0.skip_connection",
    "input_blocks.3.0.op",
    "input_blocks.0.0",
    "middle_block.1.transformer_blocks.3.attn1.to_v",
    "middle_block.2.in_layers.2",
    "output_blocks.2.1.conv",
    "output_blocks.5.1.transformer_blocks.0.attn2.to_q",
    "output_blocks.8.0.skip_connection",
    "time_embed.0",
    "time_embed.2",
    "label_emb.0.0",
    "label_emb.0.2",
    "out.2",
]
CLIP_NAMES = [
    "text_model.encoder.layers.11.self_attn.q_proj",
    "text_model.encoder.layers.0.self_attn.out_proj",
    "text_model.encoder.layers.31.mlp.fc1",
    "text_model.encoder.layers.5.mlp.fc2",
    "text_model.final_layer_norm",
    "text_model.embeddings.token_embedding",
    "text_model.embeddings.position_embedding",
]


def test_underscore_resolver_knows_the_standard_names():
    for name in LDM_NAMES + CLIP_NAMES:
        assert resolve_underscores(name.replace(".", "_")) == name
    for ldm in LDM_NAMES:  # kohya's SD1 LoRAs use diffusers module names
        d = ldm_unet_to_diffusers(ldm)
        if d and "upsamplers" not in d:
            assert lora_module_name("lora_unet_" + d.replace(".", "_")) == "diffusion_model." + ldm, d
    # a module outside the patterns is settled by the base model's names
    odd = "input_blocks.1.1.my_block.to_q"
    assert resolve_underscores(odd.replace(".", "_")) != odd
    assert resolve_underscores(odd.replace(".", "_"), {odd.replace(".", "_"): odd}) == odd


def test_lora_deltas_reads_every_spelling():
    g = torch.Generator().manual_seed(0)
    up, down = torch.randn(12, 4, generator=g), torch.randn(4, 10, generator=g)
    cup, cdown = torch.randn(8, 4, 1, 1, generator=g), torch.randn(4, 6, 3, 3, generator=g)
    sd = {
        # ComfyUI-native, with alpha
        f"{Q}.lora_up.weight": up,
        f"{Q}.lora_down.weight": down,
        f"{Q}.alpha": torch.tensor(2.0),
        # kohya LDM (SDXL), conv
        "lora_unet_input_blocks_1_0_in_layers_2.lora_up.weight": cup,
        "lora_unet_input_blocks_1_0_in_layers_2.lora_down.weight": cdown,
        # kohya diffusers (SD1)
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_up.weight": up,
        "lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.lora_down.weight": down,
        # kohya text encoders
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_up.weight": up,
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.lora_down.weight": down,
        "lora_te1_text_model_encoder_layers_0_self_attn_q_proj.alpha": torch.tensor(8.0),
        "lora_te2_text_model_encoder_layers_3_mlp_fc2.lora_up.weight": up,
        "lora_te2_text_model_encoder_layers_3_mlp_fc2.lora_down.weight": down,
        # PEFT / diffusers
        "unet.up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_out.0.lora_A.weight": down,
        "unet.up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_out.0.lora_B.weight": up,
        "text_encoder.text_model.encoder.layers.2.mlp.fc1.lora_A.weight": down,
        "text_encoder.text_model.encoder.layers.2.mlp.fc1.lora_B.weight": up,
    }
    deltas = lora_deltas(sd)
    plain = up @ down
    want = {
        Q: plain * 2.0 / 4,
        "diffusion_model.input_blocks.1.0.in_layers.2": (cup.reshape(8, 4) @ cdown.reshape(4, -1)).reshape(8, 6, 3, 3),
        "diffusion_model.input_blocks.4.1.transformer_blocks.0.attn2.to_k": plain,
        CLIP_L_Q: plain * 8.0 / 4,
        "text_encoders.clip_g.transformer.text_model.encoder.layers.3.mlp.fc2": plain,
        "diffusion_model.output_blocks.5.1.transformer_blocks.0.attn1.to_out.0": plain,
        "text_encoders.clip_l.transformer.text_model.encoder.layers.2.mlp.fc1": plain,
    }
    assert set(deltas) == set(want) and deltas.skipped == []
    for name, d in want.items():
        assert deltas[name].shape == d.shape and torch.allclose(deltas[name], d, atol=1e-5), name
    # against a base model's names: an unknown layer is set aside, not guessed
    deltas = lora_deltas(sd, known_modules=[Q, CLIP_L_Q])
    assert set(deltas) == {Q, CLIP_L_Q} and len(deltas.skipped) == 5
    with pytest.raises(ValueError, match="DoRA"):
        lora_deltas({**sd, f"{Q}.dora_scale": torch.ones(12)})
    with pytest.raises(ValueError):
        lora_deltas({"foo.weight": up})


# ---------------------------------------------------------------------------------------------------- checkpoints

D = 8  # CLIP-G width in the fake SDXL checkpoint


def fake_sdxl(seed=0):
    g = torch.Generator().manual_seed(seed)

    def r(*shape, dtype=torch.float32):
        return torch.randn(*shape, generator=g).to(dtype)

    g_pre = "conditioner.embedders.1.model.transformer.resblocks.1."
    return {
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight": r(24, 40, dtype=torch.float16),
        "model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.bias": r(24),
        "model.diffusion_model.input_blocks.1.0.in_layers.2.weight": r(8, 4, 3, 3, dtype=torch.bfloat16),
        "model.diffusion_model.input_blocks.4.1.proj_in.weight": r(24, 24),
        "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight": r(16, 16),
        "conditioner.embedders.0.transformer.text_model.embeddings.token_embedding.weight": r(30, 16),
        g_pre + "attn.in_proj_weight": r(3 * D, D, dtype=torch.float16),
        g_pre + "attn.in_proj_bias": r(3 * D),
        g_pre + "attn.out_proj.weight": r(D, D),
        g_pre + "mlp.c_fc.weight": r(4 * D, D),
        g_pre + "mlp.c_proj.weight": r(D, 4 * D),
        "first_stage_model.decoder.conv_in.weight": r(4, 4, 3, 3),
    }


def write(path, tensors, metadata=None):
    save_file(tensors, str(path), metadata=metadata)
    return path


def test_checkpoint_deltas_names_and_targets(tmp_path):
    base = fake_sdxl()
    ft = {k: v.clone() for k, v in base.items()}
    ft["model.diffusion_model.input_blocks.4.1.transformer_blocks.0.attn1.to_q.weight"] += 0.5
    ft["conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight"][D : 2 * D] += 1.0  # k only
    ft["model.diffusion_model.input_blocks.4.1.proj_in.weight"] += 1.0
    ft["model.diffusion_model.input_blocks.1.0.in_layers.2.weight"] += 1.0
    bp, fp = write(tmp_path / "base.safetensors", base), write(tmp_path / "ft.safetensors", ft)
    deltas = checkpoint_deltas(fp, bp, targets="attention")
    assert set(deltas) == {Q, CLIP_G + "self_attn.k_proj"}  # unchanged q/v and non-attention layers left out
    assert torch.allclose(deltas[Q], torch.full((24, 40), 0.5), atol=1e-3)
    fused = "conditioner.embedders.1.model.transformer.resblocks.1.attn.in_proj_weight"
    assert torch.equal(deltas[CLIP_G + "self_attn.k_proj"], (ft[fused].float() - base[fused].float())[D : 2 * D])
    assert deltas.metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert set(checkpoint_deltas(fp, bp, targets="linear")) == {
        Q,
        CLIP_G + "self_attn.k_proj",
        "diffusion_model.input_blocks.4.1.proj_in",
    }
    assert CONV in checkpoint_deltas(fp, bp, targets="all")
    names = checkpoint_module_names(bp)
    assert CLIP_L_Q in names and CLIP_G + "mlp.fc2" in names and CLIP_G + "self_attn.v_proj" in names
    (tmp_path / "x.ckpt").write_bytes(b"\x80\x02}q\x00.")  # a pickle: refused unread
    with pytest.raises(ValueError, match="pickle"):
        checkpoint_deltas(tmp_path / "x.ckpt", bp)


def merge_adapter():
    layers = {
        Q: random_layer((24, 40), 60, "db2", seed=11),
        CONV: random_layer((8, 4, 3, 3), 30, "db2", seed=12),
        CLIP_L_Q: random_layer((16, 16), 20, "db2", seed=13),
        CLIP_G + "self_attn.q_proj": random_layer((D, D), 10, "db2", seed=14),
        CLIP_G + "self_attn.v_proj": random_layer((D, D), 10, "db2", seed=15),
        CLIP_G + "self_attn.out_proj": random_layer((D, D), 10, "db2", seed=16),
        CLIP_G + "mlp.fc1": random_layer((4 * D, D), 10, "db2", seed=17),
        CLIP_G + "mlp.fc2": random_layer((D, 4 * D), 10, "db2", seed=18),
    }
    return wft.Adapter(layers=layers)


def expected(weight, layer, strength):
    ref = reference_delta(layer.indices, layer.spectrum.double(), layer.shape, "db2", layer.scaling)
    return (weight.double() + strength * torch.from_numpy(ref).reshape(weight.shape)).to(weight.dtype)


def assert_close_in_dtype(got, want):
    assert got.dtype == want.dtype and got.shape == want.shape
    eps = torch.finfo(want.dtype).eps
    assert torch.allclose(got.double(), want.double(), rtol=2 * eps, atol=2 * eps)


def test_merge_adds_strength_times_delta_and_copies_the_rest(tmp_path):
    base = fake_sdxl()
    src = write(tmp_path / "sdxl.safetensors", base, {"modelspec.title": "base", "x": "y"})
    ad = merge_adapter()
    s = 0.7
    report = merge_into_checkpoint(src, ad, s, tmp_path / "out.safetensors")
    assert report["merged"] == len(ad.layers) and report["skipped"] == []
    out = load_file(str(tmp_path / "out.safetensors"))
    with safe_open(str(tmp_path / "out.safetensors"), "pt") as f:
        assert f.metadata() == {"modelspec.title": "base", "x": "y"}
    unet = "model.diffusion_model.input_blocks."
    assert_close_in_dtype(
        out[unet + "4.1.transformer_blocks.0.attn1.to_q.weight"],
        expected(base[unet + "4.1.transformer_blocks.0.attn1.to_q.weight"], ad.layers[Q], s),
    )
    assert_close_in_dtype(
        out[unet + "1.0.in_layers.2.weight"], expected(base[unet + "1.0.in_layers.2.weight"], ad.layers[CONV], s)
    )
    key = "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    assert_close_in_dtype(out[key], expected(base[key], ad.layers[CLIP_L_Q], s))
    g_pre = "conditioner.embedders.1.model.transformer.resblocks.1."
    fused = base[g_pre + "attn.in_proj_weight"]
    want = torch.cat(
        [
            expected(fused[:D], ad.layers[CLIP_G + "self_attn.q_proj"], s),
            fused[D : 2 * D],
            expected(fused[2 * D :], ad.layers[CLIP_G + "self_attn.v_proj"], s),
        ]
    )
    assert_close_in_dtype(out[g_pre + "attn.in_proj_weight"], want)
    assert torch.equal(out[g_pre + "attn.in_proj_weight"][D : 2 * D], fused[D : 2 * D])  # k untouched
    for part, layer in (
        ("attn.out_proj.weight", "self_attn.out_proj"),
        ("mlp.c_fc.weight", "mlp.fc1"),
        ("mlp.c_proj.weight", "mlp.fc2"),
    ):
        assert_close_in_dtype(out[g_pre + part], expected(base[g_pre + part], ad.layers[CLIP_G + layer], s))
    changed = {
        unet + "4.1.transformer_blocks.0.attn1.to_q.weight",
        unet + "1.0.in_layers.2.weight",
        key,
        g_pre + "attn.in_proj_weight",
        g_pre + "attn.out_proj.weight",
        g_pre + "mlp.c_fc.weight",
        g_pre + "mlp.c_proj.weight",
    }
    assert set(out) == set(base)
    for k in set(base) - changed:  # bit-identical
        assert torch.equal(out[k].view(torch.uint8), base[k].view(torch.uint8)), k


def test_merge_into_sd1_layout(tmp_path):
    w = torch.randn(16, 16)
    key = "cond_stage_model.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    src = write(tmp_path / "sd1.safetensors", {key: w})
    layer = random_layer((16, 16), 20, "db2", seed=3)
    merge_into_checkpoint(src, wft.Adapter(layers={CLIP_L_Q: layer}), -1.5, tmp_path / "o.safetensors")
    assert_close_in_dtype(load_file(str(tmp_path / "o.safetensors"))[key], expected(w, layer, -1.5))


def test_merge_refuses_layers_that_do_not_fit(tmp_path):
    src = write(tmp_path / "sdxl.safetensors", fake_sdxl())
    out = tmp_path / "out.safetensors"
    ad = merge_adapter()
    ad.layers["diffusion_model.nowhere.to_q"] = random_layer((4, 4), 3, "db2")
    with pytest.raises(ValueError, match="diffusion_model.nowhere.to_q"):
        merge_into_checkpoint(src, ad, 1.0, out)
    assert not out.exists() and sorted(p.name for p in tmp_path.iterdir()) == ["sdxl.safetensors"]
    ad.layers.pop("diffusion_model.nowhere.to_q")
    ad.layers[Q] = random_layer((24, 41), 3, "db2")
    with pytest.raises(ValueError, match="shape"):
        merge_into_checkpoint(src, ad, 1.0, out)
    report = merge_into_checkpoint(src, ad, 1.0, out, strict=False)
    assert report["merged"] == len(ad.layers) - 1 and [n for n, _ in report["skipped"]] == [Q]


# ---------------------------------------------------------------------------------------------------- CLI


def run_cli(capsys, *args):
    code = cli.main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_cli_to_lora_extract_merge(tmp_path, capsys):
    ad = merge_adapter()
    ad.metadata["ss_base_model_version"] = "sdxl_base_v1-0"
    src = wft.save(ad, tmp_path / "a.safetensors")
    code, out, err = run_cli(capsys, "to-lora", src, tmp_path / "l.safetensors", "--rank", "4")
    assert code == 0, err
    assert "energy kept" in out and "relative error" in out and len(out.splitlines()) <= 4
    code, out, err = run_cli(
        capsys,
        "extract",
        tmp_path / "e.safetensors",
        "--lora",
        tmp_path / "l.safetensors",
        "--coefficients",
        "40",
        "--wavelet",
        "db2",
    )
    assert code == 0, err
    assert "relative error" in out
    back = wft.load(tmp_path / "e.safetensors")
    assert set(back.layers) == set(ad.layers) and back.metadata["waveft.source"] == "extracted"
    assert back.metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    ckpt = write(tmp_path / "sdxl.safetensors", fake_sdxl())
    code, out, err = run_cli(capsys, "merge", ckpt, src, tmp_path / "m.safetensors", "--strength", "0.5")
    assert code == 0, err
    assert f"merged {len(ad.layers)} of {len(ad.layers)} layers" in out
    code, out, err = run_cli(
        capsys,
        "extract",
        tmp_path / "f.safetensors",
        "--finetuned",
        tmp_path / "m.safetensors",
        "--base",
        ckpt,
        "--coefficients",
        "30",
        "--targets",
        "all",
    )
    assert code == 0, err
    assert set(wft.load(tmp_path / "f.safetensors").layers) == set(ad.layers)


def test_cli_bad_input_fails_cleanly(tmp_path, capsys):
    ckpt = write(tmp_path / "sdxl.safetensors", fake_sdxl())
    wrong = wft.save(wft.Adapter(layers={Q: random_layer((24, 41), 3, "db2")}), tmp_path / "w.safetensors")
    (tmp_path / "model.ckpt").write_bytes(b"\x80\x02}q\x00.")
    before = sorted(p.name for p in tmp_path.iterdir())
    for args in (
        ["merge", ckpt, wrong, tmp_path / "o.safetensors"],
        ["extract", tmp_path / "o.safetensors", "--finetuned", tmp_path / "model.ckpt", "--base", ckpt],
        ["extract", tmp_path / "o.safetensors", "--finetuned", ckpt],
        ["to-lora", ckpt, tmp_path / "o.safetensors"],
    ):
        code, out, err = run_cli(capsys, *args)
        assert code == 1 and out == "", args
        assert len(err.strip().splitlines()) == 1 and err.startswith("error: "), (args, err)
    assert sorted(p.name for p in tmp_path.iterdir()) == before  # nothing half-written


def test_module_entry_point(tmp_path):
    r = subprocess.run(
        [sys.executable, "-m", "waveft_core", "to-lora", tmp_path / "missing.safetensors", tmp_path / "o.safetensors"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 1 and "missing.safetensors" in r.stderr and not (tmp_path / "o.safetensors").exists()
