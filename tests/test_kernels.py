"""Every kernel against its reference twin on awkward shapes, under the Triton interpreter
(TRITON_INTERPRET=1, set by scripts/test.sh) or on a GPU; and the CPU paths against the twins.

Tolerances, (dtype, atol, rtol): the twins accumulate in fp32 in a different order than the
kernels' K tiles, so fp32 differs by accumulated rounding (~1e-6 relative per add); fp16 and bf16
outputs differ by at most one rounding of the output. Integer accumulators (int8 activations)
with SPLIT_K=1 are compared exactly.
"""
import os

import pytest
import torch

from triton_dsl.kernels import cpu, cpu_paths
from triton_dsl.kernels.common import HAS_TRITON, interpreting
from triton_dsl.kernels.int8_matmul import (int8_w8a8_matmul_ref, int8_w8a8_matmul_triton,
                                            int8_weight_only_matmul_ref,
                                            int8_weight_only_matmul_triton)
from triton_dsl.kernels.ops import int8_matmul, ternary_matmul
from triton_dsl.kernels.packing import pack_ternary, quantize_int8
from triton_dsl.kernels.ternary_matmul import (ternary_a8_matmul_ref, ternary_a8_matmul_triton,
                                               ternary_matmul_ref, ternary_matmul_triton)

SHAPES = [(1, 33, 70), (3, 50, 127), (17, 64, 255), (64, 40, 96)]  # N, K off every block size
TOL = [(torch.float32, 1e-4, 1e-5), (torch.float16, 2e-2, 2e-3), (torch.bfloat16, 1.5e-1, 8e-3)]
CONFIGS = [dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=32, SPLIT_K=1),
           dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, SPLIT_K=2)]
A8_CONFIGS = [dict(c, BLOCK_K=64) for c in CONFIGS]

triton_device = "cuda" if torch.cuda.is_available() else "cpu"
needs_triton = pytest.mark.skipif(
    not HAS_TRITON or (triton_device == "cpu" and not interpreting()),
    reason="needs triton with a GPU, or TRITON_INTERPRET=1 (scripts/test.sh sets it)")


