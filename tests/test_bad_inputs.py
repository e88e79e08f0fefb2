"""A corpus of bad .tdsl inputs: each gets a clean diagnostic at the right place, never a traceback."""
import os
import re

import pytest

from triton_dsl.lang.frontend import check_file, check_source
from triton_dsl.lang.diagnostics import render_all

HEAD = "model M:\n    input [1, 8, 8]\n    flatten\n"  # lines 1-3; a body line below is line 4
TOK = "model M:\n    input tokens(vocab=16, max_len=8)\n    layer e: embedding(8)\n"  # the same

# (name, source, expected code, line, col)
CASES = [
    ("unknown kind", HEAD + "    layer fc: lineer(10)\n", "E201", 4, 15),
    ("unknown precision", HEAD + "    layer fc: linear(10)\nprecision:\n    default ternery\n",
     "E501", 6, 13),
    ("unknown option", HEAD + "    layer fc: linear(10, baes=false)\n", "E302", 4, 26),
    ("option twice", HEAD + "    layer fc: linear(10, bias=true, bias=false)\n", "E303", 4, 37),
    ("missing required", HEAD + "    layer fc: linear\n", "E305", 4, 15),
    ("too many positional", HEAD + "    layer fc: linear(10, 20)\n", "E301", 4, 26),
    ("bad option value", HEAD + "    layer fc: linear(10, bias=maybe)\n", "E304", 4, 31),
    ("negative features", HEAD + "    layer fc: linear(-3)\n", "E304", 4, 22),
    ("float features", HEAD + "    layer fc: linear(2.5)\n", "E304", 4, 22),
    ("dropout p too big", HEAD + "    dropout(1.5)\n", "E304", 4, 13),
    ("conv on flat input", HEAD + "    layer c: conv2d(4)\n", "E401", 4, 14),
    ("kernel too big", "model M:\n    input [1, 4, 4]\n    layer c: conv2d(4, kernel=7)\n",
     "E401", 3, 31),
    ("groups do not divide", "model M:\n    input [3, 8, 8]\n    layer c: conv2d(4, groups=2)\n",
     "E401", 3, 31),
    ("duplicate layer name", HEAD + "    layer fc: linear(10)\n    layer fc: linear(10)\n",
     "E202", 5, 11),
    ("reserved name", HEAD + "    layer forward: linear(10)\n", "E203", 4, 11),
    ("python keyword name", HEAD + "    layer class: linear(10)\n", "E203", 4, 11),
    ("no input", "model M:\n    relu\n", "E403", 1, 7),
    ("two inputs", "model M:\n    input [4]\n    input [4]\n    relu\n", "E404", 3, 11),
    ("bad input shape", "model M:\n    input [0, 4]\n    relu\n", "E405", 2, 11),
    ("rule matches nothing", HEAD + "    layer fc: linear(10)\nprecision:\n    layer fc9: int8\n",
     "E503", 6, 11),
    ("pattern matches nothing", HEAD + "    layer fc: linear(10)\nprecision:\n"
     "    layer stage*.conv: int8\n", "E503", 6, 11),
    ("rule on a relu", HEAD + "    layer act: relu\n    layer fc: linear(10)\nprecision:\n"
     "    layer act: int8\n", "E503", 7, 11),
    ("kind rule without weights", HEAD + "    layer fc: linear(10)\nprecision:\n"
     "    kind relu: int8\n", "E504", 6, 10),
    ("kind absent", HEAD + "    layer fc: linear(10)\nprecision:\n    kind conv2d: int8\n",
     "E503", 6, 10),
    ("bits out of range", HEAD + "    layer fc: linear(10)\nprecision:\n    default int(bits=9)\n",
     "E304", 6, 22),
    ("bad ternary threshold", HEAD + "    layer fc: linear(10)\nprecision:\n"
     "    default ternary(threshold=lerned)\n", "E304", 6, 31),
    ("activations need 8 bits", HEAD + "    layer fc: linear(10)\nprecision:\n"
     "    default int(bits=4, activations=dynamic)\n", "E502", 6, 13),
    ("group size does not divide", HEAD + "    layer fc: linear(10)\nprecision:\n"
     "    default int(bits=4, group_size=48)\n", "E508", 6, 36),
    ("dynamic activations on a grouped conv", "model M:\n    input [4, 8, 8]\n"
     "    layer c: conv2d(4, groups=2)\nprecision:\n    default int8(activations=dynamic)\n",
     "E509", 5, 13),
    ("two defaults", HEAD + "    layer fc: linear(10)\nprecision:\n    default int8\n"
     "    default fp16\n", "E505", 7, 5),
    ("precision for unknown model", HEAD + "    layer fc: linear(10)\nprecision N:\n"
     "    default int8\n", "E507", 5, 1),
    ("precision before model", "precision:\n    default int8\n" + HEAD, "E506", 1, 1),
    ("recursive block", "block B:\n    layer x: B\nmodel M:\n    input [4]\n    layer b: B\n",
     "E204", 2, 14),
    ("block missing argument", "block B(n):\n    layer fc: linear(n)\nmodel M:\n    input [4]\n"
     "    layer b: B\n", "E305", 5, 14),
    ("residual cannot project", "model M:\n    input [4, 8, 8]\n    residual:\n        flatten\n",
     "E402", 3, 5),
    ("softmax dim out of range", HEAD + "    softmax(dim=2)\n", "E401", 4, 17),
    ("no model", "block B:\n    relu\n", "E106", 1, 1),
    ("missing colon", "model M\n    input [4]\n", "E111", 1, 8),
    ("stray character", HEAD + "    layer fc: linear(10) $\n", "E110", 4, 26),
    ("unclosed paren", HEAD + "    layer fc: linear(10\n", "E112", 4, 24),
    ("bad dedent", "model M:\n    input [4]\n        relu\n", "E111", 3, 9),
    ("inconsistent dedent", "model M:\n    input [4]\n    residual:\n        relu\n  relu\n",
     "E113", 5, 1),
    ("duplicate block", "block B:\n    relu\nblock B:\n    relu\nmodel M:\n    input [4]\n"
     "    layer b: B\n", "E205", 3, 7),
    ("duplicate model", "model M:\n    input [4]\n    relu\nmodel M:\n    input [4]\n    relu\n",
     "E206", 4, 7),
    # numbers (issue 9.9): every value has a range, checked at its position
    ("infinite eps", HEAD + "    batchnorm(eps=1e999)\n", "E304", 4, 19),
    ("float overflow", HEAD + "    ternary_act(1e400)\n", "E304", 4, 17),
    ("negative overflow", HEAD + "    layer fc: linear(4)\nprecision:\n"
     "    default ternary(threshold=-1e999)\n", "E304", 6, 31),
    ("thousands of digits", HEAD + "    layer fc: linear(" + "9" * 5000 + ")\n", "E304", 4, 22),
    ("size above range", HEAD + "    layer fc: linear(16777217)\n", "E304", 4, 22),
    ("kernel pair overflow", "model M:\n    input [1, 8, 8]\n    conv2d(4, kernel=[1e999, 3])\n",
     "E304", 3, 22),
    ("threshold above range", HEAD + "    layer fc: linear(4)\nprecision:\n"
     "    default ternary(threshold=1001)\n", "E304", 6, 31),
    ("huge repeat", HEAD + "    layer fc: linear(4) * " + "9" * 5000 + "\n", "E306", 4, 27),
    ("repeat above limit", HEAD + "    layer fc: linear(4) * 10001\n", "E306", 4, 27),
    ("repeat zero", HEAD + "    layer fc: linear(4) * 0\n", "E306", 4, 27),
    ("nested repeats", "block A:\n    linear(4) * 1000\nblock B:\n    layer a: A * 1000\n" + HEAD
     + "    layer b: B * 1000\n", "E406", 8, 11),
    ("too many parameters", "model M:\n    input [16777216]\n    layer fc: linear(16777216)\n",
     "E407", 3, 11),
    ("input dimension too large", "model M:\n    input [16777217]\n    relu\n", "E405", 2, 11),
    ("input dimension of many digits", "model M:\n    input [" + "9" * 100 + "]\n    relu\n",
     "E405", 2, 11),
    ("too many rules", HEAD + "    layer fc: linear(4)\nprecision:\n"
     + "    layer fc: int8\n" * 129, "E510", 134, 11),
    # names (issue 9.10)
    ("layer shadows check_input", HEAD + "    layer check_input: linear(4)\n", "E203", 4, 11),
    ("layer shadows a private attribute", HEAD + "    layer _modules: linear(4)\n", "E203", 4, 11),
    ("dunder layer", HEAD + "    layer __init__: linear(4)\n", "E203", 4, 11),
    ("model named like an import", "model torch:\n    input [4]\n    relu\n", "E207", 1, 7),
    ("model named like a builtin", "model super:\n    input [4]\n    relu\n", "E207", 1, 7),
    ("model named like a keyword", "model class:\n    input [4]\n    relu\n", "E207", 1, 7),
    ("block name Python would mangle", "block __B:\n    relu\n" + HEAD + "    __B\n", "E205",
     1, 7),
    # rules and blocks (issue 9.11)
    ("default without a layer to quantize", HEAD + "    relu\nprecision:\n    default int8\n",
     "E503", 6, 5),
    ("repeated block parameter", "block B(n, n):\n    linear(n)\n" + HEAD + "    layer b: B(2)\n",
     "E208", 1, 12),
    ("tab among spaces", "model M:\n    input [4]\n\trelu\n", "E116", 3, 1),
    ("tab and spaces on one line", "model M:\n    input [4]\n  \t  relu\n", "E116", 3, 1),
    # messages (issue 9.13)
    ("unterminated string", HEAD + '    layer fc: linear(4, bias="yes)\n', "E115", 4, 30),
    ("header without body", "model M:\nmodel N:\n    input [4]\n    relu\n", "E114", 1, 1),
    ("header at end of file", HEAD + "    layer fc: linear(4)\nprecision:\n", "E114", 5, 1),
    ("int4", HEAD + "    layer fc: linear(4)\nprecision:\n    default int4\n", "E501", 6, 13),
    ("misspelt input", "model M:\n    inptu [1, 28, 28]\n    relu\n", "E111", 2, 5),
    ("relu with an argument", HEAD + "    relu(4)\n", "E301", 4, 10),
    ("mutual recursion", "block A:\n    layer b: B\nblock B:\n    layer a: A\n" + HEAD
     + "    layer x: A\n", "E204", 4, 14),
    ("skip in a declared model", HEAD + "    layer fc: linear(4)\nprecision:\n"
     "    layer fc: skip\n", "E512", 6, 15),
    # token models (issue 11)
    ("heads do not divide the width", TOK + "    layer a: attention(3)\n", "E401", 4, 24),
    ("kv heads do not divide heads", TOK + "    layer a: attention(4, kv_heads=3)\n", "E401",
     4, 36),
    ("odd head dim with rotary", TOK + "    layer a: attention(8)\n", "E401", 4, 14),
    ("token ids not embedded", "model M:\n    input tokens(vocab=16, max_len=8)\n"
     "    layer fc: linear(4)\n", "E401", 3, 15),
    ("embedding without token input", HEAD + "    layer e: embedding(4)\n", "E401", 4, 14),
    ("flatten in a token model", TOK + "    flatten\n", "E401", 4, 5),
    ("softmax over positions", TOK + "    softmax(dim=0)\n", "E401", 4, 17),
    ("attention on a vector", HEAD + "    layer a: attention(4)\n", "E401", 4, 14),
    ("unknown input", "model M:\n    input words(4)\n    relu\n", "E405", 2, 11),
    ("max_len above range", "model M:\n    input tokens(vocab=16, max_len=70000)\n"
     "    layer e: embedding(8)\n", "E304", 2, 36),
    ("tokens without vocab", "model M:\n    input tokens(max_len=8)\n    layer e: embedding(8)\n",
     "E305", 2, 11),
    ("tied head without its embedding", TOK + "    layer h: tied_head(embd)\n", "E401", 4, 24),
    ("tied head of another width", TOK + "    layer fc: linear(4)\n    layer h: tied_head(e)\n",
     "E401", 5, 24),
    ("bad mlp activation", TOK + "    layer m: mlp(16, activation=tanh)\n", "E304", 4, 33),
    ("form feed and U+2028 in a comment", "# a\x0c form feed\u2028 and a line separator\n"
     + HEAD + "    layer fc: lineer(4)\n", "E201", 5, 15),
]

