"""Deploy form: trained layers frozen into packed weights whose forward calls the kernels.

    frozen = freeze(model)   # in place; returns the model

Ternary and binary weights become 2-bit packed codes plus scales (binary is ternary without
zeros); symmetric int weights and asymmetric ones up to 7 bits become int8 codes plus scales.
TTQ's separate positive and negative scales are served as a*T + d*|T| with a = (p + n) / 2 and
d = (p - n) / 2: two ternary matmuls. Asymmetric 8-bit weights, grouped convolutions and 16-bit
layers keep their (dequantized) float weights. Static activations keep their calibrated fake
quantizer in front of the weight-only kernel.

The frozen output equals the trainable layer's fake-quantized eval forward up to float rounding:
the kernels sum in a different order (fp32 paths ~1e-6 relative), the CPU float paths carry
16-bit fixed-point activations (~1.5e-5 relative), and int8-activation paths are exact in their
integer part (the CPU ones bit-exact with the reference twins).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels.cpu import PackedGrouped, PackedInt8, PackedNative, cached, cached_bytes
from ..kernels.ops import (cpu_form, cpu_kind, cpu_matmul, fake_quantize_per_token,
                           int8_matmul, on_cpu_paths, ternary_matmul)
from ..kernels.packing import abs_packed, dequantize_int8, pack_ternary, unpack_ternary
from ..lang.precision import Binary, Float, Int, Ternary
from . import quant as Q
from .layers import Conv2d, Linear, im2col_conv


_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


def dense_below(kind: str, act: str) -> int:
    """CPU layers with at most this many weights run dense (see _dense_matmul): 2^18 (1 MiB in
    fp32) in front of fbgemm, 2^14 in front of the native kernel, and none with int8 activations
    there. Measured on the 2-core EPYC: the native kernel wins from 256 x 256 up, and the dense
    path pays for fake-quantizing int8 activations."""
    if kind in ("native", "grouped"):
        return 1 << 14 if act == "none" else 0
    return 1 << 18


class FrozenLinear(nn.Module):
    def __init__(self, layer: Linear):
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self.precision = layer.precision
        w = layer.weight.detach()
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(),
                                                               requires_grad=False)
        p = layer.precision
        self.activations = getattr(p, "activations", "none")
        self.act_quant = layer.act_quant if self.activations == "static" else None
        self.mode = "float"
        self._prepacked = None  # the CPU form, once built (see _cpu_form)
        with torch.no_grad():
            if isinstance(p, (Ternary, Binary)):
                self._ternary(layer, w)
            elif isinstance(p, Int):
                self._int(layer, w)
            elif isinstance(p, Float) and p.bits == 16:  # stored at 16 bits, computed in fp32
                dt = _DTYPES[p.dtype]
                self.register_buffer("weight", w.to(dt).contiguous())
                if self.bias is not None:
                    self.bias = nn.Parameter(self.bias.detach().to(dt), requires_grad=False)
                self.mode = "float16"
            else:
                self.register_buffer("weight", layer.quantized_weight().detach().clone())

    def _int(self, layer, w):
        """Codes relative to their zero point, (c - z): int8 when they fit (symmetric, or
        asymmetric up to 7 bits), else int16 (asymmetric 8-bit: 9 bits, served dequantized)."""
        p = layer.precision
        r = layer.weight_quant.quantize(w)
        n = w.shape[0]
        if p.group_size:  # codes, zero points and scales per group of inputs
            codes = Q.group_view(r.codes, p.group_size) - r.zero_point
            scale = r.scale.reshape(n, -1)
        else:
            codes = r.codes.reshape(n, -1) - r.zero_point.reshape(-1, 1)
            scale = r.scale.reshape(-1).expand(n)
        fits = p.symmetric or p.bits <= 7
        dtype = torch.int8 if fits else torch.int16
        self.register_buffer("codes", codes.reshape(n, -1).to(dtype).contiguous())
        self.register_buffer("scale", scale.float().contiguous())
        self.mode = "int8" if fits else "int16"

    def _ternary(self, layer, w):
        p = layer.precision
        if isinstance(p, Binary):
            _, codes, scale = Q.binary_quantize(w, p.granularity)
            pos = neg = scale
        else:
            layer.weight_quant.eval()
            r = layer.weight_quant.quantize(w)
            codes, pos, neg = r.codes, r.scale, r.neg_scale
        n = w.shape[0]
        pos, neg = pos.reshape(-1).float(), neg.reshape(-1).float()
        self.register_buffer("packed", pack_ternary(codes.reshape(n, -1)))
        self.register_buffer("scale", ((pos + neg) / 2).contiguous())
        diff = (pos - neg) / 2
        if (diff != 0).any():  # TTQ: the |T| term; |T| is derived from T, never stored
            self.register_buffer("scale_abs", diff.contiguous())
        self.mode = "ternary"

    def matmul(self, x):
        if x.shape[-1] != self.in_features:  # 2-bit packing pads K: the kernels cannot tell
            raise ValueError(f"x must have {self.in_features} features in its last dimension, "
                             f"got shape {tuple(x.shape)}")
        if self.act_quant is not None:
            x = self.act_quant(x)
        act = "dynamic" if self.activations == "dynamic" else "none"
        kind = None
        if self._stored() is not None and on_cpu_paths(x):
            kind = cpu_kind(self.in_features, act, self.mode == "ternary", self._group())
        if kind is not None:
            if self.in_features * self.out_features <= dense_below(kind, act):
                return self._dense_matmul(x, act)
            return cpu_matmul(self._cpu_form(kind), x, self.bias, act)
        self._restore()
        if self.mode == "ternary":
            y = ternary_matmul(x, self.packed, self.scale, self.bias, activations=act)
            if hasattr(self, "scale_abs"):
                packed_abs = cached((self.packed,), abs_packed, kind="abs")
                y = y + ternary_matmul(x, packed_abs, self.scale_abs, activations=act)
            return y
        if self.mode == "int8":
            return int8_matmul(x, self.codes, self.scale, self.bias, activations=act)
        if self.mode == "int16":
            w = cached((self.codes, self.scale), dequantize_int8, kind="dequantized")
            return F.linear(x, w.to(x.dtype), self.bias)
        if self.mode == "float16":  # the trainable 16-bit layer rounds its input too
            x = x.to(self.weight.dtype).to(x.dtype)
            return F.linear(x, self.weight.to(x.dtype), self.bias.to(x.dtype) if
                            self.bias is not None else None)
        return F.linear(x, self.weight.to(x.dtype), self.bias)

    def _dense_matmul(self, x, act):
        """Small layers on the CPU: fp32 matmul on the weight dequantized once (per-token int8
        activations are fake-quantized first). Below dense_below() weights this beats the
        kernels' fixed costs per call, and the extra resident copy stays small."""
        w = self.dequantized_weight()
        if act == "dynamic":
            x = fake_quantize_per_token(x)
        return F.linear(x, w.to(x.dtype), None if self.bias is None else self.bias.to(x.dtype))

    def dequantized_weight(self) -> torch.Tensor:
        """The weight as fp32 [out, in], built once per buffer version (for grouped convs)."""
        self._restore()
        if self.mode == "ternary":
            k = self.in_features
            bufs = (self.packed, self.scale) + ((self.scale_abs,) if hasattr(self, "scale_abs")
                                                else ())

            def build(packed, scale, scale_abs=None):
                w = unpack_ternary(packed, k).float() * scale.reshape(-1, 1)
                if scale_abs is not None:
                    w = w + unpack_ternary(packed, k).abs().float() * scale_abs.reshape(-1, 1)
                return w
            return cached(bufs, build, kind="dequantized")
        if self.mode in ("int8", "int16"):
            return cached((self.codes, self.scale), dequantize_int8, kind="dequantized")
        return self.weight.float()

    # --- the CPU form: one resident copy of the weight -------------------------------------
    # On the CPU the weight is served from a prepacked form: the native kernel's (ternary at 2
    # bits, 1/16 of fp32; int8 codes, per channel or per group, 1/4) or, where that kernel is
    # unavailable, fbgemm's int8 form (1/4). Once it exists, the buffer it was built from is
    # released (the prepacked form holds the same codes), so a layer keeps one copy resident.
    # Saving, loading, copying or moving the layer rebuilds the buffer first.

    def weight_bytes(self) -> int:
        """Bytes of the weight as the layer holds it now: its buffers (bias excluded), the CPU
        form once a CPU call has built it (the buffer it replaced is then empty), and the forms
        cached from its buffers (a dequantized fp32 copy where a fallback or the dense path of
        a small layer runs)."""
        bufs = list(self.buffers())
        held = sum(b.numel() * b.element_size() for b in bufs) + cached_bytes(bufs)
        return held + (self._prepacked.nbytes if self._prepacked is not None else 0)

    def _stored(self) -> str | None:
        if self.mode == "ternary" and not hasattr(self, "scale_abs"):
            return "packed"
        if self.mode == "int8":
            return "codes"
        return None

    def _group(self) -> int | None:
        """The group size of per-group int8 scales, else None."""
        if self.mode == "int8" and self.scale.dim() == 2:
            return self.in_features // self.scale.shape[1]
        return None

    def _cpu_form(self, kind: str) -> PackedInt8 | PackedNative | PackedGrouped:
        if self._prepacked is None:
            name = self._stored()
            buf = getattr(self, name)
            ternary = name == "packed"
            codes = unpack_ternary(buf, self.in_features) if ternary else buf
            self._prepacked = cpu_form(codes, self.scale, kind, ternary)
            setattr(self, name, torch.empty(0, dtype=buf.dtype))  # released: see above
        return self._prepacked

    def _rebuilt(self) -> torch.Tensor:
        codes = self._prepacked.codes()
        return pack_ternary(codes) if self._stored() == "packed" else codes

    def _restore(self):
        if self._prepacked is not None:
            setattr(self, self._stored(), self._rebuilt())
            self._prepacked = None

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        super()._save_to_state_dict(destination, prefix, keep_vars)
        if self._prepacked is not None:
            destination[prefix + self._stored()] = self._rebuilt()

    def _load_from_state_dict(self, *args, **kwargs):
        self._restore()
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        self._restore()
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):  # pickle and deepcopy carry the buffer, never the fbgemm object
        self._restore()
        return self.__dict__.copy()

    def forward(self, x):
        return self.matmul(x)

    def extra_repr(self):
        return (f"{self.in_features}, {self.out_features}, precision={self.precision.to_source()}"
                f", kernel={self.mode}")


