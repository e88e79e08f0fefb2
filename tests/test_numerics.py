"""Awkward inputs on every path, against the reference twins: NaN and +-Inf activations, empty
tensors (M, N or K = 0), K past the int32 span, non-contiguous inputs.

The rules (kernels/ops.py): a row of x holding NaN or +-Inf gives a row of NaN on every path,
and every other row is exactly what it would be without that row; M = 0 gives [..., 0, N],
N = 0 gives [..., 0], K = 0 gives the bias (or zeros); int8 sums are exact for any K.

Paths: the twins ("ref"), the Triton kernels (under TRITON_INTERPRET=1), the CPU forms (native
kernel, torch's fbgemm / oneDNN GEMMs, and the fp32 fallback on a dequantized weight).
"""
import math

import pytest
import torch

from triton_dsl.kernels import cpu, cpu_paths, native, ops
from triton_dsl.kernels.common import HAS_TRITON, interpreting
from triton_dsl.kernels.int8_matmul import (int8_w8a8_matmul_ref, int8_w8a8_matmul_triton,
                                            int8_weight_only_matmul_ref)
from triton_dsl.kernels.packing import pack_ternary, quantize_int8
from triton_dsl.kernels.per_token import fake_quantize_per_token, quantize_per_token
from triton_dsl.kernels.ternary_matmul import (A8_MAX_K, ternary_a8_matmul_triton,
                                               ternary_matmul_ref)

BACKENDS = ["ref", "cpu"] + (["triton"] if HAS_TRITON and interpreting() else [])
ACTS = ["none", "dynamic"]
NAN, INF = float("nan"), float("inf")
# the interpreter's numpy warns when it multiplies the NaN and Inf of these tests
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


