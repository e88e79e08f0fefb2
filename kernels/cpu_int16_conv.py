"""Convolutions with float activations on AMX tiles at 16-bit fixed point (cpu_conv_amx.c): the
"int16" way of a frozen ternary or int8-weight convolution, chosen where it measures faster
than oneDNN's fp32 convolution on the dequantized weight.

Each image is scaled by 32767 / its own max |x| and rounded to integers, so an activation is off
by at most half that step, as the linear kernel's float-activation mode is per token; the sums
are then exact integers. int16_conv_reference is the pure-PyTorch twin, bit for bit.
"""
from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from . import native
from .common import CONV_MAX_K, conv_out_size, native_conv_fits

XI_MAX = 32767
TINY = 2.0 ** -100  # an image whose max |x| is below this counts as zero (32767 / m overflows)


def chunks(kh: int, kw: int, c: int, dw: int) -> list[tuple[int, int, int]]:
    """The 64-byte chunks a receptive field is cut into, in cpu_conv_amx.c's order:
    (ky, kx of the run's first tap, first byte in the run); with dilation 1 a kernel row's
    taps are one run of kw * c4 bytes, else each tap is its own run of c4 bytes."""
    c4 = -(-c // 4) * 4
    runs, length = (1, kw * c4) if dw == 1 else (kw, c4)
    return [(ky, r, j) for ky in range(kh) for r in range(runs) for j in range(0, length, 64)]


def pack_amx(codes: torch.Tensor, dw: int) -> torch.Tensor:
    """int8 codes [O, C, kh, kw] -> the right-hand tiles cpu_conv_amx.c reads: per block of 16
    output channels and chunk, 16 rows of (16 channels x 4 chunk bytes), zero where a chunk
    byte is past its run or a channel past C."""
    o, c, kh, kw = codes.shape
    c4, op = -(-c // 4) * 4, -(-o // 16) * 16
    flat = torch.zeros(op, c * kh * kw + 1, dtype=torch.int8)  # the last column: zero
    flat[:o, :-1] = codes.reshape(o, -1)
    index = []
    for ky, kx0, j in chunks(kh, kw, c, dw):
        for q in range(j, j + 64):  # the chunk's bytes: (tap, channel) within the run
            kx, ch = (q // c4, q % c4) if dw == 1 else (kx0, q)
            ok = kx < kw and ch < c
            index.append((ch * kh + ky) * kw + kx if ok else c * kh * kw)
    w = flat[:, torch.tensor(index)].view(op // 16, 16, -1, 16, 4)  # [ob, o, chunk, r, i]
    return w.permute(0, 2, 3, 1, 4).contiguous().reshape(-1)


def int16_conv_reference(x, codes, w_scale, bias, stride, padding, dilation, relu=False):
    """The twin of cpu_conv_amx.c in PyTorch: per image m = max|x|, xi = clamp(round(x * r))
    with r = 32767 / m (an image with m below 2^-100 counts as zero), the integer convolution
    in float64 (exact), then float(sum) * (t * w_scale) + bias in fp32 with t = m / 32767, in
    that order; None where x holds a NaN or +-Inf (the kernel answers for the whole call)."""
    x = x.float()
    if not torch.isfinite(x).all():
        return None
    m = x.abs().amax(dim=(1, 2, 3)) if x.numel() else x.new_zeros(x.shape[0])
    live = m >= TINY
    # a tensor over a tensor: XI_MAX / m would be reciprocal(m) * XI_MAX, rounded twice
    r = torch.where(live, torch.full_like(m, XI_MAX) / torch.where(live, m, 1.0), 0.0)
    t = torch.where(live, m / XI_MAX, 0.0)
    xi = torch.round(x * r.reshape(-1, 1, 1, 1)).clamp_(-XI_MAX, XI_MAX)
    acc = F.conv2d(xi.double(), codes.double(), None, stride, padding, dilation)
    y = acc.float() * (t[:, None] * w_scale.float()[None, :])[:, :, None, None]
    if bias is not None:
        y = y + bias.float().reshape(-1, 1, 1)
    return F.relu(y) if relu else y


class Int16Conv:
    """One convolution (groups=1, numeric padding) of int8 weight codes [O, C, kh, kw] with a
    scale per output channel and a bias, for float inputs; needs a library with AMX tiles."""

    def __init__(self, codes: torch.Tensor, w_scale: torch.Tensor, bias: torch.Tensor | None,
                 stride, padding, dilation, lib=None):
        o, c, kh, kw = codes.shape
        if codes.dtype != torch.int8 or c * kh * kw > CONV_MAX_K:
            raise ValueError(f"codes must be int8 [O, C, kh, kw] with C*kh*kw <= {CONV_MAX_K}, got "
                             f"{codes.dtype} of shape {tuple(codes.shape)}")
        self.lib = lib  # None: native.library() (the tests pass each build)
        op = -(-o // 16) * 16
        self.wt = pack_amx(codes, dilation[1])
        self.w_scale, self.bias = torch.zeros(op), torch.zeros(op)
        self.w_scale[:o] = w_scale.float().reshape(-1).expand(o)
        if bias is not None:
            self.bias[:o] = bias.float()
        self.shape, self.geo = (o, c, kh, kw), [*stride, *padding, *dilation]
        # max |code|, for the kernel's int32 bound (in int16: -128 has no int8 absolute value)
        self.wmax = int(codes.to(torch.int16).abs().max()) if codes.numel() else 0
        self.sizes: dict = {}  # (input shape, strides) -> (output shape, C geometry array)
        self.nbytes = sum(t.numel() * t.element_size() for t in (self.wt, self.w_scale,
                                                                 self.bias))

    @staticmethod
    def applies(codes_shape, stride, padding, dilation, lib) -> bool:
        """Whether this way can run such a convolution here."""
        return lib is not None and lib.amx and native_conv_fits(codes_shape, padding, dilation)

    def _size(self, x):
        """(output [B, O, H', W'], the kernel's geometry array) for x's shape and strides."""
        o, c, kh, kw = self.shape
        b, _, h, w = x.shape
        sh, sw, ph, pw, dh, dw = self.geo
        ho, wo = conv_out_size(h, w, (kh, kw), (sh, sw), (ph, pw), (dh, dw))
        if ho < 1 or wo < 1:
            raise ValueError(f"x of shape {tuple(x.shape)} is smaller than the kernel "
                             f"{kh}x{kw} with padding {ph}x{pw}")
        geo = (ctypes.c_int64 * 18)(b, h, w, c, o, kh, kw, *self.geo, *x.stride(), self.wmax)
        if len(self.sizes) < 64:  # a handful of shapes in practice
            self.sizes[(x.shape, x.stride())] = (b, o, ho, wo), geo
        return (b, o, ho, wo), geo

    def __call__(self, x: torch.Tensor, relu: bool = False) -> torch.Tensor | None:
        """fp32 [B, O, H', W'] channels-last of float x [B, C, H, W] (any strides), max(0, y)
        with relu; None where x holds a NaN or an infinity (the caller's fp32 path answers)."""
        c = self.shape[1]
        if x.dim() != 4 or x.shape[1] != c or x.device.type != "cpu" or \
                not x.is_floating_point():
            raise ValueError(f"x must be floats [batch, {c}, height, width] on the CPU, got "
                             f"{x.dtype} of shape {tuple(x.shape)} on {x.device}")
        if x.dtype != torch.float32:
            x = x.float()
        size, geo = self.sizes.get((x.shape, x.stride())) or self._size(x)
        y = torch.empty(size, memory_format=torch.channels_last)
        if not size[0]:
            return y
        lib = self.lib or native.library()
        rc = lib.dll.tdsl_int16_conv(x.data_ptr(), geo, self.wt.data_ptr(),
                                     self.w_scale.data_ptr(), self.bias.data_ptr(), int(relu),
                                     y.data_ptr(), torch.get_num_threads())
        if rc == -1:
            raise MemoryError("int16 convolution: no memory for the padded planes")
        if rc == -2:
            raise RuntimeError("int16 convolution: this library cannot run AMX tiles")
        return None if rc else y