# The help line each of these gives (issue 9.13: specific help, not just 'unexpected ...')
HELP = {
    "int4": "write int(bits=4) for 4-bit integer weights",
    "misspelt input": "did you mean 'input'? (input [C, H, W])",
    "relu with an argument": "write relu alone",
    "header without body": "indent the model's contents on the lines below it",
    "unterminated string": 'close it with " on the same line',
    "layer shadows check_input": "rename it, for example 'check_input_'",
    "dunder layer": "rename it, for example 'init__'",
}


@pytest.mark.parametrize("name,src,code,line,col", CASES, ids=[c[0] for c in CASES])
def test_corpus(name, src, code, line, col):
    r = check_source(src, "bad.tdsl")
    assert not r.ok
    errors = [d for d in r.diagnostics if d.is_error]
    assert (errors[0].code, errors[0].line, errors[0].col) == (code, line, col), \
        render_all("bad.tdsl", src, r.diagnostics)
    text = render_all("bad.tdsl", src, r.diagnostics)
    assert f"bad.tdsl:{line}:{col}: error[{code}]" in text
    assert "Traceback" not in text


def test_corpus_covers_every_error_code():
    """Every error code the language can emit (found in its source) has a case in this corpus,
    and is documented in docs/language.md."""
    here = os.path.dirname(__file__)
    lang = os.path.join(here, "..", "triton_dsl", "lang")
    emitted = set()
    for name in os.listdir(lang):
        if name.endswith(".py"):
            with open(os.path.join(lang, name), encoding="utf-8") as f:
                emitted |= set(re.findall(r'"(E\d{3})"', f.read()))
    covered = {c[2] for c in CASES} | {c[2] for c in FILE_CASES} | {"E100", "E101"}  # below
    covered |= {"E511", "E513"}  # rules files for existing modules: tests/test_external_rules.py
    assert emitted - covered == set()
    with open(os.path.join(here, "..", "docs", "language.md"), encoding="utf-8") as f:
        documented = set(re.findall(r"\b([EW]\d{3})\b", f.read()))
    assert emitted - documented == set()


