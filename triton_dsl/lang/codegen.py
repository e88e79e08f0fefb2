"""ir.Model -> Python source. Pure string building: deterministic, no timestamps, no decisions.

Each emitted line ends with a provenance comment `# model.tdsl:12` pointing at its source line.
Only validated identifiers and numbers are pasted into code; every other string (the file name, the
source text) goes through ``repr``, and comments show the file name through ``display_name``, so a
hostile file name can neither end a comment early nor open a string.
"""
from __future__ import annotations

import os

from . import ir
from .diagnostics import display_name
from ..version import __version__

_ELEMENTWISE = {"relu": "F.relu({x})", "gelu": "F.gelu({x})", "silu": "F.silu({x})",
                "tanh": "torch.tanh({x})", "sigmoid": "torch.sigmoid({x})"}


def _attr(qualified: str) -> str:
    """stage2.0.conv1 -> self.stage2[0].conv1"""
    out = "self"
    for part in qualified.split("."):
        out += f"[{part}]" if part.isdigit() else f".{part}"
    return out


def _pair(v):
    return tuple(v) if isinstance(v, tuple) else v


def _pre_norm(n: ir.Residual) -> bool:
    """A residual around an rmsnorm and an attention or mlp, nothing else: the transformer
    block's half that rt.pre_norm runs (as one native call for a token of a frozen model)."""
    return not n.shortcut and len(n.body) == 2 and n.body[0].op is ir.Op.LAYER \
        and n.body[0].kind == "rmsnorm" and n.body[1].op is ir.Op.COMPOSITE


def _conv_relu(nodes, i: int) -> int:
    """How many nodes from i are a conv2d, maybe its batchnorm, and a relu (rt.conv_relu runs
    them: a frozen int8 convolution applies the ReLU in the same call), else 0."""
    kinds = [n.kind if n.op is ir.Op.LAYER else None for n in nodes[i:i + 3]]
    if kinds[:1] != ["conv2d"]:
        return 0
    if kinds[1:2] == ["relu"]:
        return 2
    return 3 if kinds[1:3] == ["batchnorm", "relu"] else 0


def _residual_tail(nodes, i: int) -> int:
    """For a residual at i whose body ends in a conv2d (and its batchnorm) and that a relu
    follows: how many body nodes rt.conv_add_relu runs with the add and the relu, else 0."""
    n = nodes[i]
    if n.op is not ir.Op.RESIDUAL or _pre_norm(n) or i + 1 >= len(nodes) or \
            nodes[i + 1].op is not ir.Op.LAYER or nodes[i + 1].kind != "relu":
        return 0
    kinds = [c.kind if c.op is ir.Op.LAYER else None for c in n.body[-2:]]
    if kinds[-1:] == ["conv2d"]:
        return 1
    return 2 if kinds == ["conv2d", "batchnorm"] else 0


def _is_conv(n) -> bool:
    return n is not None and n.op is ir.Op.LAYER and n.kind == "conv2d"


