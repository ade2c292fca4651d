"""The metadata other tools read (waveft_core/files/metadata.py), checked by reading saved files the way those tools
do (tests/manager_readers.py): kohya's hashes, trigger words where LoRA managers look, training details in
kohya's keys, base-model tags managers map."""

import json

import manager_readers as readers
import pytest
import torch

import waveft_core as wft
from waveft_core.convert import lora
from waveft_core.convert.peft_io import peft_positions
from waveft_core.files import metadata
from waveft_core.names.families import FAMILIES, family_of, family_tag_of_comfy
from waveft_core.training.config import TrainConfig, TrainRecord
from waveft_core.training.trainable import TrainableLayer, TrainingState

BIG = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q"
SMALL = "text_encoders.clip_l.transformer.text_model.encoder.layers.0.self_attn.q_proj"


def adapter(**meta):
    g = torch.Generator().manual_seed(0)
    layers = {}
    # 320k float32 coefficients: the file passes 0x110000 bytes, so the legacy hash reads real data
    for name, shape, n in ((BIG, (640, 640), 320_000), (SMALL, (32, 32), 100)):
        layers[name] = wft.Layer(
            spectrum=torch.randn(n, generator=g), indices=peft_positions(shape, n, 777), shape=shape, wavelet="db1"
        )
    return wft.Adapter(layers=layers, metadata={"ss_base_model_version": "sd_1.5", **meta})


def test_hashes_are_computed_as_kohya_computes_them(tmp_path):
    stale = {"sshs_model_hash": "0" * 64, "sshs_legacy_hash": "deadbeef", "modelspec.hash_sha256": "0x" + "1" * 64}
    path = wft.save(adapter(ss_steps="10", **stale), tmp_path / "a.safetensors")
    md = readers.metadata(path)
    assert path.stat().st_size > 0x110000
    assert md["sshs_model_hash"] == readers.addnet_hash(path)
    assert md["modelspec.hash_sha256"] == readers.modelspec_hash(path) == "0x" + md["sshs_model_hash"]
    assert md["sshs_legacy_hash"] == readers.kohya_legacy_hash(path)
    assert md["sshs_legacy_hash"] != "e3b0c442"  # the hash of no bytes: the slice was not empty
    # the Civitai id Lora-Manager derives from it
    assert readers.lora_manager_view(path)["autov3"] == md["sshs_model_hash"][:12]
    # metadata does not move the tensor data: a new title keeps the content hash, other spectra change it
    again = wft.save(adapter(**{"modelspec.title": "renamed"}), tmp_path / "b.safetensors")
    assert readers.metadata(again)["sshs_model_hash"] == md["sshs_model_hash"]
    other = adapter()
    other.layers[SMALL].spectrum[0] += 1
    assert readers.metadata(wft.save(other, tmp_path / "c.safetensors"))["sshs_model_hash"] != md["sshs_model_hash"]


def test_trigger_words_go_where_lora_managers_look(tmp_path):
    captions = metadata.tag_frequency(["sks cat, sitting", "sks cat, on grass", "a cat, sitting"])
    md = metadata.with_trigger_words(
        {"ss_tag_frequency": captions, "ss_num_train_images": "3"}, " sks cat ,photo of sks, sks cat"
    )
    path = wft.save(adapter(**md), tmp_path / "t.safetensors")
    view = readers.lora_manager_view(path)
    assert view["trained_words"][:2] == ["sks cat", "photo of sks"]  # first, as the most frequent
    assert set(view["trained_words"][2:]) == {"sitting", "on grass", "a cat"}  # the captions' tags kept
    assert view["class_tokens"] == "sks cat, photo of sks"
    saved = readers.metadata(path)
    assert saved["modelspec.trigger_phrase"] == "sks cat, photo of sks"
    counts = json.loads(saved["ss_tag_frequency"])["img"]
    assert counts["sitting"] == 2 and counts["sks cat"] == 3 and counts["photo of sks"] == 3
    # no words: nothing is touched
    assert metadata.with_trigger_words({"a": "b"}, " , ") == {"a": "b"}
    # a file without any dataset record gets one, with the words as its class tokens
    bare = metadata.with_trigger_words({}, "ohwx")
    assert json.loads(bare["ss_datasets"])[0]["subsets"][0]["class_tokens"] == "ohwx"
    assert json.loads(bare["ss_tag_frequency"]) == {"img": {"ohwx": 1}}


