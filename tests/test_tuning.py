"""Measured dispatch (runtime/tuning.py): frozen layers time their exact CPU paths once per
batch bucket, keep the fastest, remember it on disk, and stay exact whichever wins."""
import copy
import json

import pytest
import torch

import triton_dsl
from triton_dsl import runtime as rt
from triton_dsl.runtime import dispatch, tuning


@pytest.fixture
def tuned(monkeypatch, tmp_path):
    monkeypatch.setenv("TRITON_DSL_TUNE", "1")
    monkeypatch.setenv("TRITON_DSL_CACHE", str(tmp_path))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(tuning, "_MEMORY", {})
    monkeypatch.setattr(tuning, "_LOADED", set())
    return tmp_path


def _net(path="examples/small_cnn.tdsl"):
    torch.manual_seed(0)
    net = triton_dsl.load(path)().eval()
    return net, rt.freeze(copy.deepcopy(net))


@pytest.mark.parametrize("winner", ["dense", "prepacked"])
def test_linear_takes_the_measured_path_and_stays_exact(tuned, monkeypatch, winner):
    monkeypatch.setattr(tuning, "fastest", lambda c: winner if winner in c else next(iter(c)))
    layer = rt.Linear(256, 128, precision=rt.Ternary()).eval()
    frozen = rt.freeze(torch.nn.Sequential(rt.FrozenLinear(layer)))[0]
    x = torch.randn(3, 256)
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), layer(x), atol=2e-3, rtol=1e-4)
    assert frozen.prepared.picks[4] == winner
    assert ("dense" in frozen.prepared.runners) == (winner == "dense")
    assert frozen.weight_bytes() >= (4 * 256 * 128 if winner == "dense" else 0)


def test_choices_are_remembered_on_disk(tuned, monkeypatch):
    net, frozen = _net()
    x = torch.randn(2, *net.input_shape)
    with torch.no_grad():
        want = net(x)
        torch.testing.assert_close(frozen(x), want, atol=2e-4, rtol=1e-4)
    files = list(tuned.glob("tuning-*.json"))
    assert len(files) == 1
    saved = json.loads(files[0].read_text())
    assert any(k.startswith("conv|") for k in saved) and set(saved.values()) <= {
        "im2col", "conv", "int16", "dense", "prepacked"}
    # a new process (fresh memory) reads the file and measures nothing
    monkeypatch.setattr(tuning, "_MEMORY", {})
    monkeypatch.setattr(tuning, "_LOADED", set())
    monkeypatch.setattr(tuning, "fastest", lambda c: pytest.fail("measured again"))
    _, again = _net()
    with torch.no_grad():
        torch.testing.assert_close(again(x), want, atol=2e-4, rtol=1e-4)


def test_a_damaged_cache_is_measured_again(tuned):
    (tuned / tuning._path().name).write_text("{not json")
    net, frozen = _net("examples/mnist_ternary.tdsl")
    x = torch.randn(1, *net.input_shape)
    with torch.no_grad():
        torch.testing.assert_close(frozen(x), net(x), atol=2e-3, rtol=1e-4)
    assert json.loads((tuned / tuning._path().name).read_text())


def test_large_layers_never_hold_a_dense_copy(tuned, monkeypatch):
    monkeypatch.setattr(dispatch, "DENSE_MAX", 1000)
    frozen = rt.FrozenLinear(rt.Linear(64, 32, precision=rt.Int()).eval())
    assert "dense" not in dispatch.candidates(frozen, torch.device("cpu"), "none")


def test_a_freed_choice_is_rebuilt_when_met_again(tuned, monkeypatch):
    """A conv's matmul picked dense for a bucket, then the conv chose another way and freed it;
    meeting that bucket again rebuilds the runner instead of failing."""
    layer = rt.FrozenLinear(rt.Linear(36, 8, precision=rt.Int()).eval())
    layer.in_conv = True
    prep = dispatch.prepare(layer, torch.device("cpu"), "none")
    prep.picks[4] = "dense"
    x = torch.randn(3, 36)
    with torch.no_grad():
        want = torch.nn.functional.linear(x, layer.dequantized_weight(), layer.bias)
        torch.testing.assert_close(layer(x), want)
