"""`pip install .` gives the library and its `waveft` command, and nothing of the ComfyUI or webui glue."""
import os
import subprocess
import sys
import zipfile

import pytest
import torch

import waveft_core as wft

from reference import ROOT


@pytest.fixture(scope="module")
def installed(tmp_path_factory):
    """The wheel pip builds from this checkout, installed into a folder of its own."""
    pytest.importorskip("setuptools", reason="building the wheel needs setuptools")
    out = tmp_path_factory.mktemp("pip")
    build = subprocess.run([sys.executable, "-m", "pip", "wheel", str(ROOT), "--no-deps", "--no-build-isolation",
                            "-w", str(out / "wheel"), "-q"], capture_output=True, text=True, timeout=600)
    assert build.returncode == 0, build.stderr[-3000:]
    wheel = next((out / "wheel").glob("*.whl"))
    target = out / "site"
    install = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--target", str(target), "-q",
                              str(wheel)], capture_output=True, text=True, timeout=600)
    assert install.returncode == 0, install.stderr[-3000:]
    return wheel, target


def test_the_wheel_holds_the_library_only(installed):
    wheel, _ = installed
    names = zipfile.ZipFile(wheel).namelist()
    packages = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
    assert packages == {"waveft_core"}
    assert "waveft_core/storage.py" in names and not any(n.startswith(("nodes/", "a1111/", "tests/")) for n in names)
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "waveft = waveft_core.cli:main" in entry_points


def test_the_waveft_command_runs_from_the_installed_copy(installed, tmp_path):
    _, target = installed
    layer = wft.Layer(spectrum=torch.randn(20), indices=torch.arange(20), shape=(8, 10))
    path = wft.save(wft.Adapter(layers={"diffusion_model.x": layer}, metadata={"modelspec.title": "pip"}),
                    tmp_path / "a.safetensors")
    env = {**os.environ, "PYTHONPATH": str(target)}
    run = subprocess.run([sys.executable, str(target / "bin" / "waveft"), "info", str(path)], cwd=tmp_path, env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert "layers: 1" in run.stdout and "title: pip" in run.stdout
    where = subprocess.run([sys.executable, "-c", "import waveft_core; print(waveft_core.__file__)"], cwd=tmp_path,
                           env=env, capture_output=True, text=True, timeout=300)
    assert where.stdout.strip().startswith(str(target))