def test_a_training_run_carries_kohyas_keys(tmp_path):
    config = TrainConfig(
        steps=5,
        learning_rate=0.002,
        optimizer="AdamW",
        batch_size=2,
        grad_accumulation_steps=1,
        targets="attention q/k/v/out",
        seed=3,
        lr_schedule="cosine",
        warmup_steps=1,
        training_dtype="bf16",
        gradient_checkpointing=True,
        wavelet="db1",
        n_coefficients=50,
        scaling=25.0,
    )
    record = TrainRecord(
        config,
        steps_total=5,
        dataset_size=7,
        resumed_from_step=0,
        started_at=1700000000,
        finished_at=1700000100,
        resolution=[512, 768],
        base_checkpoint="v1-5.safetensors",
        wavelet="db1",
        n_coefficients=50,
        scaling=25.0,
    )
    state = TrainingState(
        {SMALL: TrainableLayer((32, 32), 50, "db1", 25.0, seed=3)},
        step=5,
        seed=3,
        record=record,
        metadata={"ss_base_model_version": "sd_1.5"},
    )
    path = state.save(tmp_path / "run.safetensors")
    md = readers.metadata(path)
    assert md["ss_steps"] == "5" and md["ss_max_train_steps"] == "5" and md["ss_learning_rate"] == "0.002"
    assert md["ss_num_train_images"] == "7" and md["ss_batch_size_per_device"] == "2"
    assert md["ss_resolution"] == "(512, 768)" and md["modelspec.resolution"] == "512x768"
    assert md["ss_training_started_at"] == "1700000000" and md["ss_training_finished_at"] == "1700000100"
    assert md["ss_sd_model_name"] == "v1-5.safetensors" and md["ss_mixed_precision"] == "bf16"
    assert md["ss_optimizer"] == "AdamW" and md["ss_lr_scheduler"] == "cosine" and md["ss_seed"] == "3"
    assert json.loads(md["ss_network_args"]) == {
        "wavelet": "db1",
        "n_coefficients": 50,
        "scaling": 25.0,
        "targets": "attention q/k/v/out",
    }
    dataset = json.loads(md["ss_datasets"])[0]
    assert dataset["num_train_images"] == 7 and dataset["resolution"] == [512, 768]
    assert json.loads(md["waveft.training"])["steps_done"] == 5  # this project's own record stays
    # a state without run settings (a plain file opened to continue) invents none
    assert "ss_steps" not in TrainingState.load(wft.save(adapter(), tmp_path / "p.safetensors")).adapter().metadata


def test_a_lora_export_keeps_the_trigger_words_and_gets_its_own_hash(tmp_path):
    md = metadata.with_trigger_words({}, "sks cat")
    src = adapter(**md)
    tensors, lora_md, _ = lora.to_lora(src, 2)
    path = lora.save_lora(tensors, lora_md, tmp_path / "l.safetensors")
    view = readers.lora_manager_view(path)
    assert view["trained_words"] == ["sks cat"] and view["class_tokens"] == "sks cat"
    saved = readers.metadata(path)
    assert saved["sshs_model_hash"] == readers.addnet_hash(path)
    assert saved["modelspec.hash_sha256"] == readers.modelspec_hash(path)
    assert saved["modelspec.architecture"] == "stable-diffusion-v1/lora"


@pytest.mark.parametrize("family", FAMILIES, ids=lambda f: f.tag)
def test_every_family_tag_reads_back_as_its_family(family):
    assert family_of({"ss_base_model_version": family.tag}) is family
    assert family_of({"modelspec.architecture": family.architecture + "/waveft"}) is family
    for comfy_class in family.comfy:
        assert family_tag_of_comfy(comfy_class) == family.tag


def test_tags_are_spelled_the_way_managers_map_them(tmp_path):
    base = {}
    for tag in ("sd_1.5", "sdxl_base_v1-0", "flux1"):
        layers = {SMALL: adapter().layers[SMALL]}
        path = wft.save(wft.Adapter(layers=layers, metadata={"ss_base_model_version": tag}), tmp_path / f"{tag}.st")
        base[tag] = readers.lora_manager_view(path)["base_model"]
    assert base == {"sd_1.5": "SD 1.5", "sdxl_base_v1-0": "SDXL 1.0", "flux1": "Flux.1 D"}
    # what other trainers wrote is still understood
    assert family_of({"ss_base_model_version": "sd_v1"}).tag == "sd_1.5"
    assert family_of({"ss_base_model_version": "flux2_klein_4b"}).tag == "flux2"
    assert family_of({"modelspec.architecture": "Flux.1-dev/lora"}).tag == "flux1"
    assert family_tag_of_comfy("Flux2") == "flux2" and family_tag_of_comfy("Flux") == "flux1"
