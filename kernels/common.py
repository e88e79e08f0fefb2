"""Shared by the kernel files: is Triton usable, autotune configs, argument checks."""
from __future__ import annotations

import functools
import math
import os

import torch

try:  # Triton is optional: without it every op runs its CPU path
    import triton
    import triton.language as tl
    HAS_TRITON = True
except Exception:  # pragma: no cover - exercised on machines without triton
    triton = None
    HAS_TRITON = False


if HAS_TRITON:
    @triton.jit
    def start_tile(M, N, A8: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """The prologue both matmul kernels share: this program's rows and columns, their
        masks, its K split, and a zeroed accumulator (int32 for int8 activations, else fp32)."""
        pid_m = tl.program_id(0)
        pid_n = tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        if A8:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.int32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        return offs_m, offs_n, offs_m < M, offs_n < N, tl.program_id(2), acc

    @triton.jit
    def finish_tile(out, y_ptr, xs_ptr, b_ptr, offs_m, offs_n, mask_m, mask_n, pid_k, stride_ym,
                    stride_yn, A8: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT_K: tl.constexpr):
        """The epilogue both matmul kernels share: out (fp32, weight scale already applied) times
        the per-token scale when A8, plus bias (once, by the first K split), then a store, or an
        atomic add into the fp32 output when the K loop is split."""
        if A8:
            out = out * tl.load(xs_ptr + offs_m, mask=mask_m, other=0.0)[:, None]
        if HAS_BIAS:
            bias = tl.load(b_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
            out = out + tl.where(pid_k == 0, 1.0, 0.0) * bias[None, :]
        y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :] * stride_yn
        mask = mask_m[:, None] & mask_n[None, :]
        if SPLIT_K == 1:
            tl.store(y_ptrs, out.to(y_ptr.dtype.element_ty), mask=mask)
        else:
            tl.atomic_add(y_ptrs, out, mask=mask)


def launch(kernel, tuned, m: int, n: int, args, flags, config=None):
    """Run ``kernel`` with a pinned tile ``config`` (tests), else its autotuned twin ``tuned``.
    Grid: (M tiles, N tiles, K splits)."""
    if config is not None:
        grid = (triton.cdiv(m, config["BLOCK_M"]), triton.cdiv(n, config["BLOCK_N"]),
                config["SPLIT_K"])
        kernel[grid](*args, **flags, **config)
    else:
        tuned[lambda meta: (triton.cdiv(m, meta["BLOCK_M"]), triton.cdiv(n, meta["BLOCK_N"]),
                            meta["SPLIT_K"])](*args, **flags)


def ieee_dots(dtype: torch.dtype) -> bool:
    """fp32 dots in IEEE precision (not TF32) so fp32 results match the reference; bf16 dots are
    mis-evaluated by the interpreter, so there they run in fp32 too (exact: bf16 fits fp32)."""
    return dtype == torch.float32 or (interpreting() and dtype == torch.bfloat16)


@functools.lru_cache(maxsize=1)
def cpu_info() -> str:
    """/proc/cpuinfo, read once ("" where there is none): the CPU paths pick their kernels by
    its flags, the native build keys its cache on it, the benchmark names the CPU from it."""
    try:
        with open("/proc/cpuinfo") as f:
            return f.read()
    except OSError:
        return ""


# os.environ's own dict and encoded key: every frozen layer's call asks interpreting(), and
# os.environ.get costs 1.6 us (its Mapping layers), a tenth of a small layer's batch-1 time;
# the dict lookup 0.1 us. os.environ updates this dict on every set and delete.
try:
    _ENV, _KEY, _ONE = (os.environ._data, os.environ.encodekey("TRITON_INTERPRET"),
                        os.environ.encodevalue("1"))
except AttributeError:  # not CPython's os.environ
    _ENV = None


def interpreting() -> bool:
    """Whether Triton's interpreter is on (TRITON_INTERPRET=1), read now."""
    if _ENV is not None:
        return _ENV.get(_KEY) == _ONE
    return os.environ.get("TRITON_INTERPRET") == "1"


def use_triton(x: torch.Tensor) -> bool:
    """CUDA tensors run the Triton kernel; CPU tensors too when the interpreter is on."""
    return HAS_TRITON and (x.is_cuda or interpreting())


def m_bucket(m: int) -> int:
    """Autotune key for the batch size: 1, 2, 4, ..., 256, then 512+ (one bucket)."""
    return 1 << min(max(m - 1, 0).bit_length(), 9)


@functools.lru_cache(maxsize=None)
def configs(int8: bool, fp32: bool = False):
    """Tile configs. GEMV-like (small BLOCK_M, split-K) for small M, tiled GEMM for large M;
    the autotuner, keyed on (M bucket, N, K), picks. The interpreter gets one small config.
    fp32 activations (IEEE dots) need far more shared memory: compiled for sm_90, the ternary
    kernel's 128-row tiles took 288-800 KiB against the 227 KiB a block may use, so the fp32
    table stops at 64 rows (`python -m triton_dsl.kernels.aot` checks every config)."""
    if not HAS_TRITON:
        return []
    bk = 64 if int8 else 32  # 8-bit dot operands need K >= 32; wider K tiles halve the loop
    if interpreting():
        return [triton.Config({"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": bk, "SPLIT_K": 1})]
    out = []
    for bm, bn, bkk, sk, w, st in [
        (16, 64, 128, 1, 4, 4), (16, 64, 128, 4, 4, 4), (16, 128, 128, 8, 4, 3),
        (16, 32, 256, 8, 4, 3), (16, 128, 64, 16, 4, 4), (32, 64, 128, 4, 4, 4),
        (64, 64, 64, 2, 4, 4), (64, 128, 64, 1, 4, 4), (128, 128, 64, 1, 8, 3),
        (128, 256, 64, 1, 8, 3), (128, 64, 128, 1, 4, 4), (256, 128, 64, 1, 8, 3)]:
        if fp32 and bm >= 128:
            continue
        out.append(triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": max(bkk, bk),
                                  "SPLIT_K": sk}, num_warps=w, num_stages=st))
    return out


