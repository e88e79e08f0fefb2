"""Per-token int8 quantization of activations: the specification every int8-activation path
follows (the Triton kernels, the native CPU kernel, fbgemm, and fake quantization in QAT).
Pure torch, so QAT imports it without the kernels' launchers or ctypes.
"""
from __future__ import annotations

import torch


def symmetric_quantize(xf: torch.Tensor, amax: torch.Tensor, qmax: int):
    """The one symmetric rule: scale = amax / qmax (1 where amax is 0, so a zero range gives
    codes 0, never NaN; a NaN amax gives a NaN scale), codes = clamp(round(x / scale), -qmax, qmax) as floats. Weights
    (runtime/quant.uniform_quantize) and per-token activations both use it."""
    scale = torch.where(amax == 0, torch.ones_like(amax), amax / qmax)  # NaN amax: NaN scale
    return torch.clamp(torch.round(xf / scale), -qmax, qmax), scale


def quantize_per_token(x: torch.Tensor):
    """int8 codes [..., K] and fp32 scales [...] with x ~= codes * scale[..., None].

    A token holding NaN or +-Inf gets a NaN scale and zero codes, so every int8-activation path
    (which multiplies by the scale) gives NaN for its whole output row, as a float matmul with a
    NaN input would; other tokens are unaffected. K = 0 gives scales of 1."""
    xf = x.float()
    if xf.shape[-1] == 0:
        return (torch.zeros(xf.shape, dtype=torch.int8, device=x.device),
                torch.ones(xf.shape[:-1], device=x.device))
    amax = xf.abs().amax(dim=-1, keepdim=True)  # NaN if the token holds one, Inf for an Inf
    amax = torch.where(torch.isfinite(amax), amax, float("nan"))
    codes, scale = symmetric_quantize(xf, amax, 127)
    # x / NaN is NaN; converting NaN to int8 is undefined, so those codes become 0 (no host
    # sync to test for them first: on a GPU that would stall every call)
    return codes.nan_to_num_(0.0).to(torch.int8), scale.squeeze(-1)


def fake_quantize_per_token(x: torch.Tensor) -> torch.Tensor:
    """x on its per-token int8 grid (codes * scale), in x's dtype: what an int8-activation
    kernel multiplies, for the paths that run it in floating point."""
    codes, scale = quantize_per_token(x)
    return (codes.float() * scale.unsqueeze(-1)).to(x.dtype)
