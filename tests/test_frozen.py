"""Frozen (deploy) layers match the trainable layers' fake-quantized forward, on the Triton path
(interpreter), the native CPU kernel, the fbgemm CPU path and the dense CPU path.

Tolerance: the kernels sum in another order than F.linear (~1e-6 relative), and the CPU float
paths carry 16-bit fixed-point activations: each input errs by at most half a step, max|x_row| /
65278 (the native kernel's step is max|x_row| / 32639), so an output errs by at most
K * max|x| / 65278 * max|w| (plus rounding).
"""
import copy
import os

import pytest
import torch
import torch.nn.functional as F

import triton_dsl
from triton_dsl import runtime as rt

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")

PRECISIONS = [rt.Ternary(), rt.Ternary(threshold="learned"),
              rt.Ternary(threshold="learned", scale="learned"), rt.Ternary(scale="absmean"),
              rt.Ternary(granularity="per_tensor", scale="none"), rt.Binary(), rt.Int(),
              rt.Int(bits=4, symmetric=False), rt.Int(bits=4, group_size=16),
              rt.Int(activations="dynamic"), rt.Ternary(activations="dynamic"),
              rt.Int(symmetric=False), rt.Float("fp16"), rt.Float("bf16")]


INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"  # kernels are built at import time


@pytest.fixture(params=["triton", "cpu-native", "cpu-int8-gemm", "cpu-dense"])
def path(request, monkeypatch):
    """Run a test on the Triton kernels (on a GPU, or the interpreter when the process started
    with TRITON_INTERPRET=1), on the native CPU kernel, on fbgemm's int8 GEMM (the native
    kernel switched off), and on the CPU dense path of small layers. Returns the device the
    test should use."""
    from triton_dsl.kernels import cpu, native
    from triton_dsl.kernels.common import HAS_TRITON
    from triton_dsl.runtime import dispatch
    if request.param == "triton":
        if not HAS_TRITON:
            pytest.skip("triton is not installed")
        if torch.cuda.is_available():
            return "cuda"
        if not INTERPRETED:
            pytest.skip("no GPU, and this process did not start with TRITON_INTERPRET=1")
        return "cpu"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    size = 1 << 30 if request.param == "cpu-dense" else 0
    monkeypatch.setattr(dispatch, "dense_below", lambda kind, act: size)
    if request.param == "cpu-native" and native.library() is None:
        pytest.skip(f"the native CPU kernel is unavailable: {native.error()}")
    if request.param == "cpu-int8-gemm":
        monkeypatch.setattr(cpu, "native_fits", lambda k: False)
    return "cpu"


def _bound(x, w, k):
    return float(k * x.abs().max() / 65278 * w.abs().max()) + 1e-5


@pytest.mark.parametrize("prec", PRECISIONS, ids=lambda p: p.to_source())
def test_frozen_linear_matches_fake_quant(prec, path):
    torch.manual_seed(0)
    layer = rt.Linear(64, 24, precision=prec).eval()
    x = torch.randn(5, 64)
    with torch.no_grad():
        want = layer(x)
        atol = _bound(x, layer.quantized_weight(), 64)
        if isinstance(prec, rt.Float):  # the frozen bias is stored at 16 bits too
            atol += float(layer.bias.abs().max()) * 2 ** -7
        got = rt.FrozenLinear(layer).to(path)(x.to(path)).cpu()
        torch.testing.assert_close(got, want, atol=atol, rtol=1e-4)


@pytest.mark.parametrize("example", [os.path.join(EXAMPLES, f) for f in (
    "mnist_ternary.tdsl", "small_cnn.tdsl", "resnet_ternary.tdsl")], ids=os.path.basename)
@pytest.mark.parametrize("dense", [False, True], ids=["prepacked", "dense"])
def test_frozen_examples_match(example, dense, monkeypatch):
    from triton_dsl.runtime import dispatch
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # whole networks: the CPU paths
    monkeypatch.setattr(dispatch, "dense_below", lambda kind, act: 1 << 30 if dense else 0)
    torch.manual_seed(0)
    net = triton_dsl.load(example)()
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