@pytest.mark.parametrize("name", sorted(HELP))
def test_specific_help(name):
    src = next(c[1] for c in CASES if c[0] == name)
    errors = [d for d in check_source(src, "bad.tdsl").diagnostics if d.is_error]
    assert errors[0].help == HELP[name]


def test_mutual_recursion_names_the_cycle():
    src = next(c[1] for c in CASES if c[0] == "mutual recursion")
    d = check_source(src, "bad.tdsl").diagnostics[0]
    assert d.message == "blocks use each other: A -> B -> A"


def test_excerpt_is_the_line_the_lexer_counts():
    src = next(c[1] for c in CASES if c[0] == "form feed and U+2028 in a comment")
    text = render_all("bad.tdsl", src, check_source(src, "bad.tdsl").diagnostics)
    assert text.splitlines()[1:3] == ["        layer fc: lineer(4)", "                  ^^^^^^"]


@pytest.mark.parametrize("name,src,code,line,col", CASES, ids=[c[0] for c in CASES])
def test_cli_check_exits_1_with_a_positioned_error(tmp_path, run_cli, name, src, code, line, col):
    path = tmp_path / "bad.tdsl"
    path.write_text(src, encoding="utf-8", newline="")
    rc, out, err = run_cli("check", str(path))
    assert rc == 1 and "Traceback" not in err
    assert f"{path}:{line}:{col}: error[{code}]" in err


