"""Packing round-trips exactly for any shape (property-based), and the quantizers' invariants."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from triton_dsl.kernels.packing import (abs_packed, dequantize_int8, pack_bits, pack_ternary,
                                        packed_cols, quantize_int8, unpack_bits, unpack_ternary)
from triton_dsl.runtime import quant as Q

dims = st.integers(min_value=1, max_value=70)


@settings(max_examples=60, deadline=None)
@given(n=dims, k=dims, seed=st.integers(0, 2 ** 16))
def test_ternary_pack_round_trip(n, k, seed):
    w = torch.randint(-1, 2, (n, k), generator=torch.Generator().manual_seed(seed),
                      dtype=torch.int8)
    p = pack_ternary(w)
    assert p.dtype == torch.uint8 and p.shape == (n, packed_cols(k))
    assert torch.equal(unpack_ternary(p, k), w)


@settings(max_examples=60, deadline=None)
@given(n=dims, k=dims, bits=st.integers(1, 9), seed=st.integers(0, 2 ** 16))
def test_bit_stream_round_trip(n, k, bits, seed):
    v = torch.randint(0, 1 << bits, (n, k), generator=torch.Generator().manual_seed(seed))
    p = pack_bits(v, bits)
    assert p.shape == (n, -(-k * bits // 8))  # exactly the bytes summary counts
    assert torch.equal(unpack_bits(p, bits, k), v)


@settings(max_examples=30, deadline=None)
@given(n=dims, k=dims, seed=st.integers(0, 2 ** 16))
def test_abs_of_packed_ternary(n, k, seed):
    w = torch.randint(-1, 2, (n, k), generator=torch.Generator().manual_seed(seed),
                      dtype=torch.int8)
    assert torch.equal(unpack_ternary(abs_packed(pack_ternary(w)), k), w.abs())


@settings(max_examples=40, deadline=None)
@given(n=dims, groups=st.integers(1, 4), g=st.sampled_from([8, 16, 32]), seed=st.integers(0, 999))
def test_int8_quantize_within_half_step(n, groups, g, seed):
    w = torch.randn(n, groups * g, generator=torch.Generator().manual_seed(seed)) * 3
    for gs in (None, g):
        q, s = quantize_int8(w, gs)
        assert q.dtype == torch.int8 and q.abs().max() <= 127
        err = (dequantize_int8(q, s) - w).abs()
        step = s.repeat_interleave(g, dim=1) if gs else s[:, None]
        assert (err <= step / 2 + 1e-6).all()


@settings(max_examples=40, deadline=None)
@given(bits=st.integers(2, 8), sym=st.booleans(), seed=st.integers(0, 999),
       scale=st.sampled_from([0.0, 1e-6, 1.0, 1e4]))
def test_uniform_quantize_invariants(bits, sym, seed, scale):
    x = torch.randn(6, 10, generator=torch.Generator().manual_seed(seed)) * scale
    r = Q.uniform_quantize(x, bits, sym, "per_channel")
    assert torch.isfinite(r.dequantized).all()
    lo, hi = (-(2 ** (bits - 1) - 1), 2 ** (bits - 1) - 1) if sym else (0, 2 ** bits - 1)
    assert r.codes.min() >= lo and r.codes.max() <= hi
    assert (x - r.dequantized).abs().max() <= r.scale.max() / 2 * 1.0001 + 1e-12
    again = Q.uniform_quantize(r.dequantized, bits, sym, "per_channel")
    assert torch.allclose(again.dequantized, r.dequantized, atol=1e-5 * (scale + 1))
