"""Expansion of a model body: blocks instantiated, names qualified, options bound, shapes inferred.

Problems are collected, never raised: after a shape error the rest of the body is still checked for
argument and name errors, with shapes unknown (None) so no error cascades from the first one.
"""
from __future__ import annotations

from . import ast, ir
from .diagnostics import Diagnostic, suggest
from .kinds import KINDS, Inferred, Kind, ShapeError
from .names import alternative, layer_name_problem
from .precision import Option


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
                diags.append(Diagnostic("E301", f"{what} takes {n or 'no'} positional argument"
                                        f"{'s' * (n != 1)}", a.pos.line, a.pos.col,
                                        help="name the option: option=value"
                                        + (f"; options: {', '.join(by_name)}" if by_name else "")))
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


class Expander:
    def __init__(self, blocks: dict, diags: list):
        self.blocks, self.diags = blocks, diags
        self.stack: list[str] = []  # blocks being expanded, to catch recursion

    def error(self, code, msg, pos, help=None, width=1):
        self.diags.append(Diagnostic(code, msg, pos.line, pos.col, help, width))

    def body(self, stmts, shape, prefix: str, env: dict, names: dict):
        """Expand statements in one namespace; returns (nodes, out_shape)."""
        nodes = []
        for s in stmts:
            node, shape = (self.residual if isinstance(s, ast.Residual) else self.layer)(
                s, shape, prefix, env, names)
            if node is not None:
                nodes.append(node)
        return nodes, shape

    def name(self, given, base, pos, prefix, names):
        if given is not None:
            why = layer_name_problem(given)
            if why:
                self.error("E203", f"'{given}' cannot name a layer: {why}", pos,
                           f"rename it, for example '{alternative(given)}'", len(given))
            elif given in names:
                self.error("E202", f"layer name '{prefix}{given}' is already used on line "
                           f"{names[given]}", pos, width=len(given))
            names.setdefault(given, pos.line)
            return given
        n = 1
        while f"{base}{n}" in names:
            n += 1
        names[f"{base}{n}"] = pos.line
        return f"{base}{n}"

    def layer(self, s: ast.Layer, shape, prefix, env, names):
        kind = s.call.name
        if kind not in KINDS and kind not in self.blocks:
            self.error("E201", f"unknown layer kind '{kind}'", s.call.pos,
                       suggest(kind, list(KINDS) + list(self.blocks)), len(kind))
            return None, None
        local = self.name(s.name, kind, s.pos, prefix, names)
        if s.repeat is not None:
            if s.repeat < 1:
                self.error("E306", "repeat count must be at least 1", s.pos)
                return None, None
            inner = {}
            subs = []
            for i in range(s.repeat):
                node, shape = self.one(s, kind, str(i), shape, f"{prefix}{local}.", env, inner)
                subs.append(node)
            return ir.Group(prefix + local, tuple(n for n in subs if n), s.pos.line), shape
        return self.one(s, kind, local, shape, prefix, env, names)

    def one(self, s, kind, local, shape, prefix, env, names):
        if kind in self.blocks:
            return self.instance(s, self.blocks[kind], shape, prefix + local, env)
        spec: Kind = KINDS[kind]
        args = bind(spec.options, spec.positional, s.call, env, kind, self.diags)
        if args is None or shape is None:
            return None, None
        try:
            inf: Inferred = spec.infer(shape, args)
        except ShapeError as e:
            pos = _arg_pos(s.call, spec.positional, e.arg)
            self.error("E401", f"{prefix + local}: {e}", pos, f"input shape is {list(shape)}",
                       len(kind) if pos is s.call.pos else 1)
            return None, None
        node = ir.Layer(prefix + local, kind, tuple(args.items()), shape, inf.shape, inf.params,
                        inf.buffers, inf.weight, inf.bias, None, s.pos.line, s.pos.col)
        return node, inf.shape

    def instance(self, s, block: ast.Block, shape, qualified, env):
        if block.name in self.stack:
            self.error("E204", f"block '{block.name}' uses itself", s.call.pos,
                       "blocks cannot be recursive", len(block.name))
            return None, None
        params = [ast_param_option(p) for p in block.params]
        positional = tuple(p.name for p in block.params)
        args = bind(params, positional, s.call, env, f"block {block.name}", self.diags)
        if args is None:
            return None, None
        self.stack.append(block.name)
        nodes, shape = self.body(block.body, shape, qualified + ".", args, {})
        self.stack.pop()
        return ir.Group(qualified, tuple(nodes), s.pos.line), shape

    def residual(self, s: ast.Residual, shape, prefix, env, names):
        rname = self.name(s.name, "residual", s.pos, prefix, names)
        nodes, out = self.body(s.body, shape, prefix, env, names)
        if shape is None or out is None:
            return None, out
        shortcut = ()
        if tuple(out) != tuple(shape):
            base = "shortcut" if s.name is None else f"{rname}_shortcut"
            shortcut = self.projection(prefix, unique(base, names, s.pos.line), shape, out, s,
                                       names)
            if shortcut is None:
                return None, None
        return ir.Residual(prefix + rname, tuple(nodes), shortcut, shape, out, s.pos.line), out

    def projection(self, prefix, local, shape, out, s, names):
        """The skip path when the body changes the shape: 1x1 conv + batchnorm, or a linear."""
        line, name = s.pos.line, prefix + local
        if len(shape) == 3 and len(out) == 3:
            stride = -(-shape[1] // out[1])
            if (shape[1] - 1) // stride + 1 != out[1] or (shape[2] - 1) // stride + 1 != out[2]:
                self.error("E402", f"residual: a strided 1x1 projection cannot map {list(shape)} "
                           f"to {list(out)}", s.pos, "keep the body's spatial size a whole "
                           "fraction of its input")
                return None
            conv_args = (("out_channels", out[0]), ("kernel", 1), ("stride", stride),
                         ("padding", 0), ("dilation", 1), ("groups", 1), ("bias", False))
            k = shape[0]
            bn = unique(local + "_bn", names, line)
            return (ir.Layer(name, "conv2d", conv_args, shape, out, out[0] * k, 0, (out[0], k),
                             False, None, line),
                    ir.Layer(prefix + bn, "batchnorm", (("eps", 1e-5), ("momentum", 0.1)), out,
                             out, 2 * out[0], 2 * out[0], None, False, None, line))
        if len(shape) == len(out) and shape[:-1] == out[:-1]:
            return (ir.Layer(name, "linear", (("out_features", out[-1]), ("bias", False)), shape,
                             out, shape[-1] * out[-1], 0, (out[-1], shape[-1]), False, None,
                             line),)
        self.error("E402", f"residual: the body maps {list(shape)} to {list(out)}; no projection "
                   "can add these", s.pos, "a residual body must keep the rank of its input")
        return None


def _arg_pos(call: ast.Call, positional, option):
    """Where ``option`` was written in ``call`` (by name or by position); else the call."""
    for i, a in enumerate(call.args):
        name = a.name or (positional[i] if i < len(positional) else None)
        if option is not None and name == option:
            return a.value.pos
    return call.pos


def unique(base: str, names: dict, line: int) -> str:
    """``base``, or ``base2``, ``base3``... if taken; the name is then taken."""
    name, n = base, 1
    while name in names:
        n += 1
        name = f"{base}{n}"
    names[name] = line
    return name


class AnyOption(Option):
    """A block parameter: any value binds; the layers that use it validate it."""

    def accepts(self, v):
        return None


def ast_param_option(p: ast.Param) -> Option:
    default = value_of(p.default, {}) if p.default is not None else None
    return AnyOption(p.name, default, required=p.default is None, doc=f"block parameter {p.name}")
