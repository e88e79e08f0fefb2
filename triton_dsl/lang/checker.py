"""Semantic checks and lowering: ast.File -> list[ir.Model] plus every diagnostic in the file.

Precision precedence, one rule for all: exact name > pattern > layer kind > model default; among
rules of the same rank the later one in the file wins.
"""
from __future__ import annotations

import dataclasses
import fnmatch
import math

from . import ast, ir
from .diagnostics import Diagnostic, suggest
from .expand import Expander, bind, value_of
from .kinds import KINDS, QUANTIZABLE
from .names import alternative, model_name_problem
from .precision import FP32, REGISTRY, Ternary

_RANK = {"layer_exact": 3, "layer_pattern": 2, "kind": 1, "default": 0}


def check(tree: ast.File, text: str, all_fp32: bool = False
          ) -> tuple[list[ir.Model], list[Diagnostic]]:
    """all_fp32: every layer fp32 whatever the rules say (still checked): the float baseline
    that post-training quantization starts from."""
    diags: list[Diagnostic] = []
    blocks: dict[str, ast.Block] = {}
    models: list[ast.Model] = []
    rules: dict[str, list[ast.Precision]] = {}
    for d in tree.definitions:
        if isinstance(d, ast.Block):
            if d.name in blocks or d.name in KINDS:
                what = "a layer kind" if d.name in KINDS else "already defined"
                diags.append(Diagnostic("E205", f"block name '{d.name}' is {what}", d.pos.line,
                                        d.pos.col, width=len(d.name)))
            blocks.setdefault(d.name, d)
        elif isinstance(d, ast.Model):
            why = model_name_problem(d.name)
            if why:
                diags.append(Diagnostic("E207", f"'{d.name}' cannot name a model: {why}",
                                        d.pos.line, d.pos.col, f"rename it, for example "
                                        f"'{alternative(d.name, model=True)}'", len(d.name)))
            if any(m.name == d.name for m in models):
                diags.append(Diagnostic("E206", f"model '{d.name}' is defined twice", d.pos.line,
                                        d.pos.col, width=len(d.name)))
            models.append(d)
        else:
            target = d.model or (models[-1].name if models else None)
            if target is None:
                diags.append(Diagnostic("E506", "precision section before any model", d.pos.line,
                                        d.pos.col, "put it after its model, or name the model: "
                                        "precision MyModel:"))
            elif d.model and d.model not in {
                    x.name for x in tree.definitions if isinstance(x, ast.Model)}:
                diags.append(Diagnostic("E507", f"no model named '{d.model}'", d.pos.line,
                                        d.pos.col, suggest(d.model, [m.name for m in models])))
            else:
                rules.setdefault(target, []).append(d)
    if not models:
        diags.append(Diagnostic("E106", "no model in this file", 1, 1,
                                help="a file declares at least one `model Name:`"))
    out = []
    for m in models:
        model = _model(m, blocks, rules.get(m.name, []), text, tree.path, diags, all_fp32)
        if model is not None:
            out.append(model)
    return out, _dedupe(diags)


def _model(m: ast.Model, blocks, sections, text, path, diags, all_fp32=False) -> ir.Model | None:
    n_before = sum(d.is_error for d in diags)
    shape = None
    if not m.inputs:
        diags.append(Diagnostic("E403", f"model '{m.name}' has no input shape", m.pos.line,
                                m.pos.col, "add a line such as: input [1, 28, 28]", len(m.name)))
    else:
        for extra in m.inputs[1:]:
            diags.append(Diagnostic("E404", "a model has one input line", extra.pos.line,
                                    extra.pos.col))
        vals = value_of(m.inputs[0], {})
        if not vals or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                               for v in vals) or len(vals) > 3:
            diags.append(Diagnostic("E405", "input shape must be 1 to 3 positive integers "
                                    "(the batch dimension is not written)", m.inputs[0].pos.line,
                                    m.inputs[0].pos.col))
        else:
            shape = tuple(vals)
    nodes, _ = Expander(blocks, diags).body(m.body, shape, "", {}, {})
    layers = list(ir._walk(nodes))
    table = _resolve(m, layers, sections, diags)
    if all_fp32:
        table = {name: FP32 for name in table}
    _warn(m, layers, table, diags)
    if sum(d.is_error for d in diags) > n_before or shape is None:
        return None
    return ir.Model(m.name, path, shape, _apply(tuple(nodes), table), m.pos.line, text)


