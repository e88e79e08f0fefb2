"""The AMX convolution of float activations at 16-bit fixed point (kernels/cpu_conv_amx.c,
kernels/cpu_int16_conv.py): bit for bit its PyTorch twin on awkward shapes and layouts, within
half a step of the exact convolution, NaN and +-Inf handed back to the fp32 path; and frozen
models that run it give the unfrozen model's outputs."""
import copy
import os

import pytest
import torch
import torch.nn.functional as F

import triton_dsl
from triton_dsl import runtime as rt
from triton_dsl.kernels import cpu_int16_conv as c16
from triton_dsl.kernels import native
from triton_dsl.runtime import frozen_conv, tuning

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def _amx():
    lib = native.library()
    if lib is None or not lib.amx:
        pytest.skip("no native library with AMX tiles here")
    return lib


def _pair(v):
    return v if isinstance(v, tuple) else (v, v)


# (batch, C, O, H, W, kernel, stride, padding, dilation): channels off 4 and 16 (the padded
# channels, one and two blocks of output channels, a pair and a lone block), rows off the
# 16-pixel tile, non-square kernels and strides, dilation (a run per tap), an empty batch, and
# K near the int32 bound (int8 codes there take the int64 epilogue)
SHAPES = [(2, 16, 16, 10, 10, (3, 3), 1, 1, 1), (2, 3, 17, 9, 7, (3, 3), 2, 1, 1),
          (1, 1, 1, 5, 5, (1, 1), 1, 0, 1), (3, 5, 33, 11, 13, (2, 3), (2, 1), (0, 2), 1),
          (1, 8, 20, 12, 12, (3, 3), 1, 2, 2), (2, 64, 64, 8, 8, (3, 3), 1, 1, 1),
          (1, 40, 48, 7, 19, (3, 3), 1, 1, 1), (0, 4, 16, 6, 6, (3, 3), 1, 1, 1),
          (1, 7000, 5, 3, 3, (3, 3), 1, 1, 1)]


@pytest.mark.parametrize("ternary", [True, False], ids=["ternary", "int8"])
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_int16_conv_matches_its_twin_bit_for_bit(shape, ternary):
    lib = _amx()
    b, c, o, h, w, k, stride, padding, dilation = shape
    g = torch.Generator().manual_seed(c * o + ternary)
    low, high = (-1, 2) if ternary else (-127, 128)
    codes = torch.randint(low, high, (o, c, *k), generator=g, dtype=torch.int8)
    w_scale = torch.rand(o, generator=g) * 0.1 - 0.02  # some negative: a folded batchnorm's
    bias = torch.randn(o, generator=g) if o > 1 else None
    geo = (_pair(stride), _pair(padding), _pair(dilation))
    conv = c16.Int16Conv(codes, w_scale, bias, *geo, lib=lib)
    x = torch.randn(b, c, h, w, generator=g) * 3
    if b:
        x[0, :, 0, :2] = 0.0
        x[-1] *= 1e-3  # another image, another scale
    for layout in (x, x.contiguous(memory_format=torch.channels_last), x[:, :, :, 1:]):
        for relu in (False, True):
            want = c16.int16_conv_reference(layout, codes, w_scale, bias, *geo, relu)
            got = conv(layout, relu)
            assert got.shape == want.shape and got.is_contiguous(
                memory_format=torch.channels_last)
            assert torch.equal(got, want), (relu, (got - want).abs().max())


def test_int16_conv_errs_by_at_most_half_a_step_of_each_image():
    """Against the exact convolution in float64: each input is off by at most t / 2 with
    t = max|x of its image| / 32767, so an output by at most sum |w| t / 2 (plus fp32
    rounding); an image with a thousand times smaller values keeps its own accuracy."""
    lib = _amx()
    g = torch.Generator().manual_seed(0)
    codes = torch.randint(-1, 2, (32, 16, 3, 3), generator=g, dtype=torch.int8)
    w_scale, bias = torch.rand(32, generator=g) + 0.5, torch.randn(32, generator=g)
    x = torch.randn(3, 16, 12, 12, generator=g)
    x[1] *= 1e-3
    conv = c16.Int16Conv(codes, w_scale, bias, (1, 1), (1, 1), (1, 1), lib=lib)
    exact = F.conv2d(x.double(), codes.double() * w_scale.double()[:, None, None, None],
                     bias.double(), 1, 1)
    got = conv(x).double()
    for n in range(3):
        t = x[n].abs().max().double() / 32767
        bound = (codes.abs().sum(dim=(1, 2, 3)).double() * w_scale.double()).max() * t / 2
        err = (got[n] - exact[n]).abs().max()
        assert err <= bound + 1e-6 * exact[n].abs().max(), (n, err, bound)


