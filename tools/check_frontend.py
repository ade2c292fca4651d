"""Check the pack's frontend extension (web/waveft.js) in a real browser against a real ComfyUI: start the host
with the pack, open it in headless Chromium, add a WaveFT Info node, queue it, and read the status box the
extension adds; print what it found and save a screenshot.

    python tools/check_frontend.py --comfyui ~/comfyui-host-0.33.0/ComfyUI --screenshot docs/images/status.png

Needs Chromium and its driver (Debian: apt install chromium chromium-driver) and `pip install selenium` in the
Python running this script; the ComfyUI host runs with the venv beside its checkout (or --python). A
development check, not part of the test suite: CI machines have no browser."""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

ADD_NODE_AND_RUN = """
const done = arguments[arguments.length - 1];
(async () => {
  const app = window.app ?? window.comfyAPI?.app?.app;
  const LG = window.LiteGraph ?? window.comfyAPI?.litegraph?.LiteGraph;
  app.graph.clear();
  const node = LG.createNode("WaveFTInfo");
  node.pos = [360, 160];
  app.graph.add(node);
  node.widgets.find((w) => w.name === "waveft_name").value = arguments[0];
  app.canvas.ds.offset = [0, 0];
  app.canvas.ds.scale = 1;
  await app.queuePrompt(0, 1);
  const start = Date.now();
  while (Date.now() - start < 60000) {
    const box = node.widgets.find((w) => w.name === "waveft_status");
    if (box && box.value) {
      app.graph.setDirtyCanvas(true, true);
      return done({ok: true, text: box.value, size: node.size,
                   extensions: app.extensions.map((e) => e.name).filter((n) => n.includes("waveft"))});
    }
    await new Promise((r) => setTimeout(r, 250));
  }
  done({ok: false, widgets: node.widgets.map((w) => w.name)});
})().catch((e) => done({ok: false, error: String(e && e.stack || e)}));
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_comfyui(comfy: Path, python: str, base: Path, log: Path):
    port = free_port()
    proc = subprocess.Popen(
        [
            python,
            str(comfy / "main.py"),
            "--cpu",
            "--listen",
            "127.0.0.1",
            "--port",
            str(port),
            "--base-directory",
            str(base),
            "--disable-auto-launch",
        ],
        cwd=comfy,
        stdout=open(log, "w"),
        stderr=subprocess.STDOUT,
    )
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 180
    while time.time() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"ComfyUI exited early; see {log}")
        try:
            with urllib.request.urlopen(url + "/system_stats", timeout=5) as r:
                return proc, url, json.loads(r.read())["system"]["comfyui_version"]
        except OSError:
            time.sleep(0.5)
    proc.kill()
    raise SystemExit(f"ComfyUI did not come up; see {log}")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument(
        "--comfyui", default=os.environ.get("COMFYUI_PATH"), help="ComfyUI checkout (default: $COMFYUI_PATH)"
    )
    ap.add_argument("--python", help="Python that runs ComfyUI (default: the venv beside the checkout)")
    ap.add_argument("--screenshot", default="frontend_check.png", help="where to save the screenshot")
    args = ap.parse_args()
    if not args.comfyui:
        ap.error("--comfyui or COMFYUI_PATH is needed")
    comfy = Path(args.comfyui).expanduser().resolve()
    python = args.python or str(comfy.parent / "venv" / "bin" / "python")
    import torch
    from selenium import webdriver

    import waveft_core as wft
    from waveft_core.convert.peft_io import peft_positions
    from waveft_core.keys import DEFAULT_SEED, META_BASE_MODEL, META_TITLE, META_TRIGGER_PHRASE

    base = Path(tempfile.mkdtemp(prefix="waveft_frontend_"))
    for d in ("models/waveft", "custom_nodes", "input", "output", "user"):
        (base / d).mkdir(parents=True)
    (base / "custom_nodes" / "ComfyUI-WaveFT").symlink_to(ROOT, target_is_directory=True)
    layer = wft.Layer(spectrum=torch.randn(40), indices=peft_positions((32, 32), 40, DEFAULT_SEED), shape=(32, 32))
    wft.save(
        wft.Adapter(
            layers={"diffusion_model.input_blocks.1.1.proj_in": layer},
            metadata={
                META_BASE_MODEL: "sd_1.5",
                META_TITLE: "frontend check",
                META_TRIGGER_PHRASE: "sks",
            },
        ),
        base / "models/waveft/check.safetensors",
    )
    proc, url, version = start_comfyui(comfy, python, base, base / "comfyui.log")
    options = webdriver.ChromeOptions()
    for flag in ("--headless=new", "--no-sandbox", "--disable-gpu", "--window-size=1280,800"):
        options.add_argument(flag)
    options.set_capability("goog:loggingPrefs", {"browser": "ALL"})
    if shutil.which("chromium"):
        options.binary_location = shutil.which("chromium")
    # the system's driver: Selenium's own manager would try to download one
    service = (
        webdriver.ChromeService(executable_path=shutil.which("chromedriver")) if shutil.which("chromedriver") else None
    )
    driver = webdriver.Chrome(options=options, service=service)
    try:
        driver.set_script_timeout(90)
        driver.get(url)
        deadline = time.time() + 120
        while time.time() < deadline and not driver.execute_script(
            "return !!((window.app ?? window.comfyAPI?.app?.app)?.graph && window.LiteGraph)"
        ):
            time.sleep(0.5)
        time.sleep(2)  # let the frontend finish registering extensions and node definitions
        from selenium.webdriver.common.by import By
        from selenium.webdriver.common.keys import Keys

        driver.find_element(By.TAG_NAME, "body").send_keys(Keys.ESCAPE)  # the first-start templates dialog
        time.sleep(1)
        result = driver.execute_async_script(ADD_NODE_AND_RUN, "check.safetensors")
        time.sleep(1)
        driver.save_screenshot(args.screenshot)
        errors = [
            e["message"]
            for e in driver.get_log("browser")
            if e["level"] == "SEVERE" and "waveft" in e["message"].lower()
        ]
        frontend = driver.execute_script("return window.__COMFYUI_FRONTEND_VERSION__ ?? null")
    finally:
        driver.quit()
        proc.terminate()
        proc.wait(30)
    print(json.dumps({"comfyui": version, "frontend": frontend, **result, "waveft_console_errors": errors}, indent=1))
    print(f"screenshot: {os.path.abspath(args.screenshot)}")
    shutil.rmtree(base, ignore_errors=True)
    return 0 if result.get("ok") and not errors else 1


if __name__ == "__main__":
    sys.exit(main())
