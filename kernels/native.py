"""The native CPU kernel (cpu_linear.c), called through ctypes; built once per machine by
native_build.py. Everything works without it: when there is no compiler, the build fails, or
TRITON_DSL_CPU_NATIVE=0, the CPU paths fall back to torch's int8 GEMMs (kernels/cpu.py), and
the process that found out prints one line on stderr saying why.

The C ABI is declared once, in SIGNATURES (checked against the C prototypes by the tests), and
versioned by ABI, which the library reports through tdsl_abi(): a library of another ABI is
refused at load.
"""
from __future__ import annotations

import ctypes
import functools
import os
import sys
from pathlib import Path

import torch

from .native_build import FLAGS, SOURCES, BuildError, build  # noqa: F401 (re-exported)
from .native_build import compiler  # noqa: F401 (the tests find the system compiler with it)

ISAS = {0: "scalar", 1: "avx2", 2: "avx512-vnni"}
# The longest K whose int32 sums of u8 x s8 products cannot overflow (255 * 127 * 65536 < 2^31).
# Longer rows are summed in spans of at most MAX_K and the spans added in int64 (cpu_linear.c's
# SPAN, cpu.PackedInt8, the Triton W8A8 kernel), so every path is exact for any K; the native
# kernel serves layers up to LIMIT_K.
MAX_K = 65536
LIMIT_K = 1 << 24  # the C kernel's per-row code sums are int32: Library.linear refuses more
MAX_GROUP = 256  # the grouped kernel's int32 group sums hold 32639 * 127 * group
TERNARY, INT8 = 0, 1
ABI = 9  # cpu_linear.c's TDSL_ABI

_P, _I64, _I32, _F32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float
# The exported C functions: name -> (return type, argument types), in the prototypes' order.
SIGNATURES = {
    "tdsl_abi": (_I32, []),
    "tdsl_isa": (_I32, []),
    "tdsl_tile_rows": (_I32, []),
    # 1 when AMX tiles (cpu_amx.c) run the many-row layers (asks Linux for the tile state once)
    "tdsl_amx": (_I32, []),
    # kind, x, m, k, ldx, w, n, w_scale, w_sum, bias, mode, y, threads
    "tdsl_linear": (_I32, [_I32, _P, _I64, _I64, _I64, _P, _I64, _P, _P, _P, _I32, _P, _I32]),
    # ns: the nanoseconds spent in tdsl_linear so far
    "tdsl_linear_clock": (_I32, [_P]),
    # x, m, k, ldx, w, nib, n, group, scale, wsum, bias, y, threads
    "tdsl_grouped_linear": (_I32, [_P, _I64, _I64, _I64, _P, _I32, _I64, _I64, _P, _P, _P, _P,
                                   _I32]),
    # x, n, scale, zp, lo, hi, out, threads
    "tdsl_quantize_u8": (_I32, [_P, _I64, _F32, _I32, _I32, _I32, _P, _I32]),
    # cpu_qconv.c: x, xf, x_scale, geo, xzp, wt, wt_amx, wsum, mult, bias, relu, out_u8,
    # out_scale, out_zp, y, threads
    "tdsl_qconv": (_I32, [_P, _P, _F32, _P, _I32, _P, _P, _P, _P, _P, _I32, _I32, _F32, _I32,
                          _P, _I32]),
    # cpu_conv_amx.c: x, geo, wt, w_scale, bias, relu, y, threads
    "tdsl_int16_conv": (_I32, [_P, _P, _P, _P, _P, _I32, _P, _I32]),
    # x, m, n, ldx, w, eps, y, threads
    "tdsl_rmsnorm": (_I32, [_P, _I64, _I64, _I64, _P, _F32, _P, _I32]),
    # cpu_decode.c: x, pre, qkv, o, heads, kv_heads, head_dim, cos, sin, kc, vc, cache_type,
    # max_len, pos, norm, residual, y, threads
    "tdsl_attention_step": (_I32, [_P, _P, _P, _P, _I64, _I64, _I64, _P, _P, _P, _P, _I32,
                                   _I64, _I64, _P, _I32, _P, _I32]),
    # x, pre, up, gated, activation, norm, down, residual, y, threads
    "tdsl_mlp_step": (_I32, [_P, _P, _P, _I32, _I32, _P, _P, _I32, _P, _I32]),
    # x, steps, count, pos, y, threads
    "tdsl_decode_steps": (_I32, [_P, _P, _I64, _I64, _P, _I32]),
    # whether fp16 KV caches are built in (the compiler's _Float16)
    "tdsl_decode_fp16": (_I32, []),
}


