"""Precision configs: frozen dataclasses validated in __post_init__, found through a registry.

Shared by the checker (which must not import torch) and the runtime. Each precision declares its
options once (``Option``); the checker validates source arguments against them with positions, the
dataclass validates again for Python users, and ``docs/language.md`` documents the same table.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Union

from .limits import MAX_THRESHOLD
from .options import Option, Scalar, spell

GRANULARITY = Option("granularity", "per_channel", ("per_channel", "per_tensor"),
                     doc="one scale per output channel, or one for the whole weight")


class _Config:
    """Behaviour shared by every precision config."""

    name: str
    bits: int
    options: tuple = ()

    def _validate(self):
        for opt in self.options:
            msg = opt.accepts(getattr(self, opt.name))
            if msg:
                raise ValueError(f"{self.name}: {msg}")

    @property
    def quantized(self) -> bool:
        return self.bits < 16

    def non_defaults(self) -> list[tuple[str, Scalar]]:
        return [(o.name, getattr(self, o.name)) for o in self.options
                if getattr(self, o.name) != o.default and o.name != "bits"]

    def to_source(self) -> str:
        """The canonical .tdsl spelling: only options that differ from their defaults."""
        args = ", ".join(f"{k}={spell(v)}" for k, v in self.non_defaults())
        return f"{self.name}({args})" if args else self.name

    def to_python(self) -> str:
        """A constructor call for generated code, again only with non-default options."""
        kw = [f"{f.name}={getattr(self, f.name)!r}" for f in fields(self)
              if f.name == "bits" and type(self) is Int and self.bits != 8
              or f.name != "bits" and getattr(self, f.name) != f.default]
        return f"{type(self).__name__}({', '.join(kw)})"


FLOAT_BITS = {"fp32": 32, "fp16": 16, "bf16": 16}  # the float dtypes the language names


@dataclass(frozen=True)
class Float(_Config):
    """Unquantized storage in fp32, fp16 or bf16."""
    dtype: str = "fp32"

    def __post_init__(self):
        if self.dtype not in FLOAT_BITS:
            raise ValueError(f"float precision must be fp32, fp16 or bf16, got {self.dtype!r}")

    @property
    def name(self):
        return self.dtype

    @property
    def bits(self):
        return FLOAT_BITS[self.dtype]

    def to_python(self):
        return f"Float({self.dtype!r})"


_ACT = Option("activations", "none", ("none", "dynamic", "static"),
              doc="none: weight-only; dynamic: int8 per token at run time; static: calibrated scale")


@dataclass(frozen=True)
class Int(_Config):
    """Uniform integer weights; ``int8(...)`` is ``int(bits=8, ...)``."""
    bits: int = 8
    symmetric: bool = True
    granularity: str = "per_channel"
    group_size: int | None = None
    activations: str = "none"
    observer: str = "minmax"
    percentile: float = 99.99

    options = (
        Option("bits", 8, number="int", lo=2, hi=8, doc="bits per weight"),
        Option("symmetric", True, (True, False), doc="zero point 0, or a per-scale zero point"),
        GRANULARITY,
        Option("group_size", None, (None,), number="int", lo=8, hi=65536,
               doc="one scale per group of this many input weights (overrides granularity)"),
        _ACT,
        Option("observer", "minmax", ("minmax", "percentile"),
               doc="how static activation ranges are calibrated"),
        Option("percentile", 99.99, number="float", lo=50, hi=100,
               doc="the percentile observer's clipping point"),
    )

    def __post_init__(self):
        self._validate()
        if self.activations != "none" and self.bits != 8:
            raise ValueError(f"{self.name}: activations={self.activations} needs bits=8")
        if self.observer != "minmax" and self.activations != "static":
            raise ValueError(f"{self.name}: observer applies only to activations=static")

    @property
    def name(self):
        return f"int{self.bits}"

    def to_source(self):
        if self.bits == 8:
            return super().to_source()
        args = ", ".join([f"bits={self.bits}"] + [f"{k}={spell(v)}" for k, v in self.non_defaults()])
        return f"int({args})"


@dataclass(frozen=True)
class Ternary(_Config):
    """Weights in {-1, 0, +1} times a scale; see docs/language.md for each rule."""
    threshold: Union[str, float] = "twn"
    scale: str = "twn"
    granularity: str = "per_channel"
    activations: str = "none"

    name = "ternary"
    bits = 2
    options = (
        Option("threshold", "twn", ("twn", "absmean", "learned", "stochastic"), number="float",
               lo=0, hi=MAX_THRESHOLD, doc="twn: 0.7*mean|W|; absmean: 0.5*mean|W| (BitNet b1.58 round-clip); "
                         "learned: trainable; stochastic: random rounding while training; "
                         "a number: absolute"),
        Option("scale", "twn", ("twn", "absmean", "learned", "none"),
               doc="twn: mean |W| above the threshold; absmean: mean|W|; learned: TTQ positive and "
                   "negative scales; none: pure {-1, 0, +1}"),
        GRANULARITY,
        Option("activations", "none", ("none", "dynamic", "static"),
               doc="dynamic: int8 activations per token (W1.58A8); static: one calibrated "
                   "int8 scale (convolutions then deploy as int8 convolutions)"),
    )

    def __post_init__(self):
        if isinstance(self.threshold, int) and not isinstance(self.threshold, bool):
            object.__setattr__(self, "threshold", float(self.threshold))
        self._validate()


@dataclass(frozen=True)
class Binary(_Config):
    """sign(W) times mean |W| (XNOR-Net / BinaryConnect style)."""
    granularity: str = "per_channel"

    name = "binary"
    bits = 1
    options = (GRANULARITY,)

    def __post_init__(self):
        self._validate()


def _int8(**kw):
    if "bits" in kw:
        raise ValueError("int8: 'bits' is fixed at 8; use int(bits=N)")
    return Int(bits=8, **kw)


# name in the language -> (constructor, options accepted, positional option names)
REGISTRY = {
    "fp32": (lambda: Float("fp32"), (), ()),
    "fp16": (lambda: Float("fp16"), (), ()),
    "bf16": (lambda: Float("bf16"), (), ()),
    "int8": (_int8, Int.options[1:], ()),
    "int": (lambda **kw: Int(**kw), Int.options, ("bits",)),
    "ternary": (lambda **kw: Ternary(**kw), Ternary.options, ()),
    "binary": (lambda **kw: Binary(**kw), Binary.options, ()),
}

Precision = Union[Float, Int, Ternary, Binary]
FP32 = Float("fp32")


def storage_bits(p: Precision) -> int:
    """Bits per weight in the packed deploy form and the packed checkpoint: ternary 2, binary 1,
    integer codes at their width (one more when asymmetric: codes are stored relative to the zero
    point), floats 32 or 16. The one place this is written; summary and checkpoint use it."""
    if isinstance(p, Int):
        return p.bits + (not p.symmetric)
    return p.bits


def learned_params(p: Precision, rows: int) -> int:
    """Trainable parameters the weight quantizer adds to a layer of ``rows`` outputs: a learned
    ternary threshold (one logit per channel, or one), TTQ's positive and negative scales."""
    if not isinstance(p, Ternary):
        return 0
    per = rows if p.granularity == "per_channel" else 1
    return per * ((p.threshold == "learned") + 2 * (p.scale == "learned"))


def make(name: str, **options) -> Precision:
    """Build a precision by its language name: ``make("ternary", threshold="learned")``."""
    if name not in REGISTRY:
        raise ValueError(f"unknown precision {name!r}; expected one of {', '.join(REGISTRY)}")
    ctor, _, _ = REGISTRY[name]
    return ctor(**options)


__all__ = ["Float", "Int", "Ternary", "Binary", "Option", "REGISTRY", "FP32", "FLOAT_BITS", "make",
           "Precision", "storage_bits", "learned_params"]
