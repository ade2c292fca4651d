"""benchmarks/gpu_check.py end to end on the CPU (--device cpu --quick): the script a GPU machine runs in one
call must work here first. It writes one report whose every section passed."""

import json
import os
import subprocess
import sys

import pytest
from conftest import COMFY, ROOT


@pytest.mark.host_feature("dynamic_vram")  # it checks the ComfyUI with dynamic VRAM (0.33), as a GPU machine runs
def test_gpu_check_runs_end_to_end_on_cpu(tmp_path):
    out = tmp_path / "report"
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu_check.py"), "--device", "cpu", "--quick", "--out", str(out)],
        env={**os.environ, "COMFYUI_PATH": COMFY},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    report = json.loads((out / "gpu_check.json").read_text())
    assert report["ok"] and report["device"] == "cpu"
    exact = report["exactness"]
    assert len(exact) == 3 * 2 * 2 * 2 and all(r["ok"] for r in exact)  # wavelets x layers x dtypes x (merge, bypass)
    assert {r["check"] for r in exact} == {"merge", "bypass"}
    (run,) = report["benchmarks"]["runs"]
    for row in run["merge"] + run["bypass"] + report["benchmarks"]["merge_on_load"]:
        assert row["waveft"]["min"] > 0 and row["lora"]["min"] > 0
    assert report["txt2img"]["ok"] and report["txt2img"]["mean_pixel_difference"] > 0.5
    training = report["dit_training"]
    assert training["ok"] and training["layers"] > 0 and training["coefficient_change"] > 0
    text = (out / "gpu_check.txt").read_text()
    assert "all checks passed" in text and "Bypass h(x)" in text
