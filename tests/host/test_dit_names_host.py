"""Diffusers/PEFT layer names of every DiT family land on the rows of ComfyUI's weights where diffusers keeps them.

For each family a tiny model is built twice: by ComfyUI from its own `supported_models` class, and by the real
diffusers from a matching tiny config, loaded with the ComfyUI model's weights through diffusers' own
single-file converter (the code diffusers uses to read original checkpoints, whose layout ComfyUI's models
share). The real PEFT puts a WaveFT adapter on every Linear layer of the diffusers model, diffusers saves it
under its names (`tests/diffusers_reference.py`, run with the project's .venv: ComfyUI's Python has neither
package). Load WaveFT applies that file to the ComfyUI model; read back through the converter's layout change,
every weight must equal the diffusers weight with PEFT's ΔW added (float64), fused q/k/v slices, grouped k/v
heads (Lumina 2: 6 query heads, 2 key/value heads here, as 24/8 in the real model) and swapped scale/shift
included. Families ComfyUI 0.8 lacks are deselected there (host_feature). Every family's diffusers class and
converter exists in the diffusers the project's .venv has (0.42.1); an older one fails naming the missing class."""

import json
import os
import subprocess
from pathlib import Path

import pytest
import torch
from dit_models import BY_NAME as DIT
from host_tools import FLUX, SD3, patched_weights, patcher_for
from safetensors.torch import load_file, save_file

ROOT = Path(__file__).resolve().parents[2]
REFERENCE_PYTHON = Path(os.environ.get("WAVEFT_REFERENCE_PYTHON", ROOT / ".venv" / "bin" / "python"))

LUMINA2 = dict(
    image_model="lumina2",
    patch_size=2,
    in_channels=16,
    dim=96,
    n_layers=1,
    n_refiner_layers=1,
    n_heads=6,
    n_kv_heads=2,
    multiple_of=16,
    ffn_dim_multiplier=4.0,
    qk_norm=True,
    cap_feat_dim=32,
    axes_dims=[4, 6, 6],
    axes_lens=[300, 512, 512],
)
WAN = dict(
    image_model="wan2.1",
    model_type="t2v",
    patch_size=(1, 2, 2),
    in_dim=16,
    dim=32,
    ffn_dim=64,
    freq_dim=16,
    text_dim=24,
    out_dim=16,
    num_heads=2,
    num_layers=1,
)
# Z-Image's timestep embedder is min(width, 1024) wide in ComfyUI and 1024 in diffusers: the one 1024-wide tiny model
ZIMAGE = dict(
    LUMINA2,
    dim=1024,
    n_heads=8,
    n_kv_heads=8,
    ffn_dim_multiplier=8.0 / 3.0,
    rope_theta=256.0,
    z_image_modulation=True,
    time_scale=1000.0,
    axes_dims=[32, 48, 48],
    axes_lens=[64, 64, 64],
    multiple_of=2,
    pad_tokens_multiple=32,
)
QWEN = dict(DIT["qwen_image"].unet_config, num_layers=1)
HIDREAM = dict(
    image_model="hidream",
    patch_size=2,
    in_channels=16,
    out_channels=16,
    num_layers=1,
    num_single_layers=1,
    attention_head_dim=32,
    num_attention_heads=2,
    caption_channels=[48, 40],
    text_emb_dim=32,
    num_routed_experts=2,
    num_activated_experts=1,
    axes_dims_rope=(16, 16),
    max_resolution=(16, 16),
    llama_layers=[0, 0, 0, 0],
)
FLUX2 = dict(
    DIT["flux2"].unet_config, in_channels=64, out_channels=64, depth=1, depth_single_blocks=1, guidance_embed=True
)
CHROMA = dict(DIT["chroma"].unet_config, vec_in_dim=32, depth=1, depth_single_blocks=1, patch_size=1, n_layers=1)
HUNYUAN_VIDEO = dict(DIT["hunyuan_video"].unet_config, depth=1, depth_single_blocks=1)
# ComfyUI's HunyuanVideo modules are spelled as Flux's; the original checkpoint (what diffusers' converter reads)
# spells them as these, applied in order (`mlp.0` -> `mlp.fc1` before `time_in.in_layer` -> `time_in.mlp.0`)
HUNYUAN_ORIGINAL = [
    ("_norm.scale", "_norm.weight"),  # ComfyUI 0.8 keeps the RMSNorm weights as `scale`
    ("mlp.0.", "mlp.fc1."),
    ("mlp.2.", "mlp.fc2."),
    ("_mod.lin.", "_mod.linear."),
    ("modulation.lin.", "modulation.linear."),
    ("_attn.qkv.", "_attn_qkv."),
    ("_attn.proj.", "_attn_proj."),
    ("self_attn.qkv.", "self_attn_qkv."),
    ("self_attn.proj.", "self_attn_proj."),
    ("_attn.norm.query_norm.", "_attn_q_norm."),
    ("_attn.norm.key_norm.", "_attn_k_norm."),
    ("norm.query_norm.", "q_norm."),
    ("norm.key_norm.", "k_norm."),
    ("c_embedder.in_layer.", "c_embedder.linear_1."),
    ("c_embedder.out_layer.", "c_embedder.linear_2."),
    ("t_embedder.in_layer.", "t_embedder.mlp.0."),
    ("t_embedder.out_layer.", "t_embedder.mlp.2."),
    ("time_in.in_layer.", "time_in.mlp.0."),
    ("time_in.out_layer.", "time_in.mlp.2."),
    ("guidance_in.in_layer.", "guidance_in.mlp.0."),
    ("guidance_in.out_layer.", "guidance_in.mlp.2."),
]
LTXV = dict(DIT["ltxv"].unet_config, in_channels=16, caption_channels=24, num_layers=1)

