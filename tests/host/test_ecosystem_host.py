"""Save WaveFT for the tools users combine with it, in a real ComfyUI (in-process, tiny SD1.5): a trained and
saved file shows its trigger words, hash and training details the way LoRA managers read them, and a file
saved into models/loras loads through the stock Load LoRA nodes and a stack of them."""

import base64
import io
import json
import os
import subprocess
from pathlib import Path

import manager_readers as readers
import pytest
import torch
from host_tools import patched_weights, tiny_lora, train_inputs
from test_loader_host import CLIP_LAYERS, UNET_LAYERS, make_adapter, state_key
from test_train_host import SETTINGS

import waveft_core as wft


def save(pack, adapter, prefix, **kw):
    inputs = dict(title="", trigger_words="", description="")
    inputs.update(kw)
    return pack.nodes.train_nodes.WaveFTSave().save(adapter, prefix, **inputs)


def test_a_trained_file_shows_what_lora_managers_read(pack, checkpoint_state, loras_dir, tmp_path):
    import comfy.sd
    from safetensors.torch import save_file

    ckpt = tmp_path / "tiny_sd15.safetensors"
    save_file(checkpoint_state, str(ckpt))
    with torch.inference_mode():
        model, clip, _, _ = comfy.sd.load_checkpoint_guess_config(str(ckpt))
    cond = clip.encode_from_tokens_scheduled(clip.tokenize("a photo of sks cat"))
    latents = {"samples": torch.randn(1, 4, 8, 12, generator=torch.Generator().manual_seed(2))}
    kw = {"steps": 4, "filename_prefix": "eco"}
    with torch.inference_mode():
        _, adapter, *_ = pack.nodes.train_nodes.WaveFTTrain().train(
            [model], [latents], [cond], captions=["a cat, sitting"], **train_inputs(**{**SETTINGS, **kw})
        )
    picture = torch.rand(1, 512, 384, 3, generator=torch.Generator().manual_seed(0))
    out = save(
        pack,
        adapter,
        "people/sks",
        title="Sks cat",
        trigger_words="sks cat, photo of sks",
        save_to="loras",
        author="Ada",
        license="CreativeML Open RAIL-M",
        thumbnail=picture,
    )
    assert out["result"][0] == "loras/people/sks.safetensors" and out["ui"]["text"] == [
        "saved models/loras/people/sks.safetensors"
    ]
    path = loras_dir / "people" / "sks.safetensors"
    view = readers.lora_manager_view(path)
    assert view["trained_words"][:2] == ["sks cat", "photo of sks"] and view["class_tokens"] == "sks cat, photo of sks"
    assert view["base_model"] == "SD 1.5"
    md = readers.metadata(path)
    assert md["sshs_model_hash"] == readers.addnet_hash(path) and view["autov3"] == md["sshs_model_hash"][:12]
    assert md["modelspec.hash_sha256"] == readers.modelspec_hash(path)
    assert md["sshs_legacy_hash"] == readers.kohya_legacy_hash(path)
    # the run's details, in kohya's keys; a 8x12 latent of SD1.5 is a 96x64 picture
    assert md["ss_steps"] == "4" and md["ss_learning_rate"] == str(SETTINGS["learning_rate"])
    assert md["ss_num_train_images"] == "1" and md["ss_resolution"] == "(96, 64)"
    assert md["modelspec.resolution"] == "96x64" and md["ss_output_name"] == "sks"
    assert int(md["ss_training_started_at"]) <= int(md["ss_training_finished_at"])
    if getattr(model, "cached_patcher_init", None):  # where the host records the checkpoint's file
        assert md["ss_sd_model_name"] == "tiny_sd15.safetensors"
    assert md["modelspec.author"] == "Ada" and md["modelspec.license"] == "CreativeML Open RAIL-M"
    assert md["modelspec.title"] == "Sks cat" and md["modelspec.architecture"] == "stable-diffusion-v1/waveft"
    # the preview: a PNG data URI, scaled to 256 pixels on its long side
    from PIL import Image

    head, data = md["modelspec.thumbnail"].split(",", 1)
    assert head == "data:image/png;base64"
    thumb = Image.open(io.BytesIO(base64.b64decode(data)))
    assert thumb.format == "PNG" and thumb.size == (192, 256)
    # Load WaveFT lists it among the LoRAs, and it holds the trained layers
    assert "loras/people/sks.safetensors" in pack.nodes.loader.list_adapters()
    assert set(wft.load(path).layers) == set(adapter.layers)
    assert json.loads(md["waveft.training"])["steps_done"] == 4


