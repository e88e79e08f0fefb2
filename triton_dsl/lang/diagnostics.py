"""Diagnostics are data; one printer renders them.

    model.tdsl:7:12: error[E201]: unknown layer kind 'lineer'
        layer fc1: lineer(256)
                   ^^^^^^
    help: did you mean 'linear'?
"""
from __future__ import annotations

import difflib
import fnmatch
from dataclasses import dataclass


@dataclass(frozen=True)
class Diagnostic:
    code: str  # E1xx syntax/input, E2xx names and kinds, E3xx arguments, E4xx shapes, E5xx precision, W...
    message: str
    line: int = 0  # 1-based; 0 when the problem is the file as a whole
    col: int = 0
    help: str | None = None
    width: int = 1  # how many characters the caret underlines
    severity: str = "error"

    @property
    def is_error(self) -> bool:
        return self.severity == "error"


class TdslError(Exception):
    """Raised by the Python API when a file has errors; ``str()`` is the rendered report."""

    def __init__(self, path: str, text: str | None, diagnostics: list[Diagnostic]):
        self.path, self.text, self.diagnostics = path, text, diagnostics
        super().__init__(render_all(path, text, diagnostics))


class Checked:
    """What a checked file reports: ``path``, ``text`` (None when unreadable) and
    ``diagnostics``; ok and raise_for_errors for every kind of result (models, rules)."""

    @property
    def ok(self) -> bool:
        return self.text is not None and not any(d.is_error for d in self.diagnostics)

    def raise_for_errors(self):
        if not self.ok:
            raise TdslError(self.path, self.text, [d for d in self.diagnostics if d.is_error])


_MAX_CHOICES = 500
_MAX_LENGTH = 200


def suggest(word: str, choices) -> str | None:
    """A `help:` line proposing the closest of ``choices`` to a misspelt ``word``."""
    if len(word) > _MAX_LENGTH:  # comparing two long strings is quadratic in their length
        return None
    choices = sorted(c for c in set(choices) if len(c) <= _MAX_LENGTH)
    if len(choices) > _MAX_CHOICES:  # keep it fast: the names closest in length are the likeliest
        choices = sorted(sorted(choices, key=lambda c: abs(len(c) - len(word)))[:_MAX_CHOICES])
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    if close:
        return f"did you mean '{close[0]}'?"
    if 0 < len(choices) <= 12:
        return "expected one of: " + ", ".join(choices)
    return None


def suggest_pattern(pattern: str, names) -> str | None:
    """For a pattern that matches nothing: the same pattern with one misspelt dotted part
    replaced by the closest part real names have at that depth, when that then matches
    (model.layer.*.mlp.* -> model.layers.*.mlp.*)."""
    parts = pattern.split(".")
    names = list(names)[:10000]
    for i, part in enumerate(parts):
        if any(c in part for c in "*?"):
            continue
        at = {n.split(".")[i] for n in names if n.count(".") >= i}
        if part in at:
            continue
        for close in difflib.get_close_matches(part, sorted(at)[:500], n=3, cutoff=0.6):
            fixed = ".".join(parts[:i] + [close] + parts[i + 1:])
            if any(fnmatch.fnmatchcase(n, fixed) for n in names):
                return f"did you mean '{fixed}'?"
    return None


def display_name(name: str) -> str:
    """A file name as messages and generated comments show it: every character that is not
    printable (newlines, carriage returns, form feeds, U+2028 and the rest that end a line for
    Python or for str.splitlines) is written as its escape sequence; backslashes are doubled so the
    escapes stay unambiguous. A hostile name can then neither end a comment nor garble a report."""
    return "".join(c if c.isprintable() and c != "\\" else
                   c.encode("unicode_escape").decode("ascii") for c in name)


def source_lines(text: str) -> list[str]:
    """The lines as the lexer numbers them: split at "\n" only (a form feed or U+2028 in a
    comment does not start a line, as it would for str.splitlines), without a final "\r"."""
    lines = text.split("\n")
    if lines[-1] == "":
        lines.pop()
    return [l[:-1] if l.endswith("\r") else l for l in lines]


def _visible(s: str) -> str:
    """One printable character per source character, so the caret below stays aligned and a
    control character cannot garble the terminal."""
    return "".join(c if c.isprintable() or c == "\t" else "?" for c in s)


def render(path: str, text: str | None, d: Diagnostic) -> str:
    shown = display_name(path)
    where = f"{shown}:{d.line}:{d.col}" if d.line else shown
    out = [f"{where}: {d.severity}[{d.code}]: {d.message}"]
    lines = source_lines(text) if text else []
    if 0 < d.line <= len(lines):
        raw = _visible(lines[d.line - 1])
        src = raw.expandtabs(4)
        col = len(raw[: max(d.col, 1) - 1].expandtabs(4)) + 1  # the caret under the tab-expanded text
        if len(src) > 200:  # keep a minified or generated line readable
            src = src[:200] + " ..."
        out.append("    " + src)
        if col <= len(src) + 1:
            out.append("    " + " " * (col - 1) + "^" * max(1, min(d.width, len(src) - col + 1)))
    if d.help:
        out.append(f"help: {d.help}")
    return "\n".join(out)


def render_all(path: str, text: str | None, diags: list[Diagnostic]) -> str:
    body = "\n".join(render(path, text, d) for d in diags)
    n_err = sum(d.is_error for d in diags)
    n_warn = len(diags) - n_err
    tail = []
    if n_err:
        tail.append(f"{n_err} error{'s' * (n_err != 1)}")
    if n_warn:
        tail.append(f"{n_warn} warning{'s' * (n_warn != 1)}")
    return body + ("\n" + ", ".join(tail) + f" in {display_name(path)}" if tail else "")
