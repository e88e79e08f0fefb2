"""Fast CPU paths, built on fbgemm's int8 GEMM (the engine behind torch's dynamic int8 linear).

The weight is prepacked once per tensor version and cached, never unpacked per call.

* int8 activations (W1.58A8, W8A8): x is quantized per token to int8 codes, which enter fbgemm's
  GEMM with activation scale 1 and zero point 128 (the static-input linear op; where a torch
  lacks it, a dummy row holding -128 and 127 pins the dynamic op's range to the same scale). The
  codes pass through unchanged, the int32 accumulation is exact, and the result equals the
  reference twin bit for bit (float(acc) * w_scale, then * x_scale).
* float activations (ternary, W8A16): x is written per token as 16-bit fixed point and split into
  a high and a low int8 half, both run in the same int8 GEMM. Error: at most half a step of
  max|x_row| / 32767 per input element (relative ~1.5e-5), far below fp16 rounding.

fbgemm on CPUs without VNNI saturates int16 pair sums of uint8 x int8; there the float paths use
an fp32 matmul on a cached dequantized weight instead.
"""
from __future__ import annotations

import functools
import warnings
import weakref

import torch


# fp32 input quantized with a given scale and zero point, fp32 output: no range scan per call
_STATIC_INPUT = getattr(torch.ops.quantized, "linear_with_input_q_dq_qweight_dq_output_fp32",
                        None)


@functools.lru_cache(maxsize=1)
def fbgemm_exact() -> bool:
    """True when fbgemm accumulates u8 x s8 without saturation (VNNI), so the paths are exact."""
    if "fbgemm" not in torch.backends.quantized.supported_engines:
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return "avx512_vnni" in flags or "avx_vnni" in flags


class PackedInt8:
    """An int8 weight [N, K] with per-channel fp32 scales, prepacked for fbgemm."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor):
        n, k = codes.shape
        scale = scale.float().reshape(-1).expand(n).contiguous()
        live = scale > 0  # a zero scale (all-zero row) would break fbgemm's requantization
        codes = torch.where(live[:, None], codes, torch.zeros_like(codes))
        self.scale = torch.where(live, scale, torch.ones_like(scale))
        with warnings.catch_warnings():  # quantized tensors are deprecated; fbgemm still needs one
            warnings.simplefilter("ignore")
            q = torch._make_per_channel_quantized_tensor(
                codes.contiguous(), self.scale.double(), torch.zeros(n, dtype=torch.long), 0)
            self.packed = torch.ops.quantized.linear_prepack(q, None)
        # for the float path: 128 * rowsum(codes) * scale undoes the low half's -128 offset
        self.offset = 128 * codes.sum(dim=1, dtype=torch.int64).float() * self.scale
        self.k = k
        self.dummy = torch.zeros(1, k)
        self.dummy[0, 0] = -128.0
        if k > 1:
            self.dummy[0, 1] = 127.0
        else:  # K == 1: the two bounds cannot share a row; fall back to two rows
            self.dummy = torch.tensor([[-128.0], [127.0]])

    def codes(self) -> torch.Tensor:
        """The int8 codes back from fbgemm's packed form (rows with a zero scale read as 0)."""
        return torch.ops.quantized.linear_unpack(self.packed)[0].int_repr()

    def _rows(self, m: int) -> torch.Tensor:
        """A float buffer for m rows of codes (plus the dummy rows where they are needed)."""
        if _STATIC_INPUT is not None:
            return torch.empty(m, self.k)
        buf = torch.empty(m + self.dummy.shape[0], self.k)
        buf[m:] = self.dummy
        return buf

    def _gemm(self, buf: torch.Tensor, m: int) -> torch.Tensor:
        """float(codes @ W^T) * w_scale for integer-valued rows in [-128, 127]."""
        if _STATIC_INPUT is not None:
            return _STATIC_INPUT(buf, 1.0, 128, self.packed)
        return torch.ops.quantized.linear_dynamic(buf, self.packed, False)[:m]

    def dynamic_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """Per-token int8 quantization of float x [M, K] written straight into the GEMM's input
        buffer; equal to ops.quantize_per_token then float(acc) * w_scale * x_scale."""
        m = x.shape[0]
        xf = x.float()
        amax = torch.linalg.vector_norm(xf, float("inf"), dim=1, keepdim=True)  # max |x|
        scale = torch.where(amax > 0, amax / 127, 1.0)
        buf = self._rows(m)
        # |x| / scale <= 127 (+ rounding), so rounding alone lands in [-127, 127]: no clamp
        torch.div(xf, scale, out=buf[:m]).round_()
        return self._gemm(buf, m).mul_(scale)

    def float_matmul(self, x: torch.Tensor) -> torch.Tensor:
        """x [M, K] float @ (codes * scale)^T via the 16-bit split."""
        m = x.shape[0]
        xf = x.float()
        amax = torch.linalg.vector_norm(xf, float("inf"), dim=1, keepdim=True)
        step = torch.where(amax > 0, amax / 32767, 1.0)
        buf = self._rows(2 * m)
        xi = torch.round(xf / step)
        hi = torch.div(xi, 256, rounding_mode="floor", out=buf[:m])
        torch.sub(xi, hi, alpha=256, out=buf[m:2 * m]).sub_(128)  # the low byte, as int8
        y = self._gemm(buf, 2 * m)
        return y[:m].mul_(256).add_(y[m:]).add_(self.offset).mul_(step)


_CACHE: dict = {}  # (id, id) -> (weakrefs, versions, value); tensors hash by identity here


def cached(tensors: tuple, build, kind: str = "fbgemm"):
    """build(*tensors) once per kind of cached form, set of tensors and their versions (in-place
    edits invalidate); an entry goes away with its tensors."""
    key = (kind,) + tuple(id(t) for t in tensors)
    versions = tuple(t._version for t in tensors)
    hit = _CACHE.get(key)
    if hit is not None and all(r() is t for r, t in zip(hit[0], tensors)) and hit[1] == versions:
        return hit[2]
    value = build(*tensors)
    refs = tuple(weakref.ref(t, lambda _, k=key: _CACHE.pop(k, None)) for t in tensors)
    _CACHE[key] = (refs, versions, value)
    return value
