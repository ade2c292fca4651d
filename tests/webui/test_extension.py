"""The extension as a webui meets it, without a checkout (never skipped): installing outside a webui is harmless,
the root entry script loads by path from a clone in extensions/, and install.py is quiet when nothing is missing."""

from __future__ import annotations

import os
import subprocess
import sys

from webui_fakes import (
    fake_clone,
)

from a1111 import webui


def test_webui_install_without_host_is_harmless(capsys):
    saved = {k: sys.modules.pop(k) for k in ("networks", "network") if k in sys.modules}
    try:
        assert webui.install(defer=False) == ""
        assert "Lora extension is not loaded" in capsys.readouterr().err
    finally:
        sys.modules.update(saved)


def test_root_entry_script_loads_outside_a_webui(tmp_path):
    ext = fake_clone(tmp_path)
    # as A1111 loads it: by path, as a module named after the file, with no repo root on sys.path
    code = (
        "import importlib.util, sys; p = sys.argv[1]; "
        "s = importlib.util.spec_from_file_location('waveft_webui.py', p); m = importlib.util.module_from_spec(s); "
        "s.loader.exec_module(m); import waveft_a1111.webui as w; print('loaded', w.__name__); "
        "assert all(not x.endswith('ComfyUI-WaveFT') for x in sys.path)"
    )
    r = subprocess.run(
        [sys.executable, "-c", code, str(ext / "scripts" / "waveft_webui.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert r.returncode == 0, r.stderr
    assert "loaded waveft_a1111.webui" in r.stdout
    assert "not running inside AUTOMATIC1111 or Forge" in r.stderr
    # install.py with every requirement present: nothing to do, says so, exits cleanly
    r = subprocess.run(
        [sys.executable, str(ext / "install.py")], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    assert r.returncode == 0 and "nothing installed" in r.stdout, r.stderr
    # run by a webui at every start (its root, launch.py beside modules/, on PYTHONPATH): not a word when done
    webui_root = tmp_path / "webui"
    (webui_root / "modules").mkdir(parents=True)
    (webui_root / "launch.py").write_text("")
    r = subprocess.run(
        [sys.executable, str(ext / "install.py")],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PYTHONPATH": str(webui_root)},
    )
    assert r.returncode == 0 and r.stdout == "", r.stdout + r.stderr
