"""Binding call arguments to declared options: the one place source values meet their ranges.

Used for layer kinds, block parameters and precisions alike, so every option reports unknown,
repeated, missing and out-of-range values the same way, at the value's position.
"""
from __future__ import annotations

from . import ast
from .diagnostics import Diagnostic, suggest
from .options import Option


def value_of(v, env: dict):
    """A source value as Python: numbers, true/false/none, tuples; block parameters substituted."""
    if isinstance(v, ast.Number):
        return v.value
    if isinstance(v, ast.String):
        return v.value
    if isinstance(v, ast.List):
        return tuple(value_of(i, env) for i in v.items)
    if v.name in env:
        return env[v.name]
    return {"true": True, "false": False, "none": None}.get(v.name, v.name)


def bind(spec_options, positional, call: ast.Call, env, what: str, diags) -> dict | None:
    """Bind a call's arguments to options; report unknown, repeated, missing and invalid ones."""
    by_name = {o.name: o for o in spec_options}
    out, ok, seen = {}, True, set()
    for i, a in enumerate(call.args):
        if a.name is None:
            if i >= len(positional):
                n = len(positional)
                if by_name:
                    msg = f"{what} takes {n or 'no'} positional argument{'s' * (n != 1)}"
                    help_ = f"name the option: option=value; options: {', '.join(by_name)}"
                else:  # relu(4): nothing to bind at all
                    msg, help_ = f"{what} takes no arguments", f"write {call.name} alone"
                diags.append(Diagnostic("E301", msg, a.pos.line, a.pos.col, help_))
                ok = False
                continue
            name = positional[i]
        else:
            name = a.name
            if name not in by_name:
                diags.append(Diagnostic("E302", f"{what} has no option '{name}'", a.pos.line,
                                        a.pos.col, suggest(name, by_name), len(name)))
                ok = False
                continue
        if name in seen:
            diags.append(Diagnostic("E303", f"option '{name}' given twice", a.pos.line, a.pos.col,
                                    width=len(name)))
            ok = False
            continue
        seen.add(name)
        val = value_of(a.value, env)
        if val is None and "none" in by_name[name].words:  # the word, where an option spells it
            val = "none"
        msg = by_name[name].accepts(val)
        if msg:
            h = suggest(val, [w for w in by_name[name].words if isinstance(w, str)]) \
                if isinstance(val, str) else None
            diags.append(Diagnostic("E304", f"{what}: {msg}", a.value.pos.line, a.value.pos.col, h))
            ok = False
            continue
        out[name] = val
    for o in spec_options:
        if o.name not in seen:
            if o.required:
                diags.append(Diagnostic("E305", f"{what} needs '{o.name}' ({o.doc})", call.pos.line,
                                        call.pos.col, f"write {call.name}({o.name}=...)",
                                        len(call.name)))
                ok = False
            else:
                out[o.name] = o.default
    return out if ok else None


class AnyOption(Option):
    """A block parameter: any value binds; the layers that use it validate it."""

    def accepts(self, v):
        return None
