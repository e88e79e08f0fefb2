"""Trainable (QAT) layers: torch's Linear and Conv2d with a precision.

The latent weight stays float; the forward pass uses its fake-quantized value, so training sees
the quantization error and gradients flow by the straight-through estimator.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.common import conv_out_size
from ..lang.precision import FP32, Float
from .quant import TORCH_DTYPES
from .quantizers import make_act_quantizer, make_weight_quantizer



class _QuantMixin:
    def _setup(self, precision):
        self.precision = precision
        self.weight_quant = make_weight_quantizer(precision, self.weight)
        self.act_quant = make_act_quantizer(precision, type(self).__name__)

    def quantized_weight(self) -> torch.Tensor:
        """The weight as the forward pass uses it."""
        return self.weight_quant(self.weight)

    def _input(self, x):
        dt = TORCH_DTYPES.get(getattr(self.precision, "dtype", None))
        if dt is not None:  # emulate a 16-bit layer: its input is rounded too
            return x + (x.detach().to(dt).to(x.dtype) - x.detach())
        return self.act_quant(x)

    def extra_repr(self):
        return super().extra_repr() + f", precision={self.precision.to_source()}"


class Linear(_QuantMixin, nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 precision=FP32):
        super().__init__(in_features, out_features, bias)
        self._setup(precision)

    def forward(self, x):
        return F.linear(self._input(x), self.quantized_weight(), self.bias)


class Conv2d(_QuantMixin, nn.Conv2d):
    def __init__(self, in_channels: int, out_channels: int, kernel_size=3, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, precision=FP32):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         bias)
        self._setup(precision)

    def forward(self, x):
        if self.act_quant.mode == "dynamic":
            return self._patch_forward(x)
        return self._conv_forward(self._input(x), self.quantized_weight(), self.bias)

    def _patch_forward(self, x):
        """Dynamic int8 activations quantize per token, and a convolution's tokens are its
        im2col patches: the same rows the deployed kernel quantizes (the checker admits this
        only for groups=1 and numeric padding)."""
        w = self.quantized_weight().reshape(self.out_channels, -1)
        return im2col_conv(x, self, lambda cols: F.linear(self.act_quant(cols), w, self.bias))


def to_torch(layer: Linear | Conv2d) -> nn.Module:
    """An fp32 layer as torch's own nn.Linear / nn.Conv2d with the same weights and state-dict
    keys: what a frozen model runs for its fp32 layers (no quantizer calls per forward)."""
    if isinstance(layer, Linear):
        new = nn.Linear(layer.in_features, layer.out_features, layer.bias is not None)
    else:
        new = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride,
                        layer.padding, layer.dilation, layer.groups, layer.bias is not None)
    new.load_state_dict({k: v for k, v in layer.state_dict().items() if k in ("weight", "bias")})
    return new.to(layer.weight.device).train(layer.training)


def im2col_conv(x: torch.Tensor, conv, matmul) -> torch.Tensor:
    """A groups=1 convolution as ``matmul`` over its im2col patches: x [B, C, H, W] -> patches
    [B, L, C*kh*kw] -> matmul -> [B, out, H', W']. ``conv`` supplies kernel_size, stride,
    padding (numeric), dilation and out_channels."""
    b, _, h, w = x.shape
    ho, wo = conv_out_size(h, w, conv.kernel_size, conv.stride, conv.padding, conv.dilation)
    cols = F.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)
    y = matmul(cols.transpose(1, 2))  # [B, L, out]
    # channels-last, with its canonical strides: y.transpose(1, 2).reshape(...) is the same
    # view, but at batch 1 with a batch stride of `out`, which torch's max pool does not take
    # for channels-last (ad hoc: 54 against 11 us for [1, 16, 28, 28], small_cnn's first pool)
    return y.reshape(b, ho, wo, conv.out_channels).permute(0, 3, 1, 2)


__all__ = ["Linear", "Conv2d", "Float", "im2col_conv", "to_torch"]
