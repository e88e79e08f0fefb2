"""Static int8 activations through the command line: `train` calibrates while it trains (its
first forward, which checks the class count, must not need the ranges), and freezing a model
whose ranges were never observed is a one-line error that names the layers."""
import pytest
import torch

import triton_dsl
from triton_dsl import runtime as rt
from triton_dsl.runtime.quantizers import NotCalibrated
from triton_dsl.workflow import checkpoint as ck

STATIC_MLP = """model StaticMlp:
    input [64]
    layer fc1: linear(32)
    relu
    layer fc2: linear(10)

precision:
    default ternary(activations=static)
    layer fc2: int8(activations=static)
"""


def test_train_calibrates_static_activations_while_it_trains(tmp_path, run_cli):
    src = tmp_path / "static.tdsl"
    src.write_text(STATIC_MLP)
    out = tmp_path / "static.safetensors"
    code, text, err = run_cli("train", str(src), "--epochs", "1", "--quiet", "-o", str(out))
    assert code == 0, err
    net = ck.load(str(out))
    assert not rt.quantizers.uncalibrated(net)  # every layer observed its range
    frozen_out = tmp_path / "frozen.safetensors"
    code, _, err = run_cli("freeze", str(out), "-o", str(frozen_out))
    assert code == 0, err


def test_freezing_uncalibrated_static_activations_names_the_layers(tmp_path, run_cli):
    net = triton_dsl.load_source(STATIC_MLP, "static.tdsl")()
    assert rt.quantizers.uncalibrated(net) == ["fc1", "fc2"]
    with pytest.raises(NotCalibrated, match=r"layer fc1, fc2: static activation ranges are not "
                                             r"calibrated"):
        rt.freeze(net)
    with pytest.raises(ValueError):  # the command line's one-line errors catch ValueError
        rt.freeze(net)
    raw = tmp_path / "raw.safetensors"
    ck.save(triton_dsl.load_source(STATIC_MLP, "static.tdsl")(), str(raw))
    out = tmp_path / "f.safetensors"
    code, _, err = run_cli("freeze", str(raw), "-o", str(out))
    assert code == 1 and "layer fc1, fc2: static activation ranges are not calibrated" in err
    assert "Traceback" not in err and not out.exists()
    with torch.no_grad():  # a forward pass says so too, with the quantizer's name
        with pytest.raises(NotCalibrated):
            triton_dsl.load_source(STATIC_MLP, "static.tdsl")().eval()(torch.randn(1, 64))


def test_a_layer_the_forward_never_reaches_may_stay_uncalibrated():
    """Only a model none of whose static ranges has seen a batch is refused; with some
    calibrated (a training-only head never called, say), freeze warns and the model runs."""
    net = triton_dsl.load_source(STATIC_MLP, "static.tdsl")()
    net.train()
    with torch.no_grad():
        net.fc1.act_quant.observe(torch.randn(4, 64))  # fc2 alone left uncalibrated
    with pytest.warns(UserWarning, match="layer fc2: static activation ranges are not"):
        frozen = rt.freeze(net)
    with torch.no_grad(), pytest.raises(NotCalibrated, match="not calibrated"):
        frozen(torch.randn(1, 64))  # fc2 is called here: it says so
