"""`./dev`, the README's entry point, leaves a fresh checkout clean: whatever it writes (venv, host build logs)
lands in ignored places, so `git status` shows nothing new and the Registry package ships nothing stray."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from reference import ROOT


def _git(cwd, *args):
    return subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=True).stdout


def _fresh_checkout(dest: Path) -> Path:
    """The tracked files of this working tree, committed into a new repository (a clone, uncommitted edits included)."""
    tracked = _git(ROOT, "ls-files", "-z").split("\0")
    for name in filter(None, tracked):
        src = ROOT / name
        if src.is_file():
            (dest / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / name)
    _git(dest, "init", "-q")
    _git(dest, "add", "-A")
    _git(dest, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "fresh")
    return dest


def test_dev_hosts_leaves_a_fresh_checkout_clean(tmp_path):
    repo = _fresh_checkout(tmp_path / "ComfyUI-WaveFT")
    # A stand-in for ../shared/comfyui-host/setup.sh that only talks, as the real one does, on both streams.
    shared = tmp_path / "shared" / "comfyui-host"
    shared.mkdir(parents=True)
    (shared / "setup.sh").write_text('echo "building ComfyUI $COMFYUI_VERSION"; echo "pip noise" >&2\n')
    # A venv that `./dev` takes as set up, so the test costs no package installs.
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(repo / ".venv")], check=True)
    (repo / ".venv" / ".waveft-deps-ok").touch()
    env = {**os.environ, "HOME": str(tmp_path / "home"), "WAVEFT_SHARED": str(tmp_path / "shared")}
    env.pop("WAVEFT_VENV", None)
    run = subprocess.run(["./dev", "hosts"], cwd=repo, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    assert "ComfyUI 0.33.0 host ready" in run.stdout
    logs = sorted(p.name for p in (repo / ".venv" / "logs").iterdir())
    assert logs == ["host-0.33.0.log", "host-0.8.0.log"]
    assert "building ComfyUI 0.8.0" in (repo / ".venv" / "logs" / "host-0.8.0.log").read_text()
    assert _git(repo, "status", "--porcelain") == ""


def _repo_with_commit(dest: Path, subject: str) -> Path:
    (dest / "tools").mkdir(parents=True)
    shutil.copy2(ROOT / "tools" / "check_subjects.py", dest / "tools" / "check_subjects.py")
    _git(dest, "init", "-q")
    _git(dest, "add", "-A")
    _git(dest, "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", subject, "-m", "body")
    return dest


def test_a_commit_subject_longer_than_a_line_fails_the_check(tmp_path):
    check = [sys.executable, "tools/check_subjects.py"]
    short = _repo_with_commit(tmp_path / "short", "x" * 72)
    assert subprocess.run(check, cwd=short, capture_output=True, text=True).returncode == 0
    long = _repo_with_commit(tmp_path / "long", "y" * 73)
    run = subprocess.run(check, cwd=long, capture_output=True, text=True)
    assert run.returncode == 1
    assert "subject is 73 characters, more than 72" in run.stderr
