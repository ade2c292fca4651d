"""Text that came from a file, made safe to print or log: a title, a description, trigger words, metadata and
layer names can hold terminal escapes (set the window title, clear the screen, fake links, write the
clipboard) and bidirectional overrides. Every such character is shown as an escape (`\\x1b`, `\\u202e`)."""

from __future__ import annotations

import unicodedata


def printable(text, keep: str = "") -> str:
    """`text` with every control, format (bidi override, zero width), separator (but space) or unassigned character
    written
    as a Python escape; the characters in `keep` (e.g. "\\n" for multi-line output we made) stay as they are."""
    text = str(text)
    if text.isprintable() and not any(unicodedata.category(c) == "Cf" for c in text):
        return text
    return "".join(
        c if c in keep or (c.isprintable() and unicodedata.category(c) != "Cf") else _escape(c) for c in text
    )


def _escape(c: str) -> str:
    code = ord(c)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


class PrintableStream:
    """A text stream that passes everything written to it through printable(), keeping newlines and tabs:
    what the command line prints (file contents and error messages that quote bad values) cannot drive the
    terminal."""

    def __init__(self, stream):
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(printable(text, keep="\n\t"))
        return len(text)

    def __getattr__(self, name):
        return getattr(self._stream, name)


def short_list(items, limit: int, separator: str = ", ", more: str = " and {n} more") -> str:
    """The first `limit` items joined by `separator`, then `more` (its `{n}`: how many were left out) when some
    were: the one rule for a long list of names in a message ("a, b, c and 4 more")."""
    items = [str(item) for item in items]
    left_out = len(items) - limit
    return separator.join(items[:limit]) + (more.format(n=left_out) if left_out > 0 else "")
