"""Summary byte counts against sizes computed by hand."""
import json

import pytest

from triton_dsl.lang.frontend import check_source
from triton_dsl.lang.summary import summarize

NET = """model Net:
    input [100]
    layer fc1: linear(64)
    layer bn: batchnorm
    relu
    layer fc2: linear(10, bias=false)
precision:
    default {prec}
"""


def _bytes(prec):
    r = check_source(NET.format(prec=prec), "n.tdsl")
    assert r.ok, r.diagnostics
    s = summarize(r.models[0])
    return {l["name"]: l["bytes"] for l in s["layers"]}, s


def test_fp32():
    b, s = _bytes("fp32")
    assert b["fc1"] == 4 * (100 * 64 + 64)
    assert b["bn"] == 4 * (2 * 64 + 2 * 64)  # weight, bias, running mean, running var
    assert b["fc2"] == 4 * 640
    assert s["total_bytes"] == s["fp32_bytes"] and s["compression"] == 1.0


def test_ternary_per_channel():
    b, s = _bytes("ternary")
    # 100 weights per row at 2 bits = 25 bytes; 64 fp32 scales; 64 fp32 biases
    assert b["fc1"] == 64 * 25 + 64 * 4 + 64 * 4
    assert b["fc2"] == 10 * 16 + 10 * 4  # 64 inputs: 16 bytes per row, no bias
    assert s["params"] == 6464 + 128 + 640


def test_ternary_k_not_multiple_of_four():
    r = check_source("model N:\n    input [10]\n    layer f: linear(3)\nprecision:\n"
                     "    default ternary(granularity=per_tensor, scale=learned)\n", "n.tdsl")
    # ceil(10 / 4) = 3 bytes per row; TTQ stores a positive and a negative scale
    assert summarize(r.models[0])["layers"][0]["bytes"] == 3 * 3 + 2 * 4 + 3 * 4


def test_int4_grouped_asymmetric():
    r = check_source("model N:\n    input [100]\n    layer f: linear(64)\nprecision:\n"
                     "    default int(bits=4, group_size=20, symmetric=false)\n", "n.tdsl")
    # codes relative to the zero point: 100 * 5 bits = 63 bytes per row; 5 fp32 scales per row
    assert summarize(r.models[0])["layers"][0]["bytes"] == 64 * 63 + 64 * 5 * 4 + 64 * 4


def test_int8_static_and_binary_and_fp16():
    b, _ = _bytes("int8(activations=static)")
    assert b["fc1"] == 64 * 100 + 64 * 4 + 4 + 64 * 4
    b, _ = _bytes("binary(granularity=per_tensor)")
    assert b["fc1"] == 64 * 13 + 4 + 64 * 4  # ceil(100 / 8) = 13
    b, _ = _bytes("fp16")
    assert b["fc1"] == 2 * (6400 + 64)


def test_json_shape(run_cli, tmp_path):
    p = tmp_path / "n.tdsl"
    p.write_text(NET.format(prec="ternary"))
    code, out, _ = run_cli("summary", str(p), "--json")
    assert code == 0
    s = json.loads(out)
    assert set(s) >= {"model", "layers", "total_bytes", "fp32_bytes", "compression"}
    assert set(s["layers"][0]) >= {"name", "kind", "precision", "bits", "params", "bytes"}
    assert s["total_bytes"] == sum(l["bytes"] for l in s["layers"])
    assert abs(s["compression"] - s["fp32_bytes"] / s["total_bytes"]) < 1e-3


PRECISIONS = ["fp32", "fp16", "bf16", "int8", "int8(granularity=per_tensor)",
              "int(bits=4, group_size=8, symmetric=false)", "int8(activations=static)",
              "ternary", "ternary(threshold=learned)", "ternary(scale=learned)",
              "ternary(threshold=learned, scale=learned, granularity=per_tensor)",
              "ternary(threshold=absmean, scale=none)", "ternary(threshold=stochastic)",
              "ternary(threshold=0.05, activations=dynamic)", "binary",
              "binary(granularity=per_tensor)"]
CNN = """model Net:
    input [8, 8, 8]
    layer conv: conv2d(8, kernel=3, padding=1)
    layer bn: batchnorm
    relu
    flatten
    layer fc: linear(16)
    layer out: linear(10, bias=false)
precision:
    default {prec}
"""


@pytest.mark.parametrize("prec", PRECISIONS)
def test_params_are_what_the_built_model_trains(prec):
    """Issue 9.16: learned thresholds and TTQ scales are trained parameters too."""
    import torch  # noqa: F401  (the built model needs the runtime)
    import triton_dsl

    src = CNN.format(prec=prec)
    r = check_source(src, "n.tdsl")
    assert r.ok, r.diagnostics
    s = summarize(r.models[0])
    net = triton_dsl.load_source(src)()
    assert s["params"] == sum(p.numel() for p in net.parameters())
    for row in s["layers"]:
        module = net.get_submodule(row["name"])
        assert row["params"] == sum(p.numel() for p in module.parameters()), row["name"]


def test_storage_bits_is_the_one_width_rule():
    from triton_dsl.lang.precision import Binary, Float, Int, Ternary, storage_bits
    assert [storage_bits(p) for p in (Ternary(), Binary(), Int(bits=4), Int(bits=4, symmetric=False),
                                      Int(), Float("fp32"), Float("fp16"), Float("bf16"))] == \
        [2, 1, 4, 5, 8, 32, 16, 16]


@pytest.mark.parametrize("flags", [(), ("--all",)])
def test_text_and_json_list_the_same_layers(run_cli, tmp_path, flags):
    p = tmp_path / "n.tdsl"
    p.write_text(CNN.format(prec="ternary(threshold=learned)"))
    code, text, _ = run_cli("summary", str(p), *flags)
    assert code == 0
    code, out, _ = run_cli("summary", str(p), "--json", *flags)
    names = [l["name"] for l in json.loads(out)["layers"]]
    rows = text.splitlines()[4:4 + len(names) + 1]  # title, rule, header, rule, then the rows
    assert [r.split()[0] for r in rows[:-1]] == names and set(rows[-1]) == {"-"}
    assert ("relu1" in names) == bool(flags)
