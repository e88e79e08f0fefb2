"""The ways a frozen layer can run, as runners built once from the layer's stored form: for a
matmul, callables (mod, x, act) -> y, which runtime/dispatch.py chooses among; for a
convolution also QConv and Int16Conv, callables (x, relu) -> y, which FrozenConv2d._way
chooses among. A folded batchnorm (runtime/fold.py) is in every runner: affine() folds it into
the weight's scales and the bias; Generic applies its map to the form's output.
"""
from __future__ import annotations

import threading

import torch
import torch.nn.functional as F

from ..kernels import cpu_conv, cpu_int16_conv, native
from ..kernels.common import as_rows
from ..kernels.per_token import fake_quantize_per_token
from . import tuning

NATIVE_MACS = 1 << 24  # without measuring, the native int8 convolution takes work up to this
# Held while a runner is built: building may put a layer's released buffer back and release it
# again (stored), which another thread making its first call must not see half done.
BUILD_LOCK = threading.RLock()


def affine(mod):
    """(row multiplier, bias) with a folded batchnorm applied (runtime/fold.py), or (None, the
    layer's bias) without one."""
    bn = mod.fold
    if bn is None:
        return None, mod.bias
    mul, add = bn.affine_map()
    bias = add if mod.bias is None else mod.bias.float() * mul + add
    return mul, bias


class Runner:
    def bind(self, mod, act):
        """A call x -> y for this layer and activation mode (FrozenLinear's fast path)."""
        return lambda x: self(mod, x, act)


class Generic(Runner):
    """The form's own path: Triton kernels or reference twins (ops.py decides); a folded
    batchnorm is applied to its output. The form's matmul adds the layer's own bias already,
    so the batchnorm's map applies as it is (affine() folds that bias in for the runners
    whose matmul leaves it out)."""
    nbytes = 0

    def __init__(self, mod):
        self.form = mod.form
        self.mul, self.add = (None, None) if mod.fold is None else mod.fold.affine_map()

    def __call__(self, mod, x, act):
        y = self.form.matmul(mod, x, act)
        if self.mul is None:
            return y
        return (y.float() * self.mul.to(y.device) + self.add.to(y.device)).to(y.dtype)


class Dense(Runner):
    """fp32 matmul on the weight dequantized once (a folded batchnorm folded into it); int8
    activations fake-quantized first."""

    def __init__(self, mod):
        weight = stored(mod, lambda: mod.form.dense(mod))
        self.mul, self.bias = affine(mod)
        self.weight = weight if self.mul is None else weight * self.mul.reshape(-1, 1)
        self.nbytes = self.weight.numel() * self.weight.element_size()
        self.conv_args = None  # (4-d channels-last weight, bias), once a convolution asks

    def conv(self, shape) -> tuple:
        """(the weight as a 4-d channels-last tensor of ``shape``, the bias in its dtype) for
        F.conv2d: oneDNN runs a channels-last input fastest with a weight in the same layout
        (an ad hoc reading at batch 1 and 64 channels: 1.9x against an NCHW weight). The
        weight is then held in this form alone; matrix() makes the [N, K] one again if a
        matmul asks."""
        if self.conv_args is not None:
            return self.conv_args
        with BUILD_LOCK:
            if self.conv_args is None:
                # .to, not .contiguous: channels-last strides for one input channel too
                w = self.weight.reshape(shape).to(memory_format=torch.channels_last)
                self.conv_args = (w, None if self.bias is None else self.bias.to(w.dtype))
                self.weight = None
                self.nbytes = w.numel() * w.element_size()
            return self.conv_args

    def matrix(self) -> torch.Tensor:
        """The [N, K] weight (made again from the convolution's form if that released it)."""
        w = self.weight
        if w is None:
            with BUILD_LOCK:
                if self.weight is None:
                    four = self.conv_args[0]
                    self.weight = four.reshape(four.shape[0], -1).contiguous()
                    self.nbytes += self.weight.numel() * self.weight.element_size()
                w = self.weight
        return w

    def __call__(self, mod, x, act):
        # a float matmul: non-finite inputs give what F.linear gives (NaN or +-Inf per
        # column); with int8 activations a non-finite row has a NaN scale, so a NaN row
        if act == "dynamic":
            x = fake_quantize_per_token(x)
        w = self.matrix()
        if x.dtype != w.dtype:
            return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))
        return F.linear(x, w, self.bias)

    def bind(self, mod, act):
        w, b = self.matrix(), self.bias
        if act == "none":
            return lambda x: F.linear(x, w, b) if x.dtype == w.dtype else self(mod, x, act)
        return super().bind(mod, act)


