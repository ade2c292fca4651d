"""Files on disk, without torch: the one reader of safetensors headers (tensor names, shapes, dtypes and
metadata, checked, without loading any tensor data), the error every reader raises, and the one atomic writer.

Only safetensors is ever parsed here: pickled checkpoints (.pt, .ckpt, .bin, ...) are refused unread."""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import struct
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping

from .printable import printable

PICKLE_SUFFIXES = {".pt", ".pth", ".ckpt", ".bin", ".pkl", ".pickle"}
MAX_HEADER = 100 * 1024 * 1024  # far above any real header; a larger length means a damaged file
DAMAGED = "The file is damaged or was not written by a WaveFT tool; export or download it again"


class WaveFTFileError(ValueError):
    """A file that cannot be used. The message names the file (full path), the key and what to do."""

    def __init__(self, path, problem: str, key: str | None = None, advice: str = ""):
        self.path = str(path)
        self.key = key
        where = self.path + (f", key '{key}'" if key else "")
        super().__init__(f"{where}: {problem}" + (f". {advice}" if advice else ""))


@contextlib.contextmanager
def reporting_file_errors(prefix: str = "WaveFT", safe: bool = False):
    """A bad file as a host's node reports it: ValueError('<prefix>: <path>: problem. advice'), without the
    reader's traceback (the message says it all). `safe` for a message that also reaches a console: what the
    file's name or contents hold that could drive a terminal is escaped (printable)."""
    try:
        yield
    except WaveFTFileError as e:
        message = f"{prefix}: {e}"
        raise ValueError(printable(message) if safe else message) from None


@dataclass
class Header:
    """A safetensors header: every tensor's {'dtype', 'shape', 'data_offsets'}, the metadata, and where the
    tensor data starts in the file."""

    tensors: dict[str, dict] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    data_start: int = 0

    def shape(self, key: str) -> tuple[int, ...]:
        return tuple(int(s) for s in self.tensors[key]["shape"])


def read_header(path) -> Header:
    """The checked header of a safetensors file; WaveFTFileError naming the file when it is a pickle, not
    safetensors, truncated or damaged."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise WaveFTFileError(
            path,
            f"'{path.suffix}' files are pickles, which WaveFT never loads (they can run code)",
            advice="Convert it to .safetensors with the tool that made it",
        )
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(8)
            if len(head) < 8 or size < 10:
                raise WaveFTFileError(path, f"only {size} bytes long, not a safetensors file", advice=DAMAGED)
            (length,) = struct.unpack("<Q", head)
            if 8 + length > size:
                raise WaveFTFileError(
                    path,
                    f"truncated: the header says {length} bytes but the file has {size}",
                    advice="The copy is incomplete (an interrupted download?); download or export it again",
                )
            if length > MAX_HEADER:
                raise WaveFTFileError(path, f"a header of {length} bytes is not plausible", advice=DAMAGED)
            raw = f.read(length)
    except FileNotFoundError:
        raise WaveFTFileError(path, "no such file") from None
    except IsADirectoryError:
        raise WaveFTFileError(path, "is a folder, not a .safetensors file") from None
    if not raw.startswith(b"{"):
        raise WaveFTFileError(path, "not a safetensors file (no JSON header)", advice=DAMAGED)
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise WaveFTFileError(path, f"its safetensors header is not valid JSON ({e})", advice=DAMAGED) from None
    if not isinstance(data, dict):
        raise WaveFTFileError(path, "its safetensors header is not a JSON object", advice=DAMAGED)
    metadata = data.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict):
        raise WaveFTFileError(path, "its safetensors metadata is not a JSON object", advice=DAMAGED)
    for key, info in data.items():
        if not isinstance(info, dict) or "shape" not in info or "dtype" not in info:
            raise WaveFTFileError(path, "is not a tensor entry", key=key, advice=DAMAGED)
    return Header(data, {str(k): str(v) for k, v in metadata.items()}, 8 + length)


def checked_safetensors(path, what: str = "file") -> Path:
    """`path` after read_header's checks, or WaveFTFileError ('no such checkpoint', a pickle, damage)."""
    path = Path(path)
    if not path.is_file():
        raise WaveFTFileError(path, f"no such {what}")
    read_header(path)
    return path


def open_safetensors(path):
    """safetensors' safe_open on the CPU (torch is imported then, not here), with errors that name the file."""
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as e:  # safetensors has its own error types for every kind of damage
        raise WaveFTFileError(path, f"cannot be read as safetensors ({e})") from e


def peek_header(path) -> Header | None:
    """read_header for listings and sniffing: None instead of an error (the loader reports it later)."""
    try:
        return read_header(path)
    except (WaveFTFileError, OSError):
        return None


