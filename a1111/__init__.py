"""A1111 / Forge-family companion of ComfyUI-WaveFT: native WaveFT files work with `<lora:name:weight>`.

The webui loads this package through the repo root's `scripts/waveft_webui.py`; ComfyUI never imports it.
Modules:

    keymap       pure name mapping: ComfyUI-native module names -> A1111 layer names / Forge parameter keys
    a1111_hooks  the A1111 built-in Lora extension: a module type, a loader for WaveFT files, SD version detection
    forge_hooks  the Forge family: Forge (backend/), reForge and Forge Classic (ldm_patched/): a patch for their
                 patchers and a loader for WaveFT files
    webui        install(): finds which webui this is and hooks only what it has; never raises

Nothing here imports the webui at import time, so `keymap` is testable without a checkout.
"""
