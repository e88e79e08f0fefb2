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

import ctypes
import struct
import threading

import torch

from . import native
from .common import conv_out_size, native_conv_fits
from .cpu_int16_conv import pack_amx

_NATIVE_LOCK = threading.Lock()


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
        self._native: tuple | None = None  # (bias, NativeQConv or None)

    @property
    def nbytes(self) -> int:
        """Bytes held: the scales, oneDNN's prepacked copy, and the native form once built, or
        else the codes (kept until then to build it)."""
        nat = self._native[1] if self._native is not None else None
        return ((0 if self.codes is None else self.codes.numel()) + 4 * self.w_scale.numel() +
                self.packed.numel() * self.packed.element_size() +
                (0 if nat is None else nat.nbytes))

    def native_form(self, bias: torch.Tensor | None) -> NativeQConv | None:
        """This convolution with this bias for the native library (cpu_qconv.c), built once;
        None where that does not apply (no library, groups > 1, common.native_conv_fits)."""
        held = self._native
        if held is not None and held[0] is bias:  # every call after the first
            return held[1]
        with _NATIVE_LOCK:  # two threads' first calls: one builds, then the codes go
            return self._native_form(bias)

    def _native_form(self, bias):
        if self._native is None or self._native[0] is not bias:
            if self.codes is None:  # released once the native form was built
                return None
            stride, padding, dilation, groups = self.args
            ok = groups == 1 and native.library() is not None and native_conv_fits(
                self.codes.shape, padding, dilation)
            self._native = (bias, NativeQConv(self.codes, self.w_scale, self.x_scale, self.x_zp,
                                              bias, stride, padding, dilation, self.symmetric)
                            if ok else None)
            if ok:
                self.codes = None  # oneDNN's prepacked copy and the native form hold them now
        return self._native[1]

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
            out: tuple[float, int] | None = None, way: str = "onednn") -> torch.Tensor:
        """The convolution of uint8 codes qx (at this layer's x_scale and x_zp): fp32, or with
        ``out`` = (scale, zero point) uint8 codes of the result at that scale, rounded to
        nearest even and saturated to [0, 255] (the next layer's static quantizer, up to float
        rounding; with relu the symmetric quantizer's lower bound cannot bind). way: "onednn",
        or "native" (native_form must not be None)."""
        if way == "native":  # NativeQConv checks out itself
            return self.native_form(bias)(qx, relu, out)
        out = out_codes(out)
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


def out_codes(out) -> tuple[float, int] | None:
    """An output quantizer (scale, zero point) as the kernels take it, checked: a positive,
    finite fp32 scale and a zero point in [0, 255]; None stays None (fp32 out)."""
    if out is None:
        return None
    scale, zp = float(out[0]), int(out[1])
    try:  # the scale as C receives it: rounded to fp32 (a tiny one becomes 0)
        scale32 = struct.unpack("f", struct.pack("f", scale))[0]
    except OverflowError:
        scale32 = float("inf")
    if not 0.0 < scale32 < float("inf") or not 0 <= zp <= 255:
        raise ValueError(f"out must be (scale, zero point) with a positive finite fp32 scale "
                         f"and a zero point in [0, 255], got {tuple(out)}")
    return scale, zp


