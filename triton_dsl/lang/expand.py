"""Expansion of a model body: blocks instantiated, names qualified, options bound, shapes inferred.

Problems are collected, never raised: after an error the rest of the body is still checked for
argument and name errors, with shapes unknown (None) so no error cascades from the first one. Layers
that could not be resolved are remembered (``unresolved``) so that precision rules naming them are
not reported as matching nothing. Expansion stops at MAX_LAYERS layers or MAX_PARAMS parameters,
so nested repeats cannot make the checker run for long.
"""
from __future__ import annotations

from . import ast, ir
from .bind import AnyOption, bind, value_of
from .diagnostics import Diagnostic, suggest
from .kinds import KINDS, Inferred, Kind, ShapeError
from .limits import MAX_LAYERS, MAX_PARAMS
from .names import Scope, alternative, layer_name_problem, unique
from .seq_kinds import fits_sequence

# Statements visited (including ones that fail) per layer allowed: bounds the work spent on a
# repeated block whose body has errors and so creates no layers.
_WORK_PER_LAYER = 8
_MAX_COSTLY = 16  # did-you-means over long lists per file; later misses get none


class Unresolved:
    """A statement that exists in the source but could not be expanded: its qualified name and
    kind (a layer kind, a block name, or None for an unknown kind)."""

    def __init__(self, name: str, kind: str | None):
        self.name, self.kind = name, kind


