"""`triton-dsl plan RULES --model PKG.MODULE:FACTORY`: the table, --json, and one clear line
with exit 1 for every bad rules file or factory string."""
import json
import re
import sys

import pytest

FACTORIES = '''
from torch import nn


def mlp():
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4))


def broken():
    raise RuntimeError("no weights\\nhere")


def not_a_model():
    return [1]


CONSTANT = 3
'''


@pytest.fixture
def here(tmp_path, monkeypatch, request):
    """A folder holding a factory module (a name of its own per test: imports are cached) and
    a rules file, made the current directory."""
    name = "factories_" + re.sub(r"\W", "_", request.node.name)
    (tmp_path / f"{name}.py").write_text(FACTORIES)
    (tmp_path / "rules.tdsl").write_text("precision:\n    default int8\n    layer 2: ternary\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", list(sys.path))
    return name


def test_plan_table(run_cli, here):
    code, out, err = run_cli("plan", "rules.tdsl", "--model", f"{here}:mlp")
    assert code == 0, err
    lines = out.splitlines()
    assert lines[0] == "Sequential with rules.tdsl: 2 of 2 modules quantized"
    assert any(l.split()[:3] == ["0", "Linear", "int8"] for l in lines)
    assert any(l.split()[:3] == ["2", "Linear", "ternary"] for l in lines)
    assert "compression:" in out


def test_plan_json(run_cli, here):
    code, out, _ = run_cli("plan", "rules.tdsl", "--model", f"{here}:mlp", "--json")
    d = json.loads(out)
    assert [m["precision"] for m in d["modules"]] == ["int8", "ternary"]
    assert d["modules"][1]["bytes"] == 4 * 8 + 4 * 4 + 4 * 4  # 2-bit codes, scales, bias
    assert d["total_bytes"] == sum(m["bytes"] for m in d["modules"]) + d["other_bytes"]


@pytest.mark.parametrize("spec,message", [
    ("{m}:mlpp", "has no attribute 'mlpp' (did you mean 'mlp'?)"),
    ("{m}:broken", "calling it failed: RuntimeError: no weights here"),
    ("{m}:not_a_model", "returned a list, not a torch.nn.Module"),
    ("{m}:CONSTANT", "CONSTANT is not callable (a int object)"),
    ("no_such_pkg.models:build", "no module named 'no_such_pkg'"),
    ("{m}", "is not of the form PKG.MODULE:FACTORY"),
    ("{m}:mlp()", "is not of the form PKG.MODULE:FACTORY"),
    ("../{m}:mlp", "is not of the form PKG.MODULE:FACTORY"),
])
def test_bad_factories_are_one_line(run_cli, here, spec, message):
    code, out, err = run_cli("plan", "rules.tdsl", "--model", spec.format(m=here))
    assert code == 1 and out == ""
    assert err.startswith("triton-dsl: error: --model") and message in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err


def test_bad_rules_are_positioned_before_any_import(run_cli, here, tmp_path):
    (tmp_path / "bad.tdsl").write_text("precision:\n    default int4\n")
    code, _, err = run_cli("plan", "bad.tdsl", "--model", "no_such_pkg.models:build")
    assert code == 1 and "bad.tdsl:2:13: error[E501]" in err and "no_such_pkg" not in err


def test_a_rule_that_matches_nothing(run_cli, here, tmp_path):
    (tmp_path / "miss.tdsl").write_text("precision:\n    layer 3: int8\n")
    code, _, err = run_cli("plan", "miss.tdsl", "--model", f"{here}:mlp")
    assert code == 1
    assert "miss.tdsl:2:11: error[E503]: rule matches no module: no module is named '3'" in err


def test_missing_rules_file(run_cli, here):
    code, _, err = run_cli("plan", "nothing.tdsl", "--model", f"{here}:mlp")
    assert code == 1 and "nothing.tdsl: error[E100]: no such file" in err


def test_check_accepts_a_rules_file(run_cli, here, tmp_path):
    """`check` knows a file of precision sections only: the problems it has whatever the model."""
    code, out, _ = run_cli("check", "rules.tdsl")
    assert code == 0 and out == "rules.tdsl: ok (rules for existing models: 2 rules)\n"
    (tmp_path / "bad.tdsl").write_text("precision:\n    default int4\n    layer x: tenary\n")
    code, _, err = run_cli("check", "bad.tdsl")
    assert code == 1 and "bad.tdsl:2:13: error[E501]" in err and "did you mean 'ternary'?" in err
    (tmp_path / "block.tdsl").write_text("block B:\n    relu\n")
    code, _, err = run_cli("check", "block.tdsl")
    assert code == 1 and "E106" in err  # not a rules file: no model is still the problem


def test_bench_an_existing_model(run_cli, here, tmp_path):
    out_json = str(tmp_path / "b.json")
    code, out, err = run_cli("bench", "--model", f"{here}:mlp", "--rules", "rules.tdsl",
                             "--input-shape", "16", "--batch", "1", "--repeat", "3",
                             "--device", "cpu", "--json", out_json)
    assert code == 0, err
    recs = json.load(open(out_json))["records"]
    assert [r["method"] for r in recs] == ["float", "frozen"]
    assert all(r["median_ms"] > 0 and r["weight_bytes"] > 0 for r in recs)
    code, _, err = run_cli("bench", "--model", f"{here}:mlpp", "--rules", "rules.tdsl",
                           "--device", "cpu")
    assert code == 1 and "did you mean 'mlp'?" in err


def test_rules_examples_check_clean(run_cli):
    import glob
    import os
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    rules = [p for p in glob.glob(os.path.join(root, "examples", "*.tdsl"))
             if not any(l.startswith("model ") for l in open(p))]
    assert len(rules) >= 3
    code, out, err = run_cli("check", *rules)
    assert code == 0 and err == "" and out.count("ok (rules for existing models") == len(rules)
