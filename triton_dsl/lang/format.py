"""`triton-dsl fmt`: the canonical text of a parsed file. Comments are kept: a full-line comment
stays before the statement that followed it, a trailing comment stays on its statement's line.
Formatting is idempotent and parsing the output gives an equal syntax tree."""
from __future__ import annotations

import bisect

from . import ast
from .diagnostics import source_lines
from .source import scan

_IND = "    "


def _value(v) -> str:
    if isinstance(v, ast.Number):
        return v.text
    if isinstance(v, ast.Word):
        return v.name
    if isinstance(v, ast.String):
        return '"' + v.value + '"'
    return "[" + ", ".join(_value(i) for i in v.items) + "]"


def _call(c: ast.Call) -> str:
    if not c.args:
        return c.name
    args = ", ".join((f"{a.name}=" if a.name else "") + _value(a.value) for a in c.args)
    return f"{c.name}({args})"


def _stmts(stmts, depth, out):
    for s in stmts:
        pad = _IND * depth
        if isinstance(s, ast.Residual):
            out.append((s.pos.line, pad + "residual" + (f" {s.name}" if s.name else "") + ":"))
            _stmts(s.body, depth + 1, out)
        else:
            head = f"layer {s.name}: " if s.name else ""
            rep = f" * {s.repeat.text}" if s.repeat is not None else ""
            out.append((s.pos.line, pad + head + _call(s.call) + rep))


def _definition(d, out):
    if isinstance(d, ast.Model):
        out.append((d.pos.line, f"model {d.name}:"))
        for i in d.inputs:
            out.append((i.pos.line, _IND + "input " + (_call(i) if isinstance(i, ast.Call)
                                                          else _value(i))))
        _stmts(d.body, 1, out)
    elif isinstance(d, ast.Block):
        ps = ", ".join(p.name + (f"={_value(p.default)}" if p.default else "") for p in d.params)
        out.append((d.pos.line, f"block {d.name}({ps}):" if d.params else f"block {d.name}:"))
        _stmts(d.body, 1, out)
    else:
        out.append((d.pos.line, "precision" + (f" {d.model}" if d.model else "") + ":"))
        for r in d.rules:
            text = {"default": f"default {_call(r.precision)}",
                    "layer": f"layer {r.target}: {_call(r.precision)}",
                    "kind": f"kind {r.target}: {_call(r.precision)}"}[r.kind]
            out.append((r.pos.line, _IND + text))


def _comments(text: str):
    """{line: comment} for trailing comments and [(line, comment)] for full-line ones. A trailing
    comment on a continuation line (inside brackets, after a backslash) is keyed by that line;
    format_file moves it to the statement the line belongs to."""
    trailing, full = {}, []
    for ln in scan(text):
        if ln.comment is None:
            continue
        if ln.code.strip():
            trailing[ln.number] = ln.comment.rstrip()
        else:
            full.append((ln.number, ln.comment.rstrip()))
    return trailing, full


def _attach(trailing: dict, starts: list) -> dict:
    """Key every trailing comment by the first line of its statement, joining several."""
    out: dict = {}
    starts = sorted(starts)
    for line, c in sorted(trailing.items()):
        owner = starts[bisect.bisect_right(starts, line) - 1] if starts and starts[0] <= line \
            else line
        out[owner] = f"{out[owner]}  {c}" if owner in out else c
    return out


def format_file(tree: ast.File, text: str) -> str:
    trailing, full = _comments(text)
    src = source_lines(text)
    out: list[str] = []
    prev = 0
    per_def = []
    for d in tree.definitions:
        lines: list[tuple[int, str]] = []
        _definition(d, lines)
        per_def.append(lines)
    trailing = _attach(trailing, [line for lines in per_def for line, _ in lines])
    for lines in per_def:
        for j, (line, body) in enumerate(lines):
            indent = body[: len(body) - len(body.lstrip())]
            lead = [c for c in full if prev < c[0] < line]
            gap_from = lead[0][0] if lead else line
            blank = any(not s.strip() for s in src[prev:gap_from - 1])
            if out and (j == 0 or blank) and out[-1] != "":
                out.append("")
            out.extend(indent + c for _, c in lead)
            full = [c for c in full if c[0] >= line]
            out.append(body + (f"  {trailing.pop(line)}" if line in trailing else ""))
            prev = line
    rest = [c for _, c in full]
    if rest:
        out += [""] + rest if out else rest
    return "\n".join(out) + "\n"
