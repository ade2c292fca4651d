"""Helpers shared by the A1111 and Forge hooks: console messages, a small adapter cache, version detection."""

from __future__ import annotations

import sys

import waveft_core as wft
from waveft_core.convert import Spelling
from waveft_core.files import printable
from waveft_core.hosts import AdapterCache, fingerprint

from . import keymap

TAG = "[WaveFT]"
_ADAPTERS = AdapterCache(8)
# A file that stores no positions or shapes (PEFT, diffusers, a kohya-style file from another trainer) needs
# its base model's shapes; the webui's loader takes a file only, so the way is a native file made beforehand.
WEBUI = Spelling(
    base="a webui loads native files only: convert it first, python -m waveft_core convert <file> "
    "<new.safetensors> --base <the checkpoint it was trained on>, and put the new file in models/Lora"
)


def log(message: str) -> None:
    """One console line; names and values quoted from a file cannot drive the terminal (printable)."""
    print(f"{TAG} {printable(message, keep=chr(10))}", file=sys.stderr, flush=True)


def load_adapter(path) -> "wft.Adapter":
    """wft.load through the adapter cache (keyed by the file's path, size and mtime): the layers keep their
    scatter plans, so a prompt that changes only the weight does not rebuild them. Raises wft.WaveFTFileError."""
    return _ADAPTERS.get(fingerprint(path), lambda: wft.load(path, spelling=WEBUI))


def patch_version_detection(network) -> None:
    """Make the host's `NetworkOnDisk.detect_version` read WaveFT metadata (FORMAT.md section 3), so the Lora tab
    shows a WaveFT file for the right base model. Files that are not WaveFT keep the host's own detection."""
    cls = getattr(network, "NetworkOnDisk", None)
    members = getattr(getattr(network, "SdVersion", None), "__members__", None)
    if cls is None or members is None or getattr(cls.detect_version, "_waveft_original", None):
        return
    original = cls.detect_version

    def detect_version(self):
        version = keymap.sd_version(getattr(self, "metadata", None) or {})
        if version is None:
            return original(self)
        return network.SdVersion[version] if version in members else network.SdVersion.Unknown

    detect_version._waveft_original = original
    cls.detect_version = detect_version


def redetect_versions(networks) -> None:
    """Entries listed before the hooks were installed (the Lora extension lists files when it is imported)."""
    for entry in list(getattr(networks, "available_networks", {}).values()):
        try:
            if keymap.sd_version(getattr(entry, "metadata", None) or {}) is not None:
                entry.sd_version = entry.detect_version()
        except Exception:  # a listing entry is never worth failing over
            pass
