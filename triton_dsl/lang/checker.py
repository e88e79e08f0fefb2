"""Semantic checks and lowering: ast.File -> list[ir.Model] plus every diagnostic in the file.

Expansion (blocks, repeats, shapes) lives in expand.py, the precision rules in rules.py.
"""
from __future__ import annotations

import dataclasses
import math

from . import ast, ir
from .bind import bind, value_of
from .diagnostics import Diagnostic, suggest
from .expand import Expander
from .kinds import KINDS, QUANTIZABLE
from .limits import MAX_SEQ, MAX_SIZE
from .options import Option
from .names import alternative, model_name_problem
from .precision import FP32, Ternary
from .rules import resolve_layers


def check(tree: ast.File, text: str, all_fp32: bool = False
          ) -> tuple[list[ir.Model], list[Diagnostic]]:
    """all_fp32: every layer fp32 whatever the rules say (still checked): the float baseline
    that post-training quantization starts from."""
    diags: list[Diagnostic] = []
    blocks: dict[str, ast.Block] = {}
    models: list[ast.Model] = []
    rules: dict[str, list[ast.Precision]] = {}
    model_names = {x.name for x in tree.definitions if isinstance(x, ast.Model)}
    for d in tree.definitions:
        if isinstance(d, ast.Block):
            if d.name in blocks or d.name in KINDS or d.name.startswith("_"):
                # an unnamed use is named after the block (B1), and Python mangles `self.__B1`
                what = "a layer kind" if d.name in KINDS else "already defined" \
                    if d.name in blocks else "reserved: names starting with '_' are internal"
                diags.append(Diagnostic("E205", f"block name '{d.name}' is {what}", d.pos.line,
                                        d.pos.col, width=len(d.name)))
            _params(d, diags)
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
            if target is None and not any(isinstance(x, ast.Model) for x in tree.definitions):
                continue  # a rules file for existing modules: E106 below says so, once
            if target is None:
                diags.append(Diagnostic("E506", "precision section before any model", d.pos.line,
                                        d.pos.col, "put it after its model, or name the model: "
                                        "precision MyModel:"))
            elif d.model and d.model not in model_names:
                diags.append(Diagnostic("E507", f"no model named '{d.model}'", d.pos.line,
                                        d.pos.col, suggest(d.model, [m.name for m in models])))
            else:
                rules.setdefault(target, []).append(d)
    if not models:
        rules_only = tree.definitions and all(isinstance(x, ast.Precision)
                                              for x in tree.definitions)
        diags.append(Diagnostic(
            "E106", "no model in this file" + (": it holds precision rules for existing "
                                                "modules" if rules_only else ""), 1, 1,
            help="apply it with `triton-dsl plan FILE --model PKG.MODULE:FACTORY` or "
                 "triton_dsl.quantize(model, FILE)" if rules_only else
                 "a file declares at least one `model Name:`"))
    out = []
    expander = Expander(blocks, diags)
    for m in models:
        model = _model(m, expander, rules.get(m.name, []), text, tree.path, diags, all_fp32)
        if model is not None:
            out.append(model)
    return out, _dedupe(diags)


def _model(m: ast.Model, expander, sections, text, path, diags, all_fp32=False
           ) -> ir.Model | None:
    n_before = sum(d.is_error for d in diags)
    shape = tokens = None
    if not m.inputs:
        diags.append(Diagnostic("E403", f"model '{m.name}' has no input shape", m.pos.line,
                                m.pos.col, "add a line such as: input [1, 28, 28]", len(m.name)))
    else:
        for extra in m.inputs[1:]:
            diags.append(Diagnostic("E404", "a model has one input line", extra.pos.line,
                                    extra.pos.col))
        if isinstance(m.inputs[0], ast.Call):
            tokens = _tokens(m.inputs[0], diags)
            shape = (tokens[1],) if tokens else None
        else:
            vals = value_of(m.inputs[0], {})
            if not vals or not all(isinstance(v, int) and not isinstance(v, bool) and
                                   0 < v <= MAX_SIZE for v in vals) or len(vals) > 3:
                diags.append(Diagnostic("E405", f"input shape must be 1 to 3 integers in "
                                        f"1..{MAX_SIZE} (the batch dimension is not written)",
                                        m.inputs[0].pos.line, m.inputs[0].pos.col))
            else:
                shape = tuple(vals)
    nodes, _ = expander.model(m.body, shape, tokens)
    layers = list(ir.walk(nodes))
    table, explicit = resolve_layers(sections, layers, expander, diags)
    if all_fp32:
        table = {name: FP32 for name in table}
    _warn(m, layers, table, explicit, diags, first=tokens is None)
    if sum(d.is_error for d in diags) > n_before or shape is None:
        return None
    return ir.Model(m.name, path, shape, _apply(tuple(nodes), table), m.pos.line, text, tokens)


_TOKENS = (Option("vocab", None, required=True, number="int", lo=1, hi=MAX_SIZE,
                  doc="vocabulary size: token ids are 0..vocab-1"),
           Option("max_len", None, required=True, number="int", lo=1, hi=MAX_SEQ,
                  doc="the longest sequence, prompt and generated tokens together"))


def _tokens(call: ast.Call, diags) -> tuple | None:
    """(vocab, max_len) of `input tokens(vocab=..., max_len=...)`, or None after an error."""
    if call.name != "tokens":
        diags.append(Diagnostic("E405", f"unknown input '{call.name}'", call.pos.line,
                                call.pos.col, "write input [C, H, W] or input tokens(vocab=..., "
                                "max_len=...)", len(call.name)))
        return None
    args = bind(_TOKENS, ("vocab", "max_len"), call, {}, "tokens", diags)
    return None if args is None else (args["vocab"], args["max_len"])


def _params(b: ast.Block, diags):
    """A block parameter is named once (docs/language.md); the second would silently win."""
    seen = {}
    for p in b.params:
        if p.name in seen:
            diags.append(Diagnostic("E208", f"block '{b.name}' has two parameters named "
                                    f"'{p.name}' (first at column {seen[p.name]})", p.pos.line,
                                    p.pos.col, "rename or remove one", len(p.name)))
        seen.setdefault(p.name, p.pos.col)


def _warn(m, layers, table, explicit, diags, first=True):
    """The seed tutorial's guidelines: keep the first and last layers at 8 bits or more, and a
    fixed ternary threshold above the initial weights' range zeroes a whole layer. A first or
    last layer that an exact `layer NAME:` rule puts below 8 bits is a decision, not an
    oversight: no warning. In a token model the first layer is the embedding, which stays
    fp32 (first=False): only the last is checked."""
    quant = [l for l in layers if l.kind in QUANTIZABLE]
    for l in {id(x): x for x in (quant[:1] * first + quant[-1:])}.values():
        p = table.get(l.name)
        if p is not None and p.bits < 8 and l.name not in explicit:
            where = "first" if first and l is quant[0] else "last"
            diags.append(Diagnostic("W601", f"the {where} layer '{l.name}' is quantized to "
                                    f"{p.bits} bits; first and last layers are the most sensitive",
                                    l.line, l.col, "keep it at int8 or wider unless accuracy "
                                    f"allows (a `layer {l.name}: ...` rule states the choice "
                                    "and silences this)",
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
