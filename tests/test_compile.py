"""Frozen models under the compiler: each frozen layer is one custom op (runtime/compile_ops.py),
so torch.compile traces a frozen model in one graph and torch.export exports it."""
import copy
import os

import pytest
import torch

import triton_dsl
from triton_dsl import runtime as rt

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


def _frozen(name):
    torch.manual_seed(0)
    net = triton_dsl.load(os.path.join(EXAMPLES, name))().eval()
    return net, rt.freeze(copy.deepcopy(net))


@pytest.mark.parametrize("name", ["mnist_ternary.tdsl", "resnet_ternary.tdsl",
                                  "mixed_precision.tdsl"])
def test_frozen_models_compile_in_one_graph(name, monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    torch._dynamo.reset()
    net, frozen = _frozen(name)
    x = torch.randn(3, *net.input_shape)
    explained = torch._dynamo.explain(frozen)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    with torch.no_grad():
        want = frozen(x)
        got = torch.compile(frozen, backend="aot_eager")(x)
    torch.testing.assert_close(got, want)


def test_frozen_model_exports(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    net, frozen = _frozen("small_cnn.tdsl")
    x = torch.randn(2, *net.input_shape)
    ep = torch.export.export(frozen, (x,))
    ops = {str(n.target) for n in ep.graph.nodes if n.op == "call_function"}
    assert "triton_dsl.frozen_conv2d.default" in ops  # small_cnn's quantized layers are convs
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(x), frozen(x))


def test_copies_are_separate_layers():
    """A deep copy gets a handle of its own, so the compiled copy runs its own weights."""
    layer = rt.FrozenLinear(rt.Linear(32, 8, precision=rt.Int()).eval())
    other = copy.deepcopy(layer)
    assert other.op_handle != layer.op_handle
    with torch.no_grad():
        other.scale.mul_(2)
    x = torch.randn(1, 32)
    out = torch.ops.triton_dsl.frozen_linear(x, other.op_handle)
    torch.testing.assert_close(out, other(x))
    assert not torch.allclose(out, layer(x))