class Prepacked(Runner):
    """One prepacked CPU form per part of the weight (TTQ has two: T and |T|), summed; a folded
    batchnorm scales every part's row scales."""

    def __init__(self, mod, path, parts):
        mul, self.bias = affine(mod)
        if mul is not None:
            parts = [(codes, scale * mul.reshape(-1, *([1] * (scale.dim() - 1))), spec)
                     for codes, scale, spec in parts]
        self.forms = [path.build(codes, scale, spec) for codes, scale, spec in parts]
        self.nbytes = sum(f.nbytes for f in self.forms)
        self.k = parts[0][2].k

    def __call__(self, mod, x, act):
        x2 = as_rows(x)
        y = None
        for i, form in enumerate(self.forms):
            run = form.dynamic_matmul if act == "dynamic" else form.float_matmul
            part = run(x2, self.bias if i == 0 else None)
            y = part if y is None else y.add_(part)
        return y.to(x.dtype).reshape(*x.shape[:-1], y.shape[-1])

    def codes(self) -> torch.Tensor:
        return self.forms[0].codes()


class QConv(Runner):
    """A convolution with static int8 activations as one int8 convolution, a folded batchnorm
    in its scales and bias: oneDNN's, or the native library's where that measured faster on
    the input's shape (at batch 1, where oneDNN's per-call cost outweighs the arithmetic)."""

    def __init__(self, lin, conv):
        q = lin.act_quant
        x_scale, x_zp = q.scale_zero()
        codes, scale, self.bias = conv_weight(lin, conv)
        self.packed = cpu_conv.PackedQConv(
            codes, scale, float(x_scale), int(x_zp), q.symmetric, conv.stride, conv.padding,
            conv.dilation, conv.groups)
        self.ways: dict = {}  # input shape -> "onednn" or "native"

    @property
    def nbytes(self) -> int:
        return self.packed.nbytes

    @staticmethod
    def applies(lin, conv) -> bool:
        """Static int8 activations, calibrated; one int8 weight; groups=1 and numeric padding;
        a torch with oneDNN's quantized convolution."""
        q = lin.act_quant
        return (conv.im2col and q is not None and q.mode == "static" and int(q.batches) > 0
                and cpu_conv.available() and one_int8_weight(lin))

    def __call__(self, x, relu: bool = False, out=None):
        """Of float x: x's dtype out, or uint8 codes at out = (scale, zero point); None where
        x holds a NaN. The native kernel quantizes x in its own copy of the input."""
        if not x.is_floating_point():
            raise ValueError(f"x must hold floats, got {x.dtype} of shape {tuple(x.shape)}")
        way = self.ways.get(x.shape) or self._way(x.shape)
        if way == "native":
            y = self.packed.native_form(self.bias)(x, relu, out)
        else:
            qx = self.packed.quantize(x)
            y = None if qx is None else self.packed.run(qx, self.bias, relu, out)
        return y if y is None or out is not None else y.to(x.dtype)

    def run(self, qx, relu: bool = False, out=None):
        """The convolution of uint8 codes at this layer's input scale: fp32, or uint8 codes at
        out = (scale, zero point)."""
        way = self.ways.get(qx.shape) or self._way(qx.shape)
        return self.packed.run(qx, self.bias, relu, out, way)

    def _way(self, shape) -> str:
        nat = self.packed.native_form(self.bias)
        if nat is None:
            way = "onednn"
        elif not tuning.enabled():  # without measuring: the native kernel for small work
            (b, o, ho, wo), _ = nat._size(shape)
            way = "native" if b * ho * wo * nat.shape[1] * nat.shape[2] * nat.shape[3] * o \
                <= NATIVE_MACS and native.library().isa == "avx512-vnni" else "onednn"
        else:
            qx = torch.randint(0, 256, tuple(shape), dtype=torch.uint8).contiguous(
                memory_format=torch.channels_last)  # timing does not depend on the values
            name = (f"qconv|{'x'.join(map(str, nat.shape))}|{nat.geo}|"
                    f"{'x'.join(map(str, shape))}")
            way = tuning.choose(name, {"onednn": lambda: self.packed.run(qx, self.bias, True),
                                       "native": lambda: nat(qx, True)})
        if len(self.ways) < 64:
            self.ways[tuple(shape)] = way
        return way

    def input_codes(self) -> tuple[float, int]:
        """(scale, zero point) of the uint8 codes this convolution reads."""
        return self.packed.x_scale, self.packed.x_zp