def test_cpu_form_keeps_one_copy_and_round_trips(tmp_path, monkeypatch):
    """After a CPU call the stored buffer is released (the CPU form holds the codes);
    state_dict, save/load, deepcopy and .to() all see the original packed weight."""
    from triton_dsl.runtime import dispatch
    monkeypatch.setattr(dispatch, "dense_below", lambda kind, act: 0)  # the prepacked form
    torch.manual_seed(0)
    for prec in (rt.Ternary(), rt.Int(), rt.Int(bits=4, group_size=16)):
        layer = rt.Linear(96, 40, precision=prec).eval()
        frozen = rt.FrozenLinear(layer)
        name = "packed" if isinstance(prec, rt.Ternary) else "codes"
        before = getattr(frozen, name).clone()
        x = torch.randn(3, 96)
        monkeypatch.delenv("TRITON_INTERPRET", raising=False)
        y = frozen(x)
        assert getattr(frozen, name).numel() == 0  # released
        assert torch.equal(frozen.state_dict()[name], before)
        copy_ = copy.deepcopy(frozen)
        assert torch.equal(getattr(copy_, name), before)
        torch.save(frozen.state_dict(), tmp_path / "f.pt")
        other = rt.FrozenLinear(layer)
        other.load_state_dict(torch.load(tmp_path / "f.pt"))
        torch.testing.assert_close(other(x), y)
        frozen(x)
        frozen.to(torch.float32)
        assert torch.equal(getattr(frozen, name), before)


def test_frozen_layers_reject_wrong_width():
    """2-bit packing pads K, so a kernel cannot tell 599 inputs from 600: the layer checks."""
    layer = rt.FrozenLinear(rt.Linear(600, 70, precision=rt.Ternary()))
    layer(torch.randn(2, 600))
    with pytest.raises(ValueError, match=r"600 features .* shape \(2, 599\)"):
        layer(torch.randn(2, 599))
    conv = rt.FrozenConv2d(rt.Conv2d(3, 8, 3, precision=rt.Ternary()))
    conv(torch.randn(1, 3, 8, 8))
    with pytest.raises(ValueError, match=r"\[batch, 3, height, width\], got shape \(1, 2, 8, 8\)"):
        conv(torch.randn(1, 2, 8, 8))


def test_weight_bytes_follow_the_cpu_form(monkeypatch):
    """weight_bytes counts what the layer holds: the packed buffer before a CPU call, the CPU
    form after it (ternary 2 bits, 4-bit grouped codes as nibbles with the native kernel)."""
    from triton_dsl.kernels import native
    from triton_dsl.runtime import dispatch
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(dispatch, "dense_below", lambda kind, act: 0)
    lib = native.library()
    if lib is None or lib.isa != "avx512-vnni":
        pytest.skip("the native forms, grouped included, need the native library with VNNI")
    n, k = 64, 512
    t = rt.FrozenLinear(rt.Linear(k, n, precision=rt.Ternary()))
    assert t.weight_bytes() == n * k // 4 + 4 * n  # 2-bit codes and a scale per channel
    t(torch.randn(2, k))
    assert t.weight_bytes() == n * k // 4 + 4 * n  # the same bytes, now in the CPU form
    g = rt.FrozenLinear(rt.Linear(k, n, precision=rt.Int(bits=4, group_size=128)))
    assert g.weight_bytes() >= n * k  # int8 codes while stored
    g(torch.randn(2, k))
    groups = k // 128
    # nibbles, plus per-group scales (the layer's and the kernel's copy) and code sums
    assert g.weight_bytes() == n * k // 2 + 3 * 4 * n * groups
    # a layer served from a dequantized fp32 copy counts that copy too
    monkeypatch.setattr(dispatch, "dense_below", lambda kind, act: 1 << 30)
    d = rt.FrozenLinear(rt.Linear(k, n, precision=rt.Int()))
    before = d.weight_bytes()
    d(torch.randn(2, k))
    assert d.weight_bytes() == before + 4 * n * k


