"""The adapter catalogue every node lists and opens adapters from: native files and PEFT folders in
models/waveft, WaveFT files among models/loras ('loras/<name>'), how a name resolves to a path (never outside
the model folders), and the fingerprint that makes an edited adapter reload."""

from __future__ import annotations

import os

from ..waveft_core import keys
from ..waveft_core.convert import sources
from ..waveft_core.files import kinds
from ..waveft_core.hosts import cache
from . import host

LORA_PREFIX = "loras/"
_SNIFF: dict = {}  # path -> (size, mtime_ns, is_waveft): the loras folder is sniffed on every listing


def _is_waveft_file(path: str) -> bool:
    """kinds.is_waveft_file, remembered until the file's size or mtime changes."""
    try:
        st = os.stat(path)
    except OSError:
        return False
    cached = _SNIFF.get(path)
    if cached and cached[:2] == (st.st_size, st.st_mtime_ns):
        return cached[2]
    found = kinds.is_waveft_file(path)
    _SNIFF[path] = (st.st_size, st.st_mtime_ns, found)
    return found


def _peft_dirs() -> list[str]:
    """PEFT WaveFT folders inside models/waveft (relative names, '/' separated)."""
    found = set()
    for root in host.folder_dirs(host.FOLDER):
        found.update(sources.adapter_folders(root))
    return sorted(found)


def list_adapters() -> list[str]:
    """Native files in models/waveft, PEFT folders there (name ending in '/'), WaveFT files among loras."""
    names = [f for f in host.filename_list(host.FOLDER) if f.lower().endswith(".safetensors")]
    names += [d + "/" for d in _peft_dirs()]
    for f in host.filename_list("loras"):
        if f.lower().endswith(".safetensors"):
            path = host.full_path("loras", f)
            if path and _is_waveft_file(path):
                names.append(LORA_PREFIX + f)
    return names


def listed_name(path: str, kind: str = host.FOLDER) -> str:
    """How Load WaveFT lists a file written into models/<kind> (files among the LoRAs carry 'loras/')."""
    rel = os.path.relpath(path, host.save_folder(kind)).replace(os.sep, "/")
    return rel if kind == host.FOLDER else LORA_PREFIX + rel


def resolve_path(name: str) -> str:
    """The file or folder behind a combo entry, refusing anything outside the model folders."""
    if name.endswith("/"):
        rel = name.rstrip("/")
        for root in host.folder_dirs(host.FOLDER):
            candidate = os.path.realpath(os.path.join(root, rel))
            if os.path.commonpath([candidate, os.path.realpath(root)]) != os.path.realpath(root):
                continue
            if os.path.isfile(os.path.join(candidate, keys.PEFT_CONFIG_NAME)):
                return candidate
        raise ValueError(f"WaveFT: no PEFT adapter folder '{rel}' in models/{host.FOLDER}")
    if name.startswith(LORA_PREFIX):
        path = host.full_path("loras", name[len(LORA_PREFIX) :])
        if path:
            return path
    path = host.full_path(host.FOLDER, name)
    if not path:
        raise ValueError(
            f"WaveFT: '{name}' is not in models/{host.FOLDER} or models/loras (was it moved or "
            "deleted? press R to refresh the list)"
        )
    return path


def fingerprint(name: str) -> str:
    """Changes whenever the file (or a PEFT folder's files) changes, so an edited adapter reloads."""
    try:
        return fingerprint_path(resolve_path(name))
    except ValueError:
        return name


def fingerprint_path(path: str) -> str:
    """IS_CHANGED's value for a file or folder: changes whenever it (or a PEFT folder's files) changes."""
    return repr(cache.fingerprint(path))
