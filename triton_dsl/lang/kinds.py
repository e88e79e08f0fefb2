"""Layer kinds: their options, shape inference and parameter counts. No torch here.

Shapes exclude the batch dimension: an image is [C, H, W], a feature vector [F], tokens [T, F].
"""
from __future__ import annotations

import dataclasses
import math

from .kind_base import Inferred, Kind, ShapeError, _need_rank, _pair
from .limits import MAX_SIZE, MAX_THRESHOLD
from .options import Option
from .seq_kinds import SEQUENCE_KINDS

__all__ = ["KINDS", "QUANTIZABLE", "Inferred", "Kind", "ShapeError"]  # the base: kind_base.py


def _linear(shape, a):
    _need_rank("linear", shape, (1, 2, 3), "[features] (or [tokens, features])")
    k, n = shape[-1], a["out_features"]
    return Inferred(shape[:-1] + (n,), k * n + n * a["bias"], weight=(n, k), bias=a["bias"])


def _spatial(size, k, s, p, d=1):
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


def _conv2d(shape, a):
    _need_rank("conv2d", shape, (3,), "[channels, height, width]")
    c, h, w = shape
    n, g = a["out_channels"], a["groups"]
    if c % g:
        raise ShapeError(f"groups={g} does not divide the {c} input channels", "groups")
    if n % g:
        raise ShapeError(f"groups={g} does not divide out_channels={n}", "groups")
    (kh, kw), (sh, sw), (dh, dw) = _pair(a["kernel"]), _pair(a["stride"]), _pair(a["dilation"])
    if a["padding"] == "same":
        if (sh, sw) != (1, 1):
            raise ShapeError("padding=same needs stride 1", "padding")
        ho, wo = h, w
    else:
        ph, pw = _pair(a["padding"])
        ho, wo = _spatial(h, kh, sh, ph, dh), _spatial(w, kw, sw, pw, dw)
    if ho < 1 or wo < 1:
        raise ShapeError(f"kernel {kh}x{kw} does not fit the {h}x{w} input", "kernel")
    k = c // g * kh * kw
    return Inferred((n, ho, wo), n * k + n * a["bias"], weight=(n, k), bias=a["bias"])


def _batchnorm(shape, a):
    _need_rank("batchnorm", shape, (1, 2, 3), "[features], [channels, length] or [C, H, W]")
    return Inferred(shape, 2 * shape[0], buffers=2 * shape[0])


def _layernorm(shape, a):
    return Inferred(shape, 2 * shape[-1])


def _same(shape, a):
    return Inferred(shape)


def _softmax(shape, a):
    if not -len(shape) <= a["dim"] < len(shape):
        raise ShapeError(f"dim={a['dim']} is out of range for a shape of rank {len(shape)} "
                         "(the batch dimension is not counted)", "dim")
    return Inferred(shape)


def _pool(name):
    def infer(shape, a):
        _need_rank(name, shape, (3,), "[channels, height, width]")
        c, h, w = shape
        k = _pair(a["kernel"])
        s = _pair(a["stride"]) if a["stride"] is not None else k
        p = _pair(a["padding"])
        if p[0] * 2 > k[0] or p[1] * 2 > k[1]:
            raise ShapeError("padding must be at most half the kernel", "padding")
        ho, wo = _spatial(h, k[0], s[0], p[0]), _spatial(w, k[1], s[1], p[1])
        if ho < 1 or wo < 1:
            raise ShapeError(f"a {k[0]}x{k[1]} window does not fit the {h}x{w} input", "kernel")
        return Inferred((c, ho, wo))
    return infer


def _adaptive(name):
    def infer(shape, a):
        _need_rank(name, shape, (3,), "[channels, height, width]")
        return Inferred((shape[0],) + _pair(a["output"]))
    return infer


def _flatten(shape, a):
    return Inferred((math.prod(shape),))