# ComfyUI renames the q/k norms' `scale` of BFL's checkpoints to `weight` on load; diffusers' converter reads `scale`
FLUX_NORMS = [("_norm.weight", "_norm.scale")]
# Anima's DiT (a Cosmos-Predict2 MiniTrainDIT) at toy width; its LLM adapter has a fixed size ComfyUI sets itself
ANIMA = dict(
    image_model="anima",
    max_img_h=240,
    max_img_w=240,
    max_frames=128,
    in_channels=16,
    out_channels=16,
    patch_spatial=2,
    patch_temporal=1,
    model_channels=64,
    num_blocks=1,
    num_heads=2,
    crossattn_emb_channels=1024,
    concat_padding_mask=True,
    pos_emb_cls="rope3d",
    pos_emb_learnable=True,
    pos_emb_interpolation="crop",
    use_adaln_lora=True,
    adaln_lora_dim=16,
)
# ComfyUI's Anima holds an LLM adapter diffusers keeps outside the transformer: left out of the comparison
NOT_IN_DIFFUSERS_TRANSFORMER = {"anima": "llm_adapter."}
# family -> (ComfyUI supported_models class, its unet_config, diffusers class, its config, diffusers converter[, key
# renames back to the original layout])
FAMILIES = {
    "flux": (
        "Flux",
        FLUX,
        "FluxTransformer2DModel",
        dict(
            patch_size=1,
            in_channels=64,
            out_channels=64,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=32,
            num_attention_heads=2,
            joint_attention_dim=48,
            pooled_projection_dim=32,
            guidance_embeds=True,
            axes_dims_rope=(8, 12, 12),
        ),
        "convert_flux_transformer_checkpoint_to_diffusers",
        FLUX_NORMS,
    ),
    "flux2": (
        "Flux2",
        FLUX2,
        "Flux2Transformer2DModel",
        dict(
            patch_size=1,
            in_channels=64,
            out_channels=64,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=32,
            num_attention_heads=2,
            joint_attention_dim=48,
            axes_dims_rope=(8, 8, 8, 8),
            guidance_embeds=True,
        ),
        "convert_flux2_transformer_checkpoint_to_diffusers",
        FLUX_NORMS,
    ),
    "chroma": (
        "Chroma",
        CHROMA,
        "ChromaTransformer2DModel",
        dict(
            patch_size=1,
            in_channels=64,
            out_channels=64,
            num_layers=1,
            num_single_layers=1,
            attention_head_dim=32,
            num_attention_heads=2,
            joint_attention_dim=48,
            axes_dims_rope=(8, 12, 12),
            approximator_num_channels=64,
            approximator_hidden_dim=32,
            approximator_layers=1,
        ),
        "convert_chroma_transformer_checkpoint_to_diffusers",
        FLUX_NORMS + [(".norms.0.weight", ".norms.0.scale")],
    ),
    "sd3": (
        "SD3",
        dict(SD3, num_patches=SD3["pos_embed_max_size"] ** 2),
        "SD3Transformer2DModel",
        dict(
            sample_size=8,
            patch_size=2,
            in_channels=16,
            num_layers=2,
            attention_head_dim=64,
            num_attention_heads=2,
            joint_attention_dim=48,
            caption_projection_dim=128,
            pooled_projection_dim=32,
            out_channels=16,
            pos_embed_max_size=16,
        ),
        "convert_sd3_transformer_checkpoint_to_diffusers",
    ),
    "lumina2": (
        "Lumina2",
        LUMINA2,
        "Lumina2Transformer2DModel",
        dict(
            sample_size=8,
            patch_size=2,
            in_channels=16,
            hidden_size=96,
            num_layers=1,
            num_refiner_layers=1,
            num_attention_heads=6,
            num_kv_heads=2,
            multiple_of=16,
            ffn_dim_multiplier=1.0,
            axes_dim_rope=(4, 6, 6),
            axes_lens=(300, 512, 512),
            cap_feat_dim=32,
        ),
        "convert_lumina2_to_diffusers",
    ),
    "zimage": (
        "ZImage",
        ZIMAGE,
        "ZImageTransformer2DModel",
        dict(
            all_patch_size=(2,),
            all_f_patch_size=(1,),
            in_channels=16,
            dim=1024,
            n_layers=1,
            n_refiner_layers=1,
            n_heads=8,
            n_kv_heads=8,
            qk_norm=True,
            cap_feat_dim=32,
            axes_dims=[32, 48, 48],
            axes_lens=[64, 64, 64],
        ),
        "convert_z_image_transformer_checkpoint_to_diffusers",
    ),
    "qwen_image": (
        "QwenImage",
        QWEN,
        "QwenImageTransformer2DModel",
        {k: v for k, v in QWEN.items() if k != "image_model"},
        None,
    ),
    "hidream": (
        "HiDream",
        HIDREAM,
        "HiDreamImageTransformer2DModel",
        {k: v for k, v in HIDREAM.items() if k != "image_model"},
        "convert_hidream_transformer_to_diffusers",
    ),
    "hunyuan_video": (
        "HunyuanVideo",
        HUNYUAN_VIDEO,
        "HunyuanVideoTransformer3DModel",
        dict(
            in_channels=16,
            out_channels=16,
            num_attention_heads=2,
            attention_head_dim=32,
            num_layers=1,
            num_single_layers=1,
            num_refiner_layers=2,
            mlp_ratio=4.0,
            patch_size=2,
            patch_size_t=1,
            guidance_embeds=True,
            text_embed_dim=48,
            pooled_projection_dim=32,
            rope_axes_dim=(8, 12, 12),
        ),
        "convert_hunyuan_video_transformer_to_diffusers",
        HUNYUAN_ORIGINAL,
    ),
    "anima": (
        "Anima",
        ANIMA,
        "CosmosTransformer3DModel",
        dict(
            in_channels=16,
            out_channels=16,
            num_attention_heads=2,
            attention_head_dim=32,
            num_layers=1,
            text_embed_dim=1024,
            adaln_lora_dim=16,
            max_size=(128, 240, 240),
            patch_size=(1, 2, 2),
            concat_padding_mask=True,
            extra_pos_embed_type=None,
        ),
        "convert_cosmos_transformer_checkpoint_to_diffusers",
    ),
    "wan_2.1": (
        "WAN21_T2V",
        WAN,
        "WanTransformer3DModel",
        dict(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=16,
            in_channels=16,
            out_channels=16,
            text_dim=24,
            freq_dim=16,
            ffn_dim=64,
            num_layers=1,
        ),
        "convert_wan_transformer_to_diffusers",
    ),
    "wan_2.2": (
        "WAN22_T2V",
        dict(WAN, in_dim=48, out_dim=48),
        "WanTransformer3DModel",
        dict(
            patch_size=(1, 2, 2),
            num_attention_heads=2,
            attention_head_dim=16,
            in_channels=48,
            out_channels=48,
            text_dim=24,
            freq_dim=16,
            ffn_dim=64,
            num_layers=1,
        ),
        "convert_wan_transformer_to_diffusers",
    ),
    "ltxv": (
        "LTXV",
        LTXV,
        "LTXVideoTransformer3DModel",
        dict(
            in_channels=16,
            out_channels=16,
            num_attention_heads=2,
            attention_head_dim=32,
            cross_attention_dim=64,
            num_layers=1,
            caption_channels=24,
        ),
        "convert_ltx_transformer_checkpoint_to_diffusers",
    ),
}


