"""A1111 / Forge companion of ComfyUI-WaveFT: native WaveFT files work with `<lora:name:weight>`.

The webui loads this package through the repo root's `scripts/waveft_webui.py` (see
`root_files/`); ComfyUI never imports it. Modules:

    keymap       pure name mapping: ComfyUI-native module names -> A1111 layer names / Forge parameter keys
    a1111_hooks  the A1111 built-in Lora extension: a module type, a loader for WaveFT files, SD version detection
    forge_hooks  Forge (backend/ era): a patch type for backend.patcher.lora and a loader for WaveFT files
    webui        install(): finds the host and hooks it in; never raises

Nothing here imports the webui at import time, so `keymap` is testable without a checkout.
"""
