"""Adapters as the real tools save them, read back exactly or refused loudly (issue: diffusers files,
transformers-5 names, CLIP-L vs CLIP-G).

A small SDXL-shaped model is built from configs with the real diffusers and transformers: a UNet with two
ResNets per level, CLIP-L as transformers 5 builds CLIPTextModel (no `text_model` wrapper) and CLIP-G as
CLIPTextModelWithProjection (with it). WaveFT adapters are put on them with the real PEFT, trained for two
steps so every spectrum is non-zero, saved the way each tool saves them, and read against a base given as an
SDXL single file in the original layout (OpenCLIP CLIP-G with fused q/k/v), a diffusers folder and a state
dict. Every layer's ΔW must equal PEFT's own get_delta_weight under its ComfyUI-native name."""

import json

import pytest
import torch
from reference import rel_err

import waveft_core as wft
from waveft_core.names.families import diffusers_unet_to_ldm

peft = pytest.importorskip("peft", reason="the real PEFT package is the reference")
diffusers = pytest.importorskip("diffusers", reason="the real diffusers package saves the adapters under test")
transformers = pytest.importorskip("transformers", reason="the real transformers package builds the text encoders")
from peft import WaveFTConfig, get_peft_model, get_peft_model_state_dict  # noqa: E402

ATTN = ["to_q", "to_k", "to_v", "to_out.0"]
CLIP_ATTN = ["q_proj", "k_proj", "v_proj", "out_proj"]


def _unet():
    torch.manual_seed(0)
    return diffusers.UNet2DConditionModel(
        sample_size=8,
        in_channels=4,
        out_channels=4,
        layers_per_block=2,
        block_out_channels=(32, 64),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=64,
        attention_head_dim=8,
        transformer_layers_per_block=(1, 2),
        addition_embed_type="text_time",
        addition_time_embed_dim=8,
        projection_class_embeddings_input_dim=80,
        use_linear_projection=True,
    )


def _clip(width, with_projection=False, layers=3):
    torch.manual_seed(1 + width)
    config = transformers.CLIPTextConfig(
        hidden_size=width,
        intermediate_size=2 * width,
        num_hidden_layers=layers,
        num_attention_heads=4,
        vocab_size=64,
        max_position_embeddings=8,
        projection_dim=width,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=1,
    )
    cls = transformers.CLIPTextModelWithProjection if with_projection else transformers.CLIPTextModel
    return cls(config).eval()


def _train_two_steps(model, loss_fn):
    params = [p for n, p in model.named_parameters() if "waveft_spectrum" in n]
    assert params
    opt = torch.optim.Adam(params, lr=1e-2)
    for _ in range(2):
        opt.zero_grad()
        loss_fn().backward()
        opt.step()
    assert all(float(p.abs().min()) > 0 for p in params), "a spectrum stayed zero"


def _unet_loss(unet):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(1, 4, 8, 8, generator=g)
    ctx = torch.randn(1, 5, 64, generator=g)
    cond = {"text_embeds": torch.randn(1, 32, generator=g), "time_ids": torch.randn(1, 6, generator=g)}
    return lambda: unet(x, 10, encoder_hidden_states=ctx, added_cond_kwargs=cond).sample.square().mean()


def _clip_loss(model):
    ids = torch.tensor([[0, 5, 9, 12, 1]])
    return lambda: model(input_ids=ids).last_hidden_state.square().mean()


def _clip_modules(model) -> dict:
    """PEFT-able module name (as the model names it) -> module."""
    return {n: m for n, m in model.named_modules() if n.endswith(tuple(CLIP_ATTN))}


@pytest.fixture(scope="module")
def models():
    return {"unet": _unet(), "clip_l": _clip(32), "clip_g": _clip(48, with_projection=True, layers=4)}


# --- the three base layouts ---------------------------------------------------------------------