def test_a_file_saved_into_loras_loads_through_the_stock_lora_loaders(pack, sd15, checkpoint_state, loras_dir):
    """Load LoRA, Load LoRA (model only) and a stack of Load LoRA nodes give what Load WaveFT gives."""
    import nodes

    model, clip, _ = sd15
    adapter = make_adapter(model, clip, "db3", seed=4)
    name = save(pack, adapter, "mine", save_to="loras")["result"][0]
    assert name == "loras/mine.safetensors" and (loras_dir / "mine.safetensors").is_file()
    assert "mine.safetensors" in nodes.folder_paths.get_filename_list("loras")  # what the stock node offers
    unet = [state_key(n) for n in UNET_LAYERS]
    te = [state_key(n) for n in CLIP_LAYERS]
    base = patched_weights(model, unet)
    ours_m, ours_c = pack.nodes.loader.WaveFTLoader().load(model, clip, name, 0.7, 0.4)["result"]
    want_m, want_c = patched_weights(ours_m, unet), patched_weights(ours_c.patcher, te)
    assert all(not torch.equal(want_m[k], base[k]) for k in unet)  # the adapter changes every layer it names

    stock_m, stock_c = nodes.LoraLoader().load_lora(model, clip, "mine.safetensors", 0.7, 0.4)
    got_m, got_c = patched_weights(stock_m, unet), patched_weights(stock_c.patcher, te)
    assert all(torch.equal(got_m[k], want_m[k]) for k in unet)
    assert all(torch.equal(got_c[k], want_c[k]) for k in te)

    (only,) = nodes.LoraLoaderModelOnly().load_lora_model_only(model, "mine.safetensors", 0.7)
    got = patched_weights(only, unet)
    assert all(torch.equal(got[k], want_m[k]) for k in unet)

    # a stack: our file, then an ordinary LoRA on the same model, each through a Load LoRA node
    from safetensors.torch import save_file

    save_file(tiny_lora(checkpoint_state), str(loras_dir / "plain.safetensors"))
    nodes.folder_paths.filename_list_cache.clear()
    m1, c1 = nodes.LoraLoader().load_lora(model, clip, "mine.safetensors", 0.7, 0.4)
    m2, _ = nodes.LoraLoader().load_lora(m1, c1, "plain.safetensors", 0.5, 0.0)
    plain_only, _ = nodes.LoraLoader().load_lora(model, clip, "plain.safetensors", 0.5, 0.0)
    stacked, plain = patched_weights(m2, unet), patched_weights(plain_only, unet)
    for k in unet:
        assert torch.allclose(stacked[k], want_m[k] + (plain[k] - base[k]), atol=1e-5), k


def test_a_file_from_waveft_train_loads_through_the_node(pack, tmp_path):
    """`waveft train` (accelerate, diffusers: run with the project's .venv, which has them) on a pipeline whose UNet
    is the tiny ComfyUI one in diffusers' layout: Load WaveFT applies every layer of its file to the ComfyUI model."""
    import comfy.sd
    import folder_paths
    from tiny_models import TWO_RES_UNET_CONFIG, make_checkpoint_state

    root = Path(__file__).resolve().parents[2]
    python = root / ".venv" / "bin" / "python"
    if not python.exists():
        pytest.skip("needs the project's .venv (./dev makes it) for diffusers and accelerate")
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    subprocess.run(
        [str(python), str(root / "tests" / "tiny_pipeline.py"), str(tmp_path), "--comfy-tiny"],
        check=True,
        env=env,
        timeout=600,
        capture_output=True,
    )
    out = tmp_path / "waveft" / "trained.safetensors"
    run = subprocess.run(
        [
            str(python),
            "-m",
            "waveft_core",
            "train",
            "--base",
            str(tmp_path / "pipe"),
            "--data",
            str(tmp_path / "data"),
            "--output",
            str(out),
            "--steps",
            "2",
            "--mixed-precision",
            "no",
            "--learning-rate",
            "1e-3",
            "--coefficients",
            "300",
        ],
        cwd=root,
        env=env,
        timeout=900,
        capture_output=True,
        text=True,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    adapter = wft.load(out)
    assert len(adapter.layers) == 48
    paths, exts = folder_paths.folder_names_and_paths["waveft"]
    folder_paths.folder_names_and_paths["waveft"] = ([str(out.parent)] + list(paths), exts)
    folder_paths.filename_list_cache.clear()
    try:
        with torch.inference_mode():
            model, clip, _, _ = comfy.sd.load_state_dict_guess_config(
                make_checkpoint_state(unet_config=TWO_RES_UNET_CONFIG)
            )
        result = pack.nodes.loader.WaveFTLoader().load(model, clip, "trained.safetensors", 1.0, 1.0)
    finally:
        folder_paths.folder_names_and_paths["waveft"] = (paths, exts)
        folder_paths.filename_list_cache.clear()
    assert "48/48" in result["ui"]["text"][0] or "48 of 48" in result["ui"]["text"][0], result["ui"]["text"][0]
    patched, _ = result["result"]
    keys = [f"{name}.weight" for name in adapter.layers]
    base = patched_weights(model, keys)
    got = patched_weights(patched, keys)
    for name in adapter.layers:
        k = f"{name}.weight"
        assert torch.allclose(got[k], base[k] + adapter.layers[name].delta(), atol=1e-5), name
