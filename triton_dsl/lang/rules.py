"""The one rule engine: which precision each linear/conv2d layer gets, and rules that match nothing.

Precedence: exact name > pattern > layer kind > model default; among rules of the same rank the
later one in the file wins. A rule that matches no layer is an error, unless an earlier error kept
a layer it may name from being resolved (one mistake, one message).
"""
from __future__ import annotations

import fnmatch
import functools
import re

from .bind import bind
from .diagnostics import Diagnostic, suggest
from .kinds import KINDS, QUANTIZABLE
from .limits import MAX_RULES
from .precision import FP32, REGISTRY

_RANK = {"layer_exact": 3, "layer_pattern": 2, "kind": 1, "default": 0}


def resolve(sections, layers, expander, diags) -> tuple[dict, set]:
    """({layer name: precision} for every quantizable layer, the names whose precision an exact
    `layer NAME:` rule chose); reports every rule problem."""
    quant = [l for l in layers if l.kind in QUANTIZABLE]
    by_name = {l.name: l for l in quant}
    best: dict[str, tuple] = {}  # layer name -> (rank, order, precision)
    seen_default = None
    order = 0
    for r in (r for sec in sections for r in sec.rules):
        order += 1
        if order > MAX_RULES:
            diags.append(Diagnostic("E510", f"more than {MAX_RULES} precision rules for one model",
                                    r.pos.line, r.pos.col, "use patterns (stage*.conv?) or kind "
                                    "rules to cover many layers with one rule"))
            break
        prec = _precision(r.precision, diags)
        if r.kind == "default":
            if seen_default:
                diags.append(Diagnostic("E505", f"a second default precision (first on line "
                                        f"{seen_default})", r.pos.line, r.pos.col))
            seen_default = r.pos.line
            matched, rank = quant, "default"
            if not quant and not _hidden(r, expander):
                diags.append(Diagnostic("E503", "default rule matches no layer: the model has no "
                                        + " or ".join(QUANTIZABLE) + " layer", r.pos.line,
                                        r.pos.col, "remove the precision section, or add a "
                                        "layer that has weights", len("default")))
        elif r.kind == "kind":
            matched, rank = _kind_rule(r, quant, expander, diags), "kind"
        else:
            matched, rank = _layer_rule(r, layers, quant, by_name, expander, diags)
        if prec is None:
            continue
        for l in matched:
            if _fits(prec, l, r, diags):
                key = (_RANK[rank], order)
                if l.name not in best or key > best[l.name][:2]:
                    best[l.name] = key + (prec,)
    table = {l.name: best[l.name][2] if l.name in best else FP32 for l in quant}
    return table, {n for n, b in best.items() if b[0] == _RANK["layer_exact"]}


def _precision_help(name: str) -> str | None:
    m = re.fullmatch(r"(u?int|fp|float)(\d+)", name)
    if m and m.group(1) in ("int", "uint") and 2 <= int(m.group(2)) <= 8 and name != "int8":
        return f"write int(bits={int(m.group(2))}) for {int(m.group(2))}-bit integer weights"
    if m and m.group(2) in ("16", "32"):
        return "for 16 or 32 bits use fp16, bf16 or fp32"
    return suggest(name, REGISTRY)


def _hidden(r, expander) -> bool:
    """Whether the rule may name a layer that an earlier error kept from being resolved: then
    'matches no layer' would be a second, false message for one mistake."""
    if expander.truncated:
        return True
    is_pattern = any(c in r.target for c in "*?")
    for u in expander.unresolved:
        # an unknown kind, a block, or attention/mlp: any layer may be inside
        opaque = u.kind not in KINDS or KINDS[u.kind].parts is not None
        if not (opaque or u.kind in QUANTIZABLE):
            continue
        if r.kind == "default" or r.kind == "kind" and (opaque or u.kind == r.target):
            return True
        if r.kind == "layer":
            if is_pattern and (opaque or fnmatch.fnmatchcase(u.name, r.target)):
                return True
            if u.name == r.target or opaque and u.name and r.target.startswith(u.name + "."):
                return True
    return False


@functools.lru_cache(maxsize=MAX_RULES)
def _matcher(pattern: str):
    return re.compile(fnmatch.translate(pattern)).match


def _kind_rule(r, quant, expander, diags):
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
    if not matched and not _hidden(r, expander):
        diags.append(Diagnostic("E503", f"rule matches no layer: the model has no {r.target} layer",
                                r.pos.line, r.pos.col, width=len(r.target)))
    return matched


def _layer_rule(r, layers, quant, by_name, expander, diags):
    is_pattern = any(c in r.target for c in "*?")
    if is_pattern:
        match = _matcher(r.target)
        matched = [l for l in quant if match(l.name)]
    else:
        matched = [by_name[r.target]] if r.target in by_name else []
    if not matched and not _hidden(r, expander):
        other = [l for l in layers if l.kind not in QUANTIZABLE and  # those matched no rule
                 (l.name == r.target or is_pattern and match(l.name))]
        inside = [l.name for l in quant if not is_pattern and l.name.startswith(r.target + ".")]
        if other:
            msg = f"'{other[0].name}' is a {other[0].kind} layer, which has no weights to quantize"
            help_ = "precision applies to: " + ", ".join(QUANTIZABLE)
        elif inside:  # a block instance, an attention or an mlp: name the layers within
            msg = (f"'{r.target}' holds layers rather than weights: "
                   + ", ".join(inside[:4]) + (", ..." if len(inside) > 4 else ""))
            help_ = f"write `layer {r.target}.*: ...` to select them all"
        else:
            msg = f"rule matches no layer: no layer {'matches' if is_pattern else 'is named'} " \
                  f"'{r.target}'"
            names = [l.name for l in quant] + [u.name for u in expander.unresolved if u.name]
            help_ = expander.suggest(r.target, names)
        diags.append(Diagnostic("E503", msg, r.pos.line, r.pos.col, help_, len(r.target)))
    return matched, "layer_pattern" if is_pattern else "layer_exact"


def _precision(call, diags):
    if call.name not in REGISTRY:
        diags.append(Diagnostic("E501", f"unknown precision '{call.name}'", call.pos.line,
                                call.pos.col, _precision_help(call.name), len(call.name)))
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
