"""`pip install .` gives the library and its `waveft` command, and nothing of the ComfyUI or webui glue."""

import os
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from reference import ROOT

import waveft_core as wft


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel pip builds from this checkout, installed into a folder of its own."""
    pytest.importorskip("setuptools", reason="building the wheel needs setuptools")
    out = tmp_path_factory.mktemp("pip")
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            str(ROOT),
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out / "wheel"),
            "-q",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = next((out / "wheel").glob("*.whl"))
    target = out / "site"
    install = subprocess.run(
        [sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), "-q", str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert install.returncode == 0, install.stderr[-3000:]
    return wheel, target


def test_the_wheel_holds_the_library_only(installed):
    wheel, _ = installed
    names = zipfile.ZipFile(wheel).namelist()
    packages = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert packages == {"waveft_core"}
    assert "waveft_core/files/storage.py" in names and not any(
        n.startswith(("nodes/", "a1111/", "tests/")) for n in names
    )
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "waveft = waveft_core.cli:main" in entry_points


def test_the_waveft_command_runs_from_the_installed_copy(installed, tmp_path):
    _, target = installed
    layer = wft.Layer(spectrum=torch.randn(20), indices=torch.arange(20), shape=(8, 10))
    path = wft.save(
        wft.Adapter(layers={"diffusion_model.x": layer}, metadata={"modelspec.title": "pip"}),
        tmp_path / "a.safetensors",
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    run = subprocess.run(
        [sys.executable, str(target / "bin" / "waveft"), "info", str(path)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert run.returncode == 0, run.stderr
    assert "layers: 1" in run.stdout and "title: pip" in run.stdout
    where = subprocess.run(
        [sys.executable, "-c", "import waveft_core; print(waveft_core.__file__)"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert where.stdout.strip().startswith(str(target))


SHIPPED_TOP = {
    "__init__.py",
    "pyproject.toml",
    "requirements.txt",
    "README.md",
    "LICENSE",
    "nodes",
    "waveft_core",
    "web",
    "workflows",
    "docs",
}
FLAGGED = ("subprocess", "urllib", "requests", "socket", "http.client", "httpx", "os.system", "os.popen")


def _comfy_cli():
    import shutil

    exe = shutil.which("comfy") or str(Path(sys.executable).parent / "comfy")
    if not Path(exe).exists():
        (pytest.fail if os.environ.get("CI") else pytest.skip)(
            "comfy-cli is not installed (requirements-dev.txt has it; ./dev installs it)"
        )
    return exe


def test_the_registry_package_is_what_runs_in_comfyui_and_nothing_flagged(tmp_path):
    """Built as the Registry tooling builds it (comfy-cli's `node validate` and `node pack`: git-tracked files less
    .comfyignore): ComfyUI's part only, no development folders, and no shipped Python that starts a process or
    opens a connection (what the Registry's scanner flags)."""
    comfy = _comfy_cli()
    copy = tmp_path / "ComfyUI-WaveFT"
    files = subprocess.run(
        ["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout.split()
    for name in files:
        if (ROOT / name).is_file():
            (copy / name).parent.mkdir(parents=True, exist_ok=True)
            (copy / name).write_bytes((ROOT / name).read_bytes())
    git = {"GIT_AUTHOR_NAME": "t", "GIT_AUTHOR_EMAIL": "t@t", "GIT_COMMITTER_NAME": "t", "GIT_COMMITTER_EMAIL": "t@t"}
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"], ["git", "commit", "-qm", "pack"]):
        subprocess.run(cmd, cwd=copy, check=True, env={**os.environ, **git}, capture_output=True)
    for args in (["node", "validate"], ["node", "pack"]):
        run = subprocess.run([comfy, "--skip-prompt", *args], cwd=copy, capture_output=True, text=True, timeout=300)
        assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    names = zipfile.ZipFile(copy / "node.zip").namelist()
    tops = {n.split("/")[0] for n in names if n.strip("/")}
    assert tops <= SHIPPED_TOP, sorted(tops - SHIPPED_TOP)
    assert {"__init__.py", "pyproject.toml", "nodes", "waveft_core", "web", "workflows"} <= tops
    assert "docs/images/icon.png" in names and "requirements.txt" in names
    for name in names:
        if name.endswith(".py"):
            text = zipfile.ZipFile(copy / "node.zip").read(name).decode("utf-8")
            for word in FLAGGED:
                assert f"import {word}" not in text and f"from {word}" not in text and f"{word}(" not in text, (
                    f"{name} uses {word}"
                )
