"""Fast CPU paths. Weights run the native kernel (PackedNative: cpu_linear.c via native.py) when
it builds: ternary at 2 bits, int8 where the CPU has VNNI. Otherwise they run the int8 GEMMs
torch ships, oneDNN's (x86) or fbgemm's (PackedInt8), as described below; the native kernel
follows the same arithmetic (see cpu_linear.c).

The weight is prepacked once per tensor version and cached, never unpacked per call.

* int8 activations (W1.58A8, W8A8): x is quantized per token to int8 codes, which enter the int8
  GEMM as uint8 with zero point 128 and scale 1: the codes pass through unchanged, the int32
  accumulation is exact, and the result equals the reference twin bit for bit
  (float(acc) * w_scale, then * x_scale).
* float activations (ternary, W8A16): x is written per token as 16-bit fixed point and split into
  a high and a low 8-bit half, both run in the same int8 GEMM. Error: at most half a step of
  max|x_row| / 32767 per input element (relative ~1.5e-5), far below fp16 rounding.

Engines: "fbgemm" (the static-input quantized linear; within ~10% of torch's dynamic int8 linear
at M = 1..256 here) by default, or "onednn" (torch.ops.onednn.qlinear_pointwise: faster at
M=256, up to 1.5x slower at M=1), picked with the environment variable TRITON_DSL_CPU_ENGINE.
Both multiply uint8 by int8 with VNNI; without it they sum pairs of products in int16, which
saturates for int8 weights (not for ternary ones, |w| <= 1), so there int8 weights use an fp32
matmul on a cached dequantized weight instead (see fbgemm_exact and cpu_paths.Int8Gemm).
"""
from __future__ import annotations

import functools
import os
import warnings
import weakref

import torch

from . import native
from .common import cpu_info


def _op(namespace, name):
    try:
        return getattr(getattr(torch.ops, namespace), name)
    except (AttributeError, RuntimeError):
        return None


_ONEDNN = _op("onednn", "qlinear_pointwise") if torch.backends.mkldnn.is_available() else None
# fp32 input quantized with a given scale and zero point, fp32 output: no range scan per call
_FBGEMM = _op("quantized", "linear_with_input_q_dq_qweight_dq_output_fp32")


def engine() -> str | None:
    """The int8 GEMM the CPU paths use, or None when this torch has neither."""
    want = os.environ.get("TRITON_DSL_CPU_ENGINE")
    if want in ("onednn", "fbgemm"):
        return want if (_ONEDNN if want == "onednn" else _FBGEMM) is not None else None
    return "fbgemm" if _FBGEMM is not None else "onednn" if _ONEDNN is not None else None


@functools.lru_cache(maxsize=1)
def fbgemm_exact() -> bool:
    """True when the int8 GEMM multiplies u8 x s8 without saturation (VNNI), so the paths are
    exact, and an engine exists."""
    flags = cpu_info()
    return engine() is not None and ("avx512_vnni" in flags or "avx_vnni" in flags)


def row_absmax(x: torch.Tensor) -> torch.Tensor:
    """max |x| per row, [M, 1]; two reductions without an |x| temporary (measured 20x faster
    than vector_norm(ord=inf) on this CPU at 256 x 4096)."""
    return torch.maximum(x.amax(dim=1, keepdim=True), x.amin(dim=1, keepdim=True).neg_())


