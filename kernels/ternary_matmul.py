"""Ternary weight matmul: y = (x @ W^T) * scale (+ bias), W in {-1, 0, +1} packed 2-bit K-planar.

Two forms share one kernel:
  float activations (fp16 / bf16 / fp32): W decoded to x's dtype, fp32 accumulation;
  int8 activations (W1.58A8): x = codes * x_scale per token, int8 x int8 dot, exact int32
  accumulation (|acc| <= 127 K: K up to 2^24), then float(acc) * scale * x_scale.

Non-finite activations: a row of x holding NaN or +-Inf gives a row of NaN. Float kernel: such an
x reaches every column of its row (Inf * w is +-Inf or NaN), so the epilogue's out + out * 0
turns the row's +-Inf into NaN at no cost in the K loop; an fp32 sum of finite inputs that
overflows reads NaN too. A8: the row's x_scale is NaN (quantize_per_token).
Empty inputs (M, N or K = 0) give [..., N] outputs (K = 0: the bias, or zeros).
"""
from __future__ import annotations

import torch

from .common import (HAS_TRITON, as_rows, check_same_device, check_vector, configs, ieee_dots,
                     launch, m_bucket, nan_rows, triton)
from .packing import packed_cols, unpack_ternary

if HAS_TRITON:
    import triton.language as tl

    from .common import finish_tile, start_tile

    @triton.jit
    def _ternary_kernel(x_ptr, p_ptr, s_ptr, xs_ptr, b_ptr, y_ptr, M, N, K, KQ,
                        stride_xm, stride_xk, stride_pn, stride_ym, stride_yn, M_BUCKET,
                        A8: tl.constexpr, PER_CHANNEL: tl.constexpr, HAS_BIAS: tl.constexpr,
                        IEEE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                        BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
        """Args:
            x_ptr: activations [M, K] (float, or int8 codes when A8)
            p_ptr: packed weights [N, KQ] uint8, K-planar (see packing.py)
            s_ptr: weight scale [N] (PER_CHANNEL) or [1]; xs_ptr: per-token scale [M] when A8
            y_ptr: output [M, N]; with SPLIT_K > 1 an fp32 buffer accumulated atomically
        Grid: (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N), SPLIT_K); BLOCK_K counts packed bytes."""
        offs_m, offs_n, mask_m, mask_n, pid_k, acc = start_tile(M, N, A8, BLOCK_M, BLOCK_N)
        for j0 in range(pid_k * BLOCK_K, KQ, SPLIT_K * BLOCK_K):
            offs_j = j0 + tl.arange(0, BLOCK_K)
            mask_j = offs_j < KQ
            p = tl.load(p_ptr + offs_n[None, :] * stride_pn + offs_j[:, None],
                        mask=mask_j[:, None] & mask_n[None, :], other=0x55)
            for s in tl.static_range(4):
                codes = (p >> (2 * s)) & 3  # uint8: a logical shift, no sign to mask off
                offs_k = offs_j + s * KQ
                xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                             mask=mask_m[:, None] & (mask_j & (offs_k < K))[None, :], other=0)
                if A8:
                    w = codes.to(tl.int8) - 1
                    acc += tl.dot(xt, w)
                elif IEEE:
                    w = codes.to(tl.float32) - 1.0
                    acc += tl.dot(xt.to(tl.float32), w, input_precision="ieee")
                else:
                    w = (codes.to(tl.float32) - 1.0).to(xt.dtype)
                    acc += tl.dot(xt, w)
        if PER_CHANNEL:
            scale = tl.load(s_ptr + offs_n, mask=mask_n, other=0.0)
        else:
            scale = tl.load(s_ptr + offs_n * 0)
        out = acc.to(tl.float32) * scale[None, :]
        if not A8:  # +-Inf (from an Inf in x, which reaches every column) becomes NaN
            out = out + out * 0.0
        finish_tile(out, y_ptr, xs_ptr, b_ptr, offs_m, offs_n, mask_m, mask_n, pid_k,
                    stride_ym, stride_yn, A8, HAS_BIAS, SPLIT_K)

    _ternary_tuned = triton.autotune(configs(False), key=["M_BUCKET", "N", "K", "A8"],
                                     reset_to_zero=["y_ptr"])(_ternary_kernel)
    _ternary_tuned_f32 = triton.autotune(configs(False, True), key=["M_BUCKET", "N", "K", "A8"],
                                         reset_to_zero=["y_ptr"])(_ternary_kernel)
    _ternary_tuned_a8 = triton.autotune(configs(True), key=["M_BUCKET", "N", "K", "A8"],
                                        reset_to_zero=["y_ptr"])(_ternary_kernel)


A8_MAX_K = 1 << 24  # |acc| <= 127 K must fit int32


