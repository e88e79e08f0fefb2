"""How a frozen layer stores its weight: one class per stored form, found through a registry.

A form registers the layer's buffers from the trained weight (``store``), says which integer
codes the CPU kernels can serve (``cpu_spec``, ``cpu_parts``), gives the fp32 weight
(``dense``), and runs the generic path (``matmul``: Triton kernels on CUDA or under the interpreter, else the reference
twins). Which of these runs is runtime/dispatch.py's choice, not the form's. A new precision is
one new class added to FORMS.

The trained weight arrives as the layer's own tensor, convolutions in their 4-D shape, so every
quantizer statistic (a learned threshold per output channel, say) broadcasts as in training;
codes are then viewed as [out, in].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels.cpu_paths import WeightSpec
from ..kernels.ops import int8_matmul, ternary_matmul
from ..kernels.packing import abs_packed, dequantize_int8, pack_ternary, unpack_ternary
from ..lang.precision import Binary, Float, Int, Ternary
from . import quant as Q
from .quant import TORCH_DTYPES


class TernaryForm:
    """2-bit packed codes with a scale per row. TTQ (``scale=learned``) has separate positive
    and negative scales p and n, served as a*T + d*|T| with a = (p + n) / 2, d = (p - n) / 2:
    two ternary matmuls, |T| derived from T, never stored."""
    name = "ternary"
    stored = "packed"  # the buffer a prepacked CPU form replaces

    @staticmethod
    def accepts(p) -> bool:
        return isinstance(p, Ternary)

    def store(self, mod, layer):
        layer.weight_quant.eval()
        r = layer.weight_quant.quantize(layer.weight.detach())
        self._register(mod, r.codes, r.scale, r.neg_scale)
        if layer.precision.scale == "learned":  # always, so an untrained model loads a trained one
            mod.register_buffer("scale_abs", self._diff.contiguous())

    def _register(self, mod, codes, pos, neg):
        n = mod.out_features
        pos = pos.float().expand(codes.shape).reshape(n, -1)[:, 0]
        neg = neg.float().expand(codes.shape).reshape(n, -1)[:, 0]
        mod.register_buffer("packed", pack_ternary(codes.reshape(n, -1)))
        mod.register_buffer("scale", ((pos + neg) / 2).contiguous())
        self._diff = (pos - neg) / 2

    def parts(self, mod):
        """[(take |T|, scale)]: T * a, and |T| * d for TTQ."""
        out = [(False, mod.scale)]
        if hasattr(mod, "scale_abs"):
            out.append((True, mod.scale_abs))
        return out

    def cpu_spec(self, mod) -> WeightSpec:
        return WeightSpec(mod.out_features, mod.in_features, ternary=True)

    def cpu_parts(self, mod):
        """[(int8 codes, scale, spec)] for the CPU kernels, one per matmul summed."""
        codes = unpack_ternary(mod.packed, mod.in_features)
        spec = self.cpu_spec(mod)
        return [(codes.abs() if a else codes, s, spec) for a, s in self.parts(mod)]

    def rebuild(self, mod, codes: torch.Tensor):
        mod.packed = pack_ternary(codes)

    def dense(self, mod) -> torch.Tensor:
        codes = unpack_ternary(mod.packed, mod.in_features).float()
        return sum((codes.abs() if a else codes) * s.reshape(-1, 1) for a, s in self.parts(mod))

    def matmul(self, mod, x, act):
        y = ternary_matmul(x, mod.packed, mod.scale, mod.bias, activations=act)
        if hasattr(mod, "scale_abs"):
            y = y + ternary_matmul(x, abs_packed(mod.packed), mod.scale_abs, activations=act)
        return y


class BinaryForm(TernaryForm):
    """Binary weights are ternary codes without zeros: the same 2-bit storage and kernels."""
    name = "ternary"

    @staticmethod
    def accepts(p) -> bool:
        return isinstance(p, Binary)

    def store(self, mod, layer):
        _, codes, scale = Q.binary_quantize(layer.weight.detach(), layer.precision.granularity)
        self._register(mod, codes, scale, scale)


class IntForm:
    """int8 codes relative to their zero point, (c - z), with a scale per row or per group of
    inputs: symmetric weights and asymmetric ones up to 7 bits."""
    name = "int8"
    stored = "codes"
    dtype = torch.int8

    @staticmethod
    def accepts(p) -> bool:
        return isinstance(p, Int) and (p.symmetric or p.bits <= 7)

    def store(self, mod, layer):
        p = layer.precision
        r = layer.weight_quant.quantize(layer.weight.detach())
        n = mod.out_features
        if p.group_size:
            codes = Q.group_view(r.codes, p.group_size) - r.zero_point
            scale = r.scale.reshape(n, -1)
        else:
            codes = r.codes.reshape(n, -1) - r.zero_point.reshape(-1, 1)
            scale = r.scale.reshape(-1).expand(n)
        mod.register_buffer("codes", codes.reshape(n, -1).to(self.dtype).contiguous())
        mod.register_buffer("scale", scale.float().contiguous())

    def group(self, mod) -> int | None:
        return mod.in_features // mod.scale.shape[1] if mod.scale.dim() == 2 else None

    def cpu_spec(self, mod) -> WeightSpec:
        return WeightSpec(mod.out_features, mod.in_features, False, self.group(mod))

    def cpu_parts(self, mod):
        return [(mod.codes, mod.scale, self.cpu_spec(mod))]

    def rebuild(self, mod, codes: torch.Tensor):
        mod.codes = codes

    def dense(self, mod) -> torch.Tensor:
        return dequantize_int8(mod.codes, mod.scale)

    def matmul(self, mod, x, act):
        return int8_matmul(x, mod.codes, mod.scale, mod.bias, activations=act)


class WideIntForm(IntForm):
    """Asymmetric 8-bit weights: codes minus zero point need 9 bits, so int16 codes, served
    from the dequantized weight (no int8 kernel can take them)."""
    name = "int16"
    dtype = torch.int16

    @staticmethod
    def accepts(p) -> bool:
        return isinstance(p, Int)

    def cpu_spec(self, mod):
        return None

    def matmul(self, mod, x, act):
        return F.linear(x, self.dense(mod).to(x.dtype), mod.bias)


class HalfForm:
    """fp16 / bf16: the weight stored at 16 bits, computed in the input's dtype; the input is
    rounded to 16 bits first, as the trainable layer does."""
    name = "float16"
    stored = None

    @staticmethod
    def accepts(p) -> bool:
        return isinstance(p, Float) and p.bits == 16

    def store(self, mod, layer):
        dt = TORCH_DTYPES[layer.precision.dtype]
        mod.register_buffer("weight", layer.weight.detach().reshape(mod.out_features, -1)
                            .to(dt).contiguous())
        if mod.bias is not None:
            mod.bias.data = mod.bias.data.to(dt)

    def cpu_spec(self, mod):
        return None

    def dense(self, mod) -> torch.Tensor:
        return mod.weight.float()

    def matmul(self, mod, x, act):
        x = x.to(mod.weight.dtype).to(x.dtype)
        bias = None if mod.bias is None else mod.bias.to(x.dtype)
        return F.linear(x, mod.weight.to(x.dtype), bias)


FORMS = [TernaryForm, BinaryForm, IntForm, WideIntForm, HalfForm]


def form_for(precision):
    """A new form instance for a precision narrower than fp32."""
    for form in FORMS:
        if form.accepts(precision):
            return form()
    raise TypeError(f"no frozen form for precision {precision.to_source()}")
