"""Frozen layers as torch custom ops, so torch.compile and torch.export see one op per layer.

A frozen layer's forward does Python work the compiler cannot trace: choosing and building its
runner (runtime/dispatch.py), measuring candidates (runtime/tuning.py), calling the native kernel
through ctypes. Under torch.compile the layer instead calls ``triton_dsl::frozen_linear`` or
``triton_dsl::frozen_conv2d``, whose real implementation is that same forward and whose fake
implementation only computes the output shape; the graph has no break at a frozen layer.

A layer is named in the op by a handle (an integer) into a registry of live layers, so the op
takes tensors and scalars only. Eager calls never go through here.
"""
from __future__ import annotations

import itertools
import weakref

import torch

from ..kernels.common import conv_out_size

_LAYERS: dict[int, weakref.ref] = {}
_NEXT = itertools.count(1)


def register(mod) -> int:
    """A new handle for a layer (at construction, and for each copy), dropped with it."""
    h = next(_NEXT)
    _LAYERS[h] = weakref.ref(mod, lambda _, h=h: _LAYERS.pop(h, None))
    mod.__dict__["op_handle"] = h
    return h


def _layer(h: int):
    mod = _LAYERS.get(h)
    mod = mod() if mod is not None else None
    if mod is None:
        raise RuntimeError(f"frozen layer {h} no longer exists")
    return mod


@torch.library.custom_op("triton_dsl::frozen_linear", mutates_args=())
def frozen_linear(x: torch.Tensor, layer: int) -> torch.Tensor:
    return _layer(layer).eager_forward(x).contiguous()


@frozen_linear.register_fake
def _(x, layer):
    return x.new_empty((*x.shape[:-1], _layer(layer).out_features))


def _channels_last(shape) -> tuple:
    """The canonical channels-last strides of [B, C, H, W]: what the op answers, every way's
    output being channels-last already (a copy to NCHW would only be undone by the next
    convolution)."""
    _, c, h, w = shape
    return (h * w * c, 1, w * c, c)


@torch.library.custom_op("triton_dsl::frozen_conv2d", mutates_args=())
def frozen_conv2d(x: torch.Tensor, layer: int) -> torch.Tensor:
    y = _layer(layer).eager_forward(x)
    want = _channels_last(y.shape)
    if y.stride() == want:
        return y
    return torch.empty_strided(y.shape, want, dtype=y.dtype, device=y.device).copy_(y)


@frozen_conv2d.register_fake
def _(x, layer):
    conv = _layer(layer)
    b, _, h, w = x.shape
    hw = (h, w) if conv.padding == "same" else conv_out_size(
        h, w, conv.kernel_size, conv.stride, conv.padding, conv.dilation)
    shape = (b, conv.out_channels, *hw)
    return x.new_empty_strided(shape, _channels_last(shape))