def _resolve(m, layers, sections, diags) -> dict:
    """Precision of each quantizable layer by the one precedence; report rules that match nothing."""
    quant = [l for l in layers if l.kind in QUANTIZABLE]
    best: dict[str, tuple] = {}  # layer name -> (rank, order, precision)
    seen_default = None
    order = 0
    for sec in sections:
        for r in sec.rules:
            order += 1
            prec = _precision(r.precision, diags)
            if r.kind == "default":
                if seen_default:
                    diags.append(Diagnostic("E505", f"a second default precision (first on line "
                                            f"{seen_default})", r.pos.line, r.pos.col))
                seen_default = r.pos.line
                matched, rank = quant, "default"
            elif r.kind == "kind":
                matched, rank = _kind_rule(r, layers, quant, diags), "kind"
            else:
                matched, rank = _layer_rule(r, layers, quant, diags)
            if prec is None:
                continue
            for l in matched:
                if _fits(prec, l, r, diags):
                    key = (_RANK[rank], order)
                    if l.name not in best or key > best[l.name][:2]:
                        best[l.name] = key + (prec,)
    return {l.name: best[l.name][2] if l.name in best else FP32 for l in quant}


def _precision(call: ast.Call, diags):
    if call.name not in REGISTRY:
        diags.append(Diagnostic("E501", f"unknown precision '{call.name}'", call.pos.line,
                                call.pos.col, suggest(call.name, REGISTRY), len(call.name)))
        return None
    ctor, options, positional = REGISTRY[call.name]
    args = bind(options, positional, call, {}, call.name, diags)
    if args is None:
        return None
    given = {a.name for a in call.args if a.name} | set(positional[:len(call.args)])
    try:
        return ctor(**{k: v for k, v in args.items() if k in given})
    except ValueError as e:
        diags.append(Diagnostic("E502", str(e), call.pos.line, call.pos.col, width=len(call.name)))
        return None


def _kind_rule(r, layers, quant, diags):
    if r.target not in KINDS:
        diags.append(Diagnostic("E201", f"unknown layer kind '{r.target}'", r.pos.line, r.pos.col,
                                suggest(r.target, KINDS), len(r.target)))
        return []
    if r.target not in QUANTIZABLE:
        diags.append(Diagnostic("E504", f"'{r.target}' layers have no weights to quantize",
                                r.pos.line, r.pos.col, "precision applies to: " +
                                ", ".join(QUANTIZABLE), len(r.target)))
        return []
    matched = [l for l in quant if l.kind == r.target]
    if not matched:
        diags.append(Diagnostic("E503", f"rule matches no layer: the model has no {r.target} layer",
                                r.pos.line, r.pos.col, width=len(r.target)))
    return matched


def _layer_rule(r, layers, quant, diags):
    is_pattern = any(c in r.target for c in "*?")
    if is_pattern:
        matched = [l for l in quant if fnmatch.fnmatchcase(l.name, r.target)]
    else:
        matched = [l for l in quant if l.name == r.target]
    if not matched:
        other = [l for l in layers if l.name == r.target or
                 (is_pattern and fnmatch.fnmatchcase(l.name, r.target))]
        if other:
            msg = f"'{other[0].name}' is a {other[0].kind} layer, which has no weights to quantize"
            help_ = "precision applies to: " + ", ".join(QUANTIZABLE)
        else:
            msg = f"rule matches no layer: no layer {'matches' if is_pattern else 'is named'} " \
                  f"'{r.target}'"
            help_ = suggest(r.target, [l.name for l in quant])
        diags.append(Diagnostic("E503", msg, r.pos.line, r.pos.col, help_, len(r.target)))
    return matched, "layer_pattern" if is_pattern else "layer_exact"


