"""Issue 9.10: a name either is refused with a positioned error, or the generated module works
with it (imports, runs its input check, and keeps the name as the state-dict key)."""
import builtins
import keyword

import pytest
import torch
from torch import nn

import triton_dsl
from triton_dsl.lang.codegen import generate
from triton_dsl.lang.frontend import check_source
from triton_dsl.lang.names import COMPILED_ATTRS, GENERATED_GLOBALS, MODULE_ATTRS
from triton_dsl.runtime import CompiledModel, Group

CANDIDATES = sorted(set(dir(builtins)) | MODULE_ATTRS | COMPILED_ATTRS | GENERATED_GLOBALS
                    | set(keyword.kwlist) | set(keyword.softkwlist) - {"_"}
                    | {"x", "self", "skip1", "Group", "CompiledModel", "fc", "Net", "__x", "_x"})


def _public(names):
    return {n for n in names if not n.startswith("_")}


def test_static_attribute_list_covers_torch():
    """The language does not import torch, so its list is static; this keeps it complete."""
    compiled = triton_dsl.load_source("model N:\n    input [4]\n    layer fc: linear(2)\n")()
    have = _public(dir(nn.Module())) | _public(dir(CompiledModel())) | _public(dir(Group())) \
        | _public(set(dir(compiled)) - {"fc"})
    missing = have - MODULE_ATTRS - COMPILED_ATTRS
    assert not missing, f"add to triton_dsl/lang/names.py: {sorted(missing)}"


def test_generated_globals_are_listed():
    code = generate(
        check_source("model N:\n    input [4]\n    relu\n").models, "n.tdsl", "")
    ns = {}
    exec(code, ns)
    assert set(ns) - {"__builtins__", "N", "__all__", "__doc__"} <= GENERATED_GLOBALS


@pytest.mark.parametrize("name", ["forward", "check_input", "named_children", "tdsl_source",
                                  "input_shape", "training", "__init__", "_modules", "class",
                                  "None", "to", "checkpoint_meta"])
def test_reserved_layer_names_are_positioned_errors(name):
    r = check_source(f"model M:\n    input [4]\n    layer {name}: linear(2)\n", "m.tdsl")
    errors = [d for d in r.diagnostics if d.is_error]
    assert [(d.code, d.line, d.col) for d in errors] == [("E203", 3, 11)]
    assert "rename it, for example" in errors[0].help


@pytest.mark.parametrize("name", ["torch", "F", "nn", "rt", "Int", "Ternary", "Binary", "Float",
                                  "super", "print", "TDSL_SOURCE", "class", "__M"])
def test_reserved_model_names_are_positioned_errors(name):
    r = check_source(f"model {name}:\n    input [4]\n    relu\n", "m.tdsl")
    errors = [d for d in r.diagnostics if d.is_error]
    assert [(d.code, d.line, d.col) for d in errors] == [("E207", 1, 7)]


def test_every_accepted_layer_name_builds_a_working_model():
    ok = []
    for name in CANDIDATES:
        r = check_source(f"model M:\n    input [4]\n    layer {name}: linear(4)\n")
        if r.ok:
            ok.append(name)
        else:
            assert {d.code for d in r.diagnostics if d.is_error} <= {"E203", "E111", "E110"}, name
    assert {"x", "self", "super", "print", "torch", "F", "match"} <= set(ok)
    body = "".join(f"    layer {n}: linear(4)\n" for n in ok)
    Net = triton_dsl.load_source("model M:\n    input [4]\n" + body)
    net = Net()
    assert [k.rsplit(".", 1)[0] for k in net.state_dict()][::2] == ok
    assert net(torch.randn(2, 4)).shape == (2, 4)
    with pytest.raises(ValueError):  # the input check still runs
        net(torch.randn(2, 5))


def test_every_accepted_model_name_builds_a_working_model():
    ok = [n for n in CANDIDATES if check_source(f"model {n}:\n    input [4]\n    relu\n").ok]
    assert {"x", "fc", "Net", "match", "Group", "CompiledModel"} <= set(ok)
    src = "".join(f"model {n}:\n    input [4]\n    layer fc: linear(3)\n" for n in ok)
    mod = {}
    exec(generate(check_source(src).models, "m.tdsl", src), mod)
    for n in ok:
        net = mod[n]()
        assert net(torch.randn(1, 4)).shape == (1, 3)
        with pytest.raises(ValueError):
            net(torch.randn(1, 3))


def test_generated_locals_as_names_in_a_fused_residual():
    """Layer names that are the generated forward's own locals and imports (x, skip1, self, rt,
    F, torch) through the fused paths: rt.conv_relu(..., into=...) and rt.conv_add_relu. They
    stay attributes of self, so the model runs, and its frozen form computes the same."""
    src = ("model M:\n    input [4, 8, 8]\n"
           "    layer x: conv2d(4, kernel=3, padding=1)\n    layer skip1: batchnorm\n    relu\n"
           "    residual:\n"
           "        layer self: conv2d(4, kernel=3, padding=1)\n        layer rt: batchnorm\n"
           "        relu\n"
           "        layer x2: conv2d(4, kernel=3, padding=1)\n        layer F: batchnorm\n"
           "    relu\n    flatten\n    layer torch: linear(2)\n\n"
           "precision:\n    default ternary\n    layer x: int8\n    layer torch: int8\n")
    code = generate(check_source(src, "m.tdsl").models, "m.tdsl", src)
    assert "rt.conv_relu(self.self, self.rt, x, into=self.x2)" in code
    assert "rt.conv_add_relu(self.x2, self.F, x, skip1)" in code
    torch.manual_seed(0)
    net = triton_dsl.load_source(src)()
    net.train()(torch.randn(8, 4, 8, 8))  # batchnorm statistics
    x = torch.randn(2, 4, 8, 8)
    with torch.no_grad():
        want = net.eval()(x)
        got = triton_dsl.runtime.freeze(net)(x)
    assert torch.allclose(got, want, atol=1e-4)
