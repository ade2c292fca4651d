"""The typed training settings (waveft_core/training/config.py): the defaults the node and `waveft train` offer,
a bad value refused with its setting's name, the one difference between the two front ends, the options parsed
into a config, and the record a file keeps of a run."""

import dataclasses
import json

import pytest

from waveft_core.cli import build_parser
from waveft_core.training.accelerate_train import config_from_args
from waveft_core.training.config import CLI_DEFAULTS, NODE_DEFAULTS, TrainConfig, TrainRecord


def test_the_defaults_are_the_papers_and_the_nodes():
    assert dataclasses.asdict(NODE_DEFAULTS) == {
        "steps": 500,
        "learning_rate": 1e-4,
        "batch_size": 1,
        "grad_accumulation_steps": 4,
        "n_coefficients": 2592,
        "scaling": 25.0,
        "wavelet": "db1",
        "targets": "attention q/k/v/out",
        "seed": 0,
        "optimizer": "AdamW",
        "lr_schedule": "constant",
        "warmup_steps": 0,
        "training_dtype": "bf16",
        "gradient_checkpointing": True,
        "save_every_n_steps": 0,
    }
    # `waveft train` differs in grad accumulation alone
    differ = {k for k, v in dataclasses.asdict(CLI_DEFAULTS).items() if getattr(NODE_DEFAULTS, k) != v}
    assert differ == {"grad_accumulation_steps"} and CLI_DEFAULTS.grad_accumulation_steps == 1


@pytest.mark.parametrize(
    "setting, value, message",
    [
        ("steps", 0, "steps must be at least 1"),
        ("batch_size", 0, "batch_size must be at least 1"),
        ("grad_accumulation_steps", -1, "grad_accumulation_steps must be at least 1"),
        ("n_coefficients", 0, "n_coefficients must be at least 1"),
        ("seed", -1, "seed must be at least 0"),
        ("warmup_steps", -2, "warmup_steps must be at least 0"),
        ("save_every_n_steps", -1, "save_every_n_steps must be at least 0"),
        ("steps", 2.5, "steps must be a whole number"),
        ("batch_size", True, "batch_size must be a whole number"),
        ("learning_rate", 0.0, "learning_rate must be a positive number"),
        ("learning_rate", float("nan"), "learning_rate must be a positive number"),
        ("scaling", -25.0, "scaling must be a positive number"),
        ("scaling", float("inf"), "scaling must be a positive number"),
        ("scaling", "25", "scaling must be a positive number"),
        ("wavelet", "haar2", "wavelet 'haar2' is not one of haar, db1, db2"),
        ("targets", "everything", "targets 'everything' is not one of attention q/k/v/out"),
        ("optimizer", "Lion", "optimizer 'Lion' is not one of AdamW, Adam, SGD, RMSprop"),
        ("lr_schedule", "step", "lr_schedule 'step' is not one of constant, cosine, linear"),
        ("training_dtype", "fp8", "training_dtype 'fp8' is not one of bf16, fp16, fp32"),
        ("gradient_checkpointing", "yes", "gradient_checkpointing must be true or false"),
    ],
)
def test_a_bad_value_is_refused_naming_its_setting(setting, value, message):
    with pytest.raises(ValueError) as caught:
        TrainConfig(**{setting: value})
    assert str(caught.value).startswith(message), caught.value
    # replace() checks too: a config is never made wrong after the fact
    with pytest.raises(ValueError, match=message.split(" ")[0]):
        dataclasses.replace(NODE_DEFAULTS, **{setting: value})


def test_a_config_is_frozen_and_typed():
    config = TrainConfig(learning_rate=1, scaling=25)
    assert isinstance(config.learning_rate, float) and isinstance(config.scaling, float)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.steps = 3
    assert TrainConfig.from_inputs({"steps": 7, "filename_prefix": "x", "resume_from": "none"}).steps == 7
    assert TrainConfig(training_dtype="fp32").mixed_precision == "no"
    assert TrainConfig(training_dtype="fp16").mixed_precision == "fp16"


def _train_args(*options):
    return build_parser().parse_args(["train", "--base", "b", "--data", "d", "--output", "o.safetensors", *options])


def test_the_train_commands_options_are_a_config():
    config = config_from_args(_train_args("--steps", "30"))
    assert config == dataclasses.replace(CLI_DEFAULTS, steps=30)
    config = config_from_args(
        _train_args(
            "--steps",
            "9",
            "--seed",
            "5",
            "--coefficients",
            "60",
            "--mixed-precision",
            "no",
            "--save-every",
            "3",
            "--no-gradient-checkpointing",
            "--wavelet",
            "db2",
            "--grad-accumulation-steps",
            "4",
        )
    )
    assert (config.steps, config.seed, config.n_coefficients, config.training_dtype) == (9, 5, 60, "fp32")
    assert (config.save_every_n_steps, config.gradient_checkpointing, config.wavelet) == (3, False, "db2")
    assert config.grad_accumulation_steps == 4
    with pytest.raises(ValueError, match="learning_rate must be a positive number"):
        config_from_args(_train_args("--steps", "3", "--learning-rate", "-1"))


def test_the_record_keeps_the_files_field_names():
    """`waveft.training` as files of both trainers have always spelled it (docs/FORMAT.md)."""
    config = TrainConfig(steps=3, batch_size=2, seed=4)
    record = TrainRecord(
        config,
        steps_total=8,
        dataset_size=5,
        resumed_from_step=5,
        started_at=1,
        resolution=[64, 96],
        base_checkpoint="base",
        wavelet="db1",
        n_coefficients=100,
        scaling=25.0,
    )
    node = record.as_dict()
    assert sorted(node) == sorted(
        "steps steps_total lr optimizer batch_size grad_accumulation_steps targets dataset_size seed lr_schedule "
        "warmup_steps training_dtype gradient_checkpointing wavelet n_coefficients scaling resumed_from_step "
        "started_at resolution base_checkpoint".split()
    )
    assert node["lr"] == 1e-4 and node["steps"] == 3 and node["batch_size"] == 2 and node["seed"] == 4
    accelerate = dataclasses.replace(record, processes=2, trainer="accelerate", finished_at=9).as_dict()
    assert set(accelerate) - set(node) == {"processes", "trainer", "finished_at"}
    assert accelerate["batch_size"] == 4  # over all processes
    json.dumps(accelerate)  # a plain JSON record
