"""Entry point called by the repo root's `scripts/waveft_webui.py` when A1111 or Forge loads the extension."""
from __future__ import annotations

import importlib.util
import sys
import traceback

from .common import log

_deferred = False


def _lora_modules():
    networks = sys.modules.get("networks")
    network = sys.modules.get("network")
    return networks, network


def install(defer: bool = True) -> str:
    """Hook WaveFT into the running webui's Lora code. Returns 'a1111', 'forge', or '' when nothing was hooked
    (the Lora extension is not loaded yet: then it retries once the UI is built). Never raises."""
    global _deferred
    try:
        networks, network = _lora_modules()
        if networks is not None and hasattr(networks, "load_lora_for_models"):
            import backend.patcher.lora as lora_backend  # Forge's backend

            from . import forge_hooks

            forge_hooks.install(networks, network, lora_backend)
            _check_dependencies()
            return "forge"
        if networks is not None and network is not None and hasattr(networks, "module_types"):
            from . import a1111_hooks

            a1111_hooks.install(networks, network)
            _check_dependencies()
            return "a1111"
        if defer and not _deferred:
            try:
                from modules import script_callbacks

                script_callbacks.on_before_ui(_retry)
                _deferred = True
            except Exception:
                log("not running inside AUTOMATIC1111 or Forge; nothing to hook")
        elif not defer:
            log("the built-in Lora extension is not loaded (is it disabled?): WaveFT files cannot be used")
        return ""
    except Exception as e:
        log(f"could not hook into this webui's Lora code ({type(e).__name__}: {e}); WaveFT files will not load. "
            "Please report this with your webui version.\n" + traceback.format_exc())
        return ""


def _check_dependencies():
    if importlib.util.find_spec("pywt") is None:
        log("PyWavelets is not installed, so WaveFT files cannot be applied. Restart the webui (the extension's "
            "install.py installs it) or run: <webui python> -m pip install PyWavelets")


def _retry():
    install(defer=False)
