"""kernels/cpu_conv.py: oneDNN's int8 convolution with fp32 output against its twin, the float
convolution of the fake-quantized input and the dequantized weight."""
import pytest
import torch
import torch.nn.functional as F

from triton_dsl.kernels import cpu_conv

pytestmark = pytest.mark.skipif(not cpu_conv.available(),
                                reason="this torch has no oneDNN quantized convolution")


def _twin(x, codes, scale, bias, s, zp, symmetric, stride, padding, groups):
    lo, hi, z = (-127, 127, 0) if symmetric else (0, 255, zp)
    xq = (torch.clamp(torch.round(x / s) + z, lo, hi) - z) * s
    return F.conv2d(xq, codes.float() * scale.reshape(-1, 1, 1, 1), bias, stride, padding, 1,
                    groups)


@pytest.fixture(params=["native", "torch"])
def quantizer(request, monkeypatch):
    """The activations quantized by the native kernel's one pass, or by torch ops without it."""
    from triton_dsl.kernels import native
    if request.param == "torch":
        monkeypatch.setattr(native, "library", lambda: None)
    elif native.library() is None:
        pytest.skip("the native CPU kernel is unavailable")
    return request.param


@pytest.mark.parametrize("symmetric,zp", [(True, 0), (False, 97)])
@pytest.mark.parametrize("stride,padding,groups", [(1, 1, 1), (2, 0, 1), (1, 1, 2)])
def test_int8_conv_matches_its_twin(symmetric, zp, stride, padding, groups, quantizer):
    torch.manual_seed(0)
    codes = torch.randint(-127, 128, (12, 8 // groups, 3, 3), dtype=torch.int8)
    scale = torch.rand(12) * 1e-3 - 3e-4  # some negative (a folded batchnorm's gamma < 0)
    x, bias, s = torch.randn(3, 8, 9, 11), torch.randn(12), 0.02
    conv = cpu_conv.PackedQConv(codes, scale, s, zp, symmetric, (stride, stride),
                                (padding, padding), (1, 1), groups)
    want = _twin(x, codes, scale, bias, s, zp, symmetric, stride, padding, groups)
    torch.testing.assert_close(conv(x, bias), want, atol=1e-5, rtol=1e-5)
    assert torch.equal(conv(x, bias, relu=True), F.relu(conv(x, bias)))  # fused: the same
    torch.testing.assert_close(conv(x[:, :, :, 1:], None),  # a non-contiguous input
                               _twin(x[:, :, :, 1:], codes, scale, None, s, zp, symmetric,
                                     stride, padding, groups), atol=1e-5, rtol=1e-5)


def test_nan_input_is_left_to_the_float_path(quantizer):
    codes = torch.ones(4, 2, 1, 1, dtype=torch.int8)
    conv = cpu_conv.PackedQConv(codes, torch.ones(4), 0.1, 0, True, (1, 1), (0, 0), (1, 1), 1)
    x = torch.randn(1, 2, 3, 3)
    x[0, 0, 1, 1] = float("nan")
    assert conv(x, None) is None


def test_codes_must_be_4d_int8():
    with pytest.raises(ValueError, match=r"codes must be 4-d int8, got torch.float32 of shape"):
        cpu_conv.PackedQConv(torch.ones(4, 2, 1, 1), torch.ones(4), 0.1, 0, True, (1, 1),
                             (0, 0), (1, 1), 1)


# ---- the native int8 convolution (cpu_qconv.c) on every instruction-set build -------------

# "amx": this CPU's own build, whose convolutions run on AMX tiles (cpu_conv_amx.c) where it
# has them; "avx512-vnni" the same without AMX
ISA_FLAGS = {"amx": (), "avx512-vnni": ("-mno-amx-int8", "-mno-amx-tile"),
             "avx2": ("-mno-avx512f",), "scalar": ("-mno-avx2", "-mno-avx512f")}
RANK = {"scalar": 0, "avx2": 1, "avx512-vnni": 2, "amx": 2}


@pytest.fixture(scope="module", params=list(ISA_FLAGS))
def lib(request):
    from triton_dsl.kernels import native
    if native.library() is None:
        pytest.skip("the native CPU kernel is unavailable")
    if RANK[request.param] > RANK[native.library().isa] or (
            request.param == "amx" and not native.library().amx):
        pytest.skip(f"this CPU has no {request.param}")
    lib = native.Library(native.build(ISA_FLAGS[request.param]))
    assert lib.amx == (request.param == "amx")
    return lib


def _native_twin(qx, zp, codes, mult, bias, stride, padding, dilation, relu, out):
    """Exact integer sums (float64 holds them), then the kernel's fp32 operations in order."""
    acc = F.conv2d(qx.double() - zp, codes.double(), None, stride, padding, dilation)
    y = acc.float() * mult.reshape(-1, 1, 1) + (0 if bias is None else bias.reshape(-1, 1, 1))
    y = F.relu(y) if relu else y
    if out is None:
        return y
    return torch.clamp(torch.round(y / out[0]) + out[1], 0, 255).to(torch.uint8)


# (batch, C, O, H, W, kernel, stride, padding, dilation): channels off 4 and 16, rows off the
# 8-pixel tile, non-square kernels, dilation, an empty batch, K at the int32 bound's scale
NATIVE_SHAPES = [(1, 16, 16, 10, 10, (3, 3), 1, 1, 1), (2, 3, 17, 9, 7, (3, 3), 2, 1, 1),
                 (1, 1, 1, 5, 5, (1, 1), 1, 0, 1), (3, 5, 33, 11, 13, (2, 3), (2, 1), (0, 2), 1),
                 (1, 8, 20, 12, 12, (3, 3), 1, 2, 2), (0, 4, 16, 6, 6, (3, 3), 1, 1, 1),
                 (1, 7000, 5, 3, 3, (3, 3), 1, 1, 1)]


@pytest.mark.parametrize("shape", NATIVE_SHAPES, ids=str)
def test_native_int8_conv_matches_its_twin(lib, shape):
    b, c, o, h, w, k, stride, padding, dilation = shape
    g = torch.Generator().manual_seed(c * o)
    codes = torch.randint(-127, 128, (o, c, *k), generator=g, dtype=torch.int8)
    w_scale, bias = torch.rand(o, generator=g) * 1e-3, torch.randn(o, generator=g)
    x_scale, zp = 0.02, 128 if c % 2 else 9
    pair = (lambda v: v if isinstance(v, tuple) else (v, v))
    conv = cpu_conv.NativeQConv(codes, w_scale, x_scale, zp, bias if o > 1 else None,
                                pair(stride), pair(padding), pair(dilation), lib=lib)
    qx = torch.randint(0, 256, (b, c, h, w), generator=g, dtype=torch.uint8)
    mult = (x_scale * w_scale.double()).float()
    for relu, out in [(False, None), (True, None), (True, (0.05, 128)), (False, (0.3, 3))]:
        want = _native_twin(qx, zp, codes, mult, bias if o > 1 else None, stride, padding,
                            dilation, relu, out)
        got = conv(qx, relu, out)  # qx is channels-first: the kernel takes it channels-last
        assert got.shape == want.shape and got.is_contiguous(memory_format=torch.channels_last)
        assert torch.equal(got, want), (relu, out, (got.float() - want.float()).abs().max())


@pytest.mark.parametrize("symmetric", [True, False])
@pytest.mark.parametrize("layout", ["channels_last", "nchw", "sliced"])
@pytest.mark.parametrize("c", [3, 16])
def test_native_int8_conv_quantizes_float_input_as_the_static_quantizer(lib, symmetric, layout,
                                                                        c):
    """Float activations, quantized in the kernel's padded copy: the same codes as
    clamp(round(x / s) + zp, lo, hi) (halfway values, +-Inf, huge ones), in any memory layout;
    a NaN anywhere gives None (the caller's float path answers)."""
    g = torch.Generator().manual_seed(c)
    codes = torch.randint(-127, 128, (20, c, 3, 3), generator=g, dtype=torch.int8)
    s, zp, (lo, hi) = 0.05, (128 if symmetric else 11), ((1, 255) if symmetric else (0, 255))
    conv = cpu_conv.NativeQConv(codes, torch.rand(20, generator=g), s, zp, None, (1, 1),
                                (1, 1), (1, 1), symmetric, lib=lib)
    x = torch.randn(2, c, 9, 14, generator=g) * 4
    x[0, :, 0, :3] = torch.tensor([2.5, -2.5, 1.5]) * s  # halfway: to even
    x[1, :, 2, :4] = torch.tensor([1e30, -1e30, float("inf"), float("-inf")])
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    elif layout == "sliced":
        x = x[:, :, :, 1:]  # non-contiguous
    qx = torch.clamp(torch.round(x / s) + zp, lo, hi).to(torch.uint8)
    mult = conv.mult[:20]  # x_scale * w_scale, as the kernel holds it
    for relu, out in [(False, None), (True, (0.2, 128))]:
        want = _native_twin(qx, zp, codes, mult, None, 1, 1, 1, relu, out)
        assert torch.equal(conv(x, relu, out), want)
    assert torch.equal(conv(x.bfloat16(), True),
                       _native_twin(torch.clamp(torch.round(x.bfloat16().float() / s) + zp, lo, hi),
                                    zp, codes, mult, None, 1, 1, 1, True, None))
    x = x.clone()
    x[1, c - 1, 8, 7] = float("nan")
    assert conv(x) is None


def test_native_int8_conv_refuses_what_it_cannot_read(lib):
    conv = cpu_conv.NativeQConv(torch.ones(4, 2, 3, 3, dtype=torch.int8), torch.ones(4), 0.1, 0,
                                None, (1, 1), (0, 0), (1, 1), lib=lib)
    with pytest.raises(ValueError, match=r"x must be uint8 codes or floats \[batch, 2, height, "
                                         r"width\] on the CPU, got torch.int32 of shape "
                                         r"\(1, 2, 5, 5\) on cpu"):
        conv(torch.zeros(1, 2, 5, 5, dtype=torch.int32))
    with pytest.raises(ValueError, match=r"on the CPU, got torch.float32 of shape .* on meta"):
        conv(torch.empty(1, 2, 5, 5, device="meta"))  # no memory behind its pointer
    codes = torch.zeros(1, 2, 5, 5, dtype=torch.uint8)
    for bad in [(0.0, 0), (float("nan"), 0), (-1.0, 0), (1e-50, 0), (float("inf"), 0), (1.0, 256)]:
        with pytest.raises(ValueError, match=r"out must be \(scale, zero point\) with a "
                                             r"positive finite fp32 scale"):
            conv(codes, True, bad)  # a uint8 buffer must never be written as fp32
    with pytest.raises(ValueError, match=r"x must be uint8 codes or floats \[batch, 2"):
        conv(torch.zeros(1, 3, 5, 5, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"smaller than the kernel 3x3"):
        conv(torch.zeros(1, 2, 2, 5, dtype=torch.uint8))


def test_native_form_only_where_it_applies():
    from triton_dsl.kernels import native
    if native.library() is None:
        pytest.skip("the native CPU kernel is unavailable")
    args = (torch.ones(4), 0.1, 0, True, (1, 1), (0, 0), (1, 1))
    conv = cpu_conv.PackedQConv(torch.ones(4, 2, 1, 1, dtype=torch.int8), *args, 1)
    held, codes = conv.nbytes, conv.codes.numel()
    nat = conv.native_form(None)
    assert nat is not None and conv.codes is None  # the int8 codes live in the two forms now
    assert conv.nbytes == held - codes + nat.nbytes  # says what it holds
    assert conv.native_form(None) is nat
    assert cpu_conv.PackedQConv(torch.ones(4, 1, 1, 1, dtype=torch.int8), *args, 2) \
        .native_form(None) is None  # grouped
    big = torch.ones(4, 8192, 3, 3, dtype=torch.int8)  # K = 73728: int32 sums could overflow
    assert cpu_conv.PackedQConv(big, *args, 1).native_form(None) is None
    far = (torch.ones(4), 0.1, 0, True, (1, 1), (3, 0), (1, 1), 1)  # padding past the taps
    assert cpu_conv.PackedQConv(torch.ones(4, 2, 3, 3, dtype=torch.int8), *far) \
        .native_form(None) is None
    # a hostile file's dilation reaches far: its padding would make a huge padded copy
    wide = (torch.ones(4), 0.1, 0, True, (1, 1), (1 << 20, 0), (1 << 20, 1), 1)
    assert cpu_conv.PackedQConv(torch.ones(4, 2, 3, 3, dtype=torch.int8), *wide) \
        .native_form(None) is None


@pytest.mark.parametrize("batch", [1, 3])
def test_im2col_convolution_answers_canonical_channels_last(batch):
    """The im2col way answers the convolution channels-last with the strides torch's own
    channels-last tensors have, batch 1 included: the view it used to return had a batch
    stride of `out` there, and torch's max pool then took its slow NCHW path (4x)."""
    from triton_dsl.runtime.layers import im2col_conv
    conv = torch.nn.Conv2d(3, 5, 3, stride=2, padding=1)
    x = torch.randn(batch, 3, 9, 7)
    w = conv.weight.reshape(5, -1)
    with torch.no_grad():
        y = im2col_conv(x, conv, lambda cols: cols @ w.t() + conv.bias)
        want = conv(x)
    assert torch.allclose(y, want, atol=1e-5)
    assert y.stride() == (5 * 5 * 4, 1, 4 * 5, 5)
