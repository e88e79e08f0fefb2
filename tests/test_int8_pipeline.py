"""A frozen network with static int8 activations keeps them as uint8 codes from one int8
convolution to the next (rt.conv_relu(..., into=next)), and a residual block's last convolution
takes the add and the ReLU after it (rt.conv_add_relu). Both match the fake-quantized model up
to float rounding, and a model that is not frozen runs the modules as written."""
import copy

import pytest
import torch
import torch.nn.functional as F

import triton_dsl
from triton_dsl import runtime as rt
from triton_dsl.kernels import cpu_conv
from triton_dsl.runtime import frozen_conv

RESNET = """block Basic(channels, stride=1):
    residual:
        layer conv1: conv2d(channels, kernel=3, stride=stride, padding=1, bias=false)
        layer bn1: batchnorm
        relu
        layer conv2: conv2d(channels, kernel=3, padding=1, bias=false)
        layer bn2: batchnorm
    relu

model Res:
    input [3, 12, 12]
    layer stem: conv2d(8, kernel=3, padding=1, bias=false)
    layer stem_bn: batchnorm
    relu
    layer a: Basic(8)
    layer b: Basic(16, stride=2)
    adaptive_avgpool(1)
    flatten
    layer head: linear(4)

precision:
    default ternary(scale=absmean, activations={act})
    layer stem: int8(activations={act})
    layer head: int8
    layer b.shortcut: int8(activations={act})
"""


def _trained(act="static"):
    torch.manual_seed(0)
    net = triton_dsl.load_source(RESNET.format(act=act), "res.tdsl")()
    net.train()
    for _ in range(3):
        net(torch.randn(8, *net.input_shape))  # observers and batchnorm statistics
    return net.eval()


@pytest.fixture(params=["native", "onednn"])
def int8_convs(request, monkeypatch):
    """Int8 convolutions without timing: the native library's (cpu_qconv.c) or oneDNN's."""
    from triton_dsl.kernels import native
    from triton_dsl.runtime import runners
    if not cpu_conv.available():
        pytest.skip("this torch has no oneDNN quantized convolution")
    if request.param == "native" and (native.library() is None
                                      or native.library().isa != "avx512-vnni"):
        pytest.skip("the native int8 convolution is chosen on AVX-512 VNNI CPUs")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setenv("TRITON_DSL_TUNE", "0")
    monkeypatch.setattr(runners, "NATIVE_MACS", 1 << 40 if request.param == "native" else 0)
    return request.param


def test_generated_code_hands_codes_to_the_next_convolution(tmp_path):
    path = tmp_path / "res.tdsl"
    path.write_text(RESNET.format(act="static"))
    src = triton_dsl.compile(str(path))
    assert "x = rt.conv_relu(self.a.conv1, self.a.bn1, x, into=self.a.conv2)" in src
    assert "x = rt.conv_add_relu(self.a.conv2, self.a.bn2, x, skip1)" in src
    # the shortcut runs before the convolution that adds it
    assert src.index("skip2 = self.b.shortcut_bn(skip2)") < src.index(
        "x = rt.conv_add_relu(self.b.conv2, self.b.bn2, x, skip2)")


def test_the_int8_pipeline_matches_the_fake_quantized_model(int8_convs, monkeypatch):
    net = _trained()
    x = torch.randn(5, *net.input_shape)
    with torch.no_grad():
        want = net(x)
        frozen = rt.freeze(copy.deepcopy(net))
        frozen(x)  # the first call makes each layer's choice; the later ones hand codes over
        made, read = [], []

        class Counted(frozen_conv.Codes):
            def __init__(self, *a):
                made.append(a[0].shape)
                super().__init__(*a)

        plain = frozen_conv.FrozenConv2d.forward_codes
        monkeypatch.setattr(frozen_conv, "Codes", Counted)
        monkeypatch.setattr(frozen_conv.FrozenConv2d, "forward_codes",
                            lambda self, c, relu=False, out=None:
                            read.append(type(c)) or plain(self, c, relu, out))
        got = frozen(x)
        # a.conv1 and b.conv1 hand their codes to a.conv2 and b.conv2
        assert made == [(5, 8, 12, 12), (5, 16, 6, 6)] and read == [Counted, Counted]
        monkeypatch.setattr(frozen_conv.FrozenConv2d, "codes_for", lambda *a: None)
        apart = frozen(x)
    ways = {w for m in frozen.modules() if isinstance(m, frozen_conv.FrozenConv2d)
            for w in m.linear.prepared.runners["qconv"].ways.values()}
    assert ways == {int8_convs}
    # codes from oneDNN's output stage against the next quantizer's x / s: the same up to
    # float rounding at a tie, which moves one code by one step
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got, apart, atol=1e-4, rtol=1e-4)