@pytest.mark.parametrize("prec", PRECISIONS, ids=lambda p: p.to_source())
def test_frozen_conv_matches_fake_quant(prec, path):
    """Every precision option on conv2d, on every path. A learned threshold is one per output
    channel, [out, 1, 1, 1]: the frozen layer quantizes the 4-D weight, as training does."""
    torch.manual_seed(0)
    layer = rt.Conv2d(16, 8, 3, padding=1, precision=prec).eval()
    x = torch.randn(2, 16, 5, 5)
    with torch.no_grad():
        want = layer(x)
        atol = _bound(x, layer.quantized_weight(), 16 * 9)
        if isinstance(prec, rt.Float):
            atol += float(layer.bias.abs().max()) * 2 ** -7
        frozen = rt.FrozenConv2d(layer).to(path)
        got = frozen(x.to(path)).cpu()
        torch.testing.assert_close(got, want, atol=atol, rtol=1e-4)
    stored = sum(b.numel() * b.element_size() for b in frozen.buffers())
    assert stored <= layer.weight.numel() * 4  # never larger than the fp32 weight


def _ttq_layer(cls, *shape):
    """A TTQ layer after training: positive and negative scales apart, one row whose negative
    scale outweighs its positive one, one whose combined scale is negative."""
    torch.manual_seed(1)
    layer = cls(*shape, precision=rt.Ternary(scale="learned")).eval()
    q = layer.weight_quant
    with torch.no_grad():
        q.pos_scale.mul_(torch.linspace(0.5, 1.5, q.pos_scale.numel()).reshape(q.pos_scale.shape))
        q.neg_scale.mul_(torch.linspace(1.5, 0.5, q.neg_scale.numel()).reshape(q.neg_scale.shape))
        q.pos_scale.view(-1)[0] = -0.5
        q.neg_scale.view(-1)[0] = 0.1
    return layer


def test_frozen_ttq_matches_and_reloads(path):
    """TTQ rows with a negative combined scale are not zeroed (the int8 GEMM engines take
    positive scales only), and an untrained model's frozen form loads a trained one's state."""
    layer = _ttq_layer(rt.Linear, 64, 24)
    x = torch.randn(5, 64)
    with torch.no_grad():
        want = layer(x)
        frozen = rt.FrozenLinear(layer).to(path)
        got = frozen(x.to(path)).cpu()
        torch.testing.assert_close(got, want, atol=_bound(x, layer.quantized_weight(), 64),
                                   rtol=1e-4)
        fresh = rt.FrozenLinear(rt.Linear(64, 24, precision=rt.Ternary(scale="learned")))
        fresh.load_state_dict(frozen.state_dict())
        torch.testing.assert_close(fresh.to(path)(x.to(path)).cpu(), got)


def test_freeze_prepares_before_the_first_forward(monkeypatch):
    """freeze() builds the CPU forms (and the native library) itself: the first forward pass
    finds them ready."""
    from triton_dsl.runtime import dispatch
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(dispatch, "dense_below", lambda path, act: 0)
    net = torch.nn.Sequential(rt.Linear(256, 128, precision=rt.Ternary()))
    rt.freeze(net)
    built = net[0].prepared
    assert built is not None and net[0].packed.numel() in (0, 128 * 64)
    net(torch.randn(1, 256))
    assert net[0].prepared is built


def test_batchnorm_folds_into_the_layer_before_it(monkeypatch):
    """freeze() folds each batchnorm that directly follows a frozen layer (per the .tdsl
    declaration) into that layer's runners; the state dict keeps every key, and a model that
    loads it folds the loaded statistics."""
    from triton_dsl.runtime.fold import FoldedBatchNorm, pairs
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    torch.manual_seed(0)
    net = triton_dsl.load(os.path.join(EXAMPLES, "resnet_ternary.tdsl"))()
    x = torch.randn(2, *net.input_shape)
    net.train()(x)
    net.eval()
    keys = set(net.state_dict())
    assert ("stage2.shortcut", "stage2.shortcut_bn") in pairs(net)
    frozen = rt.freeze(copy.deepcopy(net))
    folded = [m for m in frozen.modules() if isinstance(m, FoldedBatchNorm)]
    assert len(folded) == len(pairs(net)) > 0
    assert all(torch.equal(bn(x[:1, :1]), x[:1, :1]) for bn in folded)  # passes through
    with torch.no_grad():
        want = net(x)
        torch.testing.assert_close(frozen(x), want, atol=2e-4, rtol=1e-4)
        fresh = rt.freeze(triton_dsl.load(os.path.join(EXAMPLES, "resnet_ternary.tdsl"))())
        fresh.load_state_dict(frozen.state_dict())
        torch.testing.assert_close(fresh(x), want, atol=2e-4, rtol=1e-4)
    assert {k for k in frozen.state_dict() if "bn" in k} == {k for k in keys if "bn" in k}


