"""Reading a .tdsl file defensively: every way a path or its bytes can be wrong becomes a Diagnostic."""
from __future__ import annotations

import os

from .diagnostics import Diagnostic

from .limits import MAX_BYTES, MAX_DEPTH


def read_source(path: str) -> tuple[str | None, list[Diagnostic]]:
    """Return (text, []) or (None, [diagnostic]) without ever raising for a bad path or bad bytes."""
    try:
        if os.path.isdir(path):
            return None, [Diagnostic("E101", "is a directory, not a .tdsl file")]
        size = os.path.getsize(path)
        if size > MAX_BYTES:
            return None, [Diagnostic("E102", f"file too large: {size} bytes (limit {MAX_BYTES})")]
        with open(path, "rb") as f:
            data = f.read(MAX_BYTES + 1)
    except FileNotFoundError:
        return None, [Diagnostic("E100", "no such file")]
    except OSError as e:
        return None, [Diagnostic("E100", f"cannot read file: {e.strerror or e}")]
    return decode_source(data)


def decode_source(data: bytes) -> tuple[str | None, list[Diagnostic]]:
    if b"\x00" in data:
        return None, [Diagnostic("E103", "binary file (contains NUL bytes), not a .tdsl text file")]
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        before = data[: e.start]
        line = before.count(b"\n") + 1
        col = len(before) - (before.rfind(b"\n") + 1) + 1
        return None, [Diagnostic("E104", f"invalid UTF-8 byte 0x{data[e.start]:02x}", line, col,
                                 help="save the file as UTF-8")]
    if text.startswith("\ufeff"):  # a BOM from some editors is harmless
        text = text[1:]
    return text, []


def check_depth(text: str) -> list[Diagnostic]:
    """Reject absurd nesting before parsing, so no recursion limit is ever reached."""
    indents: list[int] = [0]
    depth = 0  # brackets may span lines
    for lineno, raw in enumerate(text.splitlines(), 1):
        stripped = raw.lstrip(" \t")
        if not stripped or stripped.startswith("#"):
            continue
        width = len(raw[: len(raw) - len(stripped)].expandtabs(4))
        while width < indents[-1]:
            indents.pop()
        if width > indents[-1]:
            indents.append(width)
        in_str = False
        for col, ch in enumerate(raw, 1):
            if ch == '"':
                in_str = not in_str
            elif in_str:
                continue
            elif ch == "#":
                break
            elif ch in "([":
                depth += 1
            elif ch in ")]":
                depth -= 1
            if depth > MAX_DEPTH or len(indents) > MAX_DEPTH:
                return [Diagnostic("E105", f"nesting deeper than {MAX_DEPTH} levels", lineno, col)]
    return []
