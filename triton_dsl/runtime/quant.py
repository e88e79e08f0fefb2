"""The quantizers, as a functional API: the seed tutorial's functions, done properly.

Every function is safe on all-zero and constant tensors (no NaN, no Inf): a zero range gets scale 1
and codes 0. ``granularity`` is "per_tensor" or "per_channel" (one value per row: dim 0).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch

from ..kernels.per_token import fake_quantize_per_token as _fake_per_token
from ..kernels.per_token import quantize_per_token as _per_token
from ..kernels.per_token import symmetric_quantize


# the 16-bit precisions' torch dtypes, by their .tdsl names
TORCH_DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16}


class QuantResult(NamedTuple):
    dequantized: torch.Tensor  # same shape and dtype as the input
    codes: torch.Tensor  # integer codes (int32: asymmetric 8-bit codes reach 255)
    scale: torch.Tensor  # broadcastable to the input (grouped: one per group, see group_view)
    zero_point: torch.Tensor  # integer, same shape as scale; 0 when symmetric


class TernaryResult(NamedTuple):
    dequantized: torch.Tensor
    codes: torch.Tensor  # int8 in {-1, 0, +1}
    scale: torch.Tensor  # (positive, negative) scales are equal except for TTQ
    neg_scale: torch.Tensor
    threshold: torch.Tensor


def ste(x: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Straight-through estimator: the value of ``q``, the gradient of ``x``."""
    return x + (q - x).detach()


def _stat_dims(x: torch.Tensor, granularity: str):
    if granularity == "per_tensor":
        return tuple(range(x.dim()))
    if granularity == "per_channel":
        return tuple(range(1, x.dim()))
    raise ValueError(f"granularity must be per_tensor or per_channel, got {granularity!r}")


def group_view(x: torch.Tensor, group_size: int) -> torch.Tensor:
    """(N, ...) -> (N, K // g, g): the layout grouped scales refer to."""
    flat = x.reshape(x.shape[0], -1)
    if flat.shape[1] % group_size:
        raise ValueError(f"group_size={group_size} does not divide {flat.shape[1]} (x of shape "
                         f"{tuple(x.shape)})")
    return flat.reshape(x.shape[0], -1, group_size)


def uniform_quantize(x: torch.Tensor, bits: int = 8, symmetric: bool = True,
                     granularity: str = "per_tensor", group_size: int | None = None) -> QuantResult:
    """Uniform n-bit quantization. Symmetric codes lie in [-(2^(b-1)-1), 2^(b-1)-1]; asymmetric in
    [0, 2^b - 1] with an integer zero point, over a range widened to include 0 so 0 is exact."""
    if not 2 <= bits <= 8:
        raise ValueError(f"bits must be in 2..8, got {bits}")
    shape = x.shape
    v = group_view(x, group_size) if group_size else x
    dims = (v.dim() - 1,) if group_size else _stat_dims(v, granularity)
    xf = v.float()
    if symmetric:
        codes, scale = symmetric_quantize(xf, xf.abs().amax(dim=dims, keepdim=True),
                                          2 ** (bits - 1) - 1)
        zp = torch.zeros_like(scale, dtype=torch.int32)
    else:
        qmax = 2 ** bits - 1
        lo = xf.amin(dim=dims, keepdim=True).clamp(max=0)
        hi = xf.amax(dim=dims, keepdim=True).clamp(min=0)
        scale = (hi - lo) / qmax
        scale = torch.where(scale > 0, scale, torch.ones_like(scale))
        zp = torch.clamp(torch.round(-lo / scale), 0, qmax).to(torch.int32)
        codes = torch.clamp(torch.round(xf / scale) + zp, 0, qmax)
    deq = (codes - zp) * scale
    return QuantResult(deq.reshape(shape).to(x.dtype), codes.to(torch.int32).reshape(shape),
                       scale, zp)


def int8_quantize_ste(x: torch.Tensor, granularity: str = "per_tensor") -> torch.Tensor:
    """Symmetric INT8 fake quantization with a straight-through gradient (the seed's INT8Quantize)."""
    return ste(x, uniform_quantize(x.detach(), 8, True, granularity).dequantized)