_POS = dict(number="int", lo=1, hi=MAX_SIZE)
_NONNEG = dict(number="int", lo=0, hi=MAX_SIZE)
_BIAS = Option("bias", True, (True, False), doc="add a learned bias")
_EPS = Option("eps", 1e-5, number="float", lo=0, hi=1, doc="added to the variance")
_POOL = (Option("kernel", 2, **_POS, pair=True, required=False, doc="window size"),
         Option("stride", None, (None,), **_POS, pair=True, doc="default: kernel"),
         Option("padding", 0, **_NONNEG, pair=True, doc="implicit padding"))
_ADAPTIVE = (Option("output", 1, **_POS, pair=True, doc="output height and width"),)
_ACT = "elementwise activation"

KINDS = {k.name: k for k in [
    Kind("linear", (Option("out_features", None, required=True, **_POS, doc="output features"),
                    _BIAS), ("out_features",), _linear, True, "fully connected layer"),
    Kind("conv2d", (Option("out_channels", None, required=True, **_POS, doc="output channels"),
                    Option("kernel", 3, **_POS, pair=True, doc="kernel size"),
                    Option("stride", 1, **_POS, pair=True, doc="stride"),
                    Option("padding", 0, ("same",), **_NONNEG, pair=True,
                           doc="zero padding, or same"),
                    Option("dilation", 1, **_POS, pair=True, doc="dilation"),
                    Option("groups", 1, **_POS, doc="grouped convolution"),
                    _BIAS), ("out_channels", "kernel"), _conv2d, True, "2-d convolution"),
    Kind("batchnorm", (_EPS, Option("momentum", 0.1, number="float", lo=0, hi=1,
                                    doc="running statistics update rate")),
         (), _batchnorm, doc="batch normalization over the first (channel) dimension"),
    Kind("layernorm", (_EPS,), (), _layernorm, doc="layer normalization over the last dimension"),
    Kind("relu", infer=_same, doc=_ACT),
    Kind("gelu", infer=_same, doc=_ACT),
    Kind("silu", infer=_same, doc=_ACT),
    Kind("tanh", infer=_same, doc=_ACT),
    Kind("sigmoid", infer=_same, doc=_ACT),
    Kind("softmax", (Option("dim", -1, number="int", lo=-3, hi=2,
                            doc="dimension, batch not counted"),),
         ("dim",), _softmax, doc="softmax"),
    Kind("ternary_act", (Option("threshold", 0.5, number="float", lo=0, hi=MAX_THRESHOLD,
                                doc="|x| below this becomes 0"),),
         ("threshold",), _same, doc="activation to {-1, 0, +1} with a straight-through gradient"),
    Kind("maxpool", _POOL, ("kernel",), _pool("maxpool"), doc="2-d max pooling"),
    Kind("avgpool", _POOL, ("kernel",), _pool("avgpool"), doc="2-d average pooling"),
    Kind("adaptive_avgpool", _ADAPTIVE, ("output",), _adaptive("adaptive_avgpool"),
         doc="average pooling to a fixed output size"),
    Kind("adaptive_maxpool", _ADAPTIVE, ("output",), _adaptive("adaptive_maxpool"),
         doc="max pooling to a fixed output size"),
    Kind("flatten", infer=_flatten, doc="flatten everything but the batch dimension"),
    Kind("dropout", (Option("p", 0.5, number="float", lo=0, hi=0.999, doc="drop probability"),),
         ("p",), _same, doc="dropout while training"),
]}

# Per-position kinds (softmax only over the last dimension: the expander checks its dim).
for _k in ("linear", "layernorm", "relu", "gelu", "silu", "tanh", "sigmoid", "softmax",
           "ternary_act", "dropout"):
    KINDS[_k] = dataclasses.replace(KINDS[_k], per_position=True)

KINDS.update(SEQUENCE_KINDS)  # embedding, rmsnorm, attention, mlp
QUANTIZABLE = tuple(k for k, v in KINDS.items() if v.quantizable)