def test_a_nan_input_takes_the_float_path_for_its_own_row(int8_convs):
    net = rt.freeze(_trained())
    x = torch.randn(3, *net.input_shape)
    with torch.no_grad():
        net(x)
        x[1, 0, 0, 0] = float("nan")
        y = net(x)
    assert torch.isnan(y[1]).all() and torch.isfinite(y[[0, 2]]).all()


def test_codes_at_another_scale_are_refused(int8_convs):
    net = rt.freeze(_trained())
    with torch.no_grad():
        net(torch.randn(2, *net.input_shape))
    conv = net.a.conv2
    scale, zp = conv._qconv().input_codes()
    codes = frozen_conv.Codes(torch.zeros(2, 8, 12, 12, dtype=torch.uint8), scale * 2, zp,
                              torch.float32)
    with pytest.raises(ValueError, match="not this convolution's input"):
        conv(codes)
    with pytest.raises(ValueError, match="not this convolution's input"):
        conv(frozen_conv.Codes(torch.zeros(2, 5, 12, 12, dtype=torch.uint8), scale, zp,
                               torch.float32))


def test_conv_add_relu_leaves_its_inputs_alone_and_trains(int8_convs):
    net = rt.freeze(_trained())
    x = torch.randn(2, 8, 12, 12)
    skip = torch.randn(2, 8, 12, 12)
    kept = skip.clone(), x.clone()
    with torch.no_grad():
        want = F.relu(net.a.conv2(x) + skip)
        got = rt.conv_add_relu(net.a.conv2, net.a.bn2, x, skip)
    assert torch.equal(got, want)
    assert torch.equal(skip, kept[0]) and torch.equal(x, kept[1])
    # not frozen: the modules as written, with gradients
    model = _trained().train()
    x.requires_grad_(True)
    y = rt.conv_add_relu(model.a.conv2, model.a.bn2, x, skip)
    torch.testing.assert_close(y, F.relu(model.a.bn2(model.a.conv2(x)) + skip))
    y.sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all()


def test_float_activations_hand_nothing_over(int8_convs, monkeypatch):
    """Ternary convolutions with float activations cannot run as int8 convolutions: the same
    generated code runs them as before."""
    net = _trained(act="none")
    x = torch.randn(4, *net.input_shape)
    with torch.no_grad():
        want = net(x)
        frozen = rt.freeze(copy.deepcopy(net))
        handed = []
        monkeypatch.setattr(frozen_conv.FrozenConv2d, "forward_codes",
                            lambda *a, **k: handed.append(a))
        frozen(x)
        got = frozen(x)
    assert handed == []
    torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)


def test_copies_and_reloads_of_a_frozen_network_keep_working(int8_convs):
    """A copy, pickle, .float() or load_state_dict forgets the layers' prepared runners; the
    next calls prepare them again (the first without hand-overs) and answer as before."""
    import pickle
    frozen = rt.freeze(_trained())
    x = torch.randn(3, *frozen.input_shape)
    with torch.no_grad():
        frozen(x)
        want = frozen(x)
        again = copy.deepcopy(frozen)
        again.load_state_dict(frozen.state_dict())
        for model in (again, pickle.loads(pickle.dumps(frozen)), copy.deepcopy(frozen).float()):
            for _ in range(3):
                torch.testing.assert_close(model(x), want, atol=1e-4, rtol=1e-4)