def check_args(x, packed, scale, bias, x_scale=None):
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"packed must be 2-d uint8 [N, ceil(K/4)], got {packed.dtype} of shape "
                         f"{tuple(packed.shape)}")
    k = x.shape[-1]
    if packed.shape[1] != packed_cols(k):
        raise ValueError(f"x of shape {tuple(x.shape)} has K={k}, which packs to {packed_cols(k)} "
                         f"columns, but packed has shape {tuple(packed.shape)}")
    n = packed.shape[0]
    check_vector("scale", scale, n, allow_scalar=True)
    check_vector("bias", bias, n)
    check_same_device(x=x, packed=packed, scale=scale, bias=bias, x_scale=x_scale)
    return n, k


def ternary_matmul_ref(x, packed, scale, bias=None):
    """The specification: float activations, fp32 math, output in x's dtype."""
    if not x.is_floating_point():
        raise ValueError(f"x must be fp16, bf16 or fp32, got {x.dtype}")
    n, k = check_args(x, packed, scale, bias)
    w = unpack_ternary(packed, k).float()
    x2 = as_rows(x)
    y = (x2.float() @ w.t()) * scale.float().reshape(1, -1)
    if bias is not None:
        y = y + bias.float()
    return nan_rows(y, x2).to(x.dtype).reshape(*x.shape[:-1], n)


def ternary_a8_matmul_ref(x_codes, x_scale, packed, scale, bias=None, out_dtype=torch.float32):
    """The specification of W1.58A8: exact integer accumulation, then
    float(acc) * scale[n] * x_scale[m] (+ bias), in that order."""
    if x_codes.dtype != torch.int8:
        raise ValueError(f"x_codes must be int8, got {x_codes.dtype}")
    n, k = check_args(x_codes, packed, scale, bias, x_scale)
    w = unpack_ternary(packed, k).to(torch.int64)
    acc = as_rows(x_codes).to(torch.int64) @ w.t()
    y = acc.float() * scale.float().reshape(1, -1) * x_scale.float().reshape(-1, 1)
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype).reshape(*x_codes.shape[:-1], n)


def _launch(x2, packed, scale, bias, y, a8, x_scale, config):
    m, k = x2.shape
    n, kq = packed.shape
    per_channel = scale.numel() > 1 or n == 1
    args = (x2, packed, scale, x_scale if a8 else scale, bias if bias is not None else scale, y,
            m, n, k, kq, x2.stride(0), x2.stride(1), packed.stride(0), y.stride(0), y.stride(1),
            m_bucket(m))
    flags = dict(A8=a8, PER_CHANNEL=per_channel, HAS_BIAS=bias is not None,
                 IEEE=ieee_dots(x2.dtype))
    tuned = (_ternary_tuned_a8 if a8 else
             _ternary_tuned_f32 if x2.dtype == torch.float32 else _ternary_tuned)
    launch(_ternary_kernel, tuned, m, n, args, flags, config)


def ternary_matmul_triton(x, packed, scale, bias=None, config=None):
    """Triton kernel, float activations. ``config`` pins a tile config (tests); else autotuned."""
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x must be fp16, bf16 or fp32, got {x.dtype}")
    n, k = check_args(x, packed, scale, bias)
    x2 = as_rows(x)
    # fp32 output when split-K accumulates atomically, and for bf16, whose stores the
    # interpreter mishandles; the cast back is one cheap elementwise pass over [M, N].
    wide = config is None or config["SPLIT_K"] > 1 or x.dtype == torch.bfloat16
    out = (torch.zeros if wide else torch.empty)((x2.shape[0], n), device=x.device,
                                                   dtype=torch.float32 if wide else x.dtype)
    if out.numel() and k:
        _launch(x2, packed.contiguous(), scale.float().contiguous(), bias, out, False, None,
                config)
    elif out.numel():  # K = 0: nothing to sum
        out.zero_().add_(0.0 if bias is None else bias.float())
    return out.to(x.dtype).reshape(*x.shape[:-1], n)


def ternary_a8_matmul_triton(x_codes, x_scale, packed, scale, bias=None, out_dtype=torch.float32,
                             config=None):
    n, k = check_args(x_codes, packed, scale, bias, x_scale)
    if k > A8_MAX_K:
        raise ValueError(f"x_codes of shape {tuple(x_codes.shape)} has K={k}; the W1.58A8 "
                         f"kernel's int32 sums hold K <= {A8_MAX_K}")
    x2 = as_rows(x_codes)
    out = torch.zeros((x2.shape[0], n), device=x_codes.device, dtype=torch.float32)
    if out.numel() and k:
        _launch(x2, packed.contiguous(), scale.float().contiguous(), bias, out, True,
                x_scale.float().reshape(-1).contiguous(), config)
    elif out.numel() and bias is not None:  # K = 0: nothing to sum
        out.add_(bias.float())
    return out.to(out_dtype).reshape(*x_codes.shape[:-1], n)
