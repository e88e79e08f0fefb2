"""Whether the precision a rule gives a target fits it, checked before any work and only for
the winning rule (lang/rules.py): modules the runtime cannot replace, dynamic activations on
convolutions, packing alignment. Problems come back one per rule and kind of problem."""
from __future__ import annotations

from .diagnostics import Diagnostic

SKIP = "skip"  # the precision word that keeps an existing module as it is (external scopes)


def fits(prec, t, rule, scope, diags) -> bool:
    """Whether ``prec``, which ``rule`` gives target ``t`` (rules.Target) in ``scope``, fits
    it; a problem goes to ``diags``."""
    call = rule.precision
    if prec == SKIP:
        return True
    if t.problem:
        diags.append(Diagnostic("E511", f"{t.name} cannot take {prec.to_source()}: {t.problem}",
                                call.pos.line, call.pos.col, f"keep it as it is with a rule "
                                f"`layer {t.name}: skip`", len(call.name)))
        return False
    if getattr(prec, "activations", "none") == "dynamic" and not t.dynamic_ok:
        kind = "conv2d" if not scope.external else t.kind
        diags.append(Diagnostic("E509", f"{t.name}: activations=dynamic on a {kind} needs "
                                "groups=1 and a numeric padding", call.pos.line, call.pos.col,
                                f"quantize this {scope.noun}'s weights only, or use "
                                "activations=static", len(call.name)))
        return False
    g = getattr(prec, "group_size", None)
    if g and t.weight[1] % g:
        pos = next((a.value.pos for a in call.args if a.name == "group_size"), call.pos)
        diags.append(Diagnostic("E508", f"group_size={g} does not divide {t.name}'s "
                                f"{t.weight[1]} input weights per output", pos.line, pos.col,
                                "pick a divisor: " + ", ".join(
                                    map(str, _divisors(t.weight[1])[:8]))))
        return False
    return True


def _divisors(n):
    return [d for d in range(8, min(n, 1024) + 1) if n % d == 0]


def one_per_place(misfits, noun):
    """One message per rule and problem: a pattern that puts a bad group size on forty layers
    says so once, naming the first and counting the rest."""
    groups: dict = {}
    for d in misfits:
        groups.setdefault((d.code, d.line, d.col), []).append(d)
    out = []
    for same in groups.values():
        d = same[0]
        if len(same) > 1:
            d = Diagnostic(d.code, f"{d.message} (and {len(same) - 1} more {noun}"
                           f"{'s' * (len(same) > 2)})", d.line, d.col, d.help, d.width)
        out.append(d)
    return out
