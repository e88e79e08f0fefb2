"""Summary byte counts against sizes computed by hand."""
import json

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
