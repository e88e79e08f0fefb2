"""Int8 convolution on the CPU for layers with static (calibrated) int8 activations: oneDNN's
quantized convolution with an fp32 output, so nothing is requantized.

The activations are quantized exactly as the trainable layer's static quantizer does,
q = clamp(round(x / s) + z, lo, hi), and enter as uint8 with a zero point (symmetric codes in
[-127, 127] shift by 128). oneDNN sums (q - z) * w in int32, exactly, and scales by s * w_scale;
the result is the fake-quantized convolution up to float rounding. Weights are int8 codes
(ternary ones in {-1, 0, 1}) with a scale per output channel; a negative scale (a folded
batchnorm with a negative gamma) moves its sign into the codes, so oneDNN only sees positive
scales. An input holding NaN cannot become uint8: the call returns None and the layer takes its
float path.
"""
from __future__ import annotations

import torch

from . import native


def available() -> bool:
    """Whether this torch has oneDNN's quantized convolution (x86 builds do)."""
    try:
        return (torch.backends.mkldnn.is_available()
                and hasattr(torch.ops.onednn, "qconv2d_pointwise"))
    except (AttributeError, RuntimeError):
        return False


class PackedQConv:
    """A convolution weight [O, C/groups, kh, kw] of int8 codes with per-channel scales,
    prepacked for static int8 activations of scale ``x_scale`` and zero point ``x_zp``."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, x_scale: float, x_zp: int,
                 symmetric: bool, stride, padding, dilation, groups: int):
        if codes.dtype != torch.int8 or codes.dim() != 4:
            raise ValueError(f"codes must be 4-d int8, got {codes.dtype} of shape "
                             f"{tuple(codes.shape)}")
        scale = scale.float().reshape(-1)
        flip = scale < 0
        self.codes = torch.where(flip[:, None, None, None], -codes, codes).contiguous()
        self.w_scale = scale.abs().contiguous()
        self.w_zp = torch.zeros(scale.numel(), dtype=torch.long)
        self.x_scale, self.symmetric = float(x_scale), symmetric
        self.x_zp = 128 if symmetric else int(x_zp)  # symmetric int8 codes enter as uint8 + 128
        self.args = (list(stride), list(padding), list(dilation), int(groups))
        self.packed = torch.ops.onednn.qconv_prepack(self.codes, self.w_scale, self.x_scale,
                                                     self.x_zp, *self.args, None)
        self.nbytes = self.codes.numel() + 4 * scale.numel()

    def __call__(self, x: torch.Tensor, bias: torch.Tensor | None,
                 relu: bool = False) -> torch.Tensor | None:
        """fp32 output of the convolution of x [B, C, H, W] quantized with the static scale,
        then max(0, y) if relu (in the same call: no second pass over the output); None when
        x holds a NaN."""
        qx = self.quantize(x)
        if qx is None:
            return None
        return self.run(qx, bias, relu).to(x.dtype)

    def run(self, qx: torch.Tensor, bias: torch.Tensor | None, relu: bool = False,
            out: tuple[float, int] | None = None) -> torch.Tensor:
        """The convolution of uint8 codes qx (at this layer's x_scale and x_zp): fp32, or with
        ``out`` = (scale, zero point) uint8 codes of the result at that scale, which oneDNN
        rounds to nearest even and saturates to [0, 255] (the next layer's static quantizer,
        up to float rounding; with relu the symmetric quantizer's lower bound cannot bind)."""
        o_scale, o_zp, o_dtype = (1.0, 0, torch.float32) if out is None else (*out, None)
        return torch.ops.onednn.qconv2d_pointwise(
            qx, self.x_scale, self.x_zp, self.packed, self.w_scale, self.w_zp,
            None if bias is None else bias.float(), *self.args, float(o_scale), int(o_zp),
            o_dtype, "relu" if relu else "none", [], "")

    def quantize(self, x: torch.Tensor) -> torch.Tensor | None:
        """uint8 codes of x at this layer's input scale, in x's own memory layout (the previous
        int8 convolution's output is channels-last), or None where x holds a NaN: the native
        kernel's one pass where it is built, else torch ops."""
        x = x.float()
        lo, hi = (1, 255) if self.symmetric else (0, 255)  # symmetric: [-127, 127] + 128
        lib = native.library()
        if lib is not None:
            if not (x.is_contiguous() or x.is_contiguous(memory_format=torch.channels_last)):
                x = x.contiguous(memory_format=torch.channels_last)
            return lib.quantize_u8(x, self.x_scale, self.x_zp, lo, hi)
        if torch.isnan(x.sum()):  # one reduction, no mask (+Inf + -Inf also lands here)
            return None
        q = torch.round(x / self.x_scale).add_(self.x_zp).clamp_(lo, hi)
        return q.to(torch.uint8)
