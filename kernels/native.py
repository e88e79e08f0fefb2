"""The native CPU kernel (cpu_linear.c): built on first use with the system C compiler, cached,
and called through ctypes. Everything works without it: when there is no compiler, the build
fails, or TRITON_DSL_CPU_NATIVE=0, the CPU paths fall back to torch's int8 GEMMs (kernels/cpu.py).

The library is built for this CPU (-march=native) into $TRITON_DSL_CACHE (default
~/.cache/triton-dsl), named by a hash of the source, the flags, the compiler and the CPU, so a
changed file or another machine gets its own build. Writes are atomic: concurrent first uses (DDP
ranks, pytest workers) cannot load a half-written library.
"""
from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import torch

from .common import cpu_info

SOURCE = Path(__file__).with_name("cpu_linear.c")
FLAGS = ["-O3", "-march=native", "-fopenmp", "-ffp-contract=off", "-shared", "-fPIC", "-std=c11"]
ISAS = {0: "scalar", 1: "avx2", 2: "avx512-vnni"}
MAX_K = 65536  # the kernel's int32 sums hold 255 * 127 * K
TERNARY, INT8 = 0, 1


def _cpu_id() -> str:
    keep = [line for line in cpu_info().splitlines() if line.startswith(("model name", "flags"))]
    return "\n".join(sorted(set(keep)))


def _compiler() -> str | None:
    for cc in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if cc and shutil.which(cc):
            return cc
    return None


def build(extra_flags: tuple = ()) -> Path:
    """Compile (or find in the cache) the library; raises RuntimeError saying why it cannot."""
    cc = _compiler()
    if cc is None:
        raise RuntimeError("no C compiler found (set CC)")
    flags = FLAGS + list(extra_flags)
    version = subprocess.run([cc, "--version"], capture_output=True, text=True).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(flags), version, _cpu_id()])
                         .encode()).hexdigest()[:16]
    cache = Path(os.environ.get("TRITON_DSL_CACHE") or Path.home() / ".cache" / "triton-dsl")
    lib = cache / f"cpu_linear-{key}.so"
    if lib.exists():
        return lib
    cache.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=cache)
    os.close(fd)
    try:
        run = subprocess.run([cc, *flags, str(SOURCE), "-o", tmp, "-lm"], capture_output=True,
                             text=True)
        if run.returncode != 0:
            raise RuntimeError(f"{cc} failed: {run.stderr.strip()[-400:]}")
        os.replace(tmp, lib)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return lib


class Library:
    def __init__(self, path: Path):
        self.path = path
        self.dll = ctypes.CDLL(str(path))
        p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
        self.dll.tdsl_linear.argtypes = [i32, p, i64, i64, i64, p, i64, p, p, p, i32, p, i32]
        self.dll.tdsl_linear.restype = i32
        self.dll.tdsl_grouped_linear.argtypes = [p, i64, i64, i64, p, i32, i64, i64, p, p, p, p,
                                                 i32]
        self.dll.tdsl_grouped_linear.restype = i32
        self.isa = ISAS[self.dll.tdsl_isa()]
        self.tile_rows = self.dll.tdsl_tile_rows()

    def linear(self, kind: int, x: torch.Tensor, w: torch.Tensor, scale: torch.Tensor,
               w_sum: torch.Tensor | None, bias: torch.Tensor | None, mode: int) -> torch.Tensor:
        """x fp32 [M, K] (unit stride along K); w in kind's layout (to_blocks or int8_rows, tiled
        for this library); scale fp32 [N]; w_sum int32 [N] (int8 only); bias fp32 [N] or None;
        mode 0 = per-token int8 activations, 1 = float activations."""
        m, k = x.shape
        n = scale.shape[0]
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

    def grouped_linear(self, x: torch.Tensor, w: torch.Tensor, n: int, group: int,
                       scale: torch.Tensor, w_sum: torch.Tensor,
                       bias: torch.Tensor | None) -> torch.Tensor:
        """Float activations x fp32 [M, K] times grouped int8 weights (grouped_layout; uint8
        means nibbles)."""
        m, k = x.shape
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


_ERROR: list = []


@functools.lru_cache(maxsize=1)
def library() -> Library | None:
    """The loaded library, or None (then error() says why)."""
    if os.environ.get("TRITON_DSL_CPU_NATIVE", "1") == "0":
        _ERROR.append("disabled by TRITON_DSL_CPU_NATIVE=0")
        return None
    try:  # TRITON_DSL_CPU_FLAGS adds compiler flags, e.g. -mno-avx512f to time the AVX2 path
        return Library(build(tuple(os.environ.get("TRITON_DSL_CPU_FLAGS", "").split())))
    except (RuntimeError, OSError) as e:
        _ERROR.append(str(e))
        return None


def error() -> str | None:
    return _ERROR[-1] if _ERROR else None


def describe() -> str:
    lib = library()
    return f"native ({lib.isa})" if lib else f"unavailable: {error()}"


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


MAX_GROUP = 256  # the grouped kernel's int32 group sums hold 32639 * 127 * group


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