# diffusers' converters that write the full-size widths as constants; the reference runs them with the tiny ones
CONVERTER_WIDTHS = {
    "flux": [("inner_dim = 3072", f"inner_dim = {FLUX['hidden_size']}")],
    "hunyuan_video": [("hidden_size = 3072", f"hidden_size = {HUNYUAN_VIDEO['hidden_size']}")],
    "chroma": [("inner_dim = 3072", f"inner_dim = {CHROMA['hidden_size']}")],
    "lumina2": [
        ("q_dim = 2304", f"q_dim = {LUMINA2['dim']}"),
        ("k_dim = v_dim = 768", f"k_dim = v_dim = {LUMINA2['dim'] // LUMINA2['n_heads'] * LUMINA2['n_kv_heads']}"),
    ],
}


def diffusers_reference(native: dict, family: str, folder: Path) -> Path:
    _, _, diffusers_class, diffusers_config, converter = FAMILIES[family][:5]
    save_file({k: v.contiguous() for k, v in native.items()}, str(folder / "native.safetensors"))
    spec = dict(
        diffusers_class=diffusers_class,
        diffusers_config=diffusers_config,
        converter=converter,
        order=sorted(native),
        to_original=FAMILIES[family][5] if len(FAMILIES[family]) > 5 else [],
        converter_widths=CONVERTER_WIDTHS.get(family, []),
    )
    (folder / "spec.json").write_text(json.dumps(spec))
    assert REFERENCE_PYTHON.exists(), (
        f"{REFERENCE_PYTHON} is missing: ./dev makes the project's .venv (diffusers, "
        "peft), or set WAVEFT_REFERENCE_PYTHON"
    )
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    run = subprocess.run(
        [
            str(REFERENCE_PYTHON),
            str(ROOT / "tests" / "diffusers_reference.py"),
            str(folder / "spec.json"),
            str(folder / "native.safetensors"),
            str(folder),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    return folder


@pytest.mark.parametrize(
    "family", [pytest.param(f, marks=pytest.mark.host_feature("anima")) if f == "anima" else f for f in FAMILIES]
)
def test_diffusers_names_land_where_diffusers_keeps_them(pack, tmp_path, family):
    import comfy.supported_models as sm

    comfy_class, comfy_config = FAMILIES[family][:2]
    mp = patcher_for(getattr(sm, comfy_class), comfy_config)
    with torch.inference_mode():  # buffers ComfyUI leaves uninitialised (SD3's pos_embed on 0.8) compare as numbers
        for buffer in mp.model.diffusion_model.buffers():
            buffer.copy_(torch.nan_to_num(buffer, nan=0.0, posinf=0.0, neginf=0.0))
    leave_out = NOT_IN_DIFFUSERS_TRANSFORMER.get(family)
    native = {
        k[len("diffusion_model.") :]: v.detach().float().clone()
        for k, v in mp.model.state_dict().items()
        if k.startswith("diffusion_model.")
    }
    native = {k: v for k, v in native.items() if not (leave_out and k.startswith(leave_out))}
    out = diffusers_reference(native, family, tmp_path)
    targets = json.loads((out / "targets.json").read_text())
    merged, index = load_file(str(out / "merged.safetensors")), load_file(str(out / "index.safetensors"))

    adapter = pack.nodes.loader.load_adapter(str(out / "adapter" / "pytorch_lora_weights.safetensors"), mp, None)
    patched_model, _, summary = pack.nodes.loader.apply_adapter(adapter, mp, None, 1.0, 0.0, family)
    assert f"{len(targets)} of {len(targets)} layers matched" in summary, summary

    order = sorted(native)
    patched = patched_weights(patched_model, [f"diffusion_model.{k}" for k in order])
    flat = torch.cat([patched[f"diffusion_model.{k}"].double().flatten() for k in order])
    before = torch.cat([native[k].double().flatten() for k in order])
    changed = set()
    for key, want in merged.items():
        got = flat[index[key]]
        assert torch.allclose(got, want, atol=2e-5, rtol=0), (family, key, float((got - want).abs().max()))
        if not torch.equal(got, before[index[key]]):
            changed.add(key[: -len(".weight")])
    assert changed == set(targets)  # every layer of the file changed its own rows, and nothing else changed


@pytest.mark.host_feature("anima")
def test_anima_is_a_known_family_and_its_native_files_apply_exactly(pack, waveft_dir):
    import comfy.supported_models as sm

    import waveft_core as wft
    from waveft_core.convert.peft_io import peft_positions
    from waveft_core.names.families import family_of

    mp = patcher_for(sm.Anima, ANIMA)
    assert pack.nodes.train_loop.base_model_version(mp) == "anima"  # what Train/Save WaveFT write into the file
    state = mp.model.state_dict()
    names = [
        "diffusion_model.blocks.0.self_attn.q_proj",
        "diffusion_model.blocks.0.cross_attn.k_proj",
        "diffusion_model.blocks.0.mlp.layer1",
        "diffusion_model.llm_adapter.blocks.0.cross_attn.q_proj",
    ]
    g = torch.Generator().manual_seed(3)
    layers = {}
    for name in names:
        shape = tuple(state[name + ".weight"].shape)
        layers[name] = wft.Layer(
            spectrum=torch.randn(50, generator=g),
            shape=shape,
            wavelet="db2",
            indices=peft_positions(shape, 50, 4),
            scaling=2.0,
        )
    wft.save(
        wft.Adapter(
            layers=layers, metadata={"ss_base_model_version": "anima", "modelspec.architecture": "anima-preview/waveft"}
        ),
        waveft_dir / "anima.safetensors",
    )
    adapter = pack.nodes.loader.load_adapter(str(waveft_dir / "anima.safetensors"))
    assert family_of(adapter.metadata).comfy == ("Anima",)
    (out,) = pack.nodes.loader.WaveFTLoaderModelOnly().load(mp, "anima.safetensors", 0.7)["result"]
    keys = [n + ".weight" for n in names]
    before, after = patched_weights(mp, keys), patched_weights(out, keys)
    for name in names:
        want = before[name + ".weight"].double() + 0.7 * layers[name].delta(torch.float64)
        assert torch.allclose(after[name + ".weight"].double(), want, atol=1e-6, rtol=0), name


def test_a_layer_that_does_not_fit_its_rows_is_refused_naming_it_and_nothing_is_applied(pack):
    """A k projection the size of q (as the host's equal thirds assumed for Lumina 2) cannot be placed: the whole
    file is refused, naming the layer and both shapes, and the model stays unpatched."""
    import comfy.supported_models as sm

    import waveft_core as wft
    from waveft_core.convert.peft_io import peft_positions

    mp = patcher_for(sm.Lumina2, LUMINA2)
    width, kv_rows = LUMINA2["dim"], LUMINA2["dim"] // LUMINA2["n_heads"] * LUMINA2["n_kv_heads"]
    shapes = {"transformer.layers.0.attn.to_q": (width, width), "transformer.layers.0.attn.to_k": (width, width)}
    adapter = wft.Adapter(
        layers={
            name: wft.Layer(
                spectrum=torch.ones(10), shape=shape, wavelet="db1", indices=peft_positions(shape, 10, 1), scaling=1.0
            )
            for name, shape in shapes.items()
        }
    )
    with pytest.raises(
        ValueError,
        match=r"transformer\.layers\.0\.attn\.to_k: adapter \[96, 96\], model "
        rf"\[{kv_rows}, {width}\]",
    ):
        pack.nodes.loader.apply_adapter(adapter, mp, None, 1.0, 0.0, "lumina2 test")
    assert not mp.patches


def test_every_spelling_of_a_lumina2_name_the_host_lists_gets_the_grouped_rows(pack):
    """The host lists Z-Image's q/k/v names for Lumina 2 also as `transformer.…`, `diffusion_model.…` and `lycoris_…`,
    each with rows a third of the fused weight would have if k and v had q's heads: none of them may keep those."""
    import comfy.supported_models as sm

    from waveft_core.names.matching import resolve

    mp = patcher_for(sm.Lumina2, LUMINA2)
    kmap, shapes = pack.nodes.host.key_map(mp), pack.nodes.host.weight_shapes(mp)
    width, kv_rows = LUMINA2["dim"], LUMINA2["dim"] // LUMINA2["n_heads"] * LUMINA2["n_kv_heads"]
    key = "diffusion_model.layers.0.attention.qkv.weight"
    for name, rows in (
        ("layers.0.attention.to_k", (width, kv_rows)),
        ("layers.0.attention.to_v", (width + kv_rows, kv_rows)),
    ):
        for spelling in (name, f"transformer.{name}", f"diffusion_model.{name}", "lycoris_" + name.replace(".", "_")):
            assert kmap[spelling] == (key, (0, *rows)), spelling
            assert resolve(spelling, kmap, shapes.get).shape == (kv_rows, width), spelling  # as PEFT files are read
