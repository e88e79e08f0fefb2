"""Rules files applied to plain PyTorch modules: triton_dsl.plan, quantize, calibrate, then
rt.freeze, as for compiled models. The Hugging Face models are in tests/test_hf_models.py."""
import copy

import pytest
import torch
from torch import nn

import triton_dsl
from triton_dsl import runtime as rt


class Conv1D(nn.Module):
    """transformers.pytorch_utils.Conv1D, as GPT-2 uses it: y = x @ W + b with W [in, out]."""

    def __init__(self, nf, nx):
        super().__init__()
        self.nf = nf
        self.weight = nn.Parameter(torch.randn(nx, nf) * 0.1)
        self.bias = nn.Parameter(torch.randn(nf) * 0.1)

    def forward(self, x):
        out = torch.addmm(self.bias, x.reshape(-1, x.shape[-1]), self.weight)
        return out.view(*x.shape[:-1], self.nf)


class Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.norm = nn.BatchNorm2d(8)
        self.blocks = nn.ModuleList(
            [nn.Sequential(nn.Linear(32, 48), nn.GELU(), Conv1D(32, 48)) for _ in range(2)])
        self.head = nn.Linear(32, 10)

    def forward(self, x):
        x = torch.relu(self.norm(self.conv(x))).mean((2, 3)).repeat(1, 4)
        for b in self.blocks:
            x = x + b(x)
        return self.head(x)


RULES = """precision:
    default int8
    layer blocks.*.2: ternary
    layer head: skip
"""


def _net():
    torch.manual_seed(0)
    return Net().eval()


X = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(1))


def test_plan_changes_nothing():
    net = _net()
    before = copy.deepcopy(net.state_dict())
    p = triton_dsl.plan(net, RULES)
    assert [(e.name, e.kind, e.precision.name if e.precision else None) for e in p.entries] == [
        ("conv", "Conv2d", "int8"), ("blocks.0.0", "Linear", "int8"),
        ("blocks.0.2", "Conv1D", "ternary"), ("blocks.1.0", "Linear", "int8"),
        ("blocks.1.2", "Conv1D", "ternary"), ("head", "Linear", None)]
    assert p.entries[2].weight == (32, 48)  # Conv1D(nf=32, nx=48): 32 outputs of 48 inputs
    assert type(net.conv) is nn.Conv2d and type(net.head) is nn.Linear
    assert all(torch.equal(v, before[k]) for k, v in net.state_dict().items())


def test_quantize_keeps_the_parameters_themselves():
    net = _net()
    conv_w, lin_w, lin_b = net.conv.weight, net.blocks[0][0].weight, net.blocks[0][0].bias
    triton_dsl.quantize(net, RULES)
    assert isinstance(net.conv, rt.Conv2d) and net.conv.weight is conv_w
    assert isinstance(net.blocks[0][0], rt.Linear) and net.blocks[0][0].weight is lin_w
    assert net.blocks[0][0].bias is lin_b
    assert type(net.head) is nn.Linear  # skip
    assert net.conv.padding == (1, 1) and net.conv.stride == (1, 1)


def test_a_shared_module_is_replaced_everywhere():
    shared = nn.Linear(8, 8)
    m = nn.Sequential(shared, nn.ReLU(), shared)
    p = triton_dsl.quantize(m, "precision:\n    default int8\n")
    assert [e.name for e in p.entries] == ["0"]  # named once, as named_modules() lists it
    assert isinstance(m[0], rt.Linear) and m[2] is m[0]


def test_conv1d_becomes_a_linear_with_the_weight_transposed():
    torch.manual_seed(0)
    c = nn.Sequential(Conv1D(16, 24))
    x = torch.randn(3, 5, 24)
    want = c(x)
    triton_dsl.quantize(c, "precision:\n    kind Conv1D: fp32\n")
    assert isinstance(c[0], rt.Linear) and c[0].weight.shape == (16, 24)
    torch.testing.assert_close(c(x), want)


def test_int8_weight_only_stays_close_and_freezes():
    """Per-channel int8 weights: about 0.4% of each row's largest weight per weight, so the
    outputs of this small net move by under 2% of their range."""
    net = _net()
    with torch.no_grad():
        want = net(X)
    triton_dsl.quantize(net, "precision:\n    default int8\n")
    with torch.no_grad():
        qat = net(X)
    tol = 0.02 * want.abs().max().item()
    assert (qat - want).abs().max() < tol
    rt.freeze(net)
    assert isinstance(net.conv, rt.FrozenConv2d) and isinstance(net.head, rt.FrozenLinear)
    with torch.no_grad():
        frozen = net(X)
    torch.testing.assert_close(frozen, qat, rtol=1e-4, atol=1e-4)