class _Emitter:
    def __init__(self, model: ir.Model, fname: str):
        self.m, self.fname = model, fname
        self.init: list[str] = []
        self.fwd: list[str] = []
        self.skips = 0  # names for residual skip tensors: skip1, skip2, ...
        self.run: list[tuple[str, str, str, int]] = []  # pre-norm residuals not yet emitted

    def flush(self):
        """Emit the pending pre-norm residuals: one rt.pre_norm, or rt.pre_norms for a run."""
        run, self.run = self.run, []
        if len(run) == 1:
            norm, mod, args, line = run[0]
            self.fwd.append(f"x = rt.pre_norm({norm}, {mod}, {args}){self.where(line)}")
        elif run:
            self.fwd += ["x = rt.pre_norms(", "    x, cache,"]
            self.fwd += [f"    ({norm}, {mod}),{self.where(line)}" for norm, mod, _, line in run]
            self.fwd.append(")")

    def where(self, line):
        return f"  # {self.fname}:{line}"

    def declare(self, l: ir.Layer):
        """The __init__ line that makes layer l's module."""
        self.init.append(f"{_attr(l.name)} = {self.constructor(l, dict(l.args))}"
                         f"{self.where(l.line)}")

    def body(self, nodes, after=None):
        """Emit nodes in order; ``after`` is the node that runs right after the last of them
        (a residual's last convolution, emitted by the residual)."""
        i = 0
        while i < len(nodes):
            tail = _residual_tail(nodes, i)
            if tail:
                self.residual(nodes[i], tail)
                i += 2  # the residual and the relu after it
                continue
            run = _conv_relu(nodes, i)
            if not run:
                self.node(nodes[i])
                i += 1
                continue
            self.flush()
            conv, bn = nodes[i], nodes[i + 1] if run == 3 else None
            for l in (conv, bn) if bn is not None else (conv,):
                self.declare(l)
            norm = _attr(bn.name) if bn is not None else "None"
            nxt = nodes[i + run] if i + run < len(nodes) else after
            into = f", into={_attr(nxt.name)}" if _is_conv(nxt) else ""
            self.fwd.append(f"x = rt.conv_relu({_attr(conv.name)}, {norm}, x{into})"
                            f"{self.where(conv.line)}")
            i += run

    def node(self, n):
        if n.op is ir.Op.GROUP:
            self.init.append(f"{_attr(n.name)} = rt.Group(){self.where(n.line)}")
            self.body(n.body)
        elif n.op is ir.Op.RESIDUAL and _pre_norm(n):
            norm, layer = n.body
            self.declare(norm)
            mod, args = self.composite(layer)
            self.run.append((_attr(norm.name), mod, args, n.line))
            if not self.m.tokens:  # runs share a KV cache: token models only
                self.flush()
        elif n.op is ir.Op.RESIDUAL:
            self.residual(n)
        elif n.op is ir.Op.COMPOSITE:
            self.flush()
            mod, args = self.composite(n)
            self.fwd.append(f"x = {mod}({args}){self.where(n.line)}")
        else:
            self.flush()
            self.layer(n)

    def residual(self, n: ir.Residual, tail: int = 0):
        """x + skip around the body; with tail (_residual_tail), the body's last convolution
        [and batchnorm], the add and the relu that follows the residual as one
        rt.conv_add_relu, the shortcut projection computed before it."""
        self.flush()
        self.skips += 1
        skip = f"skip{self.skips}"
        self.fwd.append(f"{skip} = x  # residual {n.name}: {self.fname}:{n.line}")
        head = n.body[:len(n.body) - tail]
        self.body(head, after=n.body[len(head)] if tail else None)
        self.flush()  # the body's own pre-norm residuals come before the add
        conv, bn = (n.body[len(head)], n.body[-1] if tail == 2 else None) if tail else (None,) * 2
        for l in (conv, bn):
            if l is not None:
                self.declare(l)  # in source order, before the shortcut
        for c in n.shortcut:  # projection layers, applied to the skip tensor
            self.layer(c, skip, out=skip)
        if not tail:
            self.fwd.append(f"x = x + {skip}{self.where(n.line)}")
            return
        norm = _attr(bn.name) if bn is not None else "None"
        self.fwd.append(f"x = rt.conv_add_relu({_attr(conv.name)}, {norm}, x, {skip})"
                        f"{self.where(conv.line)}")

    def composite(self, n: ir.Composite) -> tuple[str, str]:
        """Attention or mlp: the runtime module, then its projections as its children. Returns
        the call's module and arguments ("self.attn", "x, cache")."""
        a, mod = dict(n.args), _attr(n.name)
        if n.kind == "attention":
            max_len = self.m.tokens[1] if self.m.tokens else n.in_shape[0]
            opts = [f"heads={a['heads']}"]
            if a["kv_heads"] not in (None, a["heads"]):
                opts.append(f"kv_heads={a['kv_heads']}")
            opts += [f"{k}={a[k]!r}" for k in ("causal", "rotary") if not a[k]]
            opts.append(f"max_len={max_len}")
            ctor = f"rt.Attention({n.in_shape[-1]}, {', '.join(opts)}"
        else:
            opts = [f"gate={a['gate']!r}"] if a["gate"] else []
            opts += [f"activation={a['activation']!r}"] if a["activation"] != "silu" else []
            ctor = f"rt.MLP({', '.join(opts)}"
        ctor += (", " if opts else "") + "sub_norm=True)" if a["sub_norm"] else ")"
        self.init.append(f"{mod} = {ctor}{self.where(n.line)}")
        for c in n.body:
            self.declare(c)
        cache = ", cache" if n.kind == "attention" and self.m.tokens else ""
        return mod, f"x{cache}"

    def layer(self, l: ir.Layer, x: str = "x", out: str = "x"):
        a = dict(l.args)
        mod = _attr(l.name)
        ctor = self.constructor(l, a)
        if ctor:
            self.init.append(f"{mod} = {ctor}{self.where(l.line)}")
            call = f"{mod}({x})"
        else:
            call = self.stateless(l, a, x)
        self.fwd.append(f"{out} = {call}{self.where(l.line)}")

    def constructor(self, l, a):
        prec = "" if l.precision is None else f", precision={l.precision.to_python()}"
        if l.kind == "linear":
            bias = "" if a["bias"] else ", bias=False"
            return f"rt.Linear({l.weight[1]}, {a['out_features']}{bias}{prec})"
        if l.kind == "conv2d":
            opts = [f"{k}={_pair(a[k])!r}" for k, d in
                    (("stride", 1), ("padding", 0), ("dilation", 1), ("groups", 1), ("bias", True))
                    if a[k] != d]
            return (f"rt.Conv2d({l.in_shape[0]}, {a['out_channels']}, {_pair(a['kernel'])!r}"
                    + "".join(", " + o for o in opts) + prec + ")")
        if l.kind == "batchnorm":
            cls = "BatchNorm2d" if len(l.in_shape) == 3 else "BatchNorm1d"
            return f"nn.{cls}({l.in_shape[0]}, eps={a['eps']!r}, momentum={a['momentum']!r})"
        if l.kind == "layernorm":
            return f"nn.LayerNorm({l.in_shape[-1]}, eps={a['eps']!r})"
        if l.kind == "rmsnorm":
            return f"rt.RMSNorm({l.in_shape[-1]}, eps={a['eps']!r})"
        if l.kind == "embedding":
            return f"nn.Embedding({a['vocab']}, {a['dim']})"
        return None

    def stateless(self, l, a, x):
        k = l.kind
        if k in _ELEMENTWISE:
            return _ELEMENTWISE[k].format(x=x)
        if k == "softmax":
            d = a["dim"] + 1 if a["dim"] >= 0 else a["dim"]  # the source does not count batch
            return f"F.softmax({x}, dim={d})"
        if k == "ternary_act":
            return f"rt.ternary_act({x}, {a['threshold']!r})"
        if k == "tied_head":  # the embedding's weight, shared: no module of its own
            return f"F.linear({x}, {_attr(a['embedding'])}.weight)"
        if k == "flatten":
            return f"torch.flatten({x}, 1)"
        if k == "dropout":
            return f"F.dropout({x}, {a['p']!r}, self.training)"
        if k in ("maxpool", "avgpool"):
            fn = "F.max_pool2d" if k == "maxpool" else "F.avg_pool2d"
            stride = _pair(a["stride"]) if a["stride"] is not None else _pair(a["kernel"])
            return f"{fn}({x}, {_pair(a['kernel'])!r}, {stride!r}, {_pair(a['padding'])!r})"
        if k in ("adaptive_avgpool", "adaptive_maxpool"):
            fn = "F.adaptive_avg_pool2d" if k == "adaptive_avgpool" else "F.adaptive_max_pool2d"
            return f"{fn}({x}, {tuple(l.out_shape[1:])!r})"
        raise AssertionError(f"no code for layer kind {k}")  # the checker admits only known kinds