def quantize_per_token(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Dynamic int8 activations: one symmetric scale per row (token). Returns (int8 codes, scale)
    with scale shaped (..., 1); x ~= codes * scale. Same rule as the kernels use."""
    codes, scale = _per_token(x.detach())
    return codes, scale.unsqueeze(-1)


def fake_quantize_per_token(x: torch.Tensor) -> torch.Tensor:
    return ste(x, _fake_per_token(x.detach()))


# --- ternary -------------------------------------------------------------------------------------

TWN_FACTOR = 0.7  # Li & Liu, Ternary Weight Networks: Delta = 0.7 * mean|W|
ABSMEAN_FACTOR = 0.5  # BitNet b1.58: RoundClip(W / mean|W|) is nonzero where |W| > 0.5 * mean|W|


# the fixed threshold rules: Delta = factor * mean|W| (a number is an absolute Delta)
THRESHOLD_FACTORS = {"twn": TWN_FACTOR, "absmean": ABSMEAN_FACTOR}


def ternary_threshold(w: torch.Tensor, rule, granularity: str = "per_channel") -> torch.Tensor:
    """Delta for the fixed rules: a name of THRESHOLD_FACTORS, or an absolute number."""
    if isinstance(rule, (int, float)) and not isinstance(rule, bool):
        return torch.full((1,) * w.dim(), float(rule), device=w.device)
    if rule not in THRESHOLD_FACTORS:
        raise ValueError(f"threshold rule must be {', '.join(THRESHOLD_FACTORS)} or a number, "
                         f"got {rule!r}")
    mean = w.detach().abs().mean(dim=_stat_dims(w, granularity), keepdim=True)
    return THRESHOLD_FACTORS[rule] * mean


def _twn_scale(a: torch.Tensor, mask: torch.Tensor, dims) -> torch.Tensor:
    """mean |W| where the mask is set; an all-zero layer keeps scale 0 rather than 0/0."""
    count = mask.sum(dim=dims, keepdim=True)
    total = (a * mask).sum(dim=dims, keepdim=True)
    return torch.where(count > 0, total / count.clamp(min=1), torch.zeros_like(total))


# the fixed scale rules, alpha from |W| and the mask of nonzero codes
SCALE_RULES = {
    "twn": _twn_scale,
    "absmean": lambda a, mask, dims: a.mean(dim=dims, keepdim=True),
    "none": lambda a, mask, dims: torch.ones((1,) * a.dim(), device=a.device),
}


def ternary_scale(w: torch.Tensor, mask: torch.Tensor, rule: str,
                  granularity: str = "per_channel") -> torch.Tensor:
    """alpha: 'twn' = mean |W| where the mask is set; 'absmean' = mean |W|; 'none' = 1."""
    if rule not in SCALE_RULES:
        raise ValueError(f"scale rule must be {', '.join(SCALE_RULES)}, got {rule!r}")
    return SCALE_RULES[rule](w.detach().abs(), mask, _stat_dims(w, granularity))


def ternary_quantize(w: torch.Tensor, threshold="twn", scale: str = "twn",
                     granularity: str = "per_channel") -> TernaryResult:
    """Deterministic ternary quantization: codes = sign(w) where |w| > Delta, else 0."""
    delta = ternary_threshold(w, threshold, granularity)
    mask = (w.detach().abs() > delta).to(w.dtype)
    codes = torch.sign(w.detach()) * mask
    alpha = ternary_scale(w, mask, scale, granularity)
    return TernaryResult(codes * alpha, codes.to(torch.int8), alpha, alpha, delta)


def stochastic_ternary(w: torch.Tensor, ref: torch.Tensor,
                       generator: torch.Generator | None = None) -> torch.Tensor:
    """Unbiased random rounding to {-ref, 0, +ref}: P(sign(w)) = clamp(|w| / ref, 0, 1), so
    E[q] = w wherever |w| <= ref. Returns codes in {-1, 0, +1} (float)."""
    p = torch.clamp(w.detach().abs() / ref.clamp(min=torch.finfo(torch.float32).tiny), 0, 1)
    u = torch.rand(w.shape, generator=generator, device=w.device, dtype=p.dtype)
    return torch.sign(w.detach()) * (u < p).to(w.dtype)


def learned_threshold_ternary(w: torch.Tensor, t: torch.Tensor, granularity: str = "per_channel",
                              temperature: float = 0.1):
    """Ternary codes with a trainable threshold Delta = sigmoid(t) * mean|W| (the seed's rule).

    A hard threshold has zero gradient almost everywhere, so the backward pass uses a soft mask
    sigmoid((|w| - Delta) / (temperature * mean|W|)); the forward value is exactly the hard mask.
    Returns (codes with gradient to w by STE and to t by the surrogate, hard mask, Delta).
    """
    mean = w.detach().abs().mean(dim=_stat_dims(w, granularity), keepdim=True)
    delta = torch.sigmoid(t) * mean
    hard = (w.detach().abs() > delta).to(w.dtype)
    soft = torch.sigmoid((w.abs() - delta) / (temperature * mean).clamp(min=1e-12))
    mask = hard + (soft - soft.detach())  # exactly hard in value; parenthesised so it stays 0/1
    codes = torch.sign(w.detach()) * mask
    return codes, hard, delta


def binary_quantize(w: torch.Tensor, granularity: str = "per_channel"):
    """sign(w) (0 maps to +1) times mean |W|: returns (dequantized, codes in {-1, +1}, scale)."""
    codes = torch.where(w.detach() >= 0, 1.0, -1.0).to(w.dtype)
    scale = w.detach().abs().mean(dim=_stat_dims(w, granularity), keepdim=True)
    return codes * scale, codes.to(torch.int8), scale


def logit(p: float) -> float:
    return math.log(p / (1 - p))
