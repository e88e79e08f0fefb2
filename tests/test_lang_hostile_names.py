"""Issue 9.1: a file name from outside reaches generated code only through repr or an escaped
comment. Each name below tries to run `open('marker', 'w')` when the compiled module is imported."""
import ast
import os

import pytest
import torch

import triton_dsl

PAYLOAD = "open('marker', 'w').close()"
NAMES = [
    f"a\n{PAYLOAD}\n#.tdsl",  # a newline ends the provenance comment
    f"a\r{PAYLOAD}\r#.tdsl",  # so does a lone carriage return, for Python's tokenizer
    f"a\r\n{PAYLOAD}\r\n#.tdsl",
    f"a\x0c\n{PAYLOAD}\n#.tdsl",  # form feed
    f'"""\n{PAYLOAD}\n""".tdsl',  # ends the module docstring
    f"'''\n{PAYLOAD}\n'''.tdsl",
    f'x\\"\n{PAYLOAD}\n#.tdsl',  # a backslash before a quote
    f"x\\\n{PAYLOAD}\n#.tdsl",  # a backslash before the newline
    "x\\N{.tdsl",  # \N in a string literal is a SyntaxError
    f"a\u2028{PAYLOAD}\u2029\x85\x0b\x1c.tdsl",  # what str.splitlines treats as line breaks
    "modèle ünïcode 模型.tdsl",
]
SRC = "model Net:\n    input [4]\n    layer fc: linear(3)\n    relu\nprecision:\n    default int8\n"


@pytest.mark.parametrize("name", NAMES, ids=ascii)
def test_compiled_module_from_hostile_name_runs_nothing(name, tmp_path, monkeypatch, run_cli):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / name
    path.write_text(SRC)
    out = tmp_path / "out.py"
    code, _, err = run_cli("compile", str(path), "-o", str(out))
    assert code == 0, err
    text = out.read_text()
    tree = ast.parse(text)  # no SyntaxError either
    # top level: the docstring, imports, assignments and the model class, nothing else
    kinds = {type(n).__name__ for n in tree.body}
    assert kinds <= {"Expr", "Import", "ImportFrom", "Assign", "ClassDef"}, kinds
    assert isinstance(tree.body[0], ast.Expr) and sum(isinstance(n, ast.Expr) for n in tree.body) == 1
    ns = {}
    exec(compile(text, "out.py", "exec"), ns)
    assert ns["SOURCE_PATH"] == name and ns["TDSL_SOURCE"] == SRC
    net = ns["Net"]()
    assert net(torch.randn(2, 4)).shape == (2, 3)
    assert not os.path.exists(tmp_path / "marker")
    # every comment stays on its line: python's tokenizer and str.splitlines agree on the lines
    assert len(text.splitlines()) == text.count("\n")


@pytest.mark.parametrize("name", NAMES, ids=ascii)
def test_load_and_load_source_with_hostile_name(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    path = tmp_path / name
    path.write_text(SRC)
    Net = triton_dsl.load(str(path))
    assert Net()(torch.randn(1, 4)).shape == (1, 3)
    Net = triton_dsl.load_source(SRC, path=name)
    assert Net()(torch.randn(1, 4)).shape == (1, 3)
    Net = triton_dsl.load_source(SRC, path=str(path))
    assert Net().tdsl_source == SRC
    assert not os.path.exists(tmp_path / "marker")


def test_display_name_keeps_printable_names_and_escapes_the_rest():
    from triton_dsl.lang.diagnostics import display_name

    assert display_name("model.tdsl") == "model.tdsl"
    assert display_name("modèle.tdsl") == "modèle.tdsl"
    assert display_name("a\nb\u2028c\\d") == "a\\nb\\u2028c\\\\d"
    assert all(len(display_name(n).splitlines()) == 1 for n in NAMES)


@pytest.mark.parametrize("name", NAMES[:4], ids=ascii)
def test_reports_show_the_name_on_one_line(name, tmp_path, run_cli):
    good, bad = tmp_path / name, tmp_path / ("bad" + name)
    good.write_text(SRC)
    bad.write_text(SRC.replace("linear(3)", "lineer(3)"))
    code, out, _ = run_cli("check", str(good))
    assert code == 0 and len(out.splitlines()) == 1 and out.rstrip().endswith("ok (1 model: Net)")
    code, _, err = run_cli("check", str(bad))
    assert code == 1 and err.splitlines()[0].endswith("error[E201]: unknown layer kind 'lineer'")
