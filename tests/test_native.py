"""The native CPU kernel (kernels/cpu_linear.c) against its reference twins.

Each instruction-set path (AVX-512 VNNI, AVX2, portable C) is built separately, as far as this
CPU runs it, and must be bit-exact with the W1.58A8 and W8A8 twins for int8 activations. Float
activations carry 16-bit fixed point: each input errs by at most half a step, max|x_row| / 65278.
The grouped kernel (per-group int8 scales) does the same operations in the same order on every
path, so its paths must also agree bit for bit with each other.
"""
import os
import subprocess
import sys

import pytest
import torch

from triton_dsl.kernels import cpu, native
from triton_dsl.kernels.int8_matmul import int8_w8a8_matmul_ref, int8_weight_only_matmul_ref
from triton_dsl.kernels.ops import int8_matmul, quantize_per_token, ternary_matmul
from triton_dsl.kernels.packing import pack_ternary, quantize_int8
from triton_dsl.kernels.ternary_matmul import ternary_a8_matmul_ref, ternary_matmul_ref

if native.library() is None:
    pytest.skip(f"the native CPU kernel is unavailable: {native.error()}",
                allow_module_level=True)

# flags appended after -march=native switch the wider paths off ("amx": AVX-512 VNNI with AMX
# tiles for many rows, cpu_amx.c)
NO_AMX = ("-mno-amx-int8", "-mno-amx-tile")
ISA_FLAGS = {"amx": (), "avx512-vnni": NO_AMX, "avx2": ("-mno-avx512f", *NO_AMX),
             "scalar": ("-mno-avx2", "-mno-avx512f", *NO_AMX)}
RANK = {"scalar": 0, "avx2": 1, "avx512-vnni": 2}


def _build(path):
    if path == "amx":
        if not native.library().amx:
            pytest.skip("this CPU (or its kernel) gives no AMX tiles")
        built = native.Library(native.build())
        assert built.amx and built.isa == "avx512-vnni"
        return built
    if RANK[path] > RANK[native.library().isa]:
        pytest.skip(f"this CPU has no {path}")
    built = native.Library(native.build(ISA_FLAGS[path]))
    assert built.isa == path and not built.amx
    return built


@pytest.fixture(scope="module", params=list(ISA_FLAGS))
def lib(request):
    return _build(request.param)


# M = 1, 3, 17, 64 (float mode doubles the rows); N and K off every tile and block size; one
# or two rows over an odd number of blocks in several K chunks (the split sums of tile_body);
# AMX: 33 rows (a partial pair of row tiles) and 130 tokens whose 260 float-mode rows span two
# row groups (cpu_linear.c's AMX_GROUP) over 3 blocks of 32 columns, the last of 6
SHAPES = [(1, 5, 7), (3, 17, 65), (17, 33, 200), (64, 100, 129), (7, 37, 64), (2, 3, 1000),
          (1, 19, 2117), (2, 6, 4200), (33, 50, 130), (130, 70, 4200)]


