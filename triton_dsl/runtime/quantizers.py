"""Trainable fake quantizers, one per precision config, looked up in a registry.

Each maps a latent float weight to its quantized value in the forward pass; gradients reach the
latent weight through a straight-through estimator, and learned thresholds and TTQ scales get
gradients of their own.
"""
from __future__ import annotations

import torch
from torch import nn

from ..lang.precision import Binary, Float, Int, Ternary
from . import quant as Q
from .quant import TORCH_DTYPES



def _stat_shape(w: torch.Tensor, granularity: str) -> tuple:
    return (w.shape[0],) + (1,) * (w.dim() - 1) if granularity == "per_channel" else (1,) * w.dim()


class FloatQuantizer(nn.Module):
    """fp32: identity. fp16/bf16: round to the narrower type, gradient straight through."""

    def __init__(self, config: Float, weight: torch.Tensor):
        super().__init__()
        self.config = config

    def forward(self, w):
        dt = TORCH_DTYPES.get(self.config.dtype)
        return w if dt is None else Q.ste(w, w.detach().to(dt).to(w.dtype))


class IntQuantizer(nn.Module):
    def __init__(self, config: Int, weight: torch.Tensor):
        super().__init__()
        self.config = config

    def quantize(self, w) -> Q.QuantResult:
        c = self.config
        return Q.uniform_quantize(w.detach(), c.bits, c.symmetric, c.granularity, c.group_size)

    def forward(self, w):
        return Q.ste(w, self.quantize(w).dequantized)


class TernaryQuantizer(nn.Module):
    """The threshold rule picks which weights are zero; the scale rule sets their magnitude."""

    def __init__(self, config: Ternary, weight: torch.Tensor):
        super().__init__()
        self.config = config
        shape = _stat_shape(weight, config.granularity)
        if config.threshold == "learned":
            # starts as TWN: sigmoid(t) * mean|W| = 0.7 * mean|W|
            self.threshold_logit = nn.Parameter(torch.full(shape, Q.logit(Q.TWN_FACTOR)))
        if config.scale == "learned":
            # TTQ (Zhu et al.): separate positive and negative scales, initialised to the TWN scale
            self.pos_scale = nn.Parameter(torch.empty(shape))
            self.neg_scale = nn.Parameter(torch.empty(shape))
            self.init_from(weight)

    @torch.no_grad()
    def init_from(self, weight: torch.Tensor):
        """Re-derive the learned parameters from ``weight`` (after loading float weights)."""
        if self.config.threshold == "learned":
            self.threshold_logit.fill_(Q.logit(Q.TWN_FACTOR))
        if self.config.scale == "learned":
            mask = self._codes(weight.detach())[1]
            alpha = Q.ternary_scale(weight, mask, "twn", self.config.granularity)
            self.pos_scale.copy_(alpha.expand_as(self.pos_scale))
            self.neg_scale.copy_(alpha.expand_as(self.neg_scale))

    def _codes(self, w):
        """(codes in {-1,0,1} carrying any threshold gradient, hard mask)."""
        c = self.config
        if c.threshold == "learned":
            codes, hard, _ = Q.learned_threshold_ternary(w, self.threshold_logit, c.granularity)
            return codes, hard
        if c.threshold == "stochastic":
            ref = self._reference(w)
            if self.training:
                codes = Q.stochastic_ternary(w, ref)
                return codes, codes.abs()
            hard = (w.detach().abs() > 0.5 * ref).to(w.dtype)  # nearest of {-ref, 0, ref}
            return torch.sign(w.detach()) * hard, hard
        delta = Q.ternary_threshold(w, c.threshold, c.granularity)
        hard = (w.detach().abs() > delta).to(w.dtype)
        return torch.sign(w.detach()) * hard, hard

    def _reference(self, w):
        """The magnitude stochastic rounding rounds to: the TWN scale."""
        return Q.ternary_quantize(w, "twn", "twn", self.config.granularity).scale

    def quantize(self, w) -> Q.TernaryResult:
        """Codes and scales as they would be frozen (no gradient)."""
        with torch.no_grad():
            codes, hard = self._codes(w)
            pos, neg = self._scales(w, hard)
            deq = torch.where(codes > 0, pos * codes, neg * codes)
            pos, neg = torch.broadcast_tensors(pos, neg)
            return Q.TernaryResult(deq, codes.to(torch.int8), pos.clone(), neg.clone(),
                                   torch.zeros(()))

    def _scales(self, w, hard):
        c = self.config
        if c.scale == "learned":
            return self.pos_scale, self.neg_scale
        a = Q.ternary_scale(w, hard, c.scale, c.granularity)
        return a, a

    def forward(self, w):
        codes, hard = self._codes(w)
        pos, neg = self._scales(w, hard)
        q = torch.where(codes.detach() > 0, pos * codes, neg * codes)
        if self.config.threshold == "learned" or self.config.scale == "learned":
            return q + (w - w.detach())  # STE to w; q keeps its own graph to t and the scales
        return Q.ste(w, q)


