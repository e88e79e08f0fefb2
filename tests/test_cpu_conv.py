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
