"""A small cache of loaded adapters, shared by the ComfyUI nodes and the A1111/Forge extension: a prompt that
only changes a strength must not read the file again, and the layers keep their scatter plans. Entries are
keyed by the file's fingerprint (content included), so an edited or replaced file is read again."""

from __future__ import annotations

import hashlib
import os
from collections import OrderedDict
from typing import Callable, Hashable

from ..keys import DIFFUSERS_WEIGHTS_NAME, PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME

ADAPTER_FILES = (PEFT_CONFIG_NAME, PEFT_WEIGHTS_NAME, DIFFUSERS_WEIGHTS_NAME)


# Files up to this size are hashed whole for the fingerprint (an adapter is a few MB); larger ones by their
# first and last HASHED_PART bytes (the safetensors header, with its content hashes, is at the start).
HASH_WHOLE = 16 << 20
HASHED_PART = 1 << 20


def fingerprint(path) -> tuple:
    """(path, size, mtime, inode, ctime, content digest) of a file, or of every adapter file in a folder (PEFT
    folders with adapter or component sub-folders); size -1 for what does not exist. Changes whenever any of
    them changes, also for a same-size replacement that keeps the mtime (`cp -p`, `rsync -t`, an unpacked
    archive, FAT/SMB timestamps): its content digest and, on most file systems, its inode or ctime differ."""
    path = os.path.abspath(str(path))
    if os.path.isdir(path):
        files = sorted(
            os.path.join(root, name) for root, _, names in os.walk(path) for name in names if name in ADAPTER_FILES
        )
    else:
        files = [path]
    out = []
    for f in files:
        try:
            st = os.stat(f)
            out.append((f, st.st_size, st.st_mtime_ns, st.st_ino, st.st_ctime_ns, content_digest(f, st.st_size)))
        except OSError:
            out.append((f, -1, -1))
    return tuple(out)


def content_digest(path, size: int) -> str:
    """A cheap digest of a file's bytes: all of them up to HASH_WHOLE, else the first and last HASHED_PART."""
    digest = hashlib.blake2b(digest_size=16)
    with open(path, "rb") as f:
        if size <= HASH_WHOLE:
            digest.update(f.read())
        else:
            digest.update(f.read(HASHED_PART))
            f.seek(max(HASHED_PART, size - HASHED_PART))
            digest.update(f.read(HASHED_PART))
    return digest.hexdigest()


class AdapterCache:
    """The `size` most recently used values, by key; `get(key, make)` calls make() on a miss."""

    def __init__(self, size: int = 8):
        self.size = size
        self._items: OrderedDict = OrderedDict()

    def get(self, key: Hashable, make: Callable):
        if key in self._items:
            self._items.move_to_end(key)
            return self._items[key]
        value = make()
        self._items[key] = value
        while len(self._items) > self.size:
            self._items.popitem(last=False)
        return value
