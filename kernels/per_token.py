"""Per-token int8 quantization of activations: the specification every int8-activation path
follows (the Triton kernels, the native CPU kernel, fbgemm, and fake quantization in QAT).
Pure torch, so QAT imports it without the kernels' launchers or ctypes.
"""
from __future__ import annotations

import torch


def quantize_per_token(x: torch.Tensor):
    """int8 codes [..., K] and fp32 scales [...] with x ~= codes * scale[..., None]."""
    xf = x.float()
    amax = xf.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    codes = torch.clamp(torch.round(xf / scale), -127, 127).to(torch.int8)
    return codes, scale.squeeze(-1)


def fake_quantize_per_token(x: torch.Tensor) -> torch.Tensor:
    """x on its per-token int8 grid (codes * scale), in x's dtype: what an int8-activation
    kernel multiplies, for the paths that run it in floating point."""
    codes, scale = quantize_per_token(x)
    return (codes.float() * scale.unsqueeze(-1)).to(x.dtype)
