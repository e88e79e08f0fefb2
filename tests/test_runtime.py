"""Runtime layers and the functional quantizers: STE gradients, learned parameters, edge values."""
import pytest
import torch

from triton_dsl import runtime as rt
from triton_dsl.runtime import quant as Q

PRECISIONS = [rt.Float("fp16"), rt.Float("bf16"), rt.Int(), rt.Int(bits=4, group_size=8),
              rt.Int(bits=3, symmetric=False), rt.Int(activations="dynamic"), rt.Ternary(),
              rt.Ternary(threshold="learned"), rt.Ternary(scale="learned"),
              rt.Ternary(threshold="stochastic"), rt.Ternary(threshold="absmean", scale="absmean"),
              rt.Ternary(threshold=0.05, scale="none"), rt.Binary(),
              rt.Ternary(activations="dynamic", granularity="per_tensor")]


@pytest.mark.parametrize("prec", PRECISIONS, ids=lambda p: p.to_source())
def test_weights_move_under_training(prec):
    """The seed's ternary layers got zero gradient; ours must train."""
    torch.manual_seed(0)
    layer = rt.Linear(32, 16, precision=prec)
    opt = torch.optim.SGD(layer.parameters(), lr=0.05)
    w0 = layer.weight.detach().clone()
    x = torch.randn(8, 32)
    for _ in range(3):
        opt.zero_grad()
        layer(x).square().mean().backward()
        assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
        opt.step()
    assert not torch.equal(layer.weight, w0)


def test_learned_threshold_and_ttq_scales_get_gradients():
    torch.manual_seed(0)
    layer = rt.Linear(32, 16, precision=rt.Ternary(threshold="learned", scale="learned"))
    layer(torch.randn(8, 32)).square().mean().backward()
    q = layer.weight_quant
    for p in (q.threshold_logit, q.pos_scale, q.neg_scale):
        assert p.grad is not None and p.grad.abs().sum() > 0


def test_forward_values_are_quantized():
    torch.manual_seed(0)
    layer = rt.Linear(64, 8, precision=rt.Ternary(scale="none"))
    w = layer.quantized_weight()
    assert set(w.unique().tolist()) <= {-1.0, 0.0, 1.0}
    layer = rt.Linear(64, 8, precision=rt.Int(bits=4))
    w, s = layer.quantized_weight(), layer.weight_quant.quantize(layer.weight).scale
    codes = w / s
    assert torch.allclose(codes, codes.round(), atol=1e-4) and codes.abs().max() <= 7


@pytest.mark.parametrize("x", [torch.zeros(4, 8), torch.full((4, 8), 3.0), torch.full((4, 8), -2.0)],
                         ids=["zeros", "constant", "negative constant"])
def test_no_nan_on_degenerate_tensors(x):
    for sym in (True, False):
        for gran in ("per_tensor", "per_channel"):
            r = Q.uniform_quantize(x, 8, sym, gran)
            assert torch.isfinite(r.dequantized).all() and torch.isfinite(r.scale).all()
            assert torch.allclose(r.dequantized, x, atol=0.02 * x.abs().max() + 1e-6)
    for thr in ("twn", "absmean", 0.1):
        for scale in ("twn", "absmean", "none"):
            assert torch.isfinite(Q.ternary_quantize(x, thr, scale).dequantized).all()
    assert torch.isfinite(Q.binary_quantize(x)[0]).all()
    assert torch.isfinite(Q.stochastic_ternary(x, torch.zeros(1, 1))).all()
    codes, scale = Q.quantize_per_token(x)
    assert torch.isfinite(scale).all()
    for prec in PRECISIONS:
        layer = rt.Linear(8, 4, precision=prec)
        with torch.no_grad():
            layer.weight.copy_(x[:4])
        assert torch.isfinite(layer(x)).all(), prec