def test_every_problem_reported_in_one_run():
    src = HEAD + "    layer a: lineer(10)\n    layer b: linear(10, baes=1)\n" \
                 "precision:\n    layer zz: ternery\n"
    codes = [d.code for d in check_source(src, "x.tdsl").diagnostics]
    assert {"E201", "E302", "E501", "E503"} <= set(codes)


def test_did_you_mean():
    src = HEAD + "    layer fc: lineer(10)\n"
    d = check_source(src, "x.tdsl").diagnostics[0]
    assert d.help == "did you mean 'linear'?"
    src = HEAD + "    layer fc1: linear(10)\nprecision:\n    layer fc2: int8\n"
    assert check_source(src, "x.tdsl").diagnostics[0].help == "did you mean 'fc1'?"


def test_shape_error_does_not_cascade():
    src = "model M:\n    input [1, 8, 8]\n    layer c: conv2d(4, kernel=9)\n    layer d: conv2d(4)\n"
    codes = [d.code for d in check_source(src, "x.tdsl").diagnostics]
    assert codes == ["E401"]


def test_warnings_for_seed_guidelines():
    src = HEAD + "    layer fc1: linear(32)\n    layer fc2: linear(10)\nprecision:\n" \
                 "    default ternary(threshold=0.9)\n"
    r = check_source(src, "x.tdsl")
    assert r.ok  # warnings do not fail a check
    codes = sorted(d.code for d in r.diagnostics)
    assert codes.count("W601") == 2 and codes.count("W602") == 2