def as_rows(x: torch.Tensor) -> torch.Tensor:
    """x [..., K] as [M, K] (reshape(-1, K) cannot infer M when K = 0)."""
    return x.reshape(math.prod(x.shape[:-1]), x.shape[-1])


def empty_output(x: torch.Tensor, n: int, bias: torch.Tensor | None) -> torch.Tensor:
    """The result when M, N or K is 0: [..., N] holding the bias (or zeros), in x's dtype, as the
    twins compute it."""
    y = torch.zeros(*x.shape[:-1], n, device=x.device)
    return (y if bias is None else y.add_(bias.float())).to(x.dtype)


def nan_rows(y: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
    """y [M, N] with NaN in the rows where x2 [M, K] holds NaN or +-Inf: the rule every path
    follows for non-finite activations (a float matmul would give NaN or +-Inf there,
    depending on the weights; the integer paths cannot tell which, so the whole row is NaN)."""
    bad = ~torch.isfinite(x2).all(dim=1, keepdim=True)
    return y.masked_fill(bad, float("nan")) if x2.numel() else y


def check_same_device(**tensors):
    devices = {n: t.device for n, t in tensors.items() if t is not None}
    if len(set(devices.values())) > 1:
        raise ValueError("tensors are on different devices: " +
                         ", ".join(f"{n} on {d}" for n, d in devices.items()))


def check_vector(name: str, t: torch.Tensor | None, n: int, allow_scalar: bool = False):
    if t is None:
        return
    ok = t.dim() == 1 and (t.shape[0] == n or (allow_scalar and t.shape[0] == 1))
    if not ok and not (allow_scalar and t.dim() == 0):
        want = f"[{n}]" + (" or [1]" if allow_scalar else "")
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")


def conv_out_size(h: int, w: int, kernel, stride, padding, dilation) -> tuple[int, int]:
    """(H', W') of a convolution of an [.., H, W] input with numeric padding, as torch sizes
    it."""
    (kh, kw), (sh, sw), (ph, pw), (dh, dw) = kernel, stride, padding, dilation
    return ((h + 2 * ph - dh * (kh - 1) - 1) // sh + 1,
            (w + 2 * pw - dw * (kw - 1) - 1) // sw + 1)


CONV_MAX_K = 65536  # the native convolutions' int32 sums: 255 * 128 * K < 2^31
CONV_MAX_PAD = 64  # their padded copy of the input: more padding goes to oneDNN


def native_conv_fits(shape, padding, dilation) -> bool:
    """Whether the native convolutions (cpu_qconv.c, cpu_conv_amx.c) take a weight [O, C, kh,
    kw] with this numeric padding: K = C kh kw <= CONV_MAX_K, and no padding past what the
    kernel's taps reach or past CONV_MAX_PAD (a file's huge dilation makes the reach huge; the
    padded copy would only be huge: oneDNN's)."""
    _, c, kh, kw = shape
    reach = (dilation[0] * (kh - 1), dilation[1] * (kw - 1))
    return c * kh * kw <= CONV_MAX_K and all(
        isinstance(p, int) and 0 <= p <= min(r, CONV_MAX_PAD) for p, r in zip(padding, reach))
