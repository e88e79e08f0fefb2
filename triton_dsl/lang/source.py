"""Reading a .tdsl file defensively, and the one walk over its lines that the lexer would make.

Every way a path or its bytes can be wrong becomes a Diagnostic. ``scan`` splits lines exactly as
the lexer counts them and knows strings, comments, brackets and backslash continuations; the layout
checks before parsing, the parser's dedent positions and ``fmt``'s comment placement all use it.
"""
from __future__ import annotations

import os
import re
from dataclasses import dataclass
from typing import Iterator

from .diagnostics import Diagnostic, source_lines
from .limits import MAX_BYTES, MAX_DEPTH

TAB_WIDTH = 4  # what a tab counts for in indentation (the parser's Indenter uses the same)
_HEADER = re.compile(r"(model|block|residual|precision)\b")  # lines that open an indented body


def read_source(path: str) -> tuple[str | None, list[Diagnostic]]:
    """Return (text, []) or (None, [diagnostic]) without ever raising for a bad path or bad bytes."""
    try:
        if os.path.isdir(path):
            return None, [Diagnostic("E101", "is a directory, not a .tdsl file")]
        size = os.path.getsize(path)
        if size > MAX_BYTES:
            return None, [Diagnostic("E102", f"file too large: {size} bytes (limit {MAX_BYTES})",
                                     help="split it, or use blocks and repeats (`* N`)")]
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


@dataclass(frozen=True)
class Line:
    number: int  # 1-based, as the lexer counts
    indent: str  # leading spaces and tabs
    code: str  # what follows the indentation, without the comment
    comment: str | None  # "# ..." to the end of the line
    continued: bool  # inside brackets or after a backslash: its indentation means nothing
    depth: int  # bracket depth at the end of the line
    peak: int  # the deepest bracket nesting on the line
    open_quote: int = 0  # column of a string that the line leaves unterminated, else 0

    @property
    def width(self) -> int:
        return self.indent.count(" ") + TAB_WIDTH * self.indent.count("\t")


def scan(text: str) -> Iterator[Line]:
    depth, continued = 0, False
    for number, raw in enumerate(source_lines(text), 1):
        body = raw.lstrip(" \t")
        indent = raw[: len(raw) - len(body)]
        in_str, escaped, comment, open_quote, peak = False, False, None, 0, depth
        for i, ch in enumerate(body):
            if in_str:
                if escaped:
                    escaped = False
                elif ch == "\\":
                    escaped = True
                elif ch == '"':
                    in_str = False
            elif ch == '"':
                in_str, open_quote = True, len(indent) + i + 1
            elif ch == "#":
                comment, body = body[i:], body[:i]
                break
            elif ch in "([":
                depth += 1
                peak = max(peak, depth)
            elif ch in ")]":
                depth = max(0, depth - 1)
        yield Line(number, indent, body, comment, continued, depth, peak,
                   open_quote if in_str else 0)
        continued = depth > 0 or body.rstrip(" \t").endswith("\\")


def check_layout(text: str) -> list[Diagnostic]:
    """Problems to report before parsing, each with a specific message: absurd nesting (so no
    recursion limit is reached), an unterminated string, indentation mixing tabs and spaces (the
    lexer would silently count a tab as four spaces), and a header with no indented body."""
    indents: list[int] = [0]
    first_kind = None  # (" " or "\t", line) of the first indented line
    header = None  # the last line that opens a body, while its body is still awaited
    for ln in scan(text):
        if ln.open_quote:
            return [Diagnostic("E115", "unterminated string", ln.number, ln.open_quote,
                               help='close it with " on the same line')]
        if ln.peak > MAX_DEPTH:
            return [Diagnostic("E105", f"nesting deeper than {MAX_DEPTH} levels", ln.number,
                               len(ln.indent) + 1)]
        if ln.continued or not ln.code.strip():
            continue
        if header is not None and ln.width <= indents[-1]:
            return [_no_body(header)]
        header = None
        kinds = set(ln.indent)
        if len(kinds) > 1 or first_kind and kinds and first_kind[0] not in kinds:
            where = "this line mixes them" if len(kinds) > 1 else \
                f"line {first_kind[1]} is indented with {_what(first_kind[0])}, this one with " \
                f"{_what(kinds.pop())}"
            return [Diagnostic("E116", f"indentation mixes tabs and spaces: {where}", ln.number,
                               1, "indent with spaces only (4 per level)", max(1, len(ln.indent)))]
        if kinds and first_kind is None:
            first_kind = (ln.indent[0], ln.number)
        while ln.width < indents[-1]:
            indents.pop()
        if ln.width > indents[-1]:
            indents.append(ln.width)
            if len(indents) > MAX_DEPTH:
                return [Diagnostic("E105", f"nesting deeper than {MAX_DEPTH} levels", ln.number,
                                   len(ln.indent) + 1)]
        if _HEADER.match(ln.code) and ln.code.rstrip(" \t\\").endswith(":"):
            header = ln
    return [_no_body(header)] if header is not None else []


def _what(ch: str) -> str:
    return "tabs" if ch == "\t" else "spaces"


def _no_body(h: Line) -> Diagnostic:
    keyword = _HEADER.match(h.code).group(1)
    return Diagnostic("E114", f"'{h.code.strip()}' has no body", h.number, len(h.indent) + 1,
                      f"indent the {keyword}'s contents on the lines below it", len(keyword))


def dedent_line(text: str) -> int:
    """The first line whose indentation matches no open level (Lark's DedentError has no
    position); 0 if none."""
    levels = [0]
    for ln in scan(text):
        if ln.continued or not ln.code.strip():
            continue
        if ln.width > levels[-1]:
            levels.append(ln.width)
        while ln.width < levels[-1]:
            levels.pop()
        if ln.width != levels[-1]:
            return ln.number
    return 0
