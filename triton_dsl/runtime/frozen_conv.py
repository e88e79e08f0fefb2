"""A frozen convolution: its weight held as a FrozenLinear, run the fastest of its ways."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.common import conv_out_size, m_bucket
from . import compile_ops, dispatch, runners, tuning
from .frozen_linear import FrozenLinear
from .layers import Conv2d, im2col_conv


class Codes:
    """An activation as the uint8 codes the next int8 convolution reads (at its static scale
    and zero point), made by the int8 convolution before it: what rt.conv_relu(..., into=nxt)
    returns in place of a float tensor. Generated code hands it only to nxt, on the next line;
    ``dtype`` is the float type it stands for."""
    __slots__ = ("q", "scale", "zp", "dtype")

    def __init__(self, q: torch.Tensor, scale: float, zp: int, dtype: torch.dtype):
        self.q, self.scale, self.zp, self.dtype = q, scale, zp, dtype


class FrozenConv2d(nn.Module):
    """A convolution whose weight is stored as a FrozenLinear [out, C/groups*kh*kw]. It runs as
    unfold + the frozen matmul ("im2col": the kernels; the only way for per-token int8
    activations, whose tokens are the patches) or as F.conv2d on the weight dequantized once
    ("conv": oneDNN's direct convolution, exact for float activations). Two more ways where
    they apply: "qconv", one int8 convolution, for static int8 activations (the fake-quantized
    convolution up to float rounding); "int16", a direct convolution on AMX tiles of float
    activations rounded to 16 bits with a step of max|x| / 32767 of each image: the step the
    matmul kernel's float mode takes per token (so per patch, on the im2col way), here set by
    the whole image. The ways differ in rounding, then, not only in speed; each stays within
    its documented bound of the trained layer. Grouped convolutions and 'same' padding always
    take "conv"; otherwise the fastest is measured per batch bucket and input shape
    (runtime/tuning.py), or "im2col" ("qconv" where it applies) with TRITON_DSL_TUNE=0."""

    def __init__(self, layer: Conv2d):
        super().__init__()
        self.stride, self.padding = layer.stride, layer.padding
        self.dilation, self.groups = layer.dilation, layer.groups
        self.kernel_size, self.out_channels = layer.kernel_size, layer.out_channels
        self.im2col = layer.groups == 1 and layer.padding != "same"
        self.linear = FrozenLinear(layer)
        self.linear.dense_only = not self.im2col
        self.linear.in_conv = True
        compile_ops.register(self)

    def __setstate__(self, state):
        super().__setstate__(state)
        compile_ops.register(self)

    def forward(self, x, relu: bool = False):
        """The convolution of x, then max(0, y) with relu=True (rt.conv_relu): an int8
        convolution applies it in the same call."""
        if torch.compiler.is_compiling():
            y = torch.ops.triton_dsl.frozen_conv2d(x, self.op_handle)
            return F.relu(y) if relu else y
        return self.eager_forward(x, relu)

    def eager_forward(self, x, relu: bool = False):
        if isinstance(x, Codes):
            return self.forward_codes(x, relu)
        lin = self.linear
        kh, kw = self.kernel_size
        if x.dim() != 4 or x.shape[1] * kh * kw != lin.in_features * self.groups:
            raise ValueError(f"x must be [batch, {lin.in_features * self.groups // (kh * kw)}, "
                             f"height, width], got shape {tuple(x.shape)}")
        way = self._way(x)
        if way in ("qconv", "int16"):
            y = self.forward_qconv(x, relu) if way == "qconv" else self.forward_int16(x, relu)
            if y is not None:
                return y
            y = self.forward_conv(x, keep=False)  # a NaN or an infinity: fp32 propagates it
        else:
            y = im2col_conv(x, self, lin) if way == "im2col" else self.forward_conv(x)
        if not relu:
            return y
        # y is new: max(0, y) in place writes no second [B, C, H, W] tensor (in a profile at
        # batch 64 a new one cost 7x the in-place pass: fresh pages), unless autograd needs y,
        # or y is a view of the inner matmul's output (im2col) that a forward hook may hold
        keep = (way == "im2col" and _hooked(lin)) or (torch.is_grad_enabled() and y.requires_grad)
        return F.relu(y) if keep else y.relu_()

    def _runner(self, name: str, kind):
        """The runner ``name`` (kind: runners.QConv or Int16Conv) built once into the layer's
        slot; None before _way made the slot (again after a copy, .to() or a state load) or
        where kind does not apply."""
        prep = self.linear.prepared
        if prep is None:
            return None
        run = prep.runners.get(name)
        if run is None and kind.applies(self.linear, self):  # built: the checks ran once
            run = dispatch.build(self.linear, prep, name, lambda lin: kind(lin, self))
        return run

    def _qconv(self):
        """The int8 convolution for static int8 activations (kernels/cpu_conv.py)."""
        return self._runner("qconv", runners.QConv)

    def _int16(self):
        """The AMX convolution of float activations at 16 bits (kernels/cpu_int16_conv.py)."""
        return self._runner("int16", runners.Int16Conv)

    def forward_int16(self, x, relu: bool = False):
        run = self._int16()
        return None if run is None else run(x, relu)

    def forward_qconv(self, x, relu: bool = False):
        run = self._qconv()
        return None if run is None else run(x, relu)

    def forward_codes(self, x: Codes, relu: bool = False, out=None):
        """The int8 convolution of codes handed over by the convolution before (codes_for):
        fp32 out, or uint8 codes at out = (scale, zero point)."""
        run = self._qconv()
        if run is None or run.input_codes() != (x.scale, x.zp) or x.q.shape[1] * \
                self.kernel_size[0] * self.kernel_size[1] != self.linear.in_features:
            raise ValueError(f"{type(self).__name__}: uint8 codes at scale {x.scale} and zero "
                             f"point {x.zp} of shape {tuple(x.q.shape)} are not this "
                             "convolution's input; only generated code hands codes over")
        y = run.run(x.q, relu, out)
        return y if out is not None else y.to(x.dtype)

    def codes_for(self, x, nxt: nn.Module) -> Codes | None:
        """max(0, self(x)) as the uint8 codes the int8 convolution nxt reads next, quantized
        by this int8 convolution's own output stage (a quarter of the bytes, and nxt skips its
        quantizing pass), where both run as int8 convolutions on this input; else None."""
        q = self.linear.act_quant
        if q is None or q.mode != "static" or not isinstance(nxt, FrozenConv2d) or \
                torch.compiler.is_compiling():
            return None  # float activations: nothing to hand over
        kh, kw = self.kernel_size
        if not isinstance(x, Codes) and (x.dim() != 4 or x.shape[1] * kh * kw !=
                                         self.linear.in_features or self._way(x) != "qconv"):
            return None  # a wrong shape: the forward says so
        prep = nxt.linear.prepared  # None until nxt has run once (again after a copy)
        run = None if prep is None else nxt._qconv()
        if run is None:
            return None
        b, _, h, w = x.q.shape if isinstance(x, Codes) else x.shape
        key = ("conv", m_bucket(b), (self.out_channels, *conv_out_size(
            h, w, self.kernel_size, self.stride, self.padding, self.dilation)))
        if prep.picks.get(key) != "qconv":  # nxt's own choice for this input, once made
            return None
        out = run.input_codes()
        if isinstance(x, Codes):
            return Codes(self.forward_codes(x, True, out), *out, x.dtype)
        q = self._qconv()(x, True, out)
        return None if q is None else Codes(q, *out, x.dtype)  # None: a NaN, the float path

    def forward_conv(self, x, keep: bool = True):
        """F.conv2d on the weight dequantized once (kept in the layer's slot, or with
        keep=False, when another way runs this layer and only this input needs it, dropped
        again: a layer whose way is not "conv" holds no fp32 copy)."""
        lin = self.linear
        prep = lin.prepared
        held = prep is not None and "dense" in prep.runners
        if lin.act_quant is not None:
            x = lin.act_quant(x)
        if x.device.type == "cpu" and x.dim() == 4:
            # oneDNN's fp32 convolution runs channels-last (NHWC) faster than NCHW (ad hoc:
            # 1.5x for 16 channels at 32x32, batch 64, on the development machine; the sums'
            # order may differ, float rounding); its output stays channels-last, so only a
            # network's first convolution copies. .to, not .contiguous: a one-channel input
            # counts as channels-last already without channels-last strides, and oneDNN then
            # answers NCHW (ad hoc, small_cnn at batch 64: 1.8 against 0.8 ms a convolution,
            # 1.8 against 0.4 ms for the max pool after it)
            x = x.to(memory_format=torch.channels_last)
        run = dispatch.dense(lin)  # the weight dequantized once, a folded batchnorm in it
        w, bias = run.conv((self.out_channels, -1, *self.kernel_size))
        if not (keep or held):
            lin.prepared.forget("dense")
        if w.dtype != x.dtype:
            w, bias = w.to(x.dtype), None if bias is None else bias.to(x.dtype)
        return F.conv2d(x, w, bias, self.stride, self.padding, self.dilation, self.groups)

    def _way(self, x) -> str:
        lin = self.linear
        if not self.im2col:
            return "conv"
        cpu = dispatch.on_cpu_paths(x.device)
        if lin.activations == "dynamic" or not cpu:
            return "im2col"
        prep = dispatch.prepare(lin, x.device, lin._act(), cpu)
        key = ("conv", m_bucket(x.shape[0]), tuple(x.shape[1:]))
        way = prep.picks.get(key)
        if way is None:
            qconv = self._qconv() is not None
            way = "qconv" if qconv else "im2col"  # without measuring: the int8 convolution
            if tuning.enabled():
                name = (f"conv|{self.out_channels}x{lin.in_features}|{lin.form.name}|"
                        f"{self.kernel_size}/{self.stride}/{self.padding}/{self.dilation}|"
                        f"batch={key[1]}|{'x'.join(map(str, x.shape[1:]))}|{lin.activations}")
                ways = {"im2col": lambda: im2col_conv(x, self, lin),
                        "conv": lambda: self.forward_conv(x)}
                if qconv:
                    ways["qconv"] = lambda: self.forward_qconv(x)
                elif runners.Int16Conv.applies(lin, self):
                    ways["int16"] = lambda: self.forward_int16(x)
                way = tuning.choose(name, ways)
            prep.picks[key] = way
            dispatch.release_unused(lin)
        return way


def _hooked(mod: nn.Module) -> bool:
    """Whether a forward hook may hold mod's output (the im2col way's result views its inner
    FrozenLinear's; a convolution's own hooks get its result)."""
    return bool(mod._forward_hooks or nn.modules.module._global_forward_hooks)


def _fused(conv: nn.Module, bn: nn.Module | None) -> bool:
    """Whether conv is a frozen convolution with bn (if any) folded into it."""
    return isinstance(conv, FrozenConv2d) and (bn is None or conv.linear.fold is bn)


def conv_relu(conv: nn.Module, bn: nn.Module | None, x, into: nn.Module | None = None):
    """F.relu(bn(conv(x))), bn optional: what generated code runs for a convolution, its
    batchnorm and a ReLU. A frozen convolution with that batchnorm folded into it applies the
    ReLU itself, an int8 convolution in the same call: no second pass over a [B, C, H, W]
    output, which at batch 64 cost about as much as the int8 convolution. ``into``: the
    convolution the next line runs on the result; where both are int8 convolutions the result
    is handed over as its uint8 codes (Codes), as torch's int8 deployments keep activations."""
    if _fused(conv, bn):  # the folded batchnorm passes its input through
        codes = None if into is None else conv.codes_for(x, into)
        return codes if codes is not None else conv(x, relu=True)
    y = conv(x)
    return F.relu(y if bn is None else bn(y))


def conv_add_relu(conv: nn.Module, bn: nn.Module | None, x, skip: torch.Tensor):
    """F.relu(bn(conv(x)) + skip), bn optional: a residual block's last convolution, its
    batchnorm, the add of the skip and the ReLU after the block. A frozen convolution's output
    is a new tensor, so it takes the add and the ReLU in place (no two more [B, C, H, W]
    tensors), where nothing needs it for gradients."""
    if not _fused(conv, bn):
        y = conv(x)
        return F.relu((y if bn is None else bn(y)) + skip)
    y = conv(x)
    if (torch.compiler.is_compiling() or y.shape != skip.shape or y.dtype != skip.dtype
            or (torch.is_grad_enabled() and (y.requires_grad or skip.requires_grad))
            or _hooked(conv) or _hooked(conv.linear)):
        return F.relu(y + skip)
    return y.add_(skip).relu_()
