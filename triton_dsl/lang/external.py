"""Precision sections for models that already exist: a rules file applied to any module.

A rules file is a .tdsl file holding only `precision:` sections (docs/language.md, "Precision
sections for existing models"). The runtime describes a PyTorch model as plain records
(``Module``: qualified name, class name, weight shape; no torch here), and ``plan`` resolves the
rules against them with the engine compiled models use (lang/rules.py): the same precedence, the
same did-you-mean, one more precision word, `skip`.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

from . import ast
from .diagnostics import Checked, Diagnostic, TdslError
from .parser import parse
from .plan import Entry, Plan
from .rules import SKIP, Scope, Target, resolve
from .source import read_source

# The module classes a rule can select: torch's Linear and Conv2d, and the Conv1D of GPT-2-style
# Hugging Face models (a linear layer whose weight is stored transposed, [in, out]).
MODULE_KINDS = ("Linear", "Conv2d", "Conv1D")


@dataclass(frozen=True)
class Module:
    """One module of an existing model, as the runtime reads it."""
    name: str
    kind: str  # the class name
    weight: tuple | None = None  # (N outputs, K inputs each) for a kind in MODULE_KINDS
    bias: bool = False
    bits: int = 32  # of its weight as it is now
    dynamic_ok: bool = True  # False for grouped or padding='same' convolutions
    problem: str | None = None  # why it cannot be replaced, where it is of a MODULE_KINDS class
    why: str | None = None  # why a rule cannot select it, for every other module


@dataclass
class Rules(Checked):
    """A parsed rules file: its sections, or the diagnostics that kept it from parsing."""
    path: str
    text: str | None
    sections: list = field(default_factory=list)
    diagnostics: list = field(default_factory=list)


def read_rules(rules) -> Rules:
    """A rules file from a path, or from its text (a string holding a line break)."""
    if isinstance(rules, str) and "\n" in rules:
        return parse_rules(rules, "<rules>")
    path = os.fspath(rules)
    text, diags = read_source(path)
    return Rules(path, None, [], diags) if text is None else parse_rules(text, path)


def parse_rules(text: str, path: str = "<rules>") -> Rules:
    tree, diags = parse(text, path)
    if tree is None:
        return Rules(path, text, [], diags)
    sections = []
    for d in tree.definitions:
        if isinstance(d, ast.Precision) and d.model is None:
            sections.append(d)
            continue
        what = "names a model" if isinstance(d, ast.Precision) else \
            f"declares {'a model' if isinstance(d, ast.Model) else 'a block'}"
        diags.append(Diagnostic("E513", f"a rules file holds only `precision:` sections; this "
                                f"one {what}", d.pos.line, d.pos.col, "a model declared in a "
                                ".tdsl file is compiled (triton_dsl.load); rules for an existing "
                                "module go in a file of their own"))
    if not tree.definitions:
        diags.append(Diagnostic("E513", "no precision section in this file", 1, 1,
                                "write `precision:` and indented rules below it"))
    return Rules(path, text, sections, diags)


class _Any(tuple):
    """Every kind, for checking rules before a model is known."""

    def __contains__(self, item):
        return True


def check_rules(rules: Rules) -> Rules:
    """The problems a rules file has whatever the model (syntax, precisions, options, two
    defaults), found by the same engine with every name hidden: a command that builds the
    model (`triton-dsl plan`) reports them before that expensive step."""
    if rules.ok:
        diags: list[Diagnostic] = []
        scope = Scope([], [], _Any(), _Any(), noun="module", external=True,
                      hidden=lambda rule: True)
        resolve(rules.sections, scope, diags)
        rules.diagnostics = sorted(rules.diagnostics + diags, key=lambda d: (d.line, d.col))
    return rules


def plan(rules: Rules, modules: list, other_bytes: int = 0, model: str = "model") -> Plan:
    """Resolve the rules against the modules of an existing model; raises TdslError, listing
    every problem, each at its place in the rules file."""
    rules.raise_for_errors()
    targets = [Target(m.name, m.kind, m.weight, m.bias, m.dynamic_ok, m.problem)
               for m in modules if m.kind in MODULE_KINDS and m.weight is not None]
    others = [(m.name, m.kind, m.why) for m in modules if m.kind not in MODULE_KINDS
              or m.weight is None]
    present = {m.kind for m in modules}
    scope = Scope(targets, others, MODULE_KINDS, MODULE_KINDS + tuple(sorted(present -
                  set(MODULE_KINDS))), noun="module", kind_without="cannot take a precision",
                  external=True)
    diags: list[Diagnostic] = []
    table, _ = resolve(rules.sections, scope, diags)
    if any(d.is_error for d in diags):
        raise TdslError(rules.path, rules.text, sorted(diags, key=lambda d: (d.line, d.col)))
    by_name = {m.name: m for m in modules}
    entries = []
    for t in targets:
        p = table[t.name]
        m = by_name[t.name]
        entries.append(Entry(t.name, t.kind, tuple(t.weight), t.bias, None if p == SKIP else p,
                             m.bits))
    return Plan(rules.path, model, entries, other_bytes)


__all__ = ["MODULE_KINDS", "Module", "Rules", "read_rules", "parse_rules", "check_rules", "plan"]