class PackedInt8:
    """An int8 weight [N, K] with per-channel fp32 scales, prepacked for the CPU engine.

    The engines' int32 sums hold |acc| <= 128 max|w| K (the float path's halves reach -128):
    int8 weights up to K = 132104, ternary ones far beyond. A wider weight ("wide") keeps its
    codes and runs torch._int_mm on spans of native.MAX_K inputs whose int32 sums are added up
    in int64: exact for any K, and the int8-activation path stays bit-exact with the twin.
    A token holding NaN or +-Inf gives a row of NaN (zero codes, NaN scale)."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor):
        n, k = codes.shape
        scale = scale.float().reshape(-1).expand(n)
        # the engines take positive scales: a negative one (TTQ's |T| term, a TTQ row whose
        # negative scale outweighs its positive one) moves its sign into the codes
        self.flipped = scale < 0
        codes = torch.where(self.flipped[:, None], -codes, codes)
        scale = scale.abs()
        live = scale > 0  # a zero scale (all-zero row) would break requantization
        codes = torch.where(live[:, None], codes, torch.zeros_like(codes)).contiguous()
        self.scale = torch.where(live, scale, torch.ones_like(scale))
        self.n, self.k = n, k
        wmax = int(codes.to(torch.int16).abs().max()) if codes.numel() else 0
        self.wide = 128 * wmax * k >= 2 ** 31
        self.engine = engine()
        # for the float path: 128 * rowsum(codes) undoes the low half's -128 offset
        w_sum = 128 * codes.sum(dim=1, dtype=torch.int64)
        self.nbytes = n * k + 8 * n  # the engine's packing is opaque: its codes and two vectors
        if self.wide:
            self.w, self.w_sum = codes, w_sum
            return
        if self.engine is None:
            raise RuntimeError("this torch has no CPU int8 GEMM (oneDNN or fbgemm)")
        if self.engine == "onednn":
            self.packed = torch.ops.onednn.qlinear_prepack(codes, None)
            self.zero_points = torch.zeros(n, dtype=torch.long)
        else:
            with warnings.catch_warnings():  # quantized tensors are deprecated; fbgemm needs one
                warnings.simplefilter("ignore")
                q = torch._make_per_channel_quantized_tensor(
                    codes, self.scale.double(), torch.zeros(n, dtype=torch.long), 0)
                self.packed = torch.ops.quantized.linear_prepack(q, None)
        self.offset = w_sum.float() * self.scale

    def codes(self) -> torch.Tensor:
        """The int8 codes back from the packed form (rows with a zero scale read as 0)."""
        if self.wide:
            return self.w
        if self.engine == "onednn":
            codes = self.packed.to_dense().t().contiguous()  # oneDNN keeps [K, N]
        else:
            codes = torch.ops.quantized.linear_unpack(self.packed)[0].int_repr()
        return torch.where(self.flipped[:, None], -codes, codes)

    def _gemm(self, rows: torch.Tensor) -> torch.Tensor:
        """float(rows @ W^T) * w_scale for float rows holding integers in [-128, 127]."""
        if self.wide:
            return self._sums(rows).float().mul_(self.scale)
        if self.engine == "onednn":
            u8 = rows.add_(128).to(torch.uint8)
            return _ONEDNN(u8, 1.0, 128, self.packed, self.scale, self.zero_points, None, 1.0,
                           0, torch.float32, "none", [], "")
        return _FBGEMM(rows, 1.0, 128, self.packed)

    def _sums(self, rows: torch.Tensor) -> torch.Tensor:
        """The exact int64 rows @ W^T of a wide weight, span by span of K."""
        q = rows.to(torch.int8)
        total = torch.zeros(rows.shape[0], self.n, dtype=torch.int64)
        for a in range(0, self.k, native.MAX_K):
            b = min(a + native.MAX_K, self.k)
            total += torch._int_mm(q[:, a:b], self.w[:, a:b].t())
        return total

    def dynamic_matmul(self, x: torch.Tensor, bias=None) -> torch.Tensor:
        """Per-token int8 quantization of float x [M, K], then the exact integer GEMM; equal to
        ops.quantize_per_token then float(acc) * w_scale * x_scale (+ bias)."""
        xf = x.float()
        amax = row_absmax(xf)
        scale = torch.where(amax > 0, amax / 127, 1.0)
        # |x| / scale <= 127 (+ rounding), so rounding alone lands in [-127, 127]: no clamp
        rows = torch.div(xf, scale).round_()
        scale = self._non_finite_rows(amax, scale, rows)
        return _add(self._gemm(rows).mul_(scale), bias)

    def float_matmul(self, x: torch.Tensor, bias=None) -> torch.Tensor:
        """x [M, K] float @ (codes * scale)^T (+ bias) via the 16-bit split."""
        m = x.shape[0]
        xf = x.float()
        amax = row_absmax(xf)
        step = torch.where(amax > 0, amax / 32767, 1.0)
        rows = torch.empty(2 * m, self.k)
        xi = torch.round(xf / step)
        step = self._non_finite_rows(amax, step, xi)
        hi = torch.div(xi, 256, rounding_mode="floor", out=rows[:m])
        torch.sub(xi, hi, alpha=256, out=rows[m:]).sub_(128)  # the low byte, as int8
        if self.wide:  # recombine the halves exactly, in int64
            s = self._sums(rows)
            v = s[:m].mul_(256).add_(s[m:]).add_(self.w_sum)
            return _add(v.float().mul_(self.scale).mul_(step), bias)
        y = self._gemm(rows)
        return _add(y[:m].mul_(256).add_(y[m:]).add_(self.offset).mul_(step), bias)

    @staticmethod
    def _non_finite_rows(amax: torch.Tensor, scale: torch.Tensor, rows: torch.Tensor):
        """For tokens holding NaN or +-Inf (amax not finite): zero their integer rows in place
        (the GEMMs' conversion of NaN is undefined) and return the scales with NaN there, so
        those output rows are NaN."""
        finite = torch.isfinite(amax)
        if bool(finite.all()):
            return scale
        rows.masked_fill_(~finite, 0.0)
        return scale.masked_fill(~finite, float("nan"))


def _add(y, bias):
    return y if bias is None else y.add_(bias)


def _rows(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] as the native kernel reads it: fp32, unit stride along K."""
    x = x.float()
    return x if x.stride(-1) == 1 else x.contiguous()


def _nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def _vector(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.float().contiguous()


def native_fits(k: int) -> bool:
    """Whether a weight with K inputs can run the native kernel here: an AVX-512 VNNI or AVX2
    build (the portable C build serves the tests, too slow to serve layers), K up to
    native.LIMIT_K (the kernel sums spans of MAX_K in int32 and adds them in int64)."""
    lib = native.library()
    return lib is not None and lib.isa != "scalar" and k <= native.LIMIT_K


def native_int8() -> bool:
    """Int8 weights take the native kernel only where it has the VNNI tiles (measured faster
    than fbgemm here); elsewhere fbgemm stays."""
    lib = native.library()
    return lib is not None and lib.isa == "avx512-vnni"


class PackedNative:
    """A weight [N, K] in the native kernel's layout: ternary at 2 bits (N * K / 4 bytes
    resident) or int8 codes, with per-channel fp32 scales. Same interface as PackedInt8
    (codes, dynamic_matmul, float_matmul, k, nbytes: the bytes it holds beyond the tensors
    it was given)."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor, ternary: bool):
        self.n, self.k = codes.shape
        self.lib = native.library()
        if self.lib is None:
            raise RuntimeError(f"the native CPU kernel is unavailable: {native.error()}")
        self.kind = native.TERNARY if ternary else native.INT8
        pack = native.to_blocks if ternary else native.int8_rows
        self.weight = pack(codes, self.lib.tile_rows)
        self.w_sum = None if ternary else codes.sum(dim=1, dtype=torch.int32)
        self.scale = scale.float().reshape(-1).expand(self.n).contiguous()
        own_scale = self.scale.data_ptr() != scale.data_ptr()  # else the caller's tensor
        self.nbytes = _nbytes(self.weight, self.w_sum, self.scale if own_scale else None)

    @classmethod
    def join(cls, forms: list) -> "PackedNative":
        """One form computing several forms' outputs side by side, for one input: their
        weights joined along N (whole tiles each, so the tiled layout just concatenates). The
        forms then read views of the joined buffers, so no weight is held twice."""
        first = forms[0]
        if any(f.kind != first.kind or f.k != first.k or f.lib is not first.lib for f in forms) \
                or any(f.n % f.lib.tile_rows for f in forms[:-1]):
            raise ValueError("only forms of one kind and K, each of whole tiles, can be joined")
        out = cls.__new__(cls)
        out.n, out.k, out.lib, out.kind = sum(f.n for f in forms), first.k, first.lib, first.kind
        out.weight = torch.cat([f.weight for f in forms])
        out.scale = torch.cat([f.scale for f in forms])
        out.w_sum = None if first.w_sum is None else torch.cat([f.w_sum for f in forms])
        out.nbytes = 0  # the forms still count their own bytes
        tiles = rows = 0
        for f in forms:
            t = f.weight.shape[0]
            f.weight = out.weight[tiles:tiles + t]
            f.scale = out.scale[rows:rows + f.n]
            if f.w_sum is not None:
                f.w_sum = out.w_sum[rows:rows + f.n]
            tiles, rows = tiles + t, rows + f.n
        return out

    def codes(self) -> torch.Tensor:
        unpack = native.from_blocks if self.kind == native.TERNARY else native.from_int8_rows
        return unpack(self.weight, self.n, self.k, self.lib.tile_rows)

    def _run(self, x, bias, mode):
        return self.lib.linear(self.kind, _rows(x), self.weight, self.scale, self.w_sum,
                               _vector(bias), mode)

    def dynamic_matmul(self, x: torch.Tensor, bias=None) -> torch.Tensor:
        """Bit-exact with ops.quantize_per_token then the W1.58A8 / W8A8 reference twin."""
        return self._run(x, bias, 0)

    def float_matmul(self, x: torch.Tensor, bias=None) -> torch.Tensor:
        """16-bit fixed-point activations (half a step, max|x_row| / 65278, per input), exact
        integer sums."""
        return self._run(x, bias, 1)


class PackedGrouped:
    """Int8 weights [N, K] with per-group scales [N, K // G] in the native grouped layout (a
    byte per weight, or a nibble for codes in [-8, 7]), float activations only (W8A16, W4A16)."""

    def __init__(self, codes: torch.Tensor, scale: torch.Tensor):
        self.n, self.k = codes.shape
        self.group = self.k // scale.shape[1]
        self.lib = native.library()
        if self.lib is None:
            raise RuntimeError(f"the native CPU kernel is unavailable: {native.error()}")
        self.weight, self.scale, self.w_sum = native.grouped_layout(codes, scale)
        self.nbytes = _nbytes(self.weight, self.w_sum, self.scale)

    def codes(self) -> torch.Tensor:
        return native.from_grouped_layout(self.weight, self.n, self.k)

    def float_matmul(self, x: torch.Tensor, bias=None) -> torch.Tensor:
        """16-bit fixed-point activations (half a step, max|x_row| / 65278, per input); exact
        integer sums per group, scaled and added in fp32."""
        return self.lib.grouped_linear(_rows(x), self.weight, self.n, self.group, self.scale,
                                       self.w_sum, _vector(bias))


def native_grouped(k: int, group: int) -> bool:
    """Whether per-group int8 weights run the native grouped kernel (VNNI; group a multiple of
    4 up to native.MAX_GROUP)."""
    return native_int8() and group % 4 == 0 and group <= native.MAX_GROUP and k % group == 0


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