def _openclip_g(state: dict, prefix: str) -> dict:
    """HF CLIPTextModelWithProjection weights -> the OpenCLIP layout SDXL single files keep CLIP-G in."""
    out = {}
    layers = sorted({int(k.split(".")[3]) for k in state if k.startswith("text_model.encoder.layers.")})
    for i in layers:
        hf = f"text_model.encoder.layers.{i}."
        oc = f"{prefix}transformer.resblocks.{i}."
        out[oc + "attn.in_proj_weight"] = torch.cat(
            [state[hf + f"self_attn.{p}.weight"] for p in ("q_proj", "k_proj", "v_proj")]
        )
        out[oc + "attn.in_proj_bias"] = torch.cat(
            [state[hf + f"self_attn.{p}.bias"] for p in ("q_proj", "k_proj", "v_proj")]
        )
        for hf_part, oc_part in (
            ("self_attn.out_proj", "attn.out_proj"),
            ("mlp.fc1", "mlp.c_fc"),
            ("mlp.fc2", "mlp.c_proj"),
            ("layer_norm1", "ln_1"),
            ("layer_norm2", "ln_2"),
        ):
            for kind in ("weight", "bias"):
                out[f"{oc}{oc_part}.{kind}"] = state[f"{hf}{hf_part}.{kind}"]
    out[prefix + "token_embedding.weight"] = state["text_model.embeddings.token_embedding.weight"]
    out[prefix + "text_projection"] = state["text_projection.weight"].T.contiguous()
    return out


def sdxl_single_file(models) -> dict:
    """An SDXL checkpoint in the original single-file layout, made from the diffusers/transformers models."""
    sd = {}
    for k, v in models["unet"].state_dict().items():
        ldm = diffusers_unet_to_ldm(k[: -len(".weight")]) if k.endswith(".weight") else None
        if ldm is not None:
            sd[f"model.diffusion_model.{ldm}.weight"] = v
    for k, v in models["clip_l"].state_dict().items():  # transformers 5 names: no text_model wrapper
        sd["conditioner.embedders.0.transformer." + ("text_model." + k if not k.startswith("text_model.") else k)] = v
    sd.update(_openclip_g(models["clip_g"].state_dict(), "conditioner.embedders.1.model."))
    return {k: v.detach().clone().contiguous() for k, v in sd.items()}


