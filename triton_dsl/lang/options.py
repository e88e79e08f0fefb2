"""Declared options: each layer kind, block parameter and precision lists its options once, with
the words and the numeric range it accepts; ``accepts`` says in one sentence what is allowed."""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

Scalar = Union[str, int, float, bool, None]


@dataclass(frozen=True)
class Option:
    name: str
    default: Scalar
    words: tuple = ()  # accepted bare words
    number: str | None = None  # "int" or "float" when a number is accepted
    lo: float | None = None  # inclusive bounds for numbers; every numeric option has both
    hi: float | None = None
    doc: str = ""
    pair: bool = False  # also accept [a, b] (kernel sizes, strides)
    required: bool = False

    def accepts(self, v) -> str | None:
        """None when ``v`` is allowed, else a message saying what is."""
        if self.pair and isinstance(v, tuple):
            if len(v) != 2:
                return f"'{self.name}' takes one number or a pair [a, b], got {len(v)} values"
            return next((m for m in map(self.accepts, v) if m), None)
        is_number = isinstance(v, (int, float)) and not isinstance(v, bool)
        if not is_number:  # compare by type too: 1 == True in Python
            if any(type(v) is type(w) and v == w for w in self.words):
                return None
        elif self.number and isinstance(v, (int, float)):
            if not math.isfinite(v) or (self.lo is not None and v < self.lo) or \
                    (self.hi is not None and v > self.hi):
                bound = f"at least {spell(self.lo)}" if self.hi is None else \
                    f"in {spell(self.lo)}..{spell(self.hi)}"
                return f"'{self.name}' must be {bound}, got {spell(v)}"
            if self.number == "int" and not isinstance(v, int):
                return f"'{self.name}' must be an integer"
            return None
        allowed = [spell(w) for w in self.words]
        if self.number:
            allowed.append("an integer" if self.number == "int" else "a number")
        if self.pair:
            allowed.append("a pair [a, b]")
        return f"'{self.name}' must be " + " or ".join(allowed) + f", got {spell(v)}"


def spell(v) -> str:
    """A value as the .tdsl source writes it (true, none, [a, b])."""
    if isinstance(v, tuple):
        return "[" + ", ".join(map(spell, v)) + "]"
    if isinstance(v, bool):
        return "true" if v else "false"
    if v is None:
        return "none"
    if isinstance(v, float) and not math.isfinite(v):
        return "a number too large to represent"
    if isinstance(v, float) and v == int(v) and abs(v) < 1e15:
        return f"{v:.1f}"
    return str(v)