def _fits(prec, layer, rule, diags) -> bool:
    """Packing alignment checked before any work: group sizes must divide the reduction."""
    if getattr(prec, "activations", "none") == "dynamic" and layer.kind == "conv2d" and (
            layer.arg("groups") != 1 or layer.arg("padding") == "same"):
        diags.append(Diagnostic("E509", f"{layer.name}: activations=dynamic on a conv2d needs "
                                "groups=1 and a numeric padding", rule.precision.pos.line,
                                rule.precision.pos.col, "quantize this layer's weights only, "
                                "or use activations=static", len(rule.precision.name)))
        return False
    g = getattr(prec, "group_size", None)
    if g and layer.weight[1] % g:
        pos = next((a.value.pos for a in rule.precision.args if a.name == "group_size"),
                   rule.precision.pos)
        diags.append(Diagnostic("E508", f"group_size={g} does not divide {layer.name}'s "
                                f"{layer.weight[1]} input weights per output", pos.line, pos.col,
                                "pick a divisor: " + ", ".join(
                                    map(str, _divisors(layer.weight[1])[:8]))))
        return False
    return True


def _divisors(n):
    return [d for d in range(8, min(n, 1024) + 1) if n % d == 0]


def _warn(m, layers, table, diags):
    """The seed tutorial's guidelines: keep the first and last layers at 8 bits or more, and a
    fixed ternary threshold above the initial weights' range zeroes a whole layer."""
    quant = [l for l in layers if l.kind in QUANTIZABLE]
    for l in {id(x): x for x in (quant[:1] + quant[-1:])}.values():
        p = table.get(l.name)
        if p is not None and p.bits < 8:
            where = "first" if l is quant[0] else "last"
            diags.append(Diagnostic("W601", f"the {where} layer '{l.name}' is quantized to "
                                    f"{p.bits} bits; first and last layers are the most sensitive",
                                    l.line, l.col, "keep it at int8 or wider unless accuracy allows",
                                    width=len(l.name.rsplit(".", 1)[-1]),
                                    severity="warning"))
    for l in quant:
        p = table.get(l.name)
        if isinstance(p, Ternary) and isinstance(p.threshold, float):
            bound = 1 / math.sqrt(l.weight[1])  # torch's default init: U(-1/sqrt(K), 1/sqrt(K))
            if p.threshold >= bound:
                diags.append(Diagnostic("W602", f"threshold {p.threshold} exceeds every initial "
                                        f"weight of '{l.name}' (|w| < {bound:.3g}): the whole "
                                        "layer starts at zero", l.line, l.col,
                                        "use threshold=twn or learned, or a smaller number",
                                        severity="warning"))


def _apply(nodes, table):
    out = []
    for n in nodes:
        if n.op is ir.Op.LAYER:
            out.append(dataclasses.replace(n, precision=table[n.name]) if n.name in table else n)
        elif n.op is ir.Op.RESIDUAL:
            out.append(dataclasses.replace(n, body=_apply(n.body, table),
                                           shortcut=_apply(n.shortcut, table)))
        else:
            out.append(dataclasses.replace(n, body=_apply(n.body, table)))
    return tuple(out)


def _dedupe(diags):
    """A block used N times reports the same problem N times; keep one, in file order."""
    seen, out = set(), []
    for d in diags:
        key = (d.code, d.line, d.col, d.message)
        if key not in seen:
            seen.add(key)
            out.append(d)
    return sorted(out, key=lambda d: (d.line, d.col))