def _weights(n, k, seed=0):
    """(ternary_matmul, (packed, scale)) and (int8_matmul, (codes, scale)) for [N, K]."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randint(-1, 2, (n, k), generator=g, dtype=torch.int8)
    q, s = quantize_int8(torch.randn(n, k, generator=g)) if k else \
        (torch.zeros(n, 0, dtype=torch.int8), torch.ones(n))
    return [(ops.ternary_matmul, (pack_ternary(w), torch.rand(n, generator=g) + 0.5)),
            (ops.int8_matmul, (q, s))]


def _bad_x(m=6, k=70, seed=1):
    """x [m, k] whose rows 1, 2, 3 hold NaN, +Inf and -Inf; the others are finite."""
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(seed))
    x[1, 3], x[2, 0], x[3, k - 1] = NAN, INF, -INF
    return x, torch.tensor([False, True, True, True] + [False] * (m - 4))


def _check_nan_rows(got, bad, alone):
    """NaN exactly in the bad rows; the good rows bit-identical to the path's output on them
    alone."""
    assert torch.isnan(got[bad]).all()
    assert not torch.isnan(got[~bad]).any()
    assert torch.equal(got[~bad], alone)


# --- NaN and Inf --------------------------------------------------------------------------------

def test_quantize_per_token_gives_nonfinite_rows_a_nan_scale():
    x, bad = _bad_x()
    codes, scale = quantize_per_token(x)
    assert torch.isnan(scale[bad]).all() and (codes[bad] == 0).all()
    good_codes, good_scale = quantize_per_token(x[~bad])
    assert torch.equal(codes[~bad], good_codes) and torch.equal(scale[~bad], good_scale)
    assert torch.isnan(fake_quantize_per_token(x)[bad]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ACTS)
def test_nonfinite_rows_give_nan_rows(backend, act):
    x, bad = _bad_x()
    bias = torch.randn(24)
    for fn, args in _weights(24, 70):
        got = fn(x, *args, bias, activations=act, backend=backend)
        _check_nan_rows(got, bad, fn(x[~bad], *args, bias, activations=act, backend=backend))
        want = fn(x[~bad], *args, bias, activations=act, backend="ref")
        torch.testing.assert_close(got[~bad], want, atol=1e-3, rtol=1e-4)


@pytest.mark.skipif(not (HAS_TRITON and interpreting()), reason="needs TRITON_INTERPRET=1")
@pytest.mark.parametrize("split_k", [1, 2])
def test_triton_float_kernels_give_nan_rows_with_any_k_split(split_k):
    """Each K split adds its own sum(x * 0) per row; the atomic adds keep the NaN."""
    from triton_dsl.kernels.int8_matmul import int8_weight_only_matmul_triton
    from triton_dsl.kernels.ternary_matmul import ternary_matmul_triton
    x, bad = _bad_x(k=128)
    config = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=32, SPLIT_K=split_k)
    (_, (packed, scale)), (_, (q, s)) = _weights(24, 128)
    qg, sg = quantize_int8(torch.randn(24, 128), group_size=64)
    for run, args in ((ternary_matmul_triton, (packed, scale)),
                      (int8_weight_only_matmul_triton, (q, s)),
                      (int8_weight_only_matmul_triton, (qg, sg))):
        got = run(x, *args, config=config)
        assert torch.isnan(got[bad]).all()
        torch.testing.assert_close(got[~bad], run(x[~bad], *args, config=config), atol=1e-4,
                                   rtol=1e-5)  # split-K partials are added in either order


def test_float_twins_make_the_whole_row_nan_not_inf():
    """A float matmul would give +-Inf in some columns of an Inf row; the rule is NaN."""
    x = torch.randn(2, 40)
    x[0, 5] = INF
    (_, (packed, scale)), (_, (q, s)) = _weights(8, 40)
    for y in (ternary_matmul_ref(x, packed, scale), int8_weight_only_matmul_ref(x, q, s)):
        assert torch.isnan(y[0]).all() and torch.isfinite(y[1]).all()


@pytest.mark.parametrize("engine", ["fbgemm", "onednn"])
def test_fbgemm_and_onednn_forms_give_nan_rows(engine, monkeypatch):
    monkeypatch.setenv("TRITON_DSL_CPU_ENGINE", engine)
    if cpu.engine() != engine:
        pytest.skip(f"this torch has no {engine} int8 GEMM")
    x, bad = _bad_x()
    for codes in (torch.randint(-1, 2, (24, 70), dtype=torch.int8),
                  quantize_int8(torch.randn(24, 70))[0]):
        form = cpu.PackedInt8(codes, torch.rand(24) + 0.5)
        for run in (form.dynamic_matmul, form.float_matmul):
            _check_nan_rows(run(x), bad, run(x[~bad]))


def test_native_forms_give_nan_rows():
    if native.library() is None:
        pytest.skip(f"the native CPU kernel is unavailable: {native.error()}")
    x, bad = _bad_x(k=128)
    for ternary in (True, False):
        codes = torch.randint(-1 if ternary else -127, 2 if ternary else 128, (24, 128),
                              dtype=torch.int8)
        form = cpu.PackedNative(codes, torch.rand(24) + 0.5, ternary)
        for run in (form.dynamic_matmul, form.float_matmul):
            _check_nan_rows(run(x), bad, run(x[~bad]))
    q, s = quantize_int8(torch.randn(24, 128), group_size=32)
    form = cpu.PackedGrouped(q, s)
    _check_nan_rows(form.float_matmul(x), bad, form.float_matmul(x[~bad]))


def test_dequantized_fallback_gives_nan_rows(monkeypatch):
    monkeypatch.setattr(cpu_paths, "choose", lambda *a, **k: None)
    x, bad = _bad_x()
    for fn, args in _weights(24, 70):
        for act in ACTS:
            got = fn(x, *args, activations=act, backend="cpu")
            _check_nan_rows(got, bad, fn(x[~bad], *args, activations=act, backend="cpu"))


# --- empty tensors ------------------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ACTS)
@pytest.mark.parametrize("lead,n,k", [((0,), 4, 70), ((2, 0), 4, 70), ((3,), 0, 70),
                                      ((3,), 4, 0), ((2, 3), 4, 0)])
def test_empty_inputs(backend, act, lead, n, k):
    x = torch.randn(*lead, k)
    bias = torch.randn(n)
    for fn, args in _weights(n, k):
        for b in (bias, None):
            got = fn(x, *args, b, activations=act, backend=backend)
            assert got.shape == (*lead, n) and got.dtype == x.dtype
            want = torch.zeros(*lead, n) + (0 if b is None else b)  # K = 0: the bias
            assert torch.equal(got, want)


def test_cpu_forms_take_an_empty_batch():
    """Frozen layers call ops.cpu_matmul on a prepacked form: an empty batch must pass."""
    q, s = quantize_int8(torch.randn(8, 64))
    forms = [cpu.PackedInt8(q, s)]
    if native.library() is not None:
        forms += [cpu.PackedNative(q, s, False), cpu.PackedGrouped(*quantize_int8(
            torch.randn(8, 64), group_size=32))]
    for form in forms:
        for act in ACTS if not isinstance(form, cpu.PackedGrouped) else ["none"]:
            y = ops.cpu_matmul(form, torch.randn(2, 0, 64), torch.ones(8), act)
            assert y.shape == (2, 0, 8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("width", [0, 3])
def test_bad_grouped_scale_width_is_a_value_error(backend, width):
    q = torch.zeros(4, 64, dtype=torch.int8)
    with pytest.raises(ValueError, match=rf"grouped scale .* got \(4, {width}\)"):
        ops.int8_matmul(torch.randn(2, 64), q, torch.ones(4, width), backend=backend)


# --- K past the int32 span ----------------------------------------------------------------------

WIDE_K = 140_000  # int8 x int8 sums of 127 * 127 * K overflow int32 past K = 133144


def _extreme(m, n, k, seed=0):
    """The worst case for int32 sums: activations and weights at full scale, mostly one sign."""
    g = torch.Generator().manual_seed(seed)
    x = 1 - torch.rand(m, k, generator=g) / 500  # per-token codes of 127, the odd 126
    q = torch.full((n, k), 127, dtype=torch.int8)
    q[-1, ::7] = -127  # one row that is not constant
    return x, q, torch.rand(n, generator=g) + 0.5


@pytest.mark.parametrize("engine", ["fbgemm", "onednn"])
def test_int8_gemm_forms_are_exact_past_the_int32_span(engine, monkeypatch):
    monkeypatch.setenv("TRITON_DSL_CPU_ENGINE", engine)
    if cpu.engine() != engine:
        pytest.skip(f"this torch has no {engine} int8 GEMM")
    x, q, s = _extreme(2, 3, WIDE_K)
    form = cpu.PackedInt8(q, s)
    assert form.wide and torch.equal(form.codes(), q)
    codes, xs = quantize_per_token(x)
    assert torch.equal(form.dynamic_matmul(x), int8_w8a8_matmul_ref(codes, xs, q, s))
    want = int8_weight_only_matmul_ref(x, q, s)
    bound = WIDE_K * x.abs().amax(dim=1, keepdim=True) / 65534 * 127 * s.max()
    assert ((form.float_matmul(x) - want).abs() <= bound * 1.001).all()


@pytest.mark.parametrize("act", ACTS)
def test_cpu_ops_are_exact_past_the_int32_span(act):
    """Whatever form ops picks for a layer this wide (fbgemm here: native.MAX_K bounds the native
    kernel's layers), int8 sums must not wrap."""
    x, q, s = _extreme(2, 3, WIDE_K)
    got = ops.int8_matmul(x, q, s, activations=act, backend="cpu")
    want = ops.int8_matmul(x, q, s, activations=act, backend="ref")
    if act == "dynamic":
        assert torch.equal(got, want)
    else:
        torch.testing.assert_close(got, want, rtol=1e-4, atol=0)


@pytest.mark.skipif(not (HAS_TRITON and interpreting()), reason="needs TRITON_INTERPRET=1")
def test_triton_w8a8_is_exact_past_the_int32_span():
    """One row, two columns, a K of 140000 (three spans): about 2 s in the interpreter."""
    x, q, s = _extreme(1, 2, WIDE_K)
    codes, xs = quantize_per_token(x)
    config = dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=256, SPLIT_K=1)
    got = int8_w8a8_matmul_triton(codes, xs, q, s, config=config)
    assert torch.equal(got, int8_w8a8_matmul_ref(codes, xs, q, s))


