"""The one rule engine: which precision each target gets, and rules that match nothing.

A target is anything a rule can select: a linear/conv2d layer of a model declared in a .tdsl file
(``resolve_layers``), or a module of an existing PyTorch model (lang/external.py builds those from
the names, classes and weight shapes the runtime reads). Both go through ``resolve`` below, so
both get the same precedence and the same messages.

Precedence: exact name > pattern > kind > default; among rules of the same rank the later one in
the file wins. A rule that matches no target is an error, unless an earlier error kept a layer it
may name from being resolved (one mistake, one message). Whether the winning precision fits its
target (group sizes, dynamic activations on convolutions, modules the runtime cannot replace) is
checked once, for the winner only: a rule that a later, stronger rule overrides is not blamed.
"""
from __future__ import annotations

import fnmatch
import functools
import re
from dataclasses import dataclass, field
from typing import Callable

from .bind import bind
from .diagnostics import Diagnostic, suggest, suggest_pattern
from .fits import SKIP, fits, one_per_place
from .kinds import KINDS, QUANTIZABLE
from .limits import MAX_RULES
from .precision import FP32, REGISTRY

_RANK = {"layer_exact": 3, "layer_pattern": 2, "kind": 1, "default": 0}


@dataclass(frozen=True)
class Target:
    """One thing a rule can select: its qualified name, its kind (a layer kind of the language,
    or an existing module's class name) and its weight as a matmul, (N outputs, K inputs each)."""
    name: str
    kind: str
    weight: tuple
    bias: bool = False
    dynamic_ok: bool = True  # False for grouped or padding='same' convolutions (E509)
    problem: str | None = None  # why it cannot be replaced at all (E511), for existing modules


def _no_hidden(rule) -> bool:
    return False


@dataclass
class Scope:
    """What the rules of one section list are matched against, and how messages name it."""
    targets: list  # of Target, in model order
    others: list  # (name, kind, why) of layers or modules a rule cannot select
    kinds: tuple  # the kinds that take a precision
    known_kinds: tuple  # every kind a kind rule may name (those not in ``kinds``: E504)
    noun: str = "layer"
    kind_without: str = "have no weights to quantize"  # E504, after "'relu' layers"
    external: bool = False  # `skip` is allowed, and a target no rule selects stays as it is
    hidden: Callable = _no_hidden  # may this rule name something an earlier error hid?
    suggest: Callable = suggest
    extra_names: list = field(default_factory=list)  # more names for did-you-mean


def resolve_layers(sections, layers, expander, diags) -> tuple[dict, set]:
    """resolve() for the linear/conv2d layers of a model declared in a .tdsl file."""
    targets = [Target(l.name, l.kind, l.weight, l.bias, l.kind != "conv2d" or (
        l.arg("groups") == 1 and l.arg("padding") != "same")) for l in layers
        if l.kind in QUANTIZABLE]
    scope = Scope(targets, [(l.name, l.kind, None) for l in layers if l.kind not in QUANTIZABLE],
                  QUANTIZABLE, tuple(KINDS), hidden=lambda r: _hidden(r, expander),
                  suggest=expander.suggest,
                  extra_names=[u.name for u in expander.unresolved if u.name])
    return resolve(sections, scope, diags)


def resolve(sections, scope: Scope, diags) -> tuple[dict, set]:
    """({target name: precision, or SKIP} for every target, the names whose precision an exact
    `layer NAME:` rule chose); reports every rule problem. A target no rule selects gets fp32,
    or SKIP in an external scope."""
    quant = scope.targets
    by_name = {t.name: t for t in quant}
    best: dict[str, tuple] = {}  # target name -> (rank, order, precision, rule)
    seen_default = None
    order = 0
    for r in (r for sec in sections for r in sec.rules):
        order += 1
        if order > MAX_RULES:
            diags.append(Diagnostic("E510", f"more than {MAX_RULES} precision rules for one model",
                                    r.pos.line, r.pos.col, "use patterns (stage*.conv?) or kind "
                                    "rules to cover many layers with one rule"))
            break
        prec = _precision(r.precision, scope, diags)
        if r.kind == "default":
            if seen_default:
                diags.append(Diagnostic("E505", f"a second default precision (first on line "
                                        f"{seen_default})", r.pos.line, r.pos.col))
            seen_default = r.pos.line
            matched, rank = quant, "default"
            if not quant and not scope.hidden(r):
                diags.append(Diagnostic("E503", f"default rule matches no {scope.noun}: the model "
                                        f"has no {' or '.join(scope.kinds)} {scope.noun}",
                                        r.pos.line, r.pos.col, "remove the precision section, or "
                                        f"add a {scope.noun} that has weights", len("default")))
        elif r.kind == "kind":
            matched, rank = _kind_rule(r, scope, diags), "kind"
        else:
            matched, rank = _layer_rule(r, scope, by_name, diags)
        if prec is None:
            continue
        for t in matched:
            key = (_RANK[rank], order)
            if t.name not in best or key > best[t.name][:2]:
                best[t.name] = key + (prec, r)
    fallback = SKIP if scope.external else FP32
    table, misfits = {}, []
    for t in quant:
        rank, _, prec, rule = best.get(t.name, (None, None, fallback, None))
        table[t.name] = prec if rule is None or fits(prec, t, rule, scope, misfits) else fallback
    diags += one_per_place(misfits, scope.noun)
    return table, {n for n, b in best.items() if b[0] == _RANK["layer_exact"]}