def refuse_overwrite(out: Path, *inputs, overwrite: bool = False, label: str = "") -> None:
    """An output never replaces an input, and replaces an existing file only when asked to. `label` names the
    option the output came from (`--output`), for the message."""
    out = Path(out)
    shown = f"{label} {out}".strip()
    for given in inputs:
        if given is None:
            continue
        given = Path(given)
        if (
            out.exists()
            and given.exists()
            and (out.resolve() == given.resolve() or (out.is_file() and given.is_file() and out.samefile(given)))
        ):
            raise ValueError(f"{shown}: that is an input of this command; write the result to another path")
    if out.exists() and not overwrite:
        raise ValueError(f"{shown} exists; give another path, or --overwrite to replace it")


# A temporary file is '.<name>.<12 hex>.tmp' beside its target; one older than this was left by a process that
# was killed (a finished write renames it, a failed one removes it; a live one keeps writing into it).
TEMPORARY = re.compile(r"\..*\.[0-9a-f]{12}\.tmp")
STALE_TEMPORARY_SECONDS = 6 * 3600
NAME_MAX = 255  # bytes in one file name on every common file system


def temporary_name(path: Path) -> Path:
    """'.<name>.<random>.tmp' beside `path`, the name shortened where it would pass NAME_MAX bytes (a legal
    240-byte name must not fail because its temporary name is longer)."""
    room = NAME_MAX - len(".") - len(".") - 12 - len(".tmp")
    name = path.name.encode("utf-8", "surrogateescape")[:room].decode("utf-8", "ignore")
    return path.parent / f".{name}.{secrets.token_hex(6)}.tmp"


def remove_stale_temporaries(folder: Path) -> None:
    """Remove this writer's temporary files in `folder` that a killed process left (older than
    STALE_TEMPORARY_SECONDS); nothing else is touched, and failures are ignored."""
    now = time.time()
    try:
        with os.scandir(folder) as entries:
            for entry in entries:
                try:
                    if (
                        TEMPORARY.fullmatch(entry.name)
                        and entry.is_file(follow_symlinks=False)
                        and now - entry.stat(follow_symlinks=False).st_mtime > STALE_TEMPORARY_SECONDS
                    ):
                        os.unlink(entry.path)
                except OSError:
                    pass
    except OSError:
        pass


def with_metadata(serialized: bytes, metadata: Mapping[str, str]) -> tuple[bytes, memoryview]:
    """The bytes of a serialized safetensors file with its metadata replaced by `metadata`, as (length and
    header, tensor data): what safetensors writes for the same tensors and this metadata (its header is compact
    JSON in UTF-8, the metadata first, padded with spaces to a multiple of 8 bytes), without serializing the
    tensors again. The tensor data is a view of `serialized`, not a copy."""
    length = int.from_bytes(serialized[:8], "little")
    entries = json.loads(bytes(serialized[8 : 8 + length]))
    entries.pop("__metadata__", None)
    header = json.dumps({"__metadata__": dict(metadata), **entries}, ensure_ascii=False, separators=(",", ":"))
    raw = header.encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    return len(raw).to_bytes(8, "little") + raw, memoryview(serialized)[8 + length :]


def write_parts(path, parts) -> None:
    """Write byte strings (or views) one after the other into the file `path`."""
    with open(path, "wb") as f:
        for part in parts:
            f.write(part)


def atomic_write(path, write_to: Callable[[str], None]) -> Path:
    """Call write_to(temp_path) for a temporary file beside `path`, then rename it into place."""
    return atomic_writes({path: write_to})[0]


def atomic_writes(targets: Mapping[object, Callable[[str], None]]) -> list[Path]:
    """Write every target to a temporary file beside it first, then rename them all into place, so a failure
    at any point leaves whatever was there before untouched and no temporary file behind. The files get the
    permissions of any new file (0666 less the umask: 0644 usually), not a temporary file's 0600, so another
    user or a container under another uid can read what was written."""
    staged: list[tuple[Path, str]] = []
    try:
        for path, write_to in targets.items():
            path = Path(path)
            path.parent.mkdir(parents=True, exist_ok=True)
            remove_stale_temporaries(path.parent)
            tmp = str(temporary_name(path))
            os.close(os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666))  # the umask applies, as to any file
            staged.append((path, tmp))
            mode = os.stat(tmp).st_mode & 0o777
            write_to(tmp)
            os.chmod(tmp, mode)  # writers that replace the file themselves (safetensors does) leave it 0600
            with open(tmp, "rb") as f:
                os.fsync(f.fileno())
        for path, tmp in staged:
            os.replace(tmp, path)
    except BaseException:
        for _, tmp in staged:
            try:
                os.unlink(tmp)
            except OSError:
                pass
        raise
    return [path for path, _ in staged]
