"""Entry point called by the repo root's `scripts/waveft_webui.py` when A1111 or Forge loads the extension."""

from __future__ import annotations

import importlib
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
    """Hook WaveFT into the running webui's Lora code. Returns 'a1111', 'forge', 'reforge', 'forge-classic', or ''
    when nothing was hooked: the Lora extension is not loaded yet (then it retries once the UI is built), or this
    webui cannot apply WaveFT (then one console line says so, and its LoRA loading is left as it is). Never
    raises."""
    global _deferred
    from . import forge_hooks

    try:
        networks, network = _lora_modules()
        if networks is not None and hasattr(networks, "load_lora_for_models"):
            kind = _install_forge_family(networks, network)
            _check_dependencies()
            return kind
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
    except forge_hooks.UnsupportedWebui as e:
        log(str(e))
        return ""
    except Exception as e:
        log(
            f"could not hook into this webui's Lora code ({type(e).__name__}: {e}); WaveFT files will not load. "
            "Please report this with your webui version.\n" + traceback.format_exc()
        )
        return ""


def _install_forge_family(networks, network) -> str:
    """Forge (backend/), reForge or Forge Classic (ldm_patched/): whichever this webui is, by what it has."""
    from . import forge_hooks

    lora_backend = _import("backend.patcher.lora")
    if lora_backend is not None:
        forge_hooks.install(networks, network, lora_backend)
        return "forge"
    weight_adapter = _import("ldm_patched.modules.weight_adapter")
    if weight_adapter is not None and hasattr(weight_adapter, "WeightAdapterBase"):
        forge_hooks.install_reforge(networks, network, weight_adapter)
        return "reforge"
    model_patcher = _import("ldm_patched.modules.model_patcher")
    if model_patcher is not None:
        forge_hooks.install_forge_classic(networks, network, model_patcher)
        return "forge-classic"
    raise forge_hooks.UnsupportedWebui(
        "this webui's Lora code calls load_lora_for_models but it has neither "
        "backend.patcher.lora (Forge) nor ldm_patched (reForge, Forge Classic); "
        "WaveFT files cannot be applied, ordinary LoRAs are untouched"
    )


def _import(name: str):
    """The module, or None when it (or its package) does not exist in this webui."""
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as e:
        if e.name and (name == e.name or name.startswith(e.name + ".")):
            return None
        raise


def _check_dependencies():
    if importlib.util.find_spec("pywt") is None:
        log(
            "PyWavelets is not installed, so WaveFT files cannot be applied. Restart the webui (the extension's "
            "install.py installs it) or run: <webui python> -m pip install PyWavelets"
        )


def _retry():
    install(defer=False)
