"""The public matmul ops. Each runs the Triton kernel for CUDA tensors (and for CPU tensors under
TRITON_INTERPRET=1), the fast CPU path for CPU tensors, or the reference twin on request:

    y = ternary_matmul(x, packed, scale, bias=None)          # W2 (ternary) x float activations
    y = ternary_matmul(x, packed, scale, activations="dynamic")   # W1.58A8
    y = int8_matmul(x, w, scale, bias=None)                   # W8A16
    y = int8_matmul(x, w, scale, activations="dynamic")       # W8A8

backend: "auto" (default), "triton", "cpu" or "ref". Inputs of any leading shape [..., K];
non-contiguous inputs are handled.
"""
from __future__ import annotations

import torch

from . import cpu, cpu_paths
from .common import HAS_TRITON, as_rows, empty_output, use_triton
from .int8_matmul import check_args as check_int8
from .int8_matmul import (int8_w8a8_matmul_ref, int8_w8a8_matmul_triton,
                          int8_weight_only_matmul_ref, int8_weight_only_matmul_triton)
from .packing import dequantize_int8, unpack_ternary
from .per_token import fake_quantize_per_token, quantize_per_token
from .ternary_matmul import check_args as check_ternary
from .ternary_matmul import (ternary_a8_matmul_ref, ternary_a8_matmul_triton, ternary_matmul_ref,
                             ternary_matmul_triton)

_ACTS = ("none", "dynamic")


def _backend(x, backend):
    if backend not in ("auto", "triton", "cpu", "ref"):
        raise ValueError(f"backend must be auto, triton, cpu or ref, got {backend!r}")
    if backend == "auto":
        return "triton" if use_triton(x) else "cpu" if not x.is_cuda else "ref"
    if backend == "triton" and not HAS_TRITON:
        raise RuntimeError("backend='triton' needs triton installed")
    if backend == "cpu" and x.is_cuda:
        raise ValueError("backend='cpu' needs CPU tensors; x is on " + str(x.device))
    return backend


def _float_x(x):
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x must be fp16, bf16 or fp32, got {x.dtype} of shape {tuple(x.shape)}")
    if x.dim() == 0:
        raise ValueError("x must have at least one dimension [..., K], got a scalar")


def cpu_matmul(prepacked, x, bias, activations):
    """The CPU path on a cached cpu.PackedInt8, PackedNative or PackedGrouped; dtype restored
    here."""
    k = x.shape[-1]
    if k != prepacked.k:  # the native kernel would read past the row otherwise
        raise ValueError(f"x must have {prepacked.k} features in its last dimension, got shape "
                         f"{tuple(x.shape)}")
    x2 = as_rows(x)
    if x2.numel() == 0 or prepacked.n == 0:  # an empty batch, or a layer with no inputs
        return empty_output(x, prepacked.n, bias)
    run = prepacked.dynamic_matmul if activations == "dynamic" else prepacked.float_matmul
    return run(x2, bias).to(x.dtype).reshape(*x.shape[:-1], prepacked.n)


def _cpu_form(tensors, spec, activations, unpack):
    """The prepacked CPU form cpu_paths.choose picks, cached on the weight tensors (the
    functional API's cache; frozen layers keep their own, see runtime/dispatch.py)."""
    path = cpu_paths.choose(spec, activations)
    if path is None:
        return None
    return cpu.cached(tensors, lambda w, s: path.build(unpack(w), s, spec), kind=path.name)


def _cpu_dequantized(x, key, dequantize, bias):
    """Without an exact int8 GEMM: fp32 matmul on a weight dequantized once and cached; rows
    of x holding NaN or +-Inf give NaN rows, as on the other paths."""
    w = cpu.cached(key, dequantize, kind="dequantized")
    y = torch.nn.functional.linear(x.float(), w, None if bias is None else bias.float())
    y.masked_fill_(~torch.isfinite(cpu.row_absmax(as_rows(x)).reshape(*x.shape[:-1], 1)),
                   float("nan"))
    return y.to(x.dtype)


def _check_act(activations):
    if activations not in _ACTS:
        raise ValueError(f"activations must be none or dynamic, got {activations!r}")


def ternary_matmul(x, packed, scale, bias=None, *, activations="none", backend="auto"):
    """y[..., N] = x[..., K] @ (ternary W * scale)^T + bias; packed from packing.pack_ternary.

    Every path follows the twins: a row of x holding NaN or +-Inf gives a row of NaN; M, N or
    K = 0 give an [..., N] output (K = 0: the bias, or zeros); integer sums are exact for any K
    (int8_matmul likewise)."""
    _float_x(x)
    _check_act(activations)
    be = _backend(x, backend)
    k = x.shape[-1]
    n, _ = check_ternary(x, packed, scale, bias)
    if be == "cpu":
        if x.numel() == 0 or n == 0:
            return empty_output(x, n, bias)
        spec = cpu_paths.WeightSpec(n, k, ternary=True)
        prepacked = _cpu_form((packed, scale), spec, activations, lambda p: unpack_ternary(p, k))
        if prepacked is not None:
            return cpu_matmul(prepacked, x, bias, activations)
        return _cpu_dequantized(x, (packed, scale), lambda p, s: unpack_ternary(p, k).float()
                                * s.float().reshape(-1, 1), bias)
    if activations == "dynamic":
        codes, xs = quantize_per_token(as_rows(x))
        run = ternary_a8_matmul_triton if be == "triton" else ternary_a8_matmul_ref
        y = run(codes, xs, packed, scale, bias, out_dtype=x.dtype)
        return y.reshape(*x.shape[:-1], y.shape[-1])
    run = ternary_matmul_triton if be == "triton" else ternary_matmul_ref
    return run(x, packed, scale, bias)


def int8_matmul(x, w, scale, bias=None, *, activations="none", backend="auto"):
    """y = x @ (w * scale)^T + bias for int8 w [N, K], scale [N] (or [N, K // G] weight-only)."""
    _float_x(x)
    _check_act(activations)
    be = _backend(x, backend)
    k = x.shape[-1]
    n, _ = check_int8(x, w, scale, bias)  # before anything divides by the scale's width
    grouped = scale.dim() == 2
    group = k // scale.shape[1] if grouped and k else None
    if be == "cpu":
        if x.numel() == 0 or n == 0:
            return empty_output(x, n, bias)
        spec = cpu_paths.WeightSpec(n, k, False, group)
        prepacked = _cpu_form((w, scale), spec, activations, lambda c: c)
        if prepacked is not None:
            return cpu_matmul(prepacked, x, bias, activations)
        if activations == "none":
            return _cpu_dequantized(x, (w, scale), dequantize_int8, bias)
        if not grouped:  # per-token int8 activations, fake-quantized, on the same fp32 matmul
            return _cpu_dequantized(fake_quantize_per_token(x), (w, scale), dequantize_int8, bias)
    if activations == "dynamic":
        codes, xs = quantize_per_token(as_rows(x))
        run = int8_w8a8_matmul_triton if be == "triton" else int8_w8a8_matmul_ref
        y = run(codes, xs, w, scale, bias, out_dtype=x.dtype)
        return y.reshape(*x.shape[:-1], y.shape[-1])
    if be == "triton" and (group is None or group % 32 == 0):
        return int8_weight_only_matmul_triton(x, w, scale, bias)
    return int8_weight_only_matmul_ref(x, w, scale, bias)


__all__ = ["ternary_matmul", "int8_matmul", "quantize_per_token", "fake_quantize_per_token",
           "ternary_matmul_ref",
           "ternary_a8_matmul_ref", "int8_weight_only_matmul_ref", "int8_w8a8_matmul_ref"]
