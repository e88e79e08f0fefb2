"""`triton-dsl bench --model`: whole models, frozen against fp32 and torch's int8, one run."""
import json
import os

EXAMPLES = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "examples")


TINY_CNN = """model TinyCnn:
    input [1, 8, 8]
    layer conv1: conv2d(8, kernel=3, padding=1)
    layer bn1: batchnorm
    relu
    layer conv2: conv2d(16, kernel=3, padding=1)
    relu
    adaptive_avgpool(1)
    flatten
    layer head: linear(4)

precision:
    default ternary
    layer conv1: int8
    layer head: int8
"""


def test_bench_model_times_every_method(run_cli, tmp_path):
    out = tmp_path / "m.json"
    (tmp_path / "cnn.tdsl").write_text(TINY_CNN)
    code, stdout, err = run_cli("bench", "--device", "cpu", "--model", str(tmp_path / "cnn.tdsl"),
                                "--batch", "1", "2", "--repeat", "4", "--json", str(out))
    assert code == 0, err
    recs = json.loads(out.read_text())["records"]
    methods = {r["method"] for r in recs}
    assert {"fp32", "frozen", "fp32-channels-last", "torch-int8-fx"} <= methods
    assert {r["batch"] for r in recs} == {1, 2}
    by = {(r["method"], r["batch"]): r for r in recs}
    assert by[("fp32", 1)]["speedup_vs_fp32"] == 1.0
    # frozen layers hold codes (and dense copies only where they won): never more than fp32
    # plus the codes
    assert by[("frozen", 1)]["weight_bytes"] <= 1.3 * by[("fp32", 1)]["weight_bytes"]
    assert "median ms" in stdout and "frozen" in stdout


def test_bench_model_mlp_compares_dynamic_int8(run_cli, tmp_path):
    (tmp_path / "mlp.tdsl").write_text("model TinyMlp:\n    input [16]\n"
                                       "    layer fc1: linear(32)\n    relu\n"
                                       "    layer fc2: linear(4)\n\nprecision:\n"
                                       "    default ternary\n")
    code, stdout, err = run_cli("bench", "--device", "cpu", "--model",
                                str(tmp_path / "mlp.tdsl"), "--batch", "1", "--repeat", "3")
    assert code == 0, err
    assert "torch-dynamic-int8" in stdout


def test_bench_model_with_errors_is_one_message(run_cli, tmp_path):
    bad = tmp_path / "bad.tdsl"
    bad.write_text("model M:\n    input [4]\n    layer fc: lineer(2)\n")
    code, _, err = run_cli("bench", "--device", "cpu", "--model", str(bad))
    assert code == 1 and "bad.tdsl:3:" in err and "Traceback" not in err


def test_channels_last_baseline_hands_on_channels_last_strides():
    """The fp32-channels-last row's input reaches the network with channels-last strides, a
    one-channel image too (whose .contiguous(channels_last) keeps NCHW strides)."""
    import torch
    from torch import nn
    from triton_dsl.workflow.model_bench import ChannelsLast
    seen = []

    class Probe(nn.Module):
        def forward(self, x):
            seen.append(x.stride())
            return x

    ChannelsLast(Probe())(torch.randn(3, 1, 5, 4))
    assert seen == [(20, 1, 4, 1)]