class BinaryQuantizer(nn.Module):
    def __init__(self, config: Binary, weight: torch.Tensor):
        super().__init__()
        self.config = config

    def forward(self, w):
        return Q.ste(w, Q.binary_quantize(w, self.config.granularity)[0])


WEIGHT_QUANTIZERS = {Float: FloatQuantizer, Int: IntQuantizer, Ternary: TernaryQuantizer,
                     Binary: BinaryQuantizer}


class ActQuantizer(nn.Module):
    """Activation quantization before the matmul: none, dynamic (int8 per token) or static
    (one calibrated int8 scale, observed while training or calibrating)."""

    def __init__(self, mode: str = "none", observer: str = "minmax", percentile: float = 99.99,
                 symmetric: bool = True, name: str = "layer"):
        super().__init__()
        self.mode, self.observer, self.percentile = mode, observer, percentile
        self.symmetric, self.name = symmetric, name
        self.calibrating = False
        if mode == "static":
            self.register_buffer("lo", torch.tensor(float("inf")))
            self.register_buffer("hi", torch.tensor(float("-inf")))
            self.register_buffer("batches", torch.tensor(0))

    @torch.no_grad()
    def observe(self, x):
        xf = x.detach().float().flatten()
        if self.observer == "percentile" and xf.numel() > 1:
            q = self.percentile / 100
            sample = xf[torch.randperm(xf.numel(), device=xf.device)[:1 << 20]] \
                if xf.numel() > 1 << 20 else xf  # torch.quantile's input limit
            lo, hi = torch.quantile(sample, 1 - q), torch.quantile(sample, q)
            n = self.batches.float()
            self.lo.copy_(torch.where(n > 0, (self.lo * n + lo) / (n + 1), lo))  # running mean
            self.hi.copy_(torch.where(n > 0, (self.hi * n + hi) / (n + 1), hi))
        else:
            self.lo.copy_(torch.minimum(self.lo, xf.min()))
            self.hi.copy_(torch.maximum(self.hi, xf.max()))
        self.batches += 1

    def scale_zero(self):
        """(scale, zero point) of the calibrated int8 (or uint8 if asymmetric) range."""
        if self.batches.item() == 0:
            raise RuntimeError(
                f"{self.name}: static activation ranges are not calibrated; run calibration "
                "(triton-dsl ptq --calib ..., or triton_dsl.calibrate) or use activations=dynamic")
        lo, hi = self.lo.clamp(max=0), self.hi.clamp(min=0)
        if self.symmetric:
            s = torch.maximum(-lo, hi) / 127
            return torch.where(s > 0, s, torch.ones_like(s)), torch.zeros((), dtype=torch.int32)
        s = (hi - lo) / 255
        s = torch.where(s > 0, s, torch.ones_like(s))
        return s, torch.clamp(torch.round(-lo / s), 0, 255).to(torch.int32)

    def forward(self, x):
        if self.mode == "none":
            return x
        if self.mode == "dynamic":
            return Q.fake_quantize_per_token(x)
        if self.training or self.calibrating:
            self.observe(x)
        s, z = self.scale_zero()
        lo, hi = (-127, 127) if self.symmetric else (0, 255)
        q = torch.clamp(torch.round(x.detach() / s) + z, lo, hi)
        return Q.ste(x, ((q - z) * s).to(x.dtype))


def make_weight_quantizer(config, weight: torch.Tensor) -> nn.Module:
    try:
        return WEIGHT_QUANTIZERS[type(config)](config, weight)
    except KeyError:
        raise TypeError(f"precision must be Float, Int, Ternary or Binary, got {config!r}") from None


def make_act_quantizer(config, name: str) -> ActQuantizer:
    mode = getattr(config, "activations", "none")
    return ActQuantizer(mode, getattr(config, "observer", "minmax"),
                        getattr(config, "percentile", 99.99),
                        getattr(config, "symmetric", True), name)