def test_a_biased_layer_with_a_folded_batchnorm_computes_what_it_trained(path):
    """A convolution and a linear layer with their own bias, each followed by a batchnorm:
    frozen (the batchnorm folded into the layer's runner) they give the unfrozen model's
    outputs on every path. The Triton path had added the layer's bias twice (its matmul adds
    it, and the fold's bias held it again): 8% off."""
    torch.manual_seed(0)
    net = triton_dsl.load_source(
        "model M:\n    input [4, 6, 6]\n    layer conv: conv2d(8, kernel=3, padding=1)\n"
        "    layer bn: batchnorm\n    relu\n    flatten\n    layer fc: linear(16)\n"
        "    layer bn2: batchnorm\n    relu\n    layer out: linear(3)\n\n"
        "precision:\n    default ternary\n    layer out: int8\n", "m.tdsl")()
    with torch.no_grad():
        for b in (net.conv.bias, net.fc.bias):
            b.uniform_(-1, 1)  # well away from zero, as a trained bias may be
    x = torch.randn(8, *net.input_shape)
    net.train()(x)  # batchnorm statistics move off their initial values
    net.eval()
    with torch.no_grad():
        want = net(x[:3])
        frozen = rt.freeze(copy.deepcopy(net)).to(path)
        torch.testing.assert_close(frozen(x[:3].to(path)).cpu(), want, atol=2e-4, rtol=1e-4)


ROUND_TRIP = """model RoundTrip:
    input [16, 6, 6]
    layer conv: conv2d(8, kernel=3, padding=1)
    layer bn: batchnorm
    relu
    flatten
    layer fc: linear(32)

precision:
    default {p}
"""


@pytest.mark.parametrize("prec", PRECISIONS, ids=lambda p: p.to_source())
def test_every_precision_round_trips_through_a_checkpoint(prec, path):
    """conv2d and linear at every precision option: trained weights -> freeze -> a packed
    checkpoint -> a fresh model loaded from it gives the frozen model's outputs, on every path."""
    from triton_dsl.workflow import checkpoint as ck
    torch.manual_seed(0)
    net = triton_dsl.load_source(ROUND_TRIP.format(p=prec.to_source()), "rt.tdsl")()
    x = torch.randn(3, *net.input_shape)
    net.train()(x)  # batchnorm statistics move off their initial values
    frozen = rt.freeze(net.eval()).to(path)
    with torch.no_grad():
        want = frozen(x.to(path)).cpu()
        again = ck.loads(ck.dumps(frozen.cpu())).to(path)
        torch.testing.assert_close(again(x.to(path)).cpu(), want)


STATIC_CNN = """model StaticCnn:
    input [3, 10, 10]
    layer conv1: conv2d(16, kernel=3, padding=1)
    layer bn1: batchnorm
    relu
    layer conv2: conv2d(8, kernel=3, stride=2, padding=1, bias=false)
    layer bn2: batchnorm
    relu
    flatten
    layer head: linear(4)

precision:
    default ternary(scale=absmean, activations=static)
    layer conv2: int8(activations=static)
    layer head: int8
"""


