"""Int8 weight matmul: y = x @ dequant(W)^T (+ bias), W int8 [N, K] with fp32 scales.

  W8A16 (weight-only): float x, W decoded to x's dtype; per-channel scales in the epilogue, or
      per-group scales ([N, K // G]) applied per K tile (BLOCK_K must divide G).
  W8A8: int8 x with per-token scales, int8 x int8 dot, exact integer accumulation, then
      float(acc) * w_scale[n] * x_scale[m]. int32 sums run over spans of at most
      native.MAX_K = 65536 inputs (127 * 127 * 65536 < 2^31); for longer K (WIDE) the spans add
      up in int64, so any K is exact.

Non-finite activations: a row of x holding NaN or +-Inf gives a row of NaN: in the float kernel
the epilogue's out + out * 0 turns +-Inf into NaN (see ternary_matmul.py); W8A8 rows carry a NaN
x_scale from quantize_per_token.
Empty inputs (M, N or K = 0) give [..., N] outputs (K = 0: the bias, or zeros).
"""
from __future__ import annotations

import torch

from .common import (HAS_TRITON, as_rows, check_same_device, check_vector, configs, ieee_dots,
                     launch, m_bucket, nan_rows, triton)
from .packing import dequantize_int8

SPAN_K = 65536  # = native.MAX_K: the inputs whose int8 x int8 sums int32 holds (see above)
if HAS_TRITON:
    _SPAN_K = triton.language.constexpr(SPAN_K)

if HAS_TRITON:
    import triton.language as tl

    from .common import finish_tile, start_tile

    @triton.jit
    def _load_tiles(x_ptr, w_ptr, k0, offs_m, offs_n, mask_m, mask_n, K, stride_xm, stride_xk,
                    stride_wn, BLOCK_K: tl.constexpr):
        """The x tile [BLOCK_M, BLOCK_K] and the weight tile [BLOCK_K, BLOCK_N] at input k0."""
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = offs_k < K
        xt = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
                     mask=mask_m[:, None] & mask_k[None, :], other=0)
        w = tl.load(w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None],
                    mask=mask_k[:, None] & mask_n[None, :], other=0)
        return xt, w

    @triton.jit
    def _int8_kernel(x_ptr, w_ptr, s_ptr, xs_ptr, b_ptr, y_ptr, M, N, K,
                     stride_xm, stride_xk, stride_wn, stride_sn, stride_ym, stride_yn, M_BUCKET,
                     A8: tl.constexpr, GROUP: tl.constexpr, HAS_BIAS: tl.constexpr,
                     IEEE: tl.constexpr, WIDE: tl.constexpr, BLOCK_M: tl.constexpr,
                     BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr):
        """Args:
            x_ptr: [M, K] float (W8A16) or int8 codes (A8); w_ptr: int8 [N, K], K-contiguous
            s_ptr: scales [N] (GROUP == 0) or [N, K // GROUP]; xs_ptr: [M] when A8
            y_ptr: output [M, N]; fp32 and atomically accumulated when SPLIT_K > 1
            WIDE (A8, K > SPAN_K): int32 sums per span of K inputs, added up in int64
        Grid: (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N), SPLIT_K)."""
        offs_m, offs_n, mask_m, mask_n, pid_k, acc = start_tile(M, N, A8, BLOCK_M, BLOCK_N)
        if A8 and WIDE:
            # a program sums _SPAN_K // BLOCK_K of its tiles (<= _SPAN_K inputs) per span
            step: tl.constexpr = SPLIT_K * BLOCK_K
            span: tl.constexpr = (_SPAN_K // BLOCK_K) * step
            wide = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int64)
            for s0 in range(pid_k * BLOCK_K, K, span):
                part = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
                for k0 in range(s0, tl.minimum(s0 + span, K), step):
                    xt, w = _load_tiles(x_ptr, w_ptr, k0, offs_m, offs_n, mask_m, mask_n, K,
                                        stride_xm, stride_xk, stride_wn, BLOCK_K)
                    part += tl.dot(xt, w)
                wide += part.to(tl.int64)
            out = wide.to(tl.float32)  # one rounding of the exact sum, as the twin's
        else:
            for k0 in range(pid_k * BLOCK_K, K, SPLIT_K * BLOCK_K):
                xt, w = _load_tiles(x_ptr, w_ptr, k0, offs_m, offs_n, mask_m, mask_n, K,
                                    stride_xm, stride_xk, stride_wn, BLOCK_K)
                if A8:
                    acc += tl.dot(xt, w)
                else:
                    if IEEE:
                        part = tl.dot(xt.to(tl.float32), w.to(tl.float32),
                                      input_precision="ieee")
                    else:
                        part = tl.dot(xt, w.to(xt.dtype))
                    if GROUP > 0:
                        g = tl.load(s_ptr + offs_n * stride_sn + k0 // GROUP, mask=mask_n,
                                    other=0.0)
                        acc += part * g[None, :]
                    else:
                        acc += part
            out = acc.to(tl.float32)
        if GROUP == 0:
            out = out * tl.load(s_ptr + offs_n, mask=mask_n, other=0.0)[None, :]
        if not A8:  # +-Inf (from an Inf in x, which reaches every column) becomes NaN
            out = out + out * 0.0
        finish_tile(out, y_ptr, xs_ptr, b_ptr, offs_m, offs_n, mask_m, mask_n, pid_k,
                    stride_ym, stride_yn, A8, HAS_BIAS, SPLIT_K)

    _int8_tuned = triton.autotune(configs(False), key=["M_BUCKET", "N", "K", "A8", "GROUP"],
                                  reset_to_zero=["y_ptr"])(_int8_kernel)
    _int8_tuned_f32 = triton.autotune(configs(False, True),
                                      key=["M_BUCKET", "N", "K", "A8", "GROUP"],
                                      reset_to_zero=["y_ptr"])(_int8_kernel)
    _int8_tuned_a8 = triton.autotune(configs(True), key=["M_BUCKET", "N", "K", "A8", "GROUP"],
                                     reset_to_zero=["y_ptr"])(_int8_kernel)