def generate(models: list[ir.Model], path: str, source: str, fp32: bool = False) -> str:
    """The Python module for every model of one .tdsl file (fp32: the all-fp32 variant)."""
    fname = os.path.basename(path)
    shown = display_name(fname)
    doc = f"Models compiled from {fname}: {', '.join(m.name for m in models)}."
    out = [f"# Generated by triton-dsl {__version__} from {shown}. Do not edit: change the .tdsl",
           f"# file and run `triton-dsl compile {shown}` again.",
           repr(doc),
           "import torch",
           "import torch.nn.functional as F",
           "from torch import nn",
           "",
           "from triton_dsl import runtime as rt",
           "from triton_dsl.runtime import Binary, Float, Int, Ternary",
           "",
           f"__all__ = {[m.name for m in models]!r}",
           "",
           f"TDSL_SOURCE = {source!r}",
           f"SOURCE_PATH = {fname!r}",
           ""]
    for m in models:
        e = _Emitter(m, shown)
        e.body(m.body)
        e.flush()
        shape = ", ".join(map(str, m.input_shape))
        output = ", ".join(map(str, m.output_shape))
        if m.tokens:  # the sequence length varies: write it as seq
            doc = f"token ids [batch, seq] -> output [batch, seq, {output.split(', ', 1)[1]}]"
        else:
            doc = f"input [batch, {shape}] -> output [batch, {output}]"
        out += ["",
                f"class {m.name}(rt.CompiledModel):",
                f'    """{m.name}: {doc}."""',
                "",
                f"    input_shape = {m.input_shape!r}"]
        if m.tokens:
            out += [f"    vocab_size = {m.tokens[0]}", f"    max_len = {m.tokens[1]}"]
        out += ["    tdsl_source = TDSL_SOURCE",
                f"    tdsl_model = {m.name!r}"]
        if fp32:
            out.append("    tdsl_fp32 = True  # every layer fp32, whatever the precision rules say")
        out += ["",
                "    def __init__(self):",
                "        super().__init__()"]
        out += ["        " + s for s in e.init]
        out += ["",
                "    def forward(self, x, cache=None):" if m.tokens else "    def forward(self, x):",
                "        x = self.check_input(x, cache)" if m.tokens else
                "        x = self.check_input(x)"]
        out += ["        " + s for s in e.fwd]
        out += ["        return x", ""]
    return "\n".join(out).rstrip("\n") + "\n"