def diffusers_folder(models, root):
    """A diffusers pipeline folder with the three components (weights only: the reader needs no configs)."""
    from safetensors.torch import save_file

    for sub, model, fname in (
        ("unet", models["unet"], "diffusion_pytorch_model.safetensors"),
        ("text_encoder", models["clip_l"], "model.safetensors"),
        ("text_encoder_2", models["clip_g"], "model.safetensors"),
    ):
        (root / sub).mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}, str(root / sub / fname))
    (root / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionXLPipeline"}))
    return root


@pytest.fixture(scope="module")
def bases(models, tmp_path_factory):
    from safetensors.torch import save_file

    root = tmp_path_factory.mktemp("bases")
    single = sdxl_single_file(models)
    save_file(single, str(root / "sdxl_base.safetensors"))
    return {
        "single file": root / "sdxl_base.safetensors",
        "diffusers folder": diffusers_folder(models, root / "pipe"),
        "state dict": single,
    }


# --- adapters as each tool saves them -------------------------------------------------------------


def _native_unet(name: str) -> str:
    return "diffusion_model." + diffusers_unet_to_ldm(name)


def _native_clip(encoder: str, name: str) -> str:
    return f"text_encoders.{encoder}.transformer." + (
        name if name.startswith(("text_model.", "text_projection")) else "text_model." + name
    )


def _assert_equals_peft(ad, expected: dict):
    """expected: native name -> PEFT's get_delta_weight; every one present and equal, nothing else."""
    assert set(ad.layers) == set(expected), sorted(set(ad.layers) ^ set(expected))[:6]
    for native, delta in expected.items():
        layer = ad.layers[native]
        assert tuple(layer.shape) == tuple(delta.shape), native
        assert rel_err(layer.delta(torch.float64), delta.double()) < 1e-6, native


@pytest.fixture(scope="module")
def saved(models, tmp_path_factory):
    """Each form on disk, with the ΔW PEFT computes for every layer, by native name."""
    import copy

    root = tmp_path_factory.mktemp("adapters")
    out = {}

    # 1. the authors' way: get_peft_model on the UNet + save_pretrained (a PEFT folder)
    unet = copy.deepcopy(models["unet"])
    cfg = WaveFTConfig(n_frequency=60, scaling=12.0, wavelet_family="db2", random_loc_seed=5, target_modules=ATTN)
    pm = get_peft_model(unet, cfg)
    _train_two_steps(pm, _unet_loss(pm))
    pm.save_pretrained(root / "peft_unet")
    out["peft_unet"] = (
        root / "peft_unet",
        {
            _native_unet(n): m.get_delta_weight("default").detach()
            for n, m in pm.base_model.model.named_modules()
            if hasattr(m, "waveft_spectrum")
        },
    )

    # 2. diffusers: unet.add_adapter + save_lora_adapter (bare names, config in the file's metadata)
    unet = copy.deepcopy(models["unet"])
    unet.add_adapter(
        WaveFTConfig(n_frequency=70, scaling=8.0, wavelet_family="sym4", random_loc_seed=9, target_modules=ATTN)
    )
    _train_two_steps(unet, _unet_loss(unet))
    unet.save_lora_adapter(root / "diffusers_unet")
    unet_delta = {
        _native_unet(n): m.get_delta_weight("default").detach()
        for n, m in unet.named_modules()
        if hasattr(m, "waveft_spectrum")
    }
    out["diffusers_unet"] = (root / "diffusers_unet" / "pytorch_lora_weights.safetensors", unet_delta)

    # 3. text encoders with PEFT: CLIP-L as transformers 5 builds it (no text_model), CLIP-G with it
    te = {}
    for encoder, seed, wavelet in (("clip_l", 21, "sym4"), ("clip_g", 22, "sym4")):  # one wavelet as in one run
        model = copy.deepcopy(models[encoder])
        cfg = WaveFTConfig(
            n_frequency=40, scaling=4.0, wavelet_family=wavelet, random_loc_seed=seed, target_modules=CLIP_ATTN
        )
        pm = get_peft_model(model, cfg)
        _train_two_steps(pm, _clip_loss(pm))
        te[encoder] = (
            pm,
            cfg,
            {
                _native_clip(encoder, n): m.get_delta_weight("default").detach()
                for n, m in pm.base_model.model.named_modules()
                if hasattr(m, "waveft_spectrum")
            },
        )
    for encoder, sub in (("clip_l", "text_encoder"), ("clip_g", "text_encoder_2")):
        te[encoder][0].save_pretrained(root / "peft_te" / sub)  # a folder per component, as pipelines keep them
    out["peft_text_encoder_2"] = (root / "peft_te" / "text_encoder_2", te["clip_g"][2])
    out["peft_te_parent"] = (root / "peft_te", {**te["clip_l"][2], **te["clip_g"][2]})

    # 4. a pipeline's save_lora_weights: unet./text_encoder./text_encoder_2. prefixes, with and without configs
    layers = {
        "unet_lora_layers": get_peft_model_state_dict(unet),
        "text_encoder_lora_layers": get_peft_model_state_dict(te["clip_l"][0]),
        "text_encoder_2_lora_layers": get_peft_model_state_dict(te["clip_g"][0]),
    }
    everything = {**unet_delta, **te["clip_l"][2], **te["clip_g"][2]}
    diffusers.StableDiffusionXLPipeline.save_lora_weights(
        root / "pipe_with_configs",
        **layers,
        unet_lora_adapter_metadata=unet.peft_config["default"].to_dict(),
        text_encoder_lora_adapter_metadata=te["clip_l"][1].to_dict(),
        text_encoder_2_lora_adapter_metadata=te["clip_g"][1].to_dict(),
    )
    out["pipe_with_configs"] = (root / "pipe_with_configs" / "pytorch_lora_weights.safetensors", everything)
    diffusers.StableDiffusionXLPipeline.save_lora_weights(root / "pipe_bare", **layers)
    out["pipe_bare"] = (root / "pipe_bare" / "pytorch_lora_weights.safetensors", everything)
    out["settings"] = {"unet": unet.peft_config["default"], "clip_l": te["clip_l"][1], "clip_g": te["clip_g"][1]}
    return out


FORMS_WITH_SETTINGS = ["peft_unet", "diffusers_unet", "peft_text_encoder_2", "peft_te_parent", "pipe_with_configs"]


@pytest.mark.parametrize("base_kind", ["single file", "diffusers folder", "state dict"])
@pytest.mark.parametrize("form", FORMS_WITH_SETTINGS)
def test_every_form_equals_peft_against_every_base(saved, bases, form, base_kind):
    path, expected = saved[form]
    ad = wft.load(path, base=bases[base_kind])
    _assert_equals_peft(ad, expected)
    assert ad.base_model == "sdxl_base_v1-0"  # taken from the base, not asked for


def test_a_pipeline_file_without_configs_needs_the_settings_and_says_so(saved, bases):
    """save_lora_weights without *_lora_adapter_metadata stores no settings: PEFT's defaults are used and
    reported; the real settings given as overrides reproduce PEFT exactly, per component."""
    path, expected = saved["pipe_bare"]
    ad = wft.load(path, base=bases["single file"])
    assert "PEFT's defaults used" in ad.metadata["waveft.import_notes"]
    assert {layer.wavelet for layer in ad.layers.values()} == {"db1"}
    assert not any(rel_err(ad.layers[n].delta(torch.float64), d.double()) < 1e-3 for n, d in expected.items())
    # with CLIP-G's real settings given, CLIP-G's layers are PEFT's exactly
    cfg = saved["settings"]["clip_g"]
    got = wft.load(
        path,
        base=bases["single file"],
        overrides={
            "wavelet_family": cfg.wavelet_family,
            "scaling": cfg.scaling,
            "random_loc_seed": cfg.random_loc_seed,
        },
    )
    natives = [n for n in expected if ".clip_g." in n]
    assert natives
    for native in natives:
        assert rel_err(got.layers[native].delta(torch.float64), expected[native].double()) < 1e-6


def test_transformers_4_names_read_the_same(saved, bases, tmp_path):
    """transformers 4 wrote CLIPTextModel's PEFT names with `text_model.`; a key-layout copy of the transformers 5
    save must give the same adapter."""
    from safetensors.torch import load_file, save_file

    src = saved["peft_te_parent"][0] / "text_encoder"
    dst = tmp_path / "text_encoder"
    dst.mkdir()
    tensors = load_file(str(src / "adapter_model.safetensors"))
    renamed = {
        k.replace("base_model.model.encoder.", "base_model.model.text_model.encoder."): v for k, v in tensors.items()
    }
    assert renamed != tensors
    save_file(renamed, str(dst / "adapter_model.safetensors"))
    (dst / "adapter_config.json").write_text((src / "adapter_config.json").read_text())
    a = wft.load(src, base=bases["single file"])
    b = wft.load(dst, base=bases["single file"])
    assert set(a.layers) == set(b.layers) and all(".clip_l." in n for n in a.layers)
    assert all(torch.equal(a.layers[n].delta(), b.layers[n].delta()) for n in a.layers)


def test_clip_g_without_its_component_is_never_guessed(saved, bases, tmp_path):
    """The CLIP-G adapter copied into a folder whose name is no component. Here CLIP-L has 3 layers and CLIP-G 4:
    on layers 0-1 only, it fits both encoders and is refused with the way out, which then gives PEFT's ΔW;
    on all 4 layers only CLIP-G has them, so the shapes decide."""
    import shutil

    from safetensors.torch import load_file, save_file

    src = saved["peft_text_encoder_2"][0]
    anon = tmp_path / "my_adapter"
    anon.mkdir()
    tensors = {
        k: v
        for k, v in load_file(str(src / "adapter_model.safetensors")).items()
        if ".layers.0." in k or ".layers.1." in k
    }
    save_file(tensors, str(anon / "adapter_model.safetensors"))
    shutil.copy(src / "adapter_config.json", anon / "adapter_config.json")
    with pytest.raises(wft.WaveFTFileError, match=r"fit clip_l and clip_g alike.*clip='clip_g'"):
        wft.load(anon, base=bases["single file"])
    ad = wft.load(anon, base=bases["single file"], clip="clip_g")
    expected = {n: d for n, d in saved["peft_text_encoder_2"][1].items() if ".layers.0." in n or ".layers.1." in n}
    _assert_equals_peft(ad, expected)
    # all four layers: layer 3 exists only in CLIP-G, so the shapes decide
    whole = tmp_path / "whole"
    shutil.copytree(src, whole)
    _assert_equals_peft(wft.load(whole, base=bases["single file"]), saved["peft_text_encoder_2"][1])


def test_an_explicit_encoder_that_does_not_fit_fails_naming_the_layers(saved, bases):
    path, _ = saved["peft_text_encoder_2"]
    with pytest.raises(wft.WaveFTFileError, match=r"no weight in clip_l for 4 of 16"):
        wft.load(path, base=bases["single file"], clip="clip_l")


def test_multi_adapter_folders(models, bases, tmp_path):
    import copy

    model = copy.deepcopy(models["clip_l"])
    pm = get_peft_model(model, WaveFTConfig(n_frequency=30, random_loc_seed=1, target_modules=["q_proj"]))
    pm.add_adapter("other", WaveFTConfig(n_frequency=20, random_loc_seed=2, target_modules=["v_proj"]))
    pm.save_pretrained(tmp_path / "multi" / "text_encoder")
    pm.save_pretrained(tmp_path / "selected", selected_adapters=["other"])
    folder = tmp_path / "multi" / "text_encoder"
    default = wft.load(folder, base=bases["single file"])
    assert all(n.endswith("q_proj") for n in default.layers)
    assert "also holds the adapters other" in default.metadata["waveft.import_notes"]
    other = wft.load(folder, base=bases["single file"], adapter="other")
    assert all(n.endswith("v_proj") for n in other.layers) and len(other.layers) == 3
    with pytest.raises(wft.WaveFTFileError, match="no adapter named 'nope'.*default, other"):
        wft.load(folder, base=bases["single file"], adapter="nope")
    # a selected_adapters save has no adapter at its top: the one sub-folder is used, and the notes say so
    sel = wft.load(tmp_path / "selected", base=bases["single file"], clip="clip_l")
    assert "no adapter at its top; using the one in other/" in sel.metadata["waveft.import_notes"]


def test_a_folder_that_is_no_adapter_says_so_not_pass_base(tmp_path, bases):
    (tmp_path / "empty").mkdir()
    with pytest.raises(wft.WaveFTFileError, match="is not a WaveFT adapter") as e:
        wft.load(tmp_path / "empty", base=bases["single file"])
    assert "base" not in str(e.value)


# --- the command line ----------------------------------------------------------------------------


def _cli(*argv):
    from waveft_core.cli import main

    return main([str(a) for a in argv])


def test_cli_converts_a_diffusers_pipeline_file_exactly(saved, bases, tmp_path, capsys):
    path, expected = saved["pipe_with_configs"]
    out = tmp_path / "converted.safetensors"
    assert _cli("convert", path, out, "--base", bases["single file"]) == 0
    printed = capsys.readouterr().out
    assert "base model sdxl_base_v1-0" in printed
    ad = wft.load(out)
    _assert_equals_peft(ad, expected)
    assert ad.metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    # nothing is ever written over an input, nor over an existing file unless asked
    assert _cli("convert", path, out, "--base", bases["single file"]) == 1
    assert "exists" in capsys.readouterr().err
    assert _cli("convert", path, out, "--base", bases["single file"], "--overwrite") == 0
    assert _cli("convert", out, out, "--overwrite") == 1
    assert "is an input" in capsys.readouterr().err


def test_cli_info_shows_the_stored_settings_and_errors_speak_cli(saved, tmp_path, capsys):
    path, _ = saved["diffusers_unet"]
    assert _cli("info", path) == 0
    text = capsys.readouterr().out
    assert "wavelet sym4, scaling 8, seed 9" in text and "lora_adapter_metadata" in text and "--base" in text
    assert _cli("convert", path, tmp_path / "x.safetensors") == 1
    err = capsys.readouterr().err
    assert "--base <single-file checkpoint or diffusers folder>" in err and "base=" not in err
    bare, _ = saved["pipe_bare"]
    assert _cli("info", bare, "--wavelet", "db3") == 0
    text = capsys.readouterr().out
    assert "wavelet db3" in text and "PEFT defaults for scaling, random_loc_seed, use_idwt" in text


def test_cli_clip_choice_and_merge_refuses_what_does_not_fit(saved, bases, tmp_path, capsys):
    import shutil

    from safetensors.torch import load_file, save_file

    src = saved["peft_text_encoder_2"][0]
    anon = tmp_path / "anon"
    anon.mkdir()
    save_file(
        {k: v for k, v in load_file(str(src / "adapter_model.safetensors")).items() if ".layers.0." in k},
        str(anon / "adapter_model.safetensors"),
    )
    shutil.copy(src / "adapter_config.json", anon / "adapter_config.json")
    merged = tmp_path / "merged.safetensors"
    # merge: the checkpoint is the base; an adapter that fits both encoders is refused, nothing written
    assert _cli("merge", bases["single file"], anon, merged) == 1
    assert "--clip clip_l or --clip clip_g" in capsys.readouterr().err and not merged.exists()
    assert _cli("merge", bases["single file"], anon, merged, "--clip", "clip_g") == 0
    from safetensors.torch import load_file as lf

    before, after = lf(str(bases["single file"])), lf(str(merged))
    key = "conditioner.embedders.1.model.transformer.resblocks.0.attn.in_proj_weight"
    assert not torch.equal(before[key], after[key])
    clip_l_q = "conditioner.embedders.0.transformer.text_model.encoder.layers.0.self_attn.q_proj.weight"
    assert torch.equal(before[clip_l_q], after[clip_l_q])
    # and merge never writes over its checkpoint
    assert _cli("merge", bases["single file"], anon, bases["single file"], "--clip", "clip_g", "--overwrite") == 1
    assert "is an input" in capsys.readouterr().err


def test_cli_components_with_different_wavelets_convert_in_one_command(saved, bases, tmp_path, capsys):
    """A pipeline whose parts were trained with different wavelets (UNet db2, text encoder sym4) converts in one
    command: the native file keeps each layer's wavelet (format 2), and every layer equals PEFT's own ΔW."""
    import shutil

    parent = tmp_path / "mixed"
    shutil.copytree(saved["peft_te_parent"][0] / "text_encoder", parent / "text_encoder")
    shutil.copytree(saved["peft_unet"][0], parent / "unet")  # db2, the text encoders sym4
    out = tmp_path / "mixed.safetensors"
    assert _cli("convert", parent, out, "--base", bases["single file"]) == 0, capsys.readouterr().err
    ad = wft.load(out)
    clip_l = {k: v for k, v in saved["peft_te_parent"][1].items() if ".clip_l." in k}
    _assert_equals_peft(ad, {**saved["peft_unet"][1], **clip_l})
    assert {ad.layers[k].wavelet for k in saved["peft_unet"][1]} == {"db2"}
    assert {ad.layers[k].wavelet for k in clip_l} == {"sym4"}


def test_base_layouts_agree_on_every_weight(bases):
    """The three base forms name the same weights with the same shapes (CLIP-G's fused q/k/v split included),
    and a ComfyUI CLIP's own state-dict keys read the same."""
    from waveft_core.names.layouts import base_shapes

    single, folder, state = (base_shapes(bases[k]) for k in ("single file", "diffusers folder", "state dict"))
    wanted = {n for n in folder.shapes if n.endswith(("_proj", "to_q", "to_k", "to_v", "to_out.0"))}
    assert len(wanted) > 50
    for name in wanted:
        assert single.shape(name) == folder.shape(name) == state.shape(name), name
    assert single.encoders == folder.encoders == ("clip_l", "clip_g")
    comfy_clip = {
        k[len("text_encoders.") :] + ".weight": v for k, v in folder.shapes.items() if k.startswith("text_encoders.")
    }
    assert base_shapes(comfy_clip).shapes == {k: v for k, v in folder.shapes.items() if k.startswith("text_encoders.")}