def check_args(x, w, scale, bias, x_scale=None):
    if w.dtype != torch.int8 or w.dim() != 2:
        raise ValueError(f"w must be 2-d int8 [N, K], got {w.dtype} of shape {tuple(w.shape)}")
    n, k = w.shape
    if x.shape[-1] != k:
        raise ValueError(f"x of shape {tuple(x.shape)} must have K={k} (w has shape "
                         f"{tuple(w.shape)})")
    if scale.dim() == 2:
        width = scale.shape[1]
        if scale.shape[0] != n or (width == 0 and k > 0) or (width and k % width):
            raise ValueError(f"grouped scale must have shape [{n}, K // group] with a width "
                             f"that divides K={k}, got {tuple(scale.shape)}")
    else:
        check_vector("scale", scale, n)
    check_vector("bias", bias, n)
    check_same_device(x=x, w=w, scale=scale, bias=bias, x_scale=x_scale)
    return n, k


def int8_weight_only_matmul_ref(x, w, scale, bias=None):
    """W8A16 specification: fp32 math on dequantized weights, output in x's dtype."""
    if not x.is_floating_point():
        raise ValueError(f"x must be fp16, bf16 or fp32, got {x.dtype}")
    n, k = check_args(x, w, scale, bias)
    x2 = as_rows(x)
    y = x2.float() @ dequantize_int8(w, scale.float()).t()
    if bias is not None:
        y = y + bias.float()
    return nan_rows(y, x2).to(x.dtype).reshape(*x.shape[:-1], n)


def int8_w8a8_matmul_ref(x_codes, x_scale, w, scale, bias=None, out_dtype=torch.float32):
    """W8A8 specification: exact int32 accumulation, then float(acc) * scale[n] * x_scale[m]."""
    if x_codes.dtype != torch.int8:
        raise ValueError(f"x_codes must be int8, got {x_codes.dtype}")
    if scale.dim() != 1:
        raise ValueError(f"W8A8 takes per-channel scales [N], got shape {tuple(scale.shape)}")
    n, k = check_args(x_codes, w, scale, bias, x_scale)
    acc = as_rows(x_codes).to(torch.int64) @ w.to(torch.int64).t()
    y = acc.float() * scale.float().reshape(1, -1) * x_scale.float().reshape(-1, 1)
    if bias is not None:
        y = y + bias.float()
    return y.to(out_dtype).reshape(*x_codes.shape[:-1], n)


def _launch(x2, w, scale, bias, y, a8, x_scale, config):
    m, k = x2.shape
    n = w.shape[0]
    group = k // scale.shape[1] if scale.dim() == 2 else 0
    args = (x2, w, scale, x_scale if a8 else scale, bias if bias is not None else scale, y,
            m, n, k, x2.stride(0), x2.stride(1), w.stride(0), scale.stride(0), y.stride(0),
            y.stride(1), m_bucket(m))
    flags = dict(A8=a8, GROUP=group, HAS_BIAS=bias is not None, IEEE=ieee_dots(x2.dtype),
                 WIDE=a8 and k > SPAN_K)
    if group and config is None:  # grouped scales need BLOCK_K | group: pick, don't autotune
        bk = next(b for b in (128, 64, 32) if group % b == 0)
        config = dict(BLOCK_M=16 if m <= 16 else 64, BLOCK_N=64, BLOCK_K=bk, SPLIT_K=1)
    tuned = (_int8_tuned_a8 if a8 else
             _int8_tuned_f32 if x2.dtype == torch.float32 else _int8_tuned)
    launch(_int8_kernel, tuned, m, n, args, flags, config)


def int8_weight_only_matmul_triton(x, w, scale, bias=None, config=None):
    if x.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        raise ValueError(f"x must be fp16, bf16 or fp32, got {x.dtype}")
    n, k = check_args(x, w, scale, bias)
    if scale.dim() == 2 and k and (k // scale.shape[1]) % 32:
        raise ValueError(f"the Triton W8A16 kernel needs a group size that is a multiple of 32, "
                         f"got {k // scale.shape[1]}")
    x2 = as_rows(x)
    out = torch.zeros((x2.shape[0], n), device=x.device, dtype=torch.float32)
    if out.numel() and k:
        _launch(x2, w.contiguous(), scale.float().contiguous(), bias, out, False, None, config)
    elif out.numel():  # K = 0: nothing to sum
        out.zero_().add_(0.0 if bias is None else bias.float())
    return out.to(x.dtype).reshape(*x.shape[:-1], n)


def int8_w8a8_matmul_triton(x_codes, x_scale, w, scale, bias=None, out_dtype=torch.float32,
                            config=None):
    n, k = check_args(x_codes, w, scale, bias, x_scale)
    if scale.dim() != 1:
        raise ValueError(f"W8A8 takes per-channel scales [N], got shape {tuple(scale.shape)}")
    x2 = as_rows(x_codes)
    out = torch.zeros((x2.shape[0], n), device=x_codes.device, dtype=torch.float32)
    if out.numel() and k:
        _launch(x2, w.contiguous(), scale.float().contiguous(), bias, out, True,
                x_scale.float().reshape(-1).contiguous(), config)
    elif out.numel() and bias is not None:  # K = 0: nothing to sum
        out.add_(bias.float())
    return out.to(out_dtype).reshape(*x_codes.shape[:-1], n)