def _precision_help(name: str, scope: Scope) -> str | None:
    m = re.fullmatch(r"(u?int|fp|float)(\d+)", name)
    if m and m.group(1) in ("int", "uint") and 2 <= int(m.group(2)) <= 8 and name != "int8":
        return f"write int(bits={int(m.group(2))}) for {int(m.group(2))}-bit integer weights"
    if m and m.group(2) in ("16", "32"):
        return "for 16 or 32 bits use fp16, bf16 or fp32"
    return suggest(name, list(REGISTRY) + [SKIP] * scope.external)


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


def _kind_rule(r, scope: Scope, diags):
    noun = scope.noun
    if r.target not in scope.known_kinds:
        diags.append(Diagnostic("E201", f"unknown {noun} kind '{r.target}'", r.pos.line,
                                r.pos.col, suggest(r.target, scope.known_kinds), len(r.target)))
        return []
    if r.target not in scope.kinds:
        diags.append(Diagnostic("E504", f"'{r.target}' {noun}s {scope.kind_without}",
                                r.pos.line, r.pos.col, "precision applies to: " +
                                ", ".join(scope.kinds), len(r.target)))
        return []
    matched = [t for t in scope.targets if t.kind == r.target]
    if not matched and not scope.hidden(r):
        other = [o for o in scope.others if o[1] == r.target]  # a subclass, already quantized
        why = f" that can take a precision ('{other[0][0]}' is one, {other[0][2]})" if other \
            else ""
        diags.append(Diagnostic("E503", f"rule matches no {noun}: the model has no {r.target} "
                                f"{noun}{why}", r.pos.line, r.pos.col, width=len(r.target)))
    return matched


def _layer_rule(r, scope: Scope, by_name, diags):
    is_pattern = any(c in r.target for c in "*?")
    if is_pattern:
        match = _matcher(r.target)
        matched = [t for t in scope.targets if match(t.name)]
    else:
        matched = [by_name[r.target]] if r.target in by_name else []
    if not matched and not scope.hidden(r):
        noun = scope.noun
        other = [o for o in scope.others  # those matched no rule
                 if o[0] == r.target or is_pattern and match(o[0])]
        inside = [t.name for t in scope.targets
                  if not is_pattern and t.name.startswith(r.target + ".")]
        if other:
            name, kind, why = other[0]
            msg = f"'{name}' is a {kind} {noun}, {why or 'which has no weights to quantize'}"
            help_ = "precision applies to: " + ", ".join(scope.kinds)
        elif inside:  # a block instance, an attention or an mlp: name the layers within
            msg = (f"'{r.target}' holds {noun}s rather than weights: "
                   + ", ".join(inside[:4]) + (", ..." if len(inside) > 4 else ""))
            help_ = f"write `layer {r.target}.*: ...` to select them all"
        else:
            msg = f"rule matches no {noun}: no {noun} {'matches' if is_pattern else 'is named'} " \
                  f"'{r.target}'"
            names = [t.name for t in scope.targets] + scope.extra_names
            help_ = (suggest_pattern(r.target, names) if is_pattern else None) or \
                scope.suggest(r.target, names)
        diags.append(Diagnostic("E503", msg, r.pos.line, r.pos.col, help_, len(r.target)))
    return matched, "layer_pattern" if is_pattern else "layer_exact"


def _precision(call, scope: Scope, diags):
    if call.name == SKIP:
        if not scope.external:
            diags.append(Diagnostic("E512", "'skip' keeps an existing module as it is; a layer "
                                    "declared in this file always has a precision",
                                    call.pos.line, call.pos.col, "write fp32 to keep it in full "
                                    "precision", len(call.name)))
            return None
        if call.args:
            diags.append(Diagnostic("E301", "skip takes no arguments", call.pos.line,
                                    call.pos.col, "write skip alone", len(call.name)))
            return None
        return SKIP
    if call.name not in REGISTRY:
        diags.append(Diagnostic("E501", f"unknown precision '{call.name}'", call.pos.line,
                                call.pos.col, _precision_help(call.name, scope), len(call.name)))
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