# Bad files, not bad syntax: each as (name, bytes or a callable making the path, code)
def _write(tmp_path, name, data):
    p = tmp_path / name
    p.write_bytes(data)
    return str(p)


FILE_CASES = [
    ("empty", b"", "E106"),
    ("only comments", b"# nothing here\n\n", "E106"),
    ("binary", bytes(range(256)) * 4, "E103"),
    ("invalid utf8", b"model M:\n    input [4]\n    layer \xff: relu\n", "E104"),
    ("deep brackets", b"model M:\n    input " + b"[" * 200 + b"]" * 200 + b"\n", "E105"),
    ("deep indentation", b"model M:\n" + b"".join(
        b" " * (i + 1) + b"residual:\n" for i in range(60)) + b" " * 62 + b"relu\n", "E105"),
    ("huge", b"# " + b"x" * (2 << 20) + b"\n", "E102"),
]


@pytest.mark.parametrize("name,data,code", FILE_CASES, ids=[c[0] for c in FILE_CASES])
def test_bad_files(tmp_path, name, data, code):
    r = check_file(_write(tmp_path, "bad.tdsl", data))
    assert not r.ok
    assert r.diagnostics[0].code == code
    render_all(r.path, r.text, r.diagnostics)  # renders without raising


def test_invalid_utf8_position(tmp_path):
    r = check_file(_write(tmp_path, "u.tdsl", b"model M:\n    input [4]\n    layer \xff: relu\n"))
    assert (r.diagnostics[0].line, r.diagnostics[0].col) == (3, 11)


def test_missing_file_and_directory(tmp_path):
    assert check_file(str(tmp_path / "nope.tdsl")).diagnostics[0].code == "E100"
    assert check_file(str(tmp_path)).diagnostics[0].code == "E101"


def test_cli_bad_inputs_exit_1_without_traceback(tmp_path, run_cli):
    for name, data, _ in FILE_CASES[:5]:
        path = _write(tmp_path, f"{name.replace(' ', '_')}.tdsl", data)
        code, out, err = run_cli("check", path)
        assert code == 1 and "Traceback" not in err and path in err
    code, _, err = run_cli("check", str(tmp_path / "missing.tdsl"))
    assert code == 1 and "no such file" in err
    code, _, err = run_cli("compile", str(tmp_path))
    assert code == 1 and "directory" in err
    assert os.listdir(tmp_path)  # nothing removed


@pytest.mark.parametrize("body,rules", [
    ("    layer fc1: linear(10, baes=1)\n    layer fc2: linear(10)\n",  # bad option
     "    kind linear: int8\n    layer fc1: ternary\n    layer fc2: int8\n    layer fc*: int8\n"
     "    default int8\n"),
    ("    layer fc1: linear(10)\n    layer c: conv2d(4)\n    layer fc2: linear(10)\n",  # shape
     "    kind conv2d: int8\n    layer c: int8\n    layer fc2: int8\n"),
    ("    layer b: B(bad=1)\n", "    layer b.fc: int8\n    layer b.*: int8\n    kind linear: int8\n"
     "    default int8\n"),  # a block use with a bad argument
    ("    layer fc: lineer(10)\n", "    layer fc: int8\n    kind linear: int8\n"),  # unknown kind
    ("    layer s: linear(4) * 0\n", "    layer s.0: int8\n    layer s.*: int8\n"),  # bad repeat
])
def test_one_mistake_one_message(body, rules):
    """Issue 9.12: the rules naming a layer that an error hid do not report 'matches no layer'."""
    src = "block B(n=4):\n    layer fc: linear(n)\n" + HEAD + body + "precision:\n" + rules
    errors = [d for d in check_source(src, "x.tdsl").diagnostics if d.is_error]
    assert len(errors) == 1 and errors[0].code != "E503", render_all("x.tdsl", src, errors)


def test_a_real_miss_next_to_an_error_keeps_its_did_you_mean():
    src = HEAD + "    layer fc1: linear(10, baes=1)\n    layer fc2: linear(10)\nprecision:\n" \
                 "    layer fc22: int8\n    layer fc11: int8\n"
    errors = [d for d in check_source(src, "x.tdsl").diagnostics if d.is_error]
    assert [(d.code, d.help) for d in errors] == [
        ("E302", "did you mean 'bias'?"), ("E503", "did you mean 'fc2'?"),
        ("E503", "did you mean 'fc1'?")]