def pack_native(codes: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """int8 weight codes [O, C, kh, kw] -> (cpu_qconv.c's layout: per block of 16 output
    channels, per tap, per group of 4 input channels, 16 x 4 codes, zero-padded; the code sums
    per output channel, int32, padded to the blocks)."""
    o, c, kh, kw = codes.shape
    op, c4 = -(-o // 16) * 16, -(-c // 4) * 4
    w = torch.zeros(op, c4, kh, kw, dtype=torch.int8)
    w[:o, :c] = codes
    # [ob, o16, g, j, kh, kw] -> [ob, kh, kw, g, o16, j]
    w = w.view(op // 16, 16, c4 // 4, 4, kh, kw).permute(0, 4, 5, 2, 1, 3).contiguous()
    wsum = torch.zeros(op, dtype=torch.int32)
    wsum[:o] = codes.sum(dim=(1, 2, 3), dtype=torch.int32)
    return w.reshape(-1), wsum


class NativeQConv:
    """The int8 convolution of uint8 codes, or of float activations it quantizes itself, by the
    native library (cpu_qconv.c): groups=1, and what common.native_conv_fits takes."""

    def __init__(self, codes: torch.Tensor, w_scale: torch.Tensor, x_scale: float, x_zp: int,
                 bias: torch.Tensor | None, stride, padding, dilation, symmetric: bool = False,
                 lib=None):
        self.lib = lib  # None: native.library() (the tests pass each instruction-set build)
        o = codes.shape[0]
        op = -(-o // 16) * 16
        run = lib or native.library()
        # the weight in the layout of the loop that runs: AMX tiles' (cpu_conv_amx.c) where the
        # library has them, else VNNI's; the code sums either way
        self.wt, self.wsum = pack_native(codes)
        if run is not None and run.amx:
            self.wt, self.wt_amx = None, pack_amx(codes, dilation[1])
        else:
            self.wt_amx = None
        self.mult = torch.zeros(op)
        self.mult[:o] = (x_scale * w_scale.double()).float()
        self.bias = torch.zeros(op)
        if bias is not None:
            self.bias[:o] = bias.float()
        self.x_scale, self.x_zp, self.shape = float(x_scale), int(x_zp), tuple(codes.shape)
        self.range = (1, 255) if symmetric else (0, 255)  # as PackedQConv.quantize clamps
        self.geo = [*stride, *padding, *dilation]
        self.sizes: dict = {}  # (input shape, strides) -> (output shape, C geometry array)
        self.nbytes = sum(t.numel() * t.element_size() for t in (
            self.wt, self.wsum, self.mult, self.bias, self.wt_amx) if t is not None)

    def _size(self, shape, strides=(0, 0, 0, 0)):
        """(output [B, O, H', W'], cpu_qconv.c's geometry) for an input shape (and a float
        input's strides)."""
        o, c, kh, kw = self.shape
        (sh, sw, ph, pw, dh, dw) = self.geo
        b, _, h, w = shape
        ho, wo = conv_out_size(h, w, (kh, kw), (sh, sw), (ph, pw), (dh, dw))
        if ho < 1 or wo < 1:
            raise ValueError(f"x of shape {tuple(shape)} is smaller than the kernel "
                             f"{kh}x{kw} with padding {ph}x{pw}")
        geo = (ctypes.c_int64 * 19)(b, h, w, c, o, kh, kw, *self.geo, *strides, *self.range)
        if len(self.sizes) < 64:  # a handful of shapes in practice
            self.sizes[(tuple(shape), tuple(strides))] = (b, o, ho, wo), geo
        return (b, o, ho, wo), geo

    def __call__(self, x: torch.Tensor, relu: bool = False,
                 out: tuple[float, int] | None = None) -> torch.Tensor | None:
        """fp32 [B, O, H', W'] (channels-last), or uint8 codes at out = (scale, zero point), of
        uint8 codes x at this layer's input scale, or of float x (quantized in the kernel's
        copy of the input, codes as PackedQConv.quantize makes them: None where x holds a
        NaN)."""
        c = self.shape[1]
        if x.dim() != 4 or x.shape[1] != c or x.device.type != "cpu" or not (
                x.dtype == torch.uint8 or x.is_floating_point()):
            raise ValueError(f"x must be uint8 codes or floats [batch, {c}, height, width] on "
                             f"the CPU, got {x.dtype} of shape {tuple(x.shape)} on {x.device}")
        out = out_codes(out)
        codes = x.dtype == torch.uint8
        if codes:
            x = x.contiguous(memory_format=torch.channels_last)
        elif x.dtype != torch.float32:
            x = x.float()
        strides = (0, 0, 0, 0) if codes else x.stride()
        size, geo = self.sizes.get((tuple(x.shape), strides)) or self._size(x.shape, strides)
        y = torch.empty(size, dtype=torch.float32 if out is None else torch.uint8,
                        memory_format=torch.channels_last)
        if not size[0]:
            return y
        lib = self.lib or native.library()
        if lib is None:
            raise RuntimeError("the native int8 convolution needs the native library")
        rc = lib.dll.tdsl_qconv(
            x.data_ptr() if codes else None, None if codes else x.data_ptr(), self.x_scale,
            geo, self.x_zp, None if self.wt is None else self.wt.data_ptr(),
            None if self.wt_amx is None else self.wt_amx.data_ptr(), self.wsum.data_ptr(),
            self.mult.data_ptr(),
            self.bias.data_ptr(), int(relu), int(out is not None),
            0.0 if out is None else out[0], 0 if out is None else out[1], y.data_ptr(),
            torch.get_num_threads())
        if rc == -2:
            raise RuntimeError("native int8 convolution: packed for AMX tiles, which this "
                               "library cannot run")
        if rc < 0:
            raise MemoryError("native int8 convolution: no memory for the padded input")
        return None if rc else y
