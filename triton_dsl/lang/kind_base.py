"""What a layer kind is: its options, shape inference, parameters. No torch here."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


class ShapeError(Exception):
    """A layer cannot accept its input shape. ``arg`` names the option at fault, if one is."""

    def __init__(self, message: str, arg: str | None = None):
        super().__init__(message)
        self.arg = arg


@dataclass(frozen=True)
class Inferred:
    shape: tuple
    params: int = 0  # trainable parameters, as torch counts them
    buffers: int = 0  # saved non-trainable values (batchnorm running statistics)
    weight: tuple | None = None  # (N, K) of the matmul for quantizable layers
    bias: bool = False


@dataclass(frozen=True)
class Kind:
    name: str
    options: tuple = ()
    positional: tuple = ()
    infer: Callable = None  # (shape, args: dict) -> Inferred
    quantizable: bool = False
    doc: str = ""
    # acts on each position of a [seq, dim] sequence alone (or mixes them as attention does, for
    # any length): allowed in a token model, whose sequence length varies at run time
    per_position: bool = False
    # a layer built of named sublayers (attention's q, k, v, o): (in_shape, args) ->
    # [(local name, kind, args, in_shape)]; each becomes an ordinary layer that rules select
    parts: Callable | None = None


def _pair(v):
    return tuple(v) if isinstance(v, tuple) else (v, v)


def _need_rank(kind, shape, ranks, what):
    if len(shape) not in ranks:
        raise ShapeError(f"{kind} needs input {what}, got {list(shape)}")