class Expander:
    """One per file: the limits count the layers and parameters of all its models together, so
    a file of many models cannot multiply them."""

    def __init__(self, blocks: dict, diags: list):
        self.blocks, self.diags = blocks, diags
        self.layers = self.params = self.work = 0
        self.suggestions = 0  # costly did-you-means given so far (see suggest)
        self.truncated = False  # a limit was reached: the layer lists are partial
        self.stack: list[str] = []  # blocks being expanded, to catch recursion
        self.unresolved: list[Unresolved] = []  # of the model being expanded
        self.top = None  # the model-level statement being expanded, where a limit error points
        self.tokens = None  # (vocab, max_len) while expanding a model with token input
        self.embeddings: dict = {}  # qualified name -> (vocab, dim) of the model's embeddings

    def error(self, code, msg, pos, help=None, width=1):
        self.diags.append(Diagnostic(code, msg, pos.line, pos.col, help, width))

    def suggest(self, word, choices):
        """suggest(), but over long lists (many blocks, many layer names) only the first
        _MAX_COSTLY times per file: each costs a pass over every choice."""
        choices = list(choices)
        if len(choices) > 64:
            if self.suggestions >= _MAX_COSTLY:
                return None
            self.suggestions += 1
        return suggest(word, choices)

    def model(self, stmts, shape, tokens=None):
        """Expand a model body; returns (nodes, out_shape). tokens: (vocab, max_len) when the
        input is token ids (shape is then (max_len,))."""
        self.stack, self.unresolved, self.top, self.tokens = [], [], None, tokens
        self.embeddings = {}  # qualified name -> (vocab, dim), for tied heads
        return self.body(stmts, shape, "", {}, Scope())

    def body(self, stmts, shape, prefix: str, env: dict, names: Scope):
        """Expand statements in one namespace; returns (nodes, out_shape)."""
        nodes = []
        for s in stmts:
            if self.truncated:
                break
            if not prefix and not self.stack:
                self.top = s
            node, shape = (self.residual if isinstance(s, ast.Residual) else self.layer)(
                s, shape, prefix, env, names)
            if node is not None:
                nodes.append(node)
        return nodes, shape

    def spend(self, layers=0, params=0) -> bool:
        """Count work against the limits; False (after one error) once a limit is passed."""
        self.work += not layers
        self.layers += layers
        self.params += params
        if self.truncated:
            return False
        pos = self.top.pos if self.top is not None else ast.Pos(1, 1)
        if self.layers > MAX_LAYERS or self.work > _WORK_PER_LAYER * MAX_LAYERS:
            self.error("E406", f"more than {MAX_LAYERS:,} layers after expansion (all models "
                       "of the file together)", pos,
                       "use fewer or smaller repeats; the limit keeps checking fast")
        elif self.params > MAX_PARAMS:
            self.error("E407", f"more than {MAX_PARAMS:,} (2^40) parameters (all models of the "
                       "file together)", pos, "use smaller layers")
        else:
            return True
        self.truncated = True
        return False

    def name(self, given, base, pos, prefix, names: Scope):
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
        n = names.next.get(base, 1)
        while f"{base}{n}" in names:
            n += 1
        names[f"{base}{n}"] = pos.line
        names.next[base] = n + 1
        return f"{base}{n}"

    def layer(self, s: ast.Layer, shape, prefix, env, names):
        kind = s.call.name
        if kind not in KINDS and kind not in self.blocks:
            self.error("E201", f"unknown layer kind '{kind}'", s.call.pos,
                       self.suggest(kind, list(KINDS) + list(self.blocks)), len(kind))
            self.unresolved.append(Unresolved(prefix + (s.name or ""), None))
            return None, None
        local = self.name(s.name, kind, s.pos, prefix, names)
        if s.repeat is None:
            return self.one(s, kind, local, shape, prefix, env, names)
        count = s.repeat.value
        if not isinstance(count, int) or not 1 <= count <= MAX_LAYERS:
            self.error("E306", f"repeat count must be an integer in 1..{MAX_LAYERS}",
                       s.repeat.pos, width=len(s.repeat.text))
            self.unresolved.append(Unresolved(prefix + local, None))  # a group: s.0, s.1, ...
            return None, None
        inner, subs = Scope(), []
        for i in range(count):
            node, shape = self.one(s, kind, str(i), shape, f"{prefix}{local}.", env, inner)
            subs.append(node)
            if node is None or shape is None:  # the next copies would only repeat its errors
                self.unresolved.append(Unresolved(prefix + local, None))
                break
        return ir.Group(prefix + local, tuple(n for n in subs if n), s.pos.line), shape

    def one(self, s, kind, local, shape, prefix, env, names):
        if not self.spend():
            return None, None
        if kind in self.blocks:
            return self.instance(s, self.blocks[kind], shape, prefix + local, env)
        spec: Kind = KINDS[kind]
        args = bind(spec.options, spec.positional, s.call, env, kind, self.diags)
        if args is None or shape is None:
            self.unresolved.append(Unresolved(prefix + local, kind))
            return None, None
        try:
            fits_sequence(spec, shape, args, self.tokens, self.embeddings)
            inf: Inferred = spec.infer(shape, args)
            parts = spec.parts(shape, args) if spec.parts else None
        except ShapeError as e:
            pos = _arg_pos(s.call, spec.positional, e.arg)
            self.error("E401", f"{prefix + local}: {e}", pos, f"input shape is {list(shape)}",
                       len(kind) if pos is s.call.pos else 1)
            self.unresolved.append(Unresolved(prefix + local, kind))
            return None, None
        if not self.spend(1, inf.params):
            return None, None
        if parts is not None:
            return self.composite(s, kind, args, parts, prefix + local, shape, inf.shape)
        node = ir.Layer(prefix + local, kind, tuple(args.items()), shape, inf.shape, inf.params,
                        inf.buffers, inf.weight, inf.bias, None, s.pos.line, s.pos.col)
        if kind == "embedding":
            self.embeddings[node.name] = (args["vocab"], args["dim"])
        return node, inf.shape

    def composite(self, s, kind, args, parts, qualified, shape, out):
        """Attention or mlp: its named sublayers, each an ordinary layer."""
        body = []
        for local, sub, sub_args, sub_shape in parts:
            inf = KINDS[sub].infer(sub_shape, sub_args)
            if not self.spend(1, inf.params):
                return None, None
            body.append(ir.Layer(f"{qualified}.{local}", sub, tuple(sub_args.items()), sub_shape,
                                 inf.shape, inf.params, inf.buffers, inf.weight, inf.bias, None,
                                 s.pos.line, s.pos.col))
        return ir.Composite(qualified, kind, tuple(args.items()), tuple(body), shape, out,
                            s.pos.line, s.pos.col), out

    def instance(self, s, block: ast.Block, shape, qualified, env):
        if block.name in self.stack:
            cycle = self.stack[self.stack.index(block.name):] + [block.name]
            what = f"block '{block.name}' uses itself" if len(cycle) == 2 else \
                "blocks use each other: " + " -> ".join(cycle)
            self.error("E204", what, s.call.pos, "blocks cannot be recursive", len(block.name))
            self.unresolved.append(Unresolved(qualified, block.name))
            return None, None
        if len({p.name for p in block.params}) < len(block.params):  # E208, reported once
            self.unresolved.append(Unresolved(qualified, block.name))
            return None, None
        params = [ast_param_option(p) for p in block.params]
        positional = tuple(p.name for p in block.params)
        args = bind(params, positional, s.call, env, f"block {block.name}", self.diags)
        if args is None:
            self.unresolved.append(Unresolved(qualified, block.name))
            return None, None
        self.stack.append(block.name)
        nodes, shape = self.body(block.body, shape, qualified + ".", args, Scope())
        self.stack.pop()
        return ir.Group(qualified, tuple(nodes), s.pos.line), shape

    def residual(self, s: ast.Residual, shape, prefix, env, names):
        rname = self.name(s.name, "residual", s.pos, prefix, names)
        if not self.spend():
            return None, None
        nodes, out = self.body(s.body, shape, prefix, env, names)
        if shape is None or out is None:
            return None, out
        shortcut = ()
        if tuple(out) != tuple(shape):
            base = "shortcut" if s.name is None else f"{rname}_shortcut"
            shortcut = self.projection(prefix, unique(base, names, s.pos.line), shape, out, s,
                                       names)
            if shortcut is None or not self.spend(len(shortcut), sum(l.params for l in shortcut)):
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


def ast_param_option(p: ast.Param) -> AnyOption:
    default = value_of(p.default, {}) if p.default is not None else None
    return AnyOption(p.name, default, required=p.default is None, doc=f"block parameter {p.name}")