def _case(m, n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
    return (w, torch.rand(n, generator=g) + 0.5, torch.randn(n, generator=g),
            torch.randn(m, k, generator=g))


def _weights(w, scale, nb):
    """(ternary or int8) -> (kind, native layout, w_sum, the twins' weight, scale)"""
    yield native.TERNARY, native.to_blocks(w, nb), None, pack_ternary(w), scale
    q, s = quantize_int8(torch.randn(w.shape, generator=torch.Generator().manual_seed(2)) * 3)
    yield native.INT8, native.int8_rows(q, nb), q.sum(dim=1, dtype=torch.int32), q, s


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_int8_activations_bit_exact(lib, m, n, k):
    w, scale, bias, x = _case(m, n, k)
    x[0, :] = 0  # an all-zero token
    codes, xs = quantize_per_token(x)
    for kind, layout, w_sum, twin_w, s in _weights(w, scale, lib.tile_rows):
        ref = ternary_a8_matmul_ref if kind == native.TERNARY else int8_w8a8_matmul_ref
        for b in (bias, None):
            got = lib.linear(kind, x, layout, s, w_sum, b, 0)
            assert torch.equal(got, ref(codes, xs, twin_w, s, b)), kind


@pytest.mark.parametrize("m,n,k", SHAPES)
def test_float_activations_within_16bit_tolerance(lib, m, n, k):
    w, scale, bias, x = _case(m, n, k, seed=1)
    x[-1] *= 1e4  # rows of very different magnitude are scaled separately
    for kind, layout, w_sum, twin_w, s in _weights(w, scale, lib.tile_rows):
        got = lib.linear(kind, x, layout, s, w_sum, bias, 1)
        if kind == native.TERNARY:
            want, wmax = ternary_matmul_ref(x, twin_w, s, bias), s.max()
        else:
            want, wmax = int8_weight_only_matmul_ref(x, twin_w, s, bias), 127 * s.max()
        bound = k * x.abs().amax(dim=1, keepdim=True) / 65278 * wmax
        assert ((got - want).abs() <= bound * 1.001 + 1e-5).all(), kind


@pytest.mark.parametrize("m,n,k", [(9, 40, 300), (16, 16, 64), (40, 33, 700),
                                   (130, 70, 4200)])
def test_amx_tiles_equal_vnni_bit_for_bit(m, n, k):
    """AMX sums the same u8 x s8 products in int32 as VNNI, so both paths give identical
    floats, not merely close ones: int8 and float activations (two 8-bit halves a token: 9
    tokens are 18 rows, AMX's only there), on one thread and on two."""
    amx, vnni = _build("amx"), _build("avx512-vnni")
    w, scale, bias, x = _case(m, n, k, seed=7)
    x[3] *= 1e-3
    x[-1] = 0
    before = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            for kind, layout, w_sum, _, s in _weights(w, scale, amx.tile_rows):
                for mode in (0, 1):
                    want = vnni.linear(kind, x, layout, s, w_sum, bias, mode)
                    assert torch.equal(amx.linear(kind, x, layout, s, w_sum, bias, mode), want)
    finally:
        torch.set_num_threads(before)


@pytest.mark.parametrize("m,n,k,group", [(8, 16, 128, 64), (9, 40, 256, 128), (17, 33, 512, 256),
                                         (40, 70, 384, 128), (20, 24, 256, 32)])
@pytest.mark.parametrize("nibbles", [False, True])
def test_amx_grouped_equal_vnni_bit_for_bit(m, n, k, group, nibbles):
    """The grouped kernel on AMX (groups of whole 64-input blocks, 8 or more tokens) does the
    same operations in the same order as on VNNI: identical floats, NaN rows included; an odd
    number of 16-column tiles (n = 40: the last block holds one) and group 32 (not AMX's)
    too."""
    amx, vnni = _build("amx"), _build("avx512-vnni")
    g = torch.Generator().manual_seed(m + n + k)
    q, s = quantize_int8(torch.randn(n, k, generator=g), group_size=group)
    if nibbles:
        q = q.clamp(-8, 7)
    layout = native.grouped_layout(q, s)
    assert (layout[0].dtype == torch.uint8) == nibbles
    x, bias = torch.randn(m, k, generator=g), torch.randn(n, generator=g)
    x[0], x[2, 5] = 0, float("nan")
    got = amx.grouped_linear(x, layout[0], n, group, *layout[1:], bias)
    want = vnni.grouped_linear(x, layout[0], n, group, *layout[1:], bias)
    assert torch.isnan(got[2]).all()
    assert torch.equal(got.nan_to_num(0), want.nan_to_num(0))


@pytest.mark.parametrize("n,k", [(1, 1), (3, 63), (5, 64), (2, 65), (9, 300)])
def test_layouts_round_trip(n, k):
    w = torch.randint(-1, 2, (n, k), dtype=torch.int8)
    for nb in (1, 4):
        blocks = native.to_blocks(w, nb)
        assert blocks.shape == (-(-n // nb), -(-k // 64) * 16 * nb)
        assert blocks.dtype == torch.uint8
        assert torch.equal(native.from_blocks(blocks, n, k, nb), w)
    q = torch.randint(-127, 128, (n, k), dtype=torch.int8)
    for ternary, codes in ((True, w), (False, q)):
        form = cpu.PackedNative(codes, torch.rand(n), ternary)
        assert torch.equal(form.codes(), codes)


def test_threads_give_identical_results():
    w, scale, bias, x = _case(33, 70, 300)
    q, s = quantize_int8(torch.randn(70, 300))
    before = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2):
            torch.set_num_threads(t)
            outs.append((ternary_matmul(x, pack_ternary(w), scale, bias, backend="cpu"),
                         int8_matmul(x, q, s, bias, backend="cpu")))
    finally:
        torch.set_num_threads(before)
    assert all(torch.equal(a, b) for a, b in zip(*outs))


def test_strided_and_leading_dims():
    w, scale, bias, _ = _case(1, 24, 96)
    packed = pack_ternary(w)
    x = torch.randn(96, 5).t()  # non-contiguous [5, 96]
    for act in ("none", "dynamic"):
        got = ternary_matmul(x, packed, scale, bias, activations=act, backend="cpu")
        want = ternary_matmul(x.contiguous(), packed, scale, bias, activations=act, backend="cpu")
        assert torch.equal(got, want)
    x3 = torch.randn(2, 3, 96, dtype=torch.bfloat16)
    y3 = ternary_matmul(x3, packed, scale, backend="cpu")
    assert y3.shape == (2, 3, 24) and y3.dtype == torch.bfloat16


def test_cached_build_is_reused():
    path = native.build()
    mtime = path.stat().st_mtime_ns
    assert native.build() == path and path.stat().st_mtime_ns == mtime


def _run(env_extra):
    code = ("import torch\n"
            "from triton_dsl.kernels import native, cpu\n"
            "from triton_dsl.kernels.ops import ternary_matmul\n"
            "from triton_dsl.kernels.packing import pack_ternary\n"
            "p = pack_ternary(torch.randint(-1, 2, (8, 40), dtype=torch.int8))\n"
            "x, s = torch.randn(3, 40), torch.rand(8)\n"
            "y = ternary_matmul(x, p, s, activations='dynamic', backend='cpu')\n"
            "r = ternary_matmul(x, p, s, activations='dynamic', backend='ref')\n"
            "print(native.describe(), torch.equal(y, r))\n")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0, out.stderr
    return out.stdout.strip()


def test_falls_back_when_disabled_or_uncompilable(tmp_path):
    """Without the native kernel, ternary layers still run (fbgemm) and stay exact."""
    assert _run({"TRITON_DSL_CPU_NATIVE": "0"}) == \
        "unavailable: disabled by TRITON_DSL_CPU_NATIVE=0 True"
    # no compiler on PATH and an empty cache: the build fails, the op still works
    out = _run({"PATH": str(tmp_path), "CC": "", "TRITON_DSL_CACHE": str(tmp_path / "cache")})
    assert out.startswith("unavailable: no C compiler found") and out.endswith("True")
    # extra compiler flags reach the build: here the portable one, which never serves layers
    assert _run({"TRITON_DSL_CPU_FLAGS": "-mno-avx2 -mno-avx512f"}) == "native (scalar) True"


# few rows (AVX-512: vector partial sums), many rows; and K = MAX_K, the longest single span,
# with 20 rows (AMX's, where there is AMX)
@pytest.mark.parametrize("m,k", [(1, 70_000), (50, 70_000), (20, native.MAX_K)])
def test_k_past_the_int32_span_is_exact(lib, m, k):
    """K = 70000: u8 x s8 sums of 255 * 127 * K would overflow int32 (past K = 66311); the
    kernel sums spans of native.MAX_K inputs and adds them in int64. K = MAX_K: one span at
    its limit, with the largest products."""
    g = torch.Generator().manual_seed(5)
    x = 1 - torch.rand(m, k, generator=g) / 500  # codes of 127: the largest sums
    q = torch.full((5, k), 127, dtype=torch.int8)
    q[-1, ::3] = -127
    s = torch.rand(5, generator=g) + 0.5
    codes, xs = quantize_per_token(x)
    got = lib.linear(native.INT8, x, native.int8_rows(q, lib.tile_rows), s,
                     q.sum(dim=1, dtype=torch.int32), None, 0)
    assert torch.equal(got, int8_w8a8_matmul_ref(codes, xs, q, s))
    got = lib.linear(native.INT8, x, native.int8_rows(q, lib.tile_rows), s,
                     q.sum(dim=1, dtype=torch.int32), None, 1)
    bound = k * x.abs().amax(dim=1, keepdim=True) / 65278 * 127 * s.max()
    assert ((got - int8_weight_only_matmul_ref(x, q, s)).abs() <= bound * 1.001).all()
    w = torch.randint(-1, 2, (5, k), generator=g, dtype=torch.int8)
    got = lib.linear(native.TERNARY, x, native.to_blocks(w, lib.tile_rows), s, None, None, 0)
    assert torch.equal(got, ternary_a8_matmul_ref(codes, xs, pack_ternary(w), s))


@pytest.mark.parametrize("mode", [0, 1])
@pytest.mark.parametrize("m", [6, 40])  # 40: many rows (AMX where there is)
def test_nonfinite_tokens_give_nan_rows(lib, mode, m):
    """NaN and +-Inf in a token: its row is NaN (the max used to skip NaN, then NaN was rounded
    to an integer, undefined in C); the other rows are unchanged."""
    w, scale, bias, x = _case(m, 9, 200, seed=4)
    x[1, 7], x[2, 0], x[4, 199] = float("nan"), float("inf"), -float("inf")
    bad = torch.zeros(m, dtype=torch.bool)
    bad[[1, 2, 4]] = True
    for kind, layout, w_sum, _, s in _weights(w, scale, lib.tile_rows):
        got = lib.linear(kind, x, layout, s, w_sum, bias, mode)
        assert torch.isnan(got[bad]).all()
        assert torch.equal(got[~bad], lib.linear(kind, x[~bad], layout, s, w_sum, bias, mode))
    q, s = quantize_int8(torch.randn(9, 200), group_size=40)
    layout = native.grouped_layout(q, s)
    got = lib.grouped_linear(x, layout[0], 9, 40, *layout[1:], bias)
    assert torch.isnan(got[bad]).all()
    assert torch.equal(got[~bad], lib.grouped_linear(x[~bad], layout[0], 9, 40, *layout[1:],
                                                     bias))


def test_limits_are_enforced_not_assumed():
    lib = native.library()
    k = native.LIMIT_K + 1
    x = torch.zeros(1, 1).expand(1, k)  # refused before any memory is read
    with pytest.raises(ValueError, match=rf"K={k}"):
        lib.linear(native.INT8, x, torch.zeros(1, dtype=torch.int8), torch.ones(1),
                   torch.zeros(1, dtype=torch.int32), None, 0)
    w, s, sums = native.grouped_layout(*quantize_int8(torch.randn(4, 1024), group_size=512))
    with pytest.raises(ValueError, match="group=512"):
        lib.grouped_linear(torch.randn(1, 1024), w, 4, 512, s, sums, None)
    # K = 0: the bias, without calling the C code (which would allocate 0 bytes)
    y = lib.linear(native.INT8, torch.zeros(2, 0), torch.zeros(0, dtype=torch.int8),
                   torch.ones(3), torch.zeros(3, dtype=torch.int32), torch.arange(3.0), 0)
    assert torch.equal(y, torch.arange(3.0).expand(2, 3))


def test_wide_layers_stay_on_the_native_kernel():
    """Layers wider than one int32 span (MAX_K) keep the native kernel, which sums spans in
    int64 (test_k_past_the_int32_span_is_exact), and stay bit-exact; past LIMIT_K they fall
    back to PackedInt8."""
    k = native.MAX_K + 64
    assert cpu.native_fits(k) and not cpu.native_fits(native.LIMIT_K + 1)
    w, scale, _, x = _case(1, 3, k)
    got = ternary_matmul(x, pack_ternary(w), scale, activations="dynamic", backend="cpu")
    want = ternary_matmul(x, pack_ternary(w), scale, activations="dynamic", backend="ref")
    assert torch.equal(got, want)



GROUPED = [(1, 5, 32, 8), (3, 17, 64, 16), (17, 33, 256, 32), (64, 40, 512, 128),
           (2, 20, 512, 256), (5, 16, 96, 32)]


@pytest.mark.parametrize("bits", [8, 4], ids=["bytes", "nibbles"])
@pytest.mark.parametrize("m,n,k,group", GROUPED)
def test_grouped_within_16bit_tolerance_and_same_on_every_path(lib, m, n, k, group, bits):
    g = torch.Generator().manual_seed(3)
    q, s = quantize_int8(torch.randn(n, k, generator=g), group_size=group)
    if bits == 4:  # 4-bit codes: stored as nibbles
        q = torch.randint(-8, 8, (n, k), generator=g, dtype=torch.int8)
    x, bias = torch.randn(m, k, generator=g), torch.randn(n, generator=g)
    x[-1] *= 1e3
    w, scales, sums = native.grouped_layout(q, s)
    assert w.dtype == (torch.uint8 if bits == 4 else torch.int8)
    got = lib.grouped_linear(x, w, n, group, scales, sums, bias)
    want = int8_weight_only_matmul_ref(x, q, s, bias)
    bound = k * x.abs().amax(dim=1, keepdim=True) / 65278 * 127 * s.max()
    assert ((got - want).abs() <= bound * 1.001 + 1e-5).all()
    portable = native.Library(native.build(ISA_FLAGS["scalar"]))
    assert torch.equal(got, portable.grouped_linear(x, w, n, group, scales, sums, bias))


def test_grouped_layout_round_trips_and_odd_groups_fall_back():
    q, s = quantize_int8(torch.randn(21, 96), group_size=32)
    assert torch.equal(cpu.PackedGrouped(q, s).codes(), q)
    q4 = torch.randint(-8, 8, (21, 96), dtype=torch.int8)
    packed = cpu.PackedGrouped(q4, s)
    assert packed.weight.numel() == 32 * 96 // 2 and torch.equal(packed.codes(), q4)
    assert cpu.native_grouped(96, 12) and not cpu.native_grouped(40, 10)  # quads of 4 inputs
    assert not cpu.native_grouped(1024, 512)  # int32 group sums could overflow
    q, s = quantize_int8(torch.randn(7, 40), group_size=10)  # served dequantized, exactly
    x = torch.randn(3, 40)
    torch.testing.assert_close(int8_matmul(x, q, s, backend="cpu"),
                               int8_matmul(x, q, s, backend="ref"), atol=1e-5, rtol=1e-5)


def test_portable_build_never_serves_layers(monkeypatch):
    """The portable C build checks the layout in these tests; serving layers is for the SIMD
    builds (it would be slower than torch's GEMMs)."""
    portable = native.Library(native.build(ISA_FLAGS["scalar"]))
    monkeypatch.setattr(native, "library", lambda: portable)
    assert not cpu.native_fits(64) and not cpu.native_int8()


@pytest.mark.parametrize("n", [0, 1, 15, 16, 17, 4095, 4097, 70001])
@pytest.mark.parametrize("symmetric", [True, False])
def test_quantize_u8_matches_its_twin(lib, n, symmetric):
    """Static int8 activations (the int8 convolution's input), on every path and length
    (vector loop, tail, the threads' blocks): the twin is torch.round(x / s) + zp, clamped."""
    g = torch.Generator().manual_seed(n)
    scale, zp, lo, hi = (0.05, 128, 1, 255) if symmetric else (0.03, 7, 0, 255)
    x = torch.randn(n, generator=g) * 4
    if n > 8:
        x[:4] = torch.tensor([2.5, -2.5, 0.5, 1.5]) * scale  # halfway: to even
        x[4:8] = torch.tensor([1e30, -1e30, float("inf"), float("-inf")])
    want = torch.clamp(torch.round(x / scale) + zp, lo, hi).to(torch.uint8)
    got = lib.quantize_u8(x, scale, zp, lo, hi)
    assert torch.equal(got, want)
    if n:
        x[n // 2] = float("nan")
        assert lib.quantize_u8(x, scale, zp, lo, hi) is None

