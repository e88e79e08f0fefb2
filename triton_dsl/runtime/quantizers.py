"""Trainable fake quantizers, one per precision config, looked up in a registry.

Each maps a latent float weight to its quantized value in the forward pass; gradients reach the
latent weight through a straight-through estimator, and learned thresholds and TTQ scales get
gradients of their own.
"""
from __future__ import annotations

import contextlib

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


class FixedThreshold:
    """Delta from a fixed rule (twn, absmean, a number): codes = sign(w) where |w| > Delta."""

    def __init__(self, q, shape):
        self.rule, self.granularity = q.config.threshold, q.config.granularity

    def codes(self, q, w):
        delta = Q.ternary_threshold(w, self.rule, self.granularity)
        hard = (w.detach().abs() > delta).to(w.dtype)
        return torch.sign(w.detach()) * hard, hard


class LearnedThreshold:
    """Delta = sigmoid(t) * mean|W| with t trained (one per channel, or one), starting as TWN:
    sigmoid(t) = 0.7."""

    def __init__(self, q, shape):
        q.threshold_logit = nn.Parameter(torch.full(shape, Q.logit(Q.TWN_FACTOR)))

    @staticmethod
    def reset(q, weight):
        q.threshold_logit.fill_(Q.logit(Q.TWN_FACTOR))

    def codes(self, q, w):
        codes, hard, _ = Q.learned_threshold_ternary(w, q.threshold_logit, q.config.granularity)
        return codes, hard


class StochasticThreshold:
    """Random rounding to {-ref, 0, ref} (ref: the TWN scale) while training; the nearest of
    the three in eval."""

    def __init__(self, q, shape):
        pass

    def codes(self, q, w):
        ref = Q.ternary_quantize(w, "twn", "twn", q.config.granularity).scale
        if q.training:
            codes = Q.stochastic_ternary(w, ref)
            return codes, codes.abs()
        hard = (w.detach().abs() > 0.5 * ref).to(w.dtype)
        return torch.sign(w.detach()) * hard, hard


class FixedScale:
    """alpha from a fixed rule (twn, absmean, none); one magnitude for both signs."""

    def __init__(self, q, shape):
        self.rule, self.granularity = q.config.scale, q.config.granularity

    def scales(self, q, w, hard):
        a = Q.ternary_scale(w, hard, self.rule, self.granularity)
        return a, a


class LearnedScales:
    """TTQ (Zhu et al.): separate positive and negative scales, trained, starting at the TWN
    scale."""

    def __init__(self, q, shape):
        q.pos_scale = nn.Parameter(torch.empty(shape))
        q.neg_scale = nn.Parameter(torch.empty(shape))

    @staticmethod
    def reset(q, weight):
        mask = q.threshold.codes(q, weight.detach())[1]
        alpha = Q.ternary_scale(weight, mask, "twn", q.config.granularity)
        q.pos_scale.copy_(alpha.expand_as(q.pos_scale))
        q.neg_scale.copy_(alpha.expand_as(q.neg_scale))

    def scales(self, q, w, hard):
        return q.pos_scale, q.neg_scale


# the ternary rules by their .tdsl names (lang/precision.py lists the same names; a test
# checks); threshold numbers and other fixed names take the Fixed* rule
THRESHOLD_RULES = {"learned": LearnedThreshold, "stochastic": StochasticThreshold}
SCALE_RULES = {"learned": LearnedScales}


class TernaryQuantizer(nn.Module):
    """The threshold rule picks which weights are zero; the scale rule sets their magnitude.
    Learned rules train parameters of their own (threshold_logit; pos_scale and neg_scale)."""

    def __init__(self, config: Ternary, weight: torch.Tensor):
        super().__init__()
        self.config = config
        shape = _stat_shape(weight, config.granularity)
        rule = config.threshold if isinstance(config.threshold, str) else None
        self.threshold = THRESHOLD_RULES.get(rule, FixedThreshold)(self, shape)
        self.scale = SCALE_RULES.get(config.scale, FixedScale)(self, shape)
        self.init_from(weight)

    @torch.no_grad()
    def init_from(self, weight: torch.Tensor):
        """Re-derive the learned parameters from ``weight`` (after loading float weights)."""
        for rule in (self.threshold, self.scale):
            if hasattr(rule, "reset"):
                rule.reset(self, weight)

    def _codes(self, w):
        """(codes in {-1,0,1} carrying any threshold gradient, hard mask)."""
        return self.threshold.codes(self, w)

    def quantize(self, w) -> Q.TernaryResult:
        """Codes and scales as they would be frozen (no gradient)."""
        with torch.no_grad():
            codes, hard = self._codes(w)
            pos, neg = self.scale.scales(self, w, hard)
            deq = torch.where(codes > 0, pos * codes, neg * codes)
            pos, neg = torch.broadcast_tensors(pos, neg)
            return Q.TernaryResult(deq, codes.to(torch.int8), pos.clone(), neg.clone(),
                                   torch.zeros(()))

    def forward(self, w):
        codes, hard = self._codes(w)
        pos, neg = self.scale.scales(self, w, hard)
        q = torch.where(codes.detach() > 0, pos * codes, neg * codes)
        if isinstance(self.threshold, LearnedThreshold) or isinstance(self.scale, LearnedScales):
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


class NotCalibrated(RuntimeError, ValueError):
    """Static activation ranges used before any calibration (a ValueError too, so the
    command line reports it in one line)."""


def static_quantizers(model: nn.Module) -> list[tuple[str, "ActQuantizer"]]:
    """(layer name, quantizer) of every static activation quantizer in model."""
    return [(name.rsplit(".", 1)[0] if "." in name else name, m)
            for name, m in model.named_modules()
            if isinstance(m, ActQuantizer) and m.mode == "static"]


def uncalibrated(model: nn.Module) -> list[str]:
    """The layers (qualified names) whose static activation ranges have seen no batch."""
    return [name for name, m in static_quantizers(model) if m.batches.item() == 0]


@contextlib.contextmanager
def uncalibrated_passthrough(model: nn.Module):
    """Within the block, static quantizers that have seen no batch pass their input through:
    for a forward pass that only needs the output's shape before training starts."""
    held = [m for _, m in static_quantizers(model) if m.batches.item() == 0]
    for m in held:
        m.mode = "none"
    try:
        yield
    finally:
        for m in held:
            m.mode = "static"


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
            raise NotCalibrated(
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
