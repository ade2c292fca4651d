"""AUTOMATIC1111 / Forge entry point of ComfyUI-WaveFT: WaveFT files work with <lora:name:weight>.

A1111 and Forge import every .py file in <extension>/scripts/ (the extension is this whole repository, cloned into
extensions/); ComfyUI imports only the repository's __init__.py, so this file is inert there. The code is in a1111/,
loaded here as the package `waveft_a1111` so that its name cannot clash with another extension's modules.
"""

import importlib
import importlib.util
import os
import sys


def _waveft_webui():
    if "waveft_a1111" not in sys.modules:
        root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
        added = root not in sys.path
        if added:
            sys.path.insert(0, root)
        try:
            import waveft_core  # noqa: F401  (imported while the repository root is on sys.path)

            folder = os.path.join(root, "a1111")
            spec = importlib.util.spec_from_file_location(
                "waveft_a1111", os.path.join(folder, "__init__.py"), submodule_search_locations=[folder]
            )
            package = importlib.util.module_from_spec(spec)
            sys.modules["waveft_a1111"] = package
            try:
                spec.loader.exec_module(package)
            except BaseException:
                del sys.modules["waveft_a1111"]
                raise
        finally:
            if added:
                sys.path.remove(root)
    return importlib.import_module("waveft_a1111.webui")


_waveft_webui().install()
