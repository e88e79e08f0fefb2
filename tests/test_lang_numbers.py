"""Issue 9.9: every number has a range; a value that passes `check` gives a module that imports;
expansion is bounded so that `check` answers quickly whatever the file."""
import time

import pytest
import torch

from triton_dsl.lang.codegen import generate
from triton_dsl.lang.frontend import check_source
from triton_dsl.lang.kinds import KINDS
from triton_dsl.lang.limits import MAX_LAYERS
from triton_dsl.lang.precision import REGISTRY

# an input each kind accepts, and the arguments it needs besides the one under test
INPUT = {"linear": "[8]", "conv2d": "[2, 8, 8]", "batchnorm": "[4]", "layernorm": "[4]",
         "softmax": "[2, 4, 4]", "ternary_act": "[4]", "maxpool": "[2, 8, 8]",
         "avgpool": "[2, 8, 8]", "adaptive_avgpool": "[2, 8, 8]", "adaptive_maxpool": "[2, 8, 8]",
         "dropout": "[4]", "embedding": "tokens(vocab=4, max_len=4)", "rmsnorm": "[4]",
         "attention": "[4, 8]", "mlp": "[4]"}
REQUIRED = {"linear": "4", "conv2d": "4", "embedding": "4", "attention": "2", "mlp": "4"}


def _numeric(options):
    return [o for o in options if o.number]


def _text(v):
    return repr(v) if not isinstance(v, float) or v != int(v) else f"{v:.1f}"


def test_every_numeric_option_has_a_range():
    opts = [o for k in KINDS.values() for o in _numeric(k.options)]
    opts += [o for _, options, _ in REGISTRY.values() for o in _numeric(options)]
    assert opts and all(o.lo is not None and o.hi is not None for o in opts), \
        [o.name for o in opts if o.lo is None or o.hi is None]


def _cases():
    for kind, spec in KINDS.items():
        for o in _numeric(spec.options):
            for v in (o.lo, o.hi):
                yield kind, o.name, v


@pytest.mark.parametrize("kind,option,value", list(_cases()), ids=str)
def test_layer_option_boundaries_compile_and_import(kind, option, value):
    args = [REQUIRED[kind]] if kind in REQUIRED and option not in (
        "out_features", "out_channels", "dim", "heads", "hidden") else []
    if kind in ("maxpool", "avgpool") and option == "padding":
        args.append(f"kernel={min(max(2, 2 * value), 16777216)}")
    args.append(f"{option}={_text(value)}")
    src = f"model M:\n    input {INPUT[kind]}\n    {kind}({', '.join(args)})\n"
    r = check_source(src, "m.tdsl")
    if not r.ok:  # a shape error for this input is fine; a range error at a bound is not
        assert {d.code for d in r.diagnostics if d.is_error} <= {"E401", "E406", "E407"}, \
            r.diagnostics
        return
    code = generate(r.models, "m.tdsl", src)
    assert "inf" not in code.replace("Conv2d", "").split("TDSL_SOURCE")[0]
    exec(compile(code, "m.py", "exec"), {})  # the generated module imports


@pytest.mark.parametrize("src", [
    "model M:\n    input [2, 8, 8]\n    batchnorm(eps=1, momentum=1)\n    layernorm(eps=0)\n"
    "    softmax(dim=-3)\n    softmax(dim=2)\n    ternary_act(1000)\n    dropout(0.999)\n"
    "    flatten\n    layer fc: linear(16)\n    layer out: linear(3)\n"
    "precision:\n    layer fc: ternary(threshold=1000)\n"
    "    layer out: int(bits=2, group_size=8, activations=none)\n",
    "model M:\n    input [1, 4, 4]\n    layer c: conv2d(1, kernel=[1, 4], stride=[1, 16777216])\n"
    "    flatten\n    layer fc: linear(1) * 3\nprecision:\n"
    "    default int8(activations=static, observer=percentile, percentile=100)\n",
    "model M:\n    input [16777216]\n    relu\n",  # the largest input dimension
], ids=["floats", "sizes", "input"])
def test_boundary_models_build_and_run(src):
    r = check_source(src, "m.tdsl")
    assert r.ok, r.diagnostics
    ns = {}
    exec(compile(generate(r.models, "m.tdsl", src), "m.py", "exec"), ns)
    net = ns["M"]()
    y = net(torch.randn(2, *net.input_shape))
    assert y.shape[0] == 2


def test_largest_model_imports_without_being_built():
    """2^24 features: too big to allocate here, but the generated module must import."""
    src = "model M:\n    input [16777216]\n    layer fc: linear(16)\n    layer g: linear(16777216)\n"
    r = check_source(src, "m.tdsl")
    assert r.ok, r.diagnostics
    exec(compile(generate(r.models, "m.tdsl", src), "m.py", "exec"), {})


@pytest.mark.parametrize("src", [
    "block A:\n    linear(4) * 10000\nblock B:\n    layer a: A * 10000\nmodel M:\n    input [4]\n"
    "    layer b: B * 10000\n",
    "block A:\n    linear(bad=1) * 10000\nblock B:\n    layer a: A * 10000\nmodel M:\n"
    "    input [4]\n    layer b: B * 10000\n",
    "block A:\n    linear(bad=1)\n    linear(4) * 10000\nblock B:\n    layer a: A * 10000\n"
    "model M:\n    input [4]\n    layer b: B * 10000\n",
    "model M:\n    input [4]\n" + "    relu\n" * 7000,
    "model M:\n    input [64]\n    layer b: linear(64) * 10000\nprecision:\n"
    + "".join(f"    layer c.{i}?*: int8\n" for i in range(128)),
    "".join(f"model M{i}:\n    input [64]\n    layer b: linear(64) * 10000\n" for i in range(500)),
    "".join(f"block B{i}:\n    relu\n" for i in range(1000)) + "model M:\n    input [4]\n"
    + "".join(f"    layer x{i}: Bx{i}\n" for i in range(1500)),
    "model M:\n    input [4]\n    layer " + "a" * 30000 + ": linear(4)\nprecision:\n"
    "    layer " + "a" * 30000 + "b: int8\n    layer " + "a" * 29999 + "*b: int8\n",
], ids=["nested repeats", "nested failing repeats", "half failing", "many lines", "rules",
        "many models", "many blocks and misspellings", "long names"])
def test_check_is_quick_whatever_the_file(src):
    check_source("model M:\n    input [4]\n    relu\n")  # the parser is built once
    t = time.perf_counter()
    r = check_source(src, "m.tdsl")
    # about 1 s on a loaded core of the 2-core development machine; the margin is for CI
    assert time.perf_counter() - t < 5
    assert sum(len(list(m.layers())) for m in r.models) <= MAX_LAYERS
