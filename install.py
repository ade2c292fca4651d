"""Installs what ComfyUI-WaveFT needs into the Python that runs it. Idempotent; never touches torch.

Run by ComfyUI-Manager after it clones the pack, and by AUTOMATIC1111 and the Forge family when the extension is
installed and again at every start (as a script, with the webui's root on PYTHONPATH; they print what it prints).
Only packages that are missing (or too old) are installed, from requirements.txt; the host's torch stays. Run by a
webui it says nothing when there is nothing to do, so a normal start prints no line of ours."""

import importlib.metadata
import os
import re
import subprocess
import sys

HERE = os.path.dirname(os.path.abspath(__file__))


def _requirements():
    with open(os.path.join(HERE, "requirements.txt"), encoding="utf-8") as f:
        for line in f:
            line = line.split("#", 1)[0].strip()
            if line:
                yield line


def _missing(requirement: str) -> bool:
    m = re.match(r"\s*([A-Za-z0-9_.\-]+)\s*(?:>=\s*([\d.]+))?", requirement)
    name, minimum = m.group(1), m.group(2)
    try:
        installed = importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return True
    if minimum:
        want = tuple(int(x) for x in re.findall(r"\d+", minimum)[:3])
        have = tuple(int(x) for x in re.findall(r"\d+", installed)[:3])
        return have < want
    return False


def main(quiet_when_done: bool = False) -> int:
    todo = [r for r in _requirements() if not r.lower().startswith("torch") and _missing(r)]
    if not todo:
        if not quiet_when_done:
            print("[ComfyUI-WaveFT] requirements already satisfied; nothing installed")
        return 0
    print(f"[ComfyUI-WaveFT] installing {', '.join(todo)} into {sys.executable}")
    try:
        import launch  # AUTOMATIC1111 / Forge: their pip wrapper honours --skip-install

        if hasattr(launch, "run_pip"):
            launch.run_pip("install " + " ".join(f'"{r}"' for r in todo), "requirements for ComfyUI-WaveFT")
            return 0
    except ImportError:
        pass
    result = subprocess.run([sys.executable, "-m", "pip", "install", *todo])
    if result.returncode != 0:
        print(
            f"[ComfyUI-WaveFT] pip failed ({result.returncode}); install by hand: "
            f"{sys.executable} -m pip install {' '.join(todo)}",
            file=sys.stderr,
        )
    return result.returncode


def _run_by_webui() -> bool:
    """A1111 and the Forge family run this file with their root (launch.py beside modules/) on PYTHONPATH."""
    for entry in os.environ.get("PYTHONPATH", "").split(os.pathsep):
        if entry and os.path.isfile(os.path.join(entry, "launch.py")) and os.path.isdir(os.path.join(entry, "modules")):
            return True
    return False


if __name__ == "__main__":
    sys.exit(main(quiet_when_done=_run_by_webui()))
else:  # some hosts import it instead of running it
    main(quiet_when_done=True)