def test_ternary_a8_triton_refuses_k_past_its_int32_bound():
    k = A8_MAX_K + 1
    packed = torch.zeros(1, math.ceil(k / 4), dtype=torch.uint8)
    codes = torch.zeros(1, dtype=torch.int8).expand(1, k)  # no memory: refused before use
    with pytest.raises(ValueError, match=rf"K={k}"):
        ternary_a8_matmul_triton(codes, torch.ones(1), packed, torch.ones(1))


# --- non-contiguous inputs ----------------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("act", ACTS)
def test_non_contiguous_inputs_match_contiguous_ones(backend, act):
    x, bad = _bad_x(m=6, k=70)
    xt = x.t().contiguous().t()  # same values, column-major
    xs = torch.randn(6, 140)[:, ::2]  # every other column
    xs[bad] = x[bad]
    assert not xt.is_contiguous() and not xs.is_contiguous()
    for fn, args in _weights(24, 70):
        for v in (xt, xs):
            got = fn(v, *args, activations=act, backend=backend)
            want = fn(v.contiguous(), *args, activations=act, backend=backend)
            assert torch.equal(got[~bad], want[~bad]) and torch.isnan(got[bad]).all()


@pytest.mark.parametrize("paths", ["cpu", "triton-interpreter"])
@pytest.mark.parametrize("example", ["mnist_ternary", "mnist_int8", "mixed_precision",
                                     "resnet_ternary"])
def test_frozen_models_take_an_empty_batch(example, paths, monkeypatch):
    """The unfrozen model handles a batch of 0; the frozen one must too, on either path."""
    import os

    import triton_dsl
    from triton_dsl import runtime as rt
    if paths == "cpu":
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    elif not (HAS_TRITON and interpreting()):
        pytest.skip("needs TRITON_INTERPRET=1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    net = triton_dsl.load(os.path.join(root, "examples", example + ".tdsl"))().eval()
    x = torch.randn(0, *net.input_shape)
    with torch.no_grad():
        want = net(x)
        got = rt.freeze(net)(x)
    assert got.shape == want.shape == (0, 10)