def test_a_frozen_module_runs_where_autograd_records():
    """Modules kept as they are still have parameters that require gradients."""
    net = _net()
    triton_dsl.quantize(net, RULES)
    rt.freeze(net)
    assert net(X).shape == (2, 10)


def test_quantized_layers_train():
    net = _net().train()
    triton_dsl.quantize(net, "precision:\n    default ternary(threshold=learned)\n")
    w = net.blocks[0][0].weight
    net(X).sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0
    assert net.blocks[0][0].weight_quant.threshold_logit.grad is not None


def test_errors_change_nothing():
    net = _net()
    with pytest.raises(triton_dsl.TdslError) as e:
        triton_dsl.quantize(net, "precision:\n    default int8\n    layer blocks.*.mpl: int8\n")
    assert "<rules>:3:11: error[E503]" in str(e.value)
    assert type(net.conv) is nn.Conv2d


def test_modules_the_runtime_cannot_replace():
    net = _net()
    net.conv.padding_mode = "reflect"
    with pytest.raises(triton_dsl.TdslError) as e:
        triton_dsl.quantize(net, "precision:\n    default int8\n")
    assert "E511" in str(e.value) and "layer conv: skip" in str(e.value)
    triton_dsl.quantize(net, "precision:\n    default int8\n    layer conv: skip\n")
    assert type(net.conv) is nn.Conv2d and isinstance(net.head, rt.Linear)
    net = _net()
    triton_dsl.quantize(net, "precision:\n    kind Linear: int8\n")
    p = triton_dsl.plan(net, "precision:\n    kind Conv1D: int8\n")  # quantized ones: others
    assert [e.name for e in p.entries] == ["conv", "blocks.0.2", "blocks.1.2"]
    with pytest.raises(triton_dsl.TdslError, match="'blocks.0.0' is one, which triton-dsl has "
                       "already quantized"):
        triton_dsl.plan(net, "precision:\n    kind Linear: int8\n")


def test_subclasses_are_not_selected():
    mha = nn.Sequential(nn.MultiheadAttention(16, 2), nn.Linear(16, 16))
    with pytest.raises(triton_dsl.TdslError) as e:
        triton_dsl.plan(mha, "precision:\n    layer 0.out_proj: int8\n")
    assert "NonDynamicallyQuantizableLinear" in str(e.value)
    assert [e.name for e in triton_dsl.plan(mha, "precision:\n    default int8\n").entries] == \
        ["1"]


def test_dtype_and_rules_from_a_file(tmp_path):
    f = tmp_path / "rules.tdsl"
    f.write_text("precision:\n    default int8\n    layer 2: ternary(threshold=learned, "
                 "scale=learned)\n")
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 8)).to(torch.bfloat16)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    triton_dsl.quantize(m, str(f))
    assert m[2].weight_quant.pos_scale.dtype == torch.bfloat16
    assert m(x).dtype == torch.bfloat16
    rt.freeze(m)
    with torch.no_grad():
        assert m(x).dtype == torch.bfloat16


def test_calibrate_static_activations():
    torch.manual_seed(0)
    m = nn.Sequential(nn.Linear(32, 32), nn.ReLU(), nn.Linear(32, 4))
    x = torch.randn(16, 32)
    want = m(x).detach()
    triton_dsl.quantize(m, "precision:\n    default int8(activations=static)\n")
    with pytest.raises(RuntimeError, match="triton_dsl.calibrate"):
        m.eval()(x)
    assert triton_dsl.calibrate(m, [x, (x,), {"input": x}]) == 3
    rt.freeze(m)
    with torch.no_grad():
        assert (m(x) - want).abs().max() < 0.05 * want.abs().max()
    with pytest.raises(ValueError, match="nothing to calibrate"):
        triton_dsl.calibrate(nn.Linear(2, 2), [torch.randn(1, 2)])


def test_frozen_external_model_compiles(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    torch._dynamo.reset()
    net = _net()
    triton_dsl.quantize(net, RULES)
    rt.freeze(net)
    with torch.no_grad():
        want = net(X)
        got = torch.compile(net, backend="aot_eager")(X)
    torch.testing.assert_close(got, want)