def test_static_activation_convs_run_as_int8_convolutions(monkeypatch):
    """Calibrated (static) int8 activations: a frozen conv2d runs one oneDNN int8 convolution
    with fp32 output, the folded batchnorm (a negative gamma too) in its scales; it equals the
    fake-quantized model up to float rounding."""
    from triton_dsl.kernels import cpu_conv
    if not cpu_conv.available():
        pytest.skip("this torch has no oneDNN quantized convolution")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    torch.manual_seed(0)
    net = triton_dsl.load_source(STATIC_CNN, "static.tdsl")()
    net.train()
    for _ in range(3):
        net(torch.randn(8, *net.input_shape))  # the static observers calibrate while training
    with torch.no_grad():
        net.bn2.weight[0] = -1.5  # a negative scale after folding
    net.eval()
    x = torch.randn(5, *net.input_shape)
    with torch.no_grad():
        want = net(x)
        frozen = rt.freeze(copy.deepcopy(net))
        got = frozen(x)
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    for name in ("conv1", "conv2"):
        runners = getattr(frozen, name).linear.prepared.runners
        assert list(runners) == ["qconv"], (name, list(runners))  # nothing else kept
    with torch.no_grad():  # a NaN input cannot become uint8: the float path gives NaN
        bad = x.clone()
        bad[0, 0, 0, 0] = float("nan")
        assert torch.isnan(frozen(bad)[0]).all() and torch.isfinite(frozen(bad)[1:]).all()


def test_a_frozen_int8_convolution_applies_its_relu_in_the_same_call(monkeypatch):
    """Generated code runs conv, batchnorm, relu as rt.conv_relu; a frozen int8 convolution
    (static activations, the batchnorm folded in) fuses the ReLU into the oneDNN call. Its
    output is the separate ReLU's, bit for bit, and a model that is not frozen runs the three
    modules as written."""
    from triton_dsl.kernels import cpu_conv
    from triton_dsl.runtime import frozen_conv
    if not cpu_conv.available():
        pytest.skip("this torch has no oneDNN quantized convolution")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("TRITON_DSL_TUNE", "0")  # no timing: the int8 convolution runs
    src = ("model C:\n    input [3, 12, 12]\n    layer conv: conv2d(8, kernel=3, padding=1, "
           "bias=false)\n    layer bn: batchnorm\n    relu\n    flatten\n    layer fc: linear(4)\n"
           "\nprecision:\n    default ternary(activations=static)\n    layer fc: fp32\n")
    torch.manual_seed(0)
    net = triton_dsl.load_source(src)()
    x = torch.randn(16, 3, 12, 12)
    net.train()
    net(x)  # observers and batchnorm statistics
    net.eval()
    with torch.no_grad():
        float_want = net.fc(torch.flatten(F.relu(net.bn(net.conv(x))), 1))
        torch.testing.assert_close(net(x), float_want)
        frozen = rt.freeze(net)
        fused = frozen(x)
        calls = []
        plain = frozen_conv.FrozenConv2d.forward_qconv
        monkeypatch.setattr(frozen_conv.FrozenConv2d, "forward_qconv",
                            lambda self, x, relu=False: calls.append(relu) or plain(self, x, relu))
        apart = frozen.fc(torch.flatten(F.relu(frozen.bn(frozen.conv(x))), 1))
        assert calls == [False]
        assert torch.equal(frozen(x), fused) and calls[-1] is True
    assert torch.equal(fused, apart)


def test_forward_hooks_on_a_frozen_convolution_keep_what_they_were_given():
    """A residual block's last convolution takes the add and the ReLU in place on its new
    output, except where a forward hook on it (or its inner layer) may hold that output: the
    hook's tensor must not change after the hook ran."""
    torch.manual_seed(0)
    net = triton_dsl.load_source(
        "model M:\n    input [4, 8, 8]\n    layer c0: conv2d(4, kernel=3, padding=1)\n    relu\n"
        "    residual:\n        layer c1: conv2d(4, kernel=3, padding=1)\n"
        "        layer bn: batchnorm\n    relu\n    flatten\n    layer fc: linear(2)\n\n"
        "precision:\n    default ternary\n", "m.tdsl")()
    net.train()(torch.randn(8, 4, 8, 8))
    frozen = rt.freeze(net.eval())
    for hooked in ([frozen.c0, frozen.c1], [frozen.c1.linear]):
        held, handles = [], [mod.register_forward_hook(
            lambda m, i, o: held.append((o, o.clone()))) for mod in hooked]
        with torch.no_grad():
            frozen(torch.randn(2, 4, 8, 8))
        assert len(held) == len(hooked) and all(torch.equal(o, c) for o, c in held)
        for h in handles:
            h.remove()