def test_int16_conv_hands_nan_and_inf_back_and_zero_images_give_the_bias():
    lib = _amx()
    codes = torch.ones(16, 4, 3, 3, dtype=torch.int8)
    bias = torch.arange(16.0)
    conv = c16.Int16Conv(codes, torch.ones(16), bias, (1, 1), (1, 1), (1, 1), lib=lib)
    for bad in (float("nan"), float("inf"), float("-inf")):
        for layout in ("nchw", "channels_last"):
            x = torch.randn(3, 4, 5, 5)
            x[2, 3, 4, 4] = bad
            if layout == "channels_last":
                x = x.contiguous(memory_format=torch.channels_last)
            assert conv(x) is None and c16.int16_conv_reference(
                x, codes, torch.ones(16), bias, 1, 1, 1) is None
    x = torch.zeros(3, 4, 5, 5)
    x[1] = 2.0 ** -110  # below 2^-100: counts as zero (32767 / max|x| would overflow)
    x[2] = 1.0
    y = conv(x)
    assert torch.equal(y[:2], bias.reshape(1, 16, 1, 1).expand(2, 16, 5, 5))
    assert torch.equal(y, c16.int16_conv_reference(x, codes, torch.ones(16), bias, 1, 1, 1))
    assert y[2, 0, 2, 2] == 36.0 and y[2, 0, 0, 0] == 16.0  # 4 channels x 9 taps, 4 x 4 taps


def test_int16_conv_sums_int8_codes_of_minus_128_past_the_int32_narrow_bound():
    """max|code| decides whether the hi/lo sums recombine in int32: -128, which has no int8
    absolute value, counts as 128 (taken as 5 here, the sums had wrapped: 57481 for -73595)."""
    lib = _amx()
    codes = torch.full((16, 64, 3, 3), -128, dtype=torch.int8)
    codes[0, 0, 0, 0] = 5
    conv = c16.Int16Conv(codes, torch.ones(16), None, (1, 1), (0, 0), (1, 1), lib=lib)
    x = torch.ones(1, 64, 3, 3)
    want = c16.int16_conv_reference(x, codes, torch.ones(16), None, 1, 0, 1)
    assert torch.equal(conv(x), want) and want[0, 0, 0, 0] == -73595.0


def test_int16_conv_refuses_bad_inputs():
    lib = _amx()
    codes = torch.zeros(4, 3, 3, 3, dtype=torch.int8)
    conv = c16.Int16Conv(codes, torch.ones(4), None, (1, 1), (0, 0), (1, 1), lib=lib)
    with pytest.raises(ValueError, match=r"x must be floats \[batch, 3, height, width\].*"
                                         r"\(2, 4, 5, 5\)"):
        conv(torch.zeros(2, 4, 5, 5))
    with pytest.raises(ValueError, match="smaller than the kernel"):
        conv(torch.zeros(1, 3, 2, 2))
    with pytest.raises(ValueError, match="C\\*kh\\*kw <= 65536"):
        c16.Int16Conv(torch.zeros(1, 8000, 3, 3, dtype=torch.int8), torch.ones(1), None,
                      (1, 1), (1, 1), (1, 1))


def test_a_library_without_amx_neither_offers_nor_runs_the_int16_way():
    if native.library() is None:
        pytest.skip("the native CPU kernel is unavailable")
    codes = torch.zeros(4, 3, 3, 3, dtype=torch.int8)
    try:
        plain = native.Library(native.build(("-mno-amx-int8", "-mno-amx-tile")))
    except native.BuildError as e:  # a compiler without these flags (not x86)
        pytest.skip(f"no build without AMX here: {e}")
    assert not c16.Int16Conv.applies((4, 3, 3, 3), (1, 1), (0, 0), (1, 1), plain)
    other = c16.Int16Conv(codes, torch.ones(4), None, (1, 1), (0, 0), (1, 1), lib=plain)
    with pytest.raises(RuntimeError, match="cannot run AMX tiles"):
        other(torch.zeros(1, 3, 4, 4))


@pytest.fixture
def int16_way(monkeypatch):
    """Frozen convolutions take the int16 way wherever it is a candidate (measuring switched
    on, the choice forced); the linear layers' own choices go to the stored form."""
    _amx()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(tuning, "enabled", lambda: True)
    monkeypatch.setattr(tuning, "choose", lambda key, ways: "int16" if "int16" in ways else
                        "prepacked" if "prepacked" in ways else next(iter(ways)))


def _ways(model):
    return [v for m in model.modules() if isinstance(m, frozen_conv.FrozenConv2d)
            for k, v in m.linear.prepared.picks.items() if isinstance(k, tuple)]


@pytest.mark.parametrize("example", ["resnet_ternary", "small_cnn"])
def test_frozen_models_on_the_int16_way_compute_what_they_trained(example, int16_way):
    """Batchnorms folded, ReLUs and residual adds fused, every float-activation convolution
    on AMX tiles: the unfrozen model's outputs, within the 16-bit activations' error; a NaN in
    one image comes out as the fp32 path gives it (that image NaN, the others as close)."""
    torch.manual_seed(0)
    net = triton_dsl.load(os.path.join(EXAMPLES, f"{example}.tdsl"))()
    x = torch.randn(4, *net.input_shape)
    net.train()(x)
    net.eval()
    with torch.no_grad():
        want = net(x)
        frozen = rt.freeze(copy.deepcopy(net))
        got = frozen(x)
        ways = _ways(frozen)
        assert "int16" in ways, ways
        torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)
        x[1, 0, 3, 3] = float("nan")
        got = frozen(x)
        assert torch.isnan(got[1]).all()  # the batch took the fp32 way: the others as close
        torch.testing.assert_close(got[[0, 2, 3]], want[[0, 2, 3]], atol=1e-3, rtol=1e-3)
        kept = [m.linear.prepared for m in frozen.modules()
                if isinstance(m, frozen_conv.FrozenConv2d)]
        assert not any("dense" in p.runners for p in kept if "conv" not in p.picks.values())