class Lin(ctypes.Structure):
    """cpu_decode.c's tdsl_lin: a packed linear layer as tdsl_linear takes it."""
    _fields_ = [("kind", _I32), ("mode", _I32), ("n", _I64), ("k", _I64), ("w", _P),
                ("scale", _P), ("w_sum", _P), ("bias", _P)]


class Norm(ctypes.Structure):
    """cpu_decode.c's tdsl_norm: an RMSNorm before a projection (on = 0: none)."""
    _fields_ = [("on", _I32), ("eps", _F32), ("w", _P)]


class Step(ctypes.Structure):
    """cpu_decode.c's tdsl_step: one pre-norm residual step of tdsl_decode_steps."""
    _fields_ = [("attention", _I32), ("cache_type", _I32), ("gated", _I32),
                ("activation", _I32), ("pre", _P), ("norm", _P), ("a", _P), ("b", _P),
                ("heads", _I64), ("kv_heads", _I64), ("head_dim", _I64), ("max_len", _I64),
                ("cos", _P), ("sin", _P), ("kc", _P), ("vc", _P)]


def _load(path: Path) -> ctypes.CDLL:
    """The library, its OpenMP threads sleeping when idle (OMP_WAIT_POLICY=PASSIVE while it
    loads, unless the user chose a policy). By default they spin for a while after every call,
    and this runtime's spinning threads and torch's own then fight over the same cores: measured
    on the 2-core machine under load, a 4096x4096 ternary layer at M=1 took 12 ms instead of
    0.5 ms. The environment is put back at once; only this library's runtime reads it now."""
    had = os.environ.get("OMP_WAIT_POLICY")
    if had is None:
        os.environ["OMP_WAIT_POLICY"] = "PASSIVE"
    try:
        return ctypes.CDLL(str(path))
    finally:
        if had is None:
            del os.environ["OMP_WAIT_POLICY"]