def _ternary(n, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
    return pack_ternary(w).to(triton_device), (torch.rand(n, generator=g) + 0.5).to(triton_device)


@needs_triton
@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("dtype,atol,rtol", TOL, ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("config", CONFIGS, ids=["splitk1", "splitk2"])
def test_ternary_float(m, n, k, dtype, atol, rtol, config):
    packed, scale = _ternary(n, k)
    x = torch.randn(m, k, device=triton_device).to(dtype)
    bias = torch.randn(n, device=triton_device)
    got = ternary_matmul_triton(x, packed, scale, bias, config=config)
    want = ternary_matmul_ref(x, packed, scale, bias)
    assert got.dtype == dtype
    torch.testing.assert_close(got.float(), want.float(), atol=atol, rtol=rtol)
    # per-tensor scale, no bias
    got = ternary_matmul_triton(x, packed, scale[:1], None, config=config)
    torch.testing.assert_close(got.float(), ternary_matmul_ref(x, packed, scale[:1]).float(),
                               atol=atol, rtol=rtol)


@needs_triton
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_ternary_a8_exact(m, n, k):
    packed, scale = _ternary(n, k)
    codes = torch.randint(-127, 128, (m, k), dtype=torch.int8, device=triton_device)
    xs = torch.rand(m, device=triton_device)
    bias = torch.randn(n, device=triton_device)
    want = ternary_a8_matmul_ref(codes, xs, packed, scale, bias)
    assert torch.equal(ternary_a8_matmul_triton(codes, xs, packed, scale, bias,
                                                config=A8_CONFIGS[0]), want)
    torch.testing.assert_close(ternary_a8_matmul_triton(codes, xs, packed, scale, bias,
                                                        config=A8_CONFIGS[1]),
                               want, atol=1e-3, rtol=1e-5)  # split-K: partials rounded apart


@needs_triton
@pytest.mark.parametrize("m,n,k", SHAPES)
@pytest.mark.parametrize("dtype,atol,rtol", TOL, ids=lambda v: str(v).replace("torch.", ""))
def test_int8_weight_only(m, n, k, dtype, atol, rtol):
    q, s = quantize_int8(torch.randn(n, k))
    q, s = q.to(triton_device), s.to(triton_device)
    x = torch.randn(m, k, device=triton_device).to(dtype)
    got = int8_weight_only_matmul_triton(x, q, s, None, config=CONFIGS[0])
    torch.testing.assert_close(got.float(), int8_weight_only_matmul_ref(x, q, s).float(),
                               atol=atol, rtol=rtol)


@needs_triton
def test_int8_weight_only_grouped():
    q, s = quantize_int8(torch.randn(40, 256), group_size=64)
    x = torch.randn(17, 256)
    q, s, x = q.to(triton_device), s.to(triton_device), x.to(triton_device)
    torch.testing.assert_close(int8_weight_only_matmul_triton(x, q, s),
                               int8_weight_only_matmul_ref(x, q, s), atol=1e-4, rtol=1e-5)


@needs_triton
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_w8a8_exact(m, n, k):
    q, s = quantize_int8(torch.randn(n, k))
    q, s = q.to(triton_device), s.to(triton_device)
    codes = torch.randint(-127, 128, (m, k), dtype=torch.int8, device=triton_device)
    xs = torch.rand(m, device=triton_device)
    bias = torch.randn(n, device=triton_device)
    assert torch.equal(int8_w8a8_matmul_triton(codes, xs, q, s, bias, config=A8_CONFIGS[0]),
                       int8_w8a8_matmul_ref(codes, xs, q, s, bias))


@needs_triton
def test_autotuned_dispatch_and_noncontiguous():
    packed, scale = _ternary(48, 96)
    x = torch.randn(96, 5, device=triton_device).t()  # non-contiguous [5, 96]
    torch.testing.assert_close(ternary_matmul(x, packed, scale, backend="triton"),
                               ternary_matmul_ref(x, packed, scale), atol=1e-4, rtol=1e-5)
    x3 = torch.randn(2, 3, 96, device=triton_device)  # leading dims
    assert ternary_matmul(x3, packed, scale, backend="triton").shape == (2, 3, 48)


# --- CPU paths ---------------------------------------------------------------------------------

cpu_exact = pytest.mark.skipif(not cpu.fbgemm_exact(), reason="fbgemm without VNNI: CPU paths "
                               "fall back to the reference")


@pytest.fixture(params=["onednn", "fbgemm"])
def cpu_engine(request, monkeypatch):
    monkeypatch.setenv("TRITON_DSL_CPU_ENGINE", request.param)
    if cpu.engine() != request.param:
        pytest.skip(f"this torch has no {request.param} int8 GEMM")
    return request.param


@pytest.mark.parametrize("m,n,k", SHAPES + [(5, 7, 1)])
def test_cpu_int8_activation_paths_are_bit_exact(m, n, k, cpu_engine):
    packed, scale = (t.cpu() for t in _ternary(n, k))
    q, s = quantize_int8(torch.randn(n, k))
    x, bias = torch.randn(m, k), torch.randn(n)
    for fn, args in ((ternary_matmul, (packed, scale)), (int8_matmul, (q, s))):
        got = fn(x, *args, bias, activations="dynamic", backend="cpu")
        assert torch.equal(got, fn(x, *args, bias, activations="dynamic", backend="ref"))


@cpu_exact
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_cpu_float_paths_within_16bit_tolerance(m, n, k, cpu_engine):
    packed, scale = (t.cpu() for t in _ternary(n, k))
    q, s = quantize_int8(torch.randn(n, k))
    x = torch.randn(m, k)
    for fn, args in ((ternary_matmul, (packed, scale)), (int8_matmul, (q, s))):
        got, want = fn(x, *args, backend="cpu"), fn(x, *args, backend="ref")
        # the 16-bit split errs by at most step/2 per input, step = max|x_row| / 32767
        bound = k * x.abs().amax() / 65534 * 127 * s.max() if fn is int8_matmul \
            else k * x.abs().amax() / 65278 * scale.max()  # the native kernel's step
        assert (got - want).abs().max() <= bound + 1e-4


def test_cpu_fallback_without_vnni(monkeypatch):
    """Where fbgemm could saturate (and the native kernel is off), int8 weights use a cached
    dequantized weight, with int8 activations fake-quantized: equal to the twins up to fp32
    rounding. Ternary codes cannot saturate fbgemm's pair sums and keep it."""
    monkeypatch.setattr(cpu, "fbgemm_exact", lambda: False)
    monkeypatch.setattr(cpu, "native_fits", lambda k: False)
    q, s = quantize_int8(torch.randn(24, 70))
    x, bias = torch.randn(3, 70), torch.randn(24)
    for act in ("none", "dynamic"):
        torch.testing.assert_close(int8_matmul(x, q, s, bias, activations=act, backend="cpu"),
                                   int8_matmul(x, q, s, bias, activations=act, backend="ref"),
                                   atol=1e-5, rtol=1e-5)
        assert cpu_paths.choose(cpu_paths.WeightSpec(24, 70, ternary=False), act) is None
        assert cpu_paths.choose(cpu_paths.WeightSpec(24, 70, ternary=True), act).name == "int8-gemm"


def test_cpu_codes_read_back_from_either_engine(cpu_engine):
    q, s = quantize_int8(torch.randn(12, 40))
    assert torch.equal(cpu.PackedInt8(q, s).codes(), q)


def test_cpu_cache_follows_in_place_edits():
    q, s = quantize_int8(torch.randn(8, 16))
    x = torch.randn(2, 16)
    a = int8_matmul(x, q, s, activations="dynamic", backend="cpu")
    q.mul_(-1)
    b = int8_matmul(x, q, s, activations="dynamic", backend="cpu")
    assert torch.equal(a, -b)


def test_bad_arguments_name_the_argument():
    packed, scale = (t.cpu() for t in _ternary(8, 16))
    with pytest.raises(ValueError, match=r"x of shape \(2, 11\) has K=11"):
        ternary_matmul(torch.randn(2, 11), packed, scale, backend="ref")
    with pytest.raises(ValueError, match=r"scale must have shape \[8\] or \[1\], got \(3,\)"):
        ternary_matmul(torch.randn(2, 16), packed, torch.ones(3), backend="ref")
    with pytest.raises(ValueError, match=r"x must be fp16, bf16 or fp32, got torch.int32"):
        ternary_matmul(torch.ones(2, 16, dtype=torch.int32), packed, scale)
    with pytest.raises(ValueError, match=r"bias must have shape \[8\]"):
        int8_matmul(torch.randn(2, 16), torch.zeros(8, 16, dtype=torch.int8), torch.ones(8),
                    torch.ones(4), backend="ref")
    with pytest.raises(ValueError, match="packed must be 2-d uint8"):
        ternary_matmul(torch.randn(2, 16), packed.to(torch.int8), scale, backend="ref")
    with pytest.raises(ValueError, match="activations must be none or dynamic"):
        ternary_matmul(torch.randn(2, 16), packed, scale, activations="static")


@pytest.mark.requires_gpu
def test_gpu_autotuned_large_shapes():
    packed, scale = _ternary(1024, 4096)
    for m in (1, 16, 256):
        x = torch.randn(m, 4096, device="cuda", dtype=torch.float16)
        torch.testing.assert_close(ternary_matmul(x, packed, scale),
                                   ternary_matmul_ref(x, packed, scale), atol=0.25, rtol=1e-2)


def test_everything_works_without_triton(tmp_path):
    """With triton absent (its import fails), the package imports, kernels fall back to the CPU
    paths, and a frozen model runs."""
    code = """
import sys
sys.modules["triton"] = None  # makes `import triton` raise ImportError
import torch, triton_dsl
from triton_dsl import runtime as rt
from triton_dsl.kernels.common import HAS_TRITON
assert not HAS_TRITON
net = triton_dsl.load(sys.argv[1])().eval()
x = torch.randn(3, *net.input_shape)
with torch.no_grad():
    want = net(x)
    got = rt.freeze(net)(x)
assert torch.allclose(got, want, atol=1e-3), (got - want).abs().max()
print("ok")
"""
    import subprocess
    import sys
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    path = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples",
                        "mnist_ternary.tdsl")
    r = subprocess.run([sys.executable, "-c", code, path], capture_output=True, text=True,
                       env=env, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr[-2000:]