class Int16Conv(Runner):
    """A convolution with float activations on AMX tiles, each image at 16-bit fixed point
    (kernels/cpu_int16_conv.py), a folded batchnorm in its scales and bias."""

    def __init__(self, lin, conv):
        self.conv = cpu_int16_conv.Int16Conv(*conv_weight(lin, conv), conv.stride,
                                             conv.padding, conv.dilation)
        self.nbytes = self.conv.nbytes

    def __call__(self, x, relu: bool = False):
        """x's dtype out; None where x holds a NaN or an infinity."""
        y = self.conv(x, relu)
        return y if y is None else y.to(x.dtype)

    @staticmethod
    def applies(lin, conv) -> bool:
        """Float activations, one int8 weight, groups=1 and numeric padding, on a library with
        AMX tiles."""
        if lin.act_quant is not None or lin.activations != "none" or not conv.im2col \
                or not one_int8_weight(lin):
            return False
        shape = (conv.out_channels, lin.in_features // (conv.kernel_size[0] *
                                                        conv.kernel_size[1]), *conv.kernel_size)
        return cpu_int16_conv.Int16Conv.applies(shape, conv.stride, conv.padding,
                                                conv.dilation, native.library())


def one_int8_weight(lin) -> bool:
    """Whether the layer's weight is one int8 code matrix with a scale per output channel, as
    the int8 convolutions take it: not grouped scales, nor TTQ's two parts, nor 16-bit."""
    spec = lin.form.cpu_spec(lin)
    return spec is not None and spec.group is None and not hasattr(lin, "scale_abs")


def conv_weight(lin, conv) -> tuple:
    """(int8 codes [O, C, kh, kw], fp32 scale per output channel, bias) of a frozen
    convolution's one int8 weight (one_int8_weight), a folded batchnorm in the scale and bias."""
    o = conv.out_channels
    codes, scale, _ = stored(lin, lambda: lin.form.cpu_parts(lin))[0]
    scale = scale.float().reshape(-1).expand(o)
    mul, bias = affine(lin)
    if mul is not None:
        scale = scale * mul
    return codes.reshape(o, -1, *conv.kernel_size).contiguous(), scale, bias


def stored(mod, fn):
    """fn() with the layer's stored buffer in place, put back from the prepacked form if that
    released it (a dense copy built after the prepacked form, say)."""
    with BUILD_LOCK:
        pre = mod.prepared.prepacked() if mod.prepared is not None else None
        if pre is None or mod.form.stored is None:
            return fn()
        mod.form.rebuild(mod, pre.codes())
        try:
            return fn()
        finally:
            buf = getattr(mod, mod.form.stored)
            setattr(mod, mod.form.stored, torch.empty(0, dtype=buf.dtype))