class Library:
    def __init__(self, path: Path):
        self.path = path
        self.dll = _load(path)
        abi = self.dll.tdsl_abi() if hasattr(self.dll, "tdsl_abi") else None
        if abi != ABI:
            raise RuntimeError(f"{path} has C ABI {abi}, this triton-dsl needs {ABI} (a stale "
                               f"build: delete it)")
        for name, (restype, argtypes) in SIGNATURES.items():
            fn = getattr(self.dll, name)
            fn.restype, fn.argtypes = restype, argtypes
        self.isa = ISAS[self.dll.tdsl_isa()]
        self.fp16 = bool(self.dll.tdsl_decode_fp16())
        self.tile_rows = self.dll.tdsl_tile_rows()

    @property
    def amx(self) -> bool:
        """Whether AMX tiles run the many-row layers. Asks Linux for the tile state the first
        time (as the first such layer would): not at load, so a process that never needs it,
        decoding one token at a time, never holds it."""
        return bool(self.dll.tdsl_amx())

    def linear(self, kind: int, x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor,
               w_sum: torch.Tensor | None, bias: torch.Tensor | None, mode: int) -> torch.Tensor:
        """x fp32 [M, K] (unit stride along K); w in kind's layout (to_blocks or int8_rows, tiled
        for this library); scale fp32 [N]; w_sum int32 [N] (int8 only); bias fp32 [N] or None;
        mode 0 = per-token int8 activations, 1 = float activations. A row of x holding NaN or
        +-Inf gives a row of NaN."""
        m, k = x.shape
        n = scale.shape[0]
        if k > LIMIT_K:
            raise ValueError(f"x has K={k} inputs (shape {tuple(x.shape)}); the native kernel "
                             f"takes at most {LIMIT_K}")
        if k == 0:  # no inputs: y = bias (the C code would allocate 0 bytes)
            return _bias_rows(m, n, bias)
        y = torch.empty(m, n)
        if m and n:
            rc = self.dll.tdsl_linear(
                kind, x.data_ptr(), m, k, x.stride(0), w.data_ptr(), n, scale.data_ptr(),
                None if w_sum is None else w_sum.data_ptr(),
                None if bias is None else bias.data_ptr(), mode, y.data_ptr(),
                torch.get_num_threads())
            if rc != 0:
                raise MemoryError("native linear: could not allocate scratch memory")
        return y

    def linear_seconds(self) -> float:
        """Seconds spent in the native linear kernel since the library loaded, by all callers
        (Python, or the native decoding steps)."""
        ns = ctypes.c_int64()
        self.dll.tdsl_linear_clock(ctypes.byref(ns))
        return ns.value / 1e9

    def quantize_u8(self, x: torch.Tensor, scale: float, zp: int, lo: int, hi: int):
        """uint8 codes clamp(round(x / scale) + zp, lo, hi) of fp32 x, in x's memory layout
        (contiguous in some memory format), or None when x holds a NaN."""
        out = torch.empty_like(x, dtype=torch.uint8)
        if x.numel() and self.dll.tdsl_quantize_u8(x.data_ptr(), x.numel(), scale, zp, lo, hi,
                                                   out.data_ptr(), torch.get_num_threads()):
            return None
        return out

    def rmsnorm(self, x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
        """RMSNorm over the last dimension of contiguous fp32 x [..., N], times contiguous fp32
        weight [N] or None; y has x's shape. (Few tensor ops: at batch 1 each costs more than
        the arithmetic.)"""
        n = x.shape[-1]
        if not x.is_contiguous() or (weight is not None and (
                weight.shape != (n,) or not weight.is_contiguous())):
            raise ValueError(f"rmsnorm needs a contiguous x [..., N] and weight [N]; got x of "
                             f"shape {tuple(x.shape)}, weight of shape "
                             f"{None if weight is None else tuple(weight.shape)}")
        y = torch.empty_like(x)
        if x.numel():
            self.dll.tdsl_rmsnorm(x.data_ptr(), x.numel() // n, n, n,
                                  None if weight is None else weight.data_ptr(), eps,
                                  y.data_ptr(), torch.get_num_threads())
        return y

    def grouped_linear(self, x: torch.Tensor, w: torch.Tensor, n: int, group: int,
                       scale: torch.Tensor, w_sum: torch.Tensor,
                       bias: torch.Tensor | None) -> torch.Tensor:
        """Float activations x fp32 [M, K] times grouped int8 weights (grouped_layout; uint8
        means nibbles). A row of x holding NaN or +-Inf gives a row of NaN."""
        m, k = x.shape
        if group <= 0 or group % 4 or group > MAX_GROUP or k % group:
            raise ValueError(f"group={group} must be a multiple of 4 up to {MAX_GROUP} that "
                             f"divides K={k} (x has shape {tuple(x.shape)})")
        y = torch.empty(m, n)
        if m and n:
            rc = self.dll.tdsl_grouped_linear(
                x.data_ptr(), m, k, x.stride(0), w.data_ptr(), int(w.dtype == torch.uint8), n,
                group, scale.data_ptr(),
                w_sum.data_ptr(), None if bias is None else bias.data_ptr(), y.data_ptr(),
                torch.get_num_threads())
            if rc != 0:
                raise MemoryError("native grouped linear: could not allocate scratch memory")
        return y


def _bias_rows(m: int, n: int, bias: torch.Tensor | None) -> torch.Tensor:
    y = torch.zeros(m, n)
    return y if bias is None else y.add_(bias)


_ERROR: list = []
FALLBACK_COST = "about 4-10x slower at batch 1: see README"


@functools.lru_cache(maxsize=1)
def library() -> Library | None:
    """The loaded library, or None (then error() says why). Cheap after the first call: the
    runtime may call it at freeze so that no forward pass pays for the build."""
    if os.environ.get("TRITON_DSL_CPU_NATIVE", "1") == "0":
        _ERROR.append("disabled by TRITON_DSL_CPU_NATIVE=0")
        return None
    try:  # TRITON_DSL_CPU_FLAGS adds compiler flags, e.g. -mno-avx512f to time the AVX2 path
        return Library(build(tuple(os.environ.get("TRITON_DSL_CPU_FLAGS", "").split())))
    except (RuntimeError, OSError) as e:
        _ERROR.append(str(e))
        if not getattr(e, "cached", False):  # said once, by the process that tried
            print(f"triton-dsl: native CPU kernel unavailable ({e}); using torch's int8 GEMMs "
                  f"({FALLBACK_COST})", file=sys.stderr)
        return None


def loaded() -> Library | None:
    """The library if something has asked for it already (a frozen layer, at freeze or load),
    else None: for helpers that any model runs (RMSNorm), which must not make a float model
    wait for a compiler, or warn about kernels it never uses."""
    return library() if library.cache_info().currsize else None


def error() -> str | None:
    return _ERROR[-1] if _ERROR else None


def describe() -> str:
    lib = library()
    return f"native ({lib.isa}{' + amx' if lib.amx else ''})" if lib else f"unavailable: {error()}"


def _tile(rows: torch.Tensor, nb: int) -> torch.Tensor:
    """[N, KB, W] -> tiles of nb rows interleaved block by block, [ceil(N / nb), KB * nb * W]
    (see WADDR in cpu_linear.c); padding rows are zero."""
    n, kb, width = rows.shape
    np_ = -(-n // nb) * nb
    padded = torch.zeros(np_, kb, width, dtype=rows.dtype)
    padded[:n] = rows
    return padded.view(np_ // nb, nb, kb, width).transpose(1, 2).reshape(np_ // nb, -1)


def _untile(tiles: torch.Tensor, n: int, nb: int, width: int) -> torch.Tensor:
    t = tiles.view(tiles.shape[0], -1, nb, width).transpose(1, 2)  # [tiles, nb, KB, W]
    return t.reshape(-1, t.shape[2], width)[:n]


def to_blocks(codes: torch.Tensor, nb: int) -> torch.Tensor:
    """int8 ternary weights [N, K] in {-1, 0, 1} -> the K-blocked 2-bit layout in tiles of nb
    rows, uint8 (N * K / 4 bytes, N and K padded; see cpu_linear.c)."""
    n, k = codes.shape
    kb = -(-k // 64)
    c = torch.ones(n, kb * 64, dtype=torch.uint8)  # code 1 = weight 0 pads K
    c[:, :k] = (codes.to(torch.int16) + 1).to(torch.uint8)
    s = c.view(n, kb, 4, 16)
    return _tile(s[:, :, 0] | s[:, :, 1] << 2 | s[:, :, 2] << 4 | s[:, :, 3] << 6, nb)


def from_blocks(blocks: torch.Tensor, n: int, k: int, nb: int) -> torch.Tensor:
    """The inverse of to_blocks: int8 [N, K]."""
    b = _untile(blocks, n, nb, 16).unsqueeze(2)  # [N, KB, 1, 16]
    planes = torch.cat([(b >> (2 * s)) & 3 for s in range(4)], dim=2)  # [N, KB, 4, 16]
    return planes.reshape(n, -1)[:, :k].to(torch.int8) - 1


def int8_rows(codes: torch.Tensor, nb: int) -> torch.Tensor:
    """int8 codes [N, K] -> blocks of 64 codes (K zero-padded) in tiles of nb rows."""
    n, k = codes.shape
    kb = -(-k // 64)
    out = torch.zeros(n, kb * 64, dtype=torch.int8)
    out[:, :k] = codes
    return _tile(out.view(n, kb, 64), nb)


def from_int8_rows(tiles: torch.Tensor, n: int, k: int, nb: int) -> torch.Tensor:
    """The inverse of int8_rows."""
    return _untile(tiles, n, nb, 64).reshape(n, -1)[:, :k].contiguous()


def grouped_layout(codes: torch.Tensor, scale: torch.Tensor):
    """int8 codes [N, K] and per-group scales [N, K // G] -> (weight in tiles of 16 columns by
    quads of 4 inputs, scales [K // G, NP] fp32, code sums [K // G, NP] int32), N padded to NP,
    a multiple of 16 (see cpu_linear.c). Codes in [-8, 7] are stored as nibbles (uint8, half
    the bytes), others as int8."""
    n, k = codes.shape
    groups = scale.shape[1]
    np_ = -(-n // 16) * 16
    padded = torch.zeros(np_, k, dtype=torch.int8)
    padded[:n] = codes
    w = padded.view(np_ // 16, 16, k // 4, 4).transpose(1, 2).reshape(np_ // 16, -1, 64)
    if codes.numel() and codes.min() >= -8 and codes.max() <= 7:
        u = (w.to(torch.int16) + 8).to(torch.uint8)
        w = u[..., :32] | (u[..., 32:] << 4)
    s = torch.zeros(groups, np_)
    s[:, :n] = scale.float().t()
    sums = padded.view(np_, groups, -1).sum(dim=2, dtype=torch.int32).t().contiguous()
    return w.reshape(np_ // 16, -1).contiguous(), s, sums


def from_grouped_layout(w: torch.Tensor, n: int, k: int) -> torch.Tensor:
    """The codes back from grouped_layout's weight."""
    if w.dtype == torch.uint8:  # nibbles
        b = w.view(w.shape[0], -1, 32)
        w = (torch.cat([b & 15, b >> 4], dim=2).to(torch.int16) - 8).to(torch.int8)
    return w.reshape(-1, k // 4, 16, 4).transpose(1, 2).reshape(-1, k)[:n].contiguous()