class FrozenConv2d(nn.Module):
    """A convolution whose weight is stored as a FrozenLinear [out, C/groups*kh*kw]. With
    groups=1 and numeric padding it runs as unfold + the frozen matmul (im2col, the kernels);
    otherwise as F.conv2d on the weight dequantized once."""

    def __init__(self, layer: Conv2d):
        super().__init__()
        self.stride, self.padding = layer.stride, layer.padding
        self.dilation, self.groups = layer.dilation, layer.groups
        self.kernel_size, self.out_channels = layer.kernel_size, layer.out_channels
        self.im2col = layer.groups == 1 and layer.padding != "same"
        self.linear = FrozenLinear(_as_linear(layer))

    def forward(self, x):
        if not self.im2col:
            lin = self.linear
            if lin.act_quant is not None:
                x = lin.act_quant(x)
            w = lin.dequantized_weight().reshape(self.out_channels, -1, *self.kernel_size)
            return F.conv2d(x, w.to(x.dtype), lin.bias, self.stride, self.padding, self.dilation,
                            self.groups)
        kh, kw = self.kernel_size
        if x.shape[1] * kh * kw != self.linear.in_features:
            raise ValueError(f"x must have {self.linear.in_features // (kh * kw)} channels, got "
                             f"shape {tuple(x.shape)}")
        return im2col_conv(x, self, self.linear)


def _as_linear(conv: Conv2d) -> Linear:
    """The conv's weight viewed as a [out, C*kh*kw] linear layer with the same quantizers."""
    lin = Linear.__new__(Linear)
    nn.Module.__init__(lin)
    lin.in_features = conv.weight[0].numel()
    lin.out_features = conv.out_channels
    lin.weight = nn.Parameter(conv.weight.detach().reshape(conv.out_channels, -1))
    lin.bias = conv.bias
    lin.precision = conv.precision
    lin.weight_quant = conv.weight_quant
    lin.act_quant = conv.act_quant
    return lin


def freeze(model: nn.Module) -> nn.Module:
    """Replace every Linear/Conv2d narrower than fp32 with its deploy form, in place."""
    model.eval()
    for name, child in list(model.named_children()):
        if isinstance(child, (Linear, Conv2d)) and child.precision.bits < 32:
            setattr(model, name, (FrozenLinear if isinstance(child, Linear) else FrozenConv2d)(child))
        else:
            freeze(child)
    return model
