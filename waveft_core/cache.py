"""A small cache of loaded adapters, shared by the ComfyUI nodes and the A1111/Forge extension: a prompt that
only changes a strength must not read the file again, and the layers keep their scatter plans. Entries are
keyed by the file's fingerprint, so an edited file is read again."""
from __future__ import annotations

import os
from collections import OrderedDict
from typing import Callable, Hashable

from .sources import CONFIG_NAME, DIFFUSERS_WEIGHTS_NAME, WEIGHTS_NAME

ADAPTER_FILES = (CONFIG_NAME, WEIGHTS_NAME, DIFFUSERS_WEIGHTS_NAME)


def fingerprint(path) -> tuple:
    """(path, size, mtime) of a file, or of every adapter file in a folder (PEFT folders with adapter or
    component sub-folders); size -1 for what does not exist. Changes whenever any of them changes."""
    path = os.path.abspath(str(path))
    if os.path.isdir(path):
        files = sorted(os.path.join(root, name) for root, _, names in os.walk(path) for name in names
                       if name in ADAPTER_FILES)
    else:
        files = [path]
    out = []
    for f in files:
        try:
            st = os.stat(f)
            out.append((f, st.st_size, st.st_mtime_ns))
        except OSError:
            out.append((f, -1, -1))
    return tuple(out)


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

    def clear(self) -> None:
        self._items.clear()
