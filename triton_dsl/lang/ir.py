"""The resolved network: every name qualified, every shape, option and precision decided.

Codegen and summary read only this; they decide nothing. Nodes are frozen records.
"""
from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Iterator, Union

from .precision import Precision


class Op(Enum):
    LAYER = "layer"  # one layer kind: linear, relu, ...
    RESIDUAL = "residual"  # body + skip connection (with a projection when shapes differ)
    GROUP = "group"  # a block instance or a repeat: a namespace, no computation
    COMPOSITE = "composite"  # attention, mlp: one computation over named sublayers


@dataclass(frozen=True)
class Layer:
    name: str  # qualified: stage2.0.conv1
    kind: str
    args: tuple  # ((option, value), ...) with every default filled in
    in_shape: tuple
    out_shape: tuple
    params: int
    buffers: int
    weight: tuple | None  # (N, K) for quantizable layers
    bias: bool
    precision: Precision | None  # quantizable layers only
    line: int
    col: int = 1
    op: Op = Op.LAYER

    def arg(self, name):
        return dict(self.args)[name]


@dataclass(frozen=True)
class Residual:
    name: str
    body: tuple
    shortcut: tuple  # () for identity, else projection layers applied to the skip input
    in_shape: tuple
    out_shape: tuple
    line: int
    op: Op = Op.RESIDUAL


@dataclass(frozen=True)
class Group:
    name: str
    body: tuple
    line: int
    op: Op = Op.GROUP


@dataclass(frozen=True)
class Composite:
    """A layer kind computed from named sublayers (attention: q, k, v, o): its body holds them
    as ordinary layers, in the order they run, so rules, summary and state dict see them."""
    name: str
    kind: str
    args: tuple
    body: tuple
    in_shape: tuple
    out_shape: tuple
    line: int
    col: int = 1
    op: Op = Op.COMPOSITE

    def arg(self, name):
        return dict(self.args)[name]


Node = Union[Layer, Residual, Group, Composite]


@dataclass(frozen=True)
class Model:
    name: str
    path: str
    input_shape: tuple
    body: tuple
    line: int
    source: str  # the whole .tdsl text, kept for checkpoint metadata
    tokens: tuple | None = None  # (vocab, max_len) for token input; input_shape is then (max_len,)

    @property
    def output_shape(self) -> tuple:
        layers = list(self.layers())
        return layers[-1].out_shape if layers else self.input_shape

    def layers(self) -> Iterator[Layer]:
        """Every layer in execution order; a residual's shortcut comes after its body."""
        yield from walk(self.body)


def walk(nodes) -> Iterator[Layer]:
    """Every layer under ``nodes`` in execution order (a residual's shortcut after its body)."""
    for n in nodes:
        if n.op is Op.LAYER:
            yield n
        else:
            yield from walk(n.body)
            if n.op is Op.RESIDUAL:
                yield from n.shortcut
