"""Frozen (deploy) layers match the trainable layers' fake-quantized forward.

Tolerance: 2e-4 absolute on outputs of size ~1. The kernels sum in another order than F.linear
(~1e-6 relative), and the CPU float paths carry 16-bit fixed-point activations (~1.5e-5 relative
per input, summed over K <= 784 inputs here).
"""
import copy

import pytest
import torch

import triton_dsl
from triton_dsl import runtime as rt

PRECISIONS = [rt.Ternary(), rt.Ternary(threshold="learned"),
              rt.Ternary(threshold="learned", scale="learned"), rt.Ternary(scale="absmean"),
              rt.Ternary(granularity="per_tensor", scale="none"), rt.Binary(), rt.Int(),
              rt.Int(bits=4, symmetric=False), rt.Int(bits=4, group_size=16),
              rt.Int(activations="dynamic"), rt.Ternary(activations="dynamic")]


@pytest.mark.parametrize("prec", PRECISIONS, ids=lambda p: p.to_source())
def test_frozen_linear_matches_fake_quant(prec):
    torch.manual_seed(0)
    layer = rt.Linear(64, 24, precision=prec).eval()
    x = torch.randn(5, 64)
    with torch.no_grad():
        torch.testing.assert_close(rt.FrozenLinear(layer)(x), layer(x), atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("path", ["examples/mnist_ternary.tdsl", "examples/small_cnn.tdsl",
                                  "examples/resnet_ternary.tdsl"])
def test_frozen_examples_match(path):
    torch.manual_seed(0)
    net = triton_dsl.load(path)()
    x = torch.randn(2, *net.input_shape)
    net.train()
    net(x)  # batchnorm statistics move away from their initial values
    net.eval()
    with torch.no_grad():
        want = net(x)
        frozen = rt.freeze(copy.deepcopy(net))
        torch.testing.assert_close(frozen(x), want, atol=2e-4, rtol=1e-4)
    assert any(isinstance(m, rt.FrozenLinear) for m in frozen.modules())


def test_frozen_ternary_is_packed():
    layer = rt.Linear(4096, 256, precision=rt.Ternary())
    frozen = rt.FrozenLinear(layer)
    stored = sum(b.numel() * b.element_size() for b in frozen.buffers())
    assert frozen.packed.dtype == torch.uint8 and frozen.packed.shape == (256, 1024)
    assert stored <= layer.weight.numel() * 4 / 15  # 2 bits of 32, plus scales
    assert "packed" in frozen.state_dict()