def test_threads_making_their_first_calls_together(int8_convs):
    """Several threads' first calls on a new frozen model: one builds each runner, the others
    find it built (a half-built layer once raised a shape error)."""
    import threading
    net = _trained()
    x = torch.randn(2, *net.input_shape)
    with torch.no_grad():
        want = rt.freeze(copy.deepcopy(net))(x)
    for _ in range(3):
        frozen = rt.freeze(copy.deepcopy(net))
        errors, outs = [], []

        def call():
            try:
                with torch.no_grad():
                    outs.append(frozen(x))
            except Exception as e:  # noqa: BLE001 - the test reports any
                errors.append(e)
        threads = [threading.Thread(target=call) for _ in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        for y in outs:
            torch.testing.assert_close(y, want, atol=1e-4, rtol=1e-4)


def test_a_frozen_network_refuses_integer_images(int8_convs):
    frozen = rt.freeze(_trained())
    with torch.no_grad(), pytest.raises(ValueError, match="expects floating-point x"):
        frozen(torch.zeros(1, *frozen.input_shape, dtype=torch.uint8))


def test_float_convolutions_run_channels_last(monkeypatch):
    """A frozen float convolution (the dense "conv" way) runs oneDNN's convolution channels-last,
    copying only an input in another layout; the result is the unfrozen model's up to float
    rounding."""
    monkeypatch.setenv("TRITON_DSL_TUNE", "0")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the CPU paths
    net = _trained(act="none")
    frozen = rt.freeze(copy.deepcopy(net))
    x = torch.randn(3, *net.input_shape)
    with torch.no_grad():
        want = net(x)
    seen = []
    plain = F.conv2d  # torch.nn.functional's: every caller's from here on
    monkeypatch.setattr(F, "conv2d", lambda x, *a: seen.append(
        x.is_contiguous(memory_format=torch.channels_last)) or plain(x, *a))
    for m in frozen.modules():
        if isinstance(m, frozen_conv.FrozenConv2d):
            m.im2col = False  # the "conv" way for every layer
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), want, atol=1e-3, rtol=1e-3)
    assert len(seen) == 6 and all(seen)  # stem, a.conv1, a.conv2, b.conv1, b.conv2, b.shortcut
    run = frozen.a.conv1.linear.prepared.runners["dense"]  # the weight held once, channels-last
    four = run.conv_args[0]
    assert run.weight is None and four.is_contiguous(memory_format=torch.channels_last)
    assert run.nbytes == four.numel() * 4
    assert torch.equal(run.matrix(), four.reshape(four.shape[0], -1))  # a matmul asks: made again
    with torch.no_grad():  # another dtype: the folded batchnorm's fp32 bias follows the weight
        torch.testing.assert_close(frozen.double()(x.double()), want.double(), atol=1e-3,
                                   rtol=1e-3)


def test_releasing_a_runner_waits_for_a_build(int8_convs, monkeypatch):
    """A layer that drops its losing runners puts its stored codes back; a build in another
    thread at that moment (which also puts them back, then releases them) must not leave the
    layer with no codes anywhere."""
    import threading
    import time
    from triton_dsl.runtime import dispatch
    net = _trained()
    frozen = rt.freeze(copy.deepcopy(net))
    conv = frozen.a.conv1
    lin = conv.linear
    form = type(lin.form)
    plain = form.cpu_parts
    monkeypatch.setattr(form, "cpu_parts", lambda self, mod: time.sleep(0.2) or plain(self, mod))
    build = threading.Thread(target=conv._qconv)
    drop = threading.Thread(target=lambda: time.sleep(0.05) or dispatch.release_unused(lin))
    build.start()
    drop.start()
    build.join()
    drop.join()
    monkeypatch.setattr(form, "cpu_parts", plain)
    held = lin.state_dict()[lin.form.stored]
    assert held.numel() > 0  # the codes, 2 bits each, packed


def test_a_one_channel_input_still_runs_channels_last(monkeypatch):
    """A one-channel tensor counts as channels-last contiguous with NCHW strides; the frozen
    convolution must still hand oneDNN channels-last strides (else its output, and every
    layer after it, came back NCHW at half the speed)."""
    monkeypatch.setenv("TRITON_DSL_TUNE", "0")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    src = ("model One:\n    input [1, 10, 10]\n    layer conv: conv2d(8, kernel=3, padding=1)\n"
           "    relu\n    flatten\n    layer fc: linear(3)\n\nprecision:\n    default fp32\n"
           "    kind conv2d: int8(granularity=per_channel)\n")
    frozen = rt.freeze(triton_dsl.load_source(src, "one.tdsl")().eval())
    frozen.conv.im2col = False  # the "conv" way
    out = []
    frozen.conv.register_forward_hook(lambda m, i, o: out.append(o.stride()))
    with torch.no_grad():
        frozen(torch.randn(2, 1, 10, 10))
    assert out and out[0][1] == 1  # channels-last: the channel stride is 1