def test_uniform_quantize_round_trip_codes():
    x = torch.randn(16, 32)
    for bits in range(2, 9):
        r = Q.uniform_quantize(x, bits, symmetric=False, granularity="per_channel")
        assert r.codes.min() >= 0 and r.codes.max() <= 2 ** bits - 1
        assert torch.allclose((r.codes - r.zero_point) * r.scale, r.dequantized)
        err = (x - r.dequantized).abs().max(dim=1).values
        assert (err <= r.scale.squeeze(1) * 0.5 + 1e-6).all()  # within half a step


def test_twn_rule():
    w = torch.tensor([[0.1, -0.8, 0.5, 0.0]])
    r = Q.ternary_quantize(w, "twn", "twn")
    delta = 0.7 * w.abs().mean()  # 0.245
    assert torch.equal(r.codes, torch.tensor([[0, -1, 1, 0]], dtype=torch.int8))
    assert torch.allclose(r.threshold, delta)
    assert torch.allclose(r.scale, torch.tensor([[0.65]]))  # mean of 0.8 and 0.5


def test_absmean_matches_bitnet_roundclip():
    w = torch.randn(32, 64)
    gamma = w.abs().mean(dim=1, keepdim=True)
    bitnet = torch.clamp(torch.round(w / gamma), -1, 1)
    r = Q.ternary_quantize(w, "absmean", "absmean")
    assert torch.equal(r.codes.float(), bitnet)


def test_stochastic_is_unbiased():
    torch.manual_seed(0)
    w = torch.full((20000,), 0.3)
    q = Q.stochastic_ternary(w, torch.tensor(1.0))
    assert abs(q.mean().item() - 0.3) < 0.02


def test_int8_ste_gradient_is_identity():
    x = torch.randn(10, requires_grad=True)
    Q.int8_quantize_ste(x).sum().backward()
    assert torch.equal(x.grad, torch.ones(10))


def test_static_activations_need_calibration():
    layer = rt.Linear(8, 4, precision=rt.Int(activations="static"))
    layer.eval()
    with pytest.raises(RuntimeError, match="not calibrated"):
        layer(torch.randn(2, 8))
    layer.act_quant.calibrating = True
    layer(torch.randn(64, 8))
    layer.act_quant.calibrating = False
    assert torch.isfinite(layer(torch.randn(2, 8))).all()


def test_ternary_act_gradient():
    x = torch.tensor([-2.0, -0.6, 0.2, 0.7, 1.5], requires_grad=True)
    y = rt.ternary_act(x, 0.5)
    assert y.tolist() == [-1.0, -1.0, 0.0, 1.0, 1.0]
    y.sum().backward()
    assert x.grad.tolist() == [0.0, 1.0, 1.0, 1.0, 0.0]


def test_input_shape_error_names_argument():
    import triton_dsl
    import os
    Net = triton_dsl.load(os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                       "examples", "mnist_ternary.tdsl"))
    with pytest.raises(ValueError, match=r"expects x of shape \[batch, 1, 28, 28\], got x of shape \[2, 784\]"):
        Net()(torch.randn(2, 784))


def test_ternary_rule_registries_cover_the_language():
    """Every threshold and scale word the language accepts has a runtime rule, and no runtime
    rule is unreachable from the language."""
    from triton_dsl.lang.precision import Ternary
    from triton_dsl.runtime import quantizers
    words = {o.name: set(o.words) for o in Ternary.options}
    assert words["threshold"] == set(Q.THRESHOLD_FACTORS) | set(quantizers.THRESHOLD_RULES)
    assert words["scale"] == set(Q.SCALE_RULES) | set(quantizers.SCALE_RULES)


def test_interpreting_follows_the_environment(monkeypatch):
    """interpreting() reads os.environ's own dict (the Mapping's get cost 1.6 us a frozen call):
    it must still see every set and delete."""
    from triton_dsl.kernels.common import interpreting
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert not interpreting()
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert interpreting()
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not interpreting()
    monkeypatch.delenv("TRITON_INTERPRET")
    assert not interpreting()
