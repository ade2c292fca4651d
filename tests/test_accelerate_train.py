"""`waveft train` through the real accelerate, diffusers and transformers on a tiny pipeline folder made in code
(tests/tiny_pipeline.py): two processes (gloo, on the CPU) train what one process with twice the batch trains, a
run continued from a checkpoint retraces the uninterrupted one, and the output is the node's native file."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("accelerate", reason="the real accelerate runs the processes")
pytest.importorskip("diffusers", reason="the real diffusers gives the UNet, VAE and scheduler")

import tiny_pipeline  # noqa: E402

import waveft_core as wft  # noqa: E402
from waveft_core.convert.peft_io import peft_positions  # noqa: E402
from waveft_core.files import storage  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def train(*args, processes=1, check=True):
    """`python -m waveft_core train ...`, or under `accelerate launch` with several processes on the CPU."""
    if processes == 1:
        cmd = [sys.executable, "-m", "waveft_core", "train"]
    else:
        cmd = [
            str(Path(sys.executable).parent / "accelerate"),
            "launch",
            "--multi_gpu",
            "--num_processes",
            str(processes),
            "--num_machines",
            "1",
            "--mixed_precision",
            "no",
            "--dynamo_backend",
            "no",
            "--main_process_port",
            str(_free_port()),
            "-m",
            "waveft_core",
            "train",
        ]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    run = subprocess.run(cmd + [str(a) for a in args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=900)
    if check:
        assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    return run


@pytest.fixture(scope="module")
def sd1(tmp_path_factory):
    base = tmp_path_factory.mktemp("sd1")
    return tiny_pipeline.make_pipeline(base / "pipe"), tiny_pipeline.make_images(base / "data")


COMMON = ("--steps", 3, "--seed", 5, "--mixed-precision", "no", "--learning-rate", 1e-3, "--coefficients", 60)


def spectra(path):
    return {n: layer.spectrum for n, layer in wft.load(path).layers.items()}


def test_two_processes_train_what_one_process_with_twice_the_batch_trains(sd1, tmp_path):
    pipe, data = sd1
    two = tmp_path / "two.safetensors"
    one = tmp_path / "one.safetensors"
    run = train("--base", pipe, "--data", data, "--output", two, "--batch-size", 1, *COMMON, processes=2)
    assert run.stdout.count("saved ") == 1, run.stdout  # the main process alone writes
    train("--base", pipe, "--data", data, "--output", one, "--batch-size", 2, *COMMON)
    a, b = spectra(two), spectra(one)
    assert set(a) == set(b) and len(a) == 48  # 6 transformer blocks (2 down, 1 middle, 3 up) x 2 attentions x 4
    moved = max(float(s.abs().max()) for s in b.values())
    assert moved > 1e-4  # it trained
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-3, atol=1e-3 * moved), name
    md = wft.load(two).metadata
    settings = json.loads(md["waveft.training"])
    assert settings["processes"] == 2 and settings["batch_size"] == 2 and settings["steps_done"] == 3


def test_a_run_killed_after_a_checkpoint_resumes_to_the_same_result(sd1, tmp_path):
    """Two processes, killed (SIGKILL to the whole launch) once the step-2 checkpoint is on disk, then resumed from it:
    the same coefficients as a run that was never stopped (a constant learning rate: the schedule does not depend
    on where the run would have ended)."""
    import contextlib
    import signal
    import time

    import psutil

    pipe, data = sd1
    args = [
        "--base",
        pipe,
        "--data",
        data,
        "--batch-size",
        1,
        "--seed",
        2,
        "--mixed-precision",
        "no",
        "--learning-rate",
        1e-3,
        "--coefficients",
        60,
    ]
    whole = tmp_path / "whole.safetensors"
    train(*args, "--steps", 4, "--output", whole, processes=2)
    killed = tmp_path / "killed.safetensors"
    checkpoint = tmp_path / "killed_00002.safetensors"
    cmd = [
        str(Path(sys.executable).parent / "accelerate"),
        "launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(_free_port()),
        "-m",
        "waveft_core",
        "train",
        *map(str, args),
        "--steps",
        "100000",
        "--save-every",
        "2",
        "--output",
        str(killed),
    ]
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        env=dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT)),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    try:
        deadline = time.time() + 600
        while not checkpoint.exists() and time.time() < deadline and proc.poll() is None:
            time.sleep(0.05)
    finally:
        # the launcher and every worker: torchrun starts its workers in sessions of their own, so killing the
        # launcher's group alone would leave them training (and writing checkpoints) on
        family = []
        with contextlib.suppress(psutil.Error):  # a launcher that already exited has no workers left to find
            family = psutil.Process(proc.pid).children(recursive=True)
        os.killpg(proc.pid, signal.SIGKILL)
        for member in family:
            with contextlib.suppress(psutil.NoSuchProcess):
                member.kill()
        proc.wait()
        _, alive = psutil.wait_procs(family, timeout=60)
    assert not alive, alive
    assert checkpoint.exists() and not killed.exists()
    state_keys = [k for k in storage.read_header(checkpoint).tensors if k.startswith("waveft_train.")]
    assert state_keys, "the checkpoint holds the optimizer's moments"
    again = tmp_path / "again.safetensors"
    train(*args, "--steps", 4, "--output", again, "--resume", checkpoint, processes=2)
    a, b = spectra(whole), spectra(again)
    for name in a:
        assert torch.allclose(a[name], b[name], rtol=1e-5, atol=1e-8), name
    assert not any(k.startswith("waveft_train.") for k in storage.read_header(whole).tensors)


def test_the_output_is_the_nodes_file(sd1, tmp_path):
    pipe, data = sd1
    out = tmp_path / "out.safetensors"
    train(
        "--base",
        pipe,
        "--data",
        data,
        "--output",
        out,
        "--steps",
        2,
        "--seed",
        9,
        "--mixed-precision",
        "no",
        "--coefficients",
        50,
        "--caption",
        "sks toy",
    )
    adapter = wft.load(out)
    assert all(n.startswith("diffusion_model.") for n in adapter.layers)
    name = "diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q"  # down_blocks.0.attentions.0...
    layer = adapter.layers[name]
    assert torch.equal(layer.indices.long(), peft_positions(layer.shape, 50, 9).long())  # the node's positions rule
    md = adapter.metadata
    assert md["ss_base_model_version"] == "sd_1.5" and md["ss_steps"] == "2" and md["ss_num_train_images"] == "4"
    assert md["ss_resolution"] == "(16, 16)" and md["sshs_model_hash"]
    assert "sks toy" in json.loads(md["ss_tag_frequency"])["img"]  # the image without a caption file
    assert json.loads(md["waveft.training"])["trainer"] == "accelerate"


def test_sdxl_pipelines_train_with_both_encoders(tmp_path):
    pipe = tiny_pipeline.make_pipeline(tmp_path / "xl", xl=True)
    data = tiny_pipeline.make_images(tmp_path / "data", count=2)
    out = tmp_path / "xl.safetensors"
    train(
        "--base",
        pipe,
        "--data",
        data,
        "--output",
        out,
        "--steps",
        2,
        "--mixed-precision",
        "no",
        "--learning-rate",
        1e-3,
        "--coefficients",
        40,
    )
    adapter = wft.load(out)
    assert adapter.metadata["ss_base_model_version"] == "sdxl_base_v1-0"
    assert max(float(layer.spectrum.abs().max()) for layer in adapter.layers.values()) > 0


def test_refusals_name_the_input_and_write_nothing(sd1, tmp_path):
    pipe, data = sd1
    run = train(
        "--base",
        "someone/some-model",
        "--data",
        data,
        "--output",
        tmp_path / "x.safetensors",
        "--steps",
        1,
        check=False,
    )
    assert run.returncode == 1 and "someone/some-model" in run.stderr and "huggingface-cli download" in run.stderr
    existing = tmp_path / "exists.safetensors"
    existing.write_bytes(b"keep")
    run = train("--base", pipe, "--data", data, "--output", existing, "--steps", 1, check=False)
    assert run.returncode == 1 and "--overwrite" in run.stderr and existing.read_bytes() == b"keep"
    checkpoint = tmp_path / "run_00002.safetensors"
    checkpoint.write_bytes(b"checkpoint")
    run = train(
        "--base", pipe, "--data", data, "--output", checkpoint, "--steps", 4, "--resume", checkpoint, check=False
    )
    assert run.returncode == 1 and "is an input" in run.stderr and checkpoint.read_bytes() == b"checkpoint"
    run = train("--base", pipe, "--data", data, "--output", existing, "--steps", 4, "--resume", checkpoint, check=False)
    assert run.returncode == 1 and "--overwrite" in run.stderr and existing.read_bytes() == b"keep"
    run = train("--base", pipe, "--data", data, "--output", data, "--steps", 1, check=False)
    assert run.returncode == 1 and ".safetensors" in run.stderr
    assert not list(tmp_path.glob("x*"))
