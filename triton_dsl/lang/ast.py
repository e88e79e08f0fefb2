"""Syntax tree of a .tdsl file: frozen dataclasses mirroring the grammar, no logic.

Every node carries the 1-based ``line`` and ``col`` of its first token so that the checker can
point at it. Values keep their source spelling in ``text`` for messages and for ``fmt``.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union


@dataclass(frozen=True)
class Pos:
    line: int
    col: int


@dataclass(frozen=True)
class Number:
    value: Union[int, float]
    text: str
    pos: Pos = field(compare=False)


@dataclass(frozen=True)
class Word:
    """A bare identifier used as a value: `learned`, `true`, a block parameter."""
    name: str
    pos: Pos = field(compare=False)


@dataclass(frozen=True)
class String:
    value: str
    pos: Pos = field(compare=False)


@dataclass(frozen=True)
class List:
    items: tuple
    pos: Pos = field(compare=False)


Value = Union[Number, Word, String, List]


@dataclass(frozen=True)
class Arg:
    name: str | None  # None for a positional argument
    value: Value
    pos: Pos = field(compare=False)


@dataclass(frozen=True)
class Call:
    """`name(args...)` or a bare `name`: a layer kind, a block use, or a precision."""
    name: str
    args: tuple  # of Arg
    pos: Pos = field(compare=False)


@dataclass(frozen=True)
class Layer:
    name: str | None  # None when unnamed (`relu`)
    call: Call
    repeat: Number | None  # the count of `* N`
    pos: Pos = field(compare=False)


@dataclass(frozen=True)
class Residual:
    name: str | None
    body: tuple  # of Layer | Residual
    pos: Pos = field(compare=False)


@dataclass(frozen=True)
class Param:
    name: str
    default: Value | None
    pos: Pos = field(compare=False)


@dataclass(frozen=True)
class Block:
    name: str
    params: tuple  # of Param
    body: tuple
    pos: Pos = field(compare=False)


@dataclass(frozen=True)
class Rule:
    """One precision rule. kind: 'default' | 'layer' | 'kind'; target is '' for default."""
    kind: str
    target: str
    precision: Call
    pos: Pos = field(compare=False)


@dataclass(frozen=True)
class Precision:
    model: str | None  # None: applies to the model just above it
    rules: tuple
    pos: Pos = field(compare=False)


@dataclass(frozen=True)
class Model:
    name: str
    inputs: tuple  # of List (a shape) or Call (tokens(...)); the checker wants exactly one
    body: tuple
    pos: Pos = field(compare=False)


@dataclass(frozen=True)
class File:
    path: str
    definitions: tuple  # Model | Block | Precision, in source order
