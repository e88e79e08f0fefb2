"""The command line: exit codes, atomic output, formatting, speed-critical imports."""
import glob
import os
import subprocess
import sys

import pytest

from triton_dsl.lang.format import format_file
from triton_dsl.lang.parser import parse

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ALL_EXAMPLES = sorted(glob.glob(os.path.join(ROOT, "examples", "*.tdsl")))
# files that declare models; the others are rules files for existing models (test_cli_plan.py)
EXAMPLES = [p for p in ALL_EXAMPLES if any(l.startswith("model ") for l in open(p))]
GOOD = "model M:\n    input [4]\n    layer fc: linear(2)\n"
BAD = "model M:\n    input [4]\n    layer fc: lineer(2)\n"


def test_brief_line_compiles(tmp_path, run_cli):
    src = tmp_path / "brief.tdsl"
    src.write_text("model M:\n    input [1, 28, 28]\n    flatten\n    layer fc1: linear(256)\n"
                   "    relu\n    layer fc2: linear(128)\n    relu\n    layer fc3: linear(10)\n\n"
                   "precision:\n    default fp32\n    layer fc2: ternary(threshold=learned)\n")
    code, out, err = run_cli("compile", str(src))
    assert code == 0, err
    assert (tmp_path / "brief.py").exists()


@pytest.mark.parametrize("path", EXAMPLES, ids=os.path.basename)
def test_examples_compile_import_and_run(path, tmp_path, run_cli):
    import importlib.util

    import torch
    out = tmp_path / "gen.py"
    code, _, err = run_cli("compile", path, "-o", str(out))
    assert code == 0, err
    spec = importlib.util.spec_from_file_location("gen", out)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for name in mod.__all__:
        net = getattr(mod, name)()
        net(net.example_input(4))  # a training step calibrates static activations
        net.eval()
        y = net(net.example_input(2))  # token ids for a language model
        assert y.shape[0] == 2 and torch.isfinite(y).all()


def test_exit_codes(tmp_path, run_cli):
    good, bad = tmp_path / "g.tdsl", tmp_path / "b.tdsl"
    good.write_text(GOOD)
    bad.write_text(BAD)
    assert run_cli("check", str(good))[0] == 0
    assert run_cli("check", str(good), str(bad))[0] == 1
    assert run_cli("compile")[0] == 2
    assert run_cli("frobnicate")[0] == 2
    assert run_cli()[0] == 2


def test_failed_compile_keeps_existing_output(tmp_path, run_cli):
    bad, out = tmp_path / "b.tdsl", tmp_path / "out.py"
    bad.write_text(BAD)
    out.write_text("precious = 1\n")
    code, _, err = run_cli("compile", str(bad), "-o", str(out))
    assert code == 1 and "E201" in err
    assert out.read_text() == "precious = 1\n"
    assert sorted(os.listdir(tmp_path)) == ["b.tdsl", "out.py"]  # no temporary left behind


def test_compile_refuses_to_overwrite_its_input(tmp_path, run_cli):
    src = tmp_path / "m.tdsl"
    src.write_text(GOOD)
    assert run_cli("compile", str(src), "-o", str(src))[0] == 2
    assert src.read_text() == GOOD


def test_compile_to_stdout(tmp_path, run_cli):
    src = tmp_path / "m.tdsl"
    src.write_text(GOOD)
    code, out, _ = run_cli("compile", str(src), "-o", "-")
    assert code == 0 and "class M(rt.CompiledModel)" in out


@pytest.mark.parametrize("path", EXAMPLES + sorted(glob.glob(os.path.join(ROOT, "tests", "golden", "*.tdsl"))),
                         ids=os.path.basename)
def test_fmt_is_idempotent_and_preserves_the_model(path):
    text = open(path).read()
    tree, _ = parse(text, path)
    once = format_file(tree, text)
    tree2, diags = parse(once, path)
    assert not diags
    assert tree2.definitions == tree.definitions
    assert format_file(tree2, once) == once
    def comments(t):
        return [line.split("#", 1)[1].strip() for line in t.splitlines() if "#" in line]
    assert comments(once) == comments(text)  # every comment kept, in order


def test_fmt_check_and_write(tmp_path, run_cli):
    p = tmp_path / "m.tdsl"
    p.write_text("model M:\n  input [4,]\n  layer fc:   linear( 2 ,bias = false )  # keep\n")
    assert run_cli("fmt", "--check", str(p))[0] == 1
    assert run_cli("fmt", "-w", str(p))[0] == 0
    assert p.read_text() == "model M:\n    input [4]\n    layer fc: linear(2, bias=false)  # keep\n"
    assert run_cli("fmt", "--check", str(p))[0] == 0


def _run(*args, **kw):
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT, **kw)


def test_check_and_compile_import_neither_torch_nor_triton(tmp_path):
    code = ("import sys; from triton_dsl.cli import main; "
            f"rc = main(['check', {EXAMPLES[0]!r}]); "
            f"rc |= main(['compile', {EXAMPLES[0]!r}, '-o', {str(tmp_path / 'x.py')!r}]); "
            f"rc |= main(['summary', {EXAMPLES[0]!r}]); "
            "bad = [m for m in ('torch', 'triton') if m in sys.modules]; "
            "print('imported:', bad); sys.exit(rc or bool(bad))")
    r = _run("-c", code)
    assert r.returncode == 0, r.stdout + r.stderr


def test_python_dash_m_and_version():
    r = _run("-m", "triton_dsl", "--version")
    assert r.returncode == 0 and r.stdout.startswith("triton-dsl ")
    r = _run("-m", "triton_dsl", "check", "examples/small_cnn.tdsl")
    assert r.returncode == 0 and "ok" in r.stdout


def test_load_api():
    import triton_dsl
    Net = triton_dsl.load(os.path.join(ROOT, "examples", "mixed_precision.tdsl"))
    assert Net.__name__ == "MixedPrecisionNet"
    with pytest.raises(triton_dsl.TdslError, match="E201"):
        triton_dsl.load_source(BAD, "bad.tdsl")


def test_compiling_a_rules_file_says_what_it_is(tmp_path, run_cli):
    """A rules file for existing modules given to compile: one error that names the right
    command, not a second one sending the user to add a model."""
    rules = tmp_path / "rules.tdsl"
    rules.write_text("precision:\n    default int8\n")
    code, _, err = run_cli("compile", str(rules))
    assert code == 1 and "E506" not in err
    assert "E106" in err and "triton-dsl plan" in err
