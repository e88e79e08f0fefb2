"""`fmt` keeps every comment (the README promises it), wherever it stands, and is idempotent."""
import glob
import os

import pytest

from triton_dsl.lang.format import format_file
from triton_dsl.lang.parser import parse
from triton_dsl.lang.source import scan

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FILES = sorted(glob.glob(os.path.join(ROOT, "examples", "*.tdsl"))
               + glob.glob(os.path.join(ROOT, "tests", "golden", "*.tdsl")))

EVERYWHERE = """# file header
block B(n=4):  # block header
    # before the body
    layer fc: linear(n)  # trailing
model M:  # model header
    input [4]  # input
    layer a: linear(4, \\
        bias=false)  # on a backslash-continued line
    layer b: linear(  # after an open bracket
        4,  # inside the arguments
        bias=true)  # after the close
    residual:  # residual header
        relu  # in a residual
    # between statements

    layer c: B * 2  # a repeat
precision:  # precision header
    default int8  # default
    # before a rule
    layer a: fp16  # a rule "with # quotes"
# at the end
"""


def _comments(text):
    return sorted(ln.comment.rstrip() for ln in scan(text) if ln.comment)


def _split(comments):
    """Comments joined on one line by fmt ('# a  # b') count as each of their parts."""
    return sorted(p if p.startswith("#") else "#" + p
                  for c in comments for p in c.split("  #"))


@pytest.mark.parametrize("text", [EVERYWHERE] + [open(p).read() for p in FILES],
                         ids=["everywhere"] + [os.path.basename(p) for p in FILES])
def test_every_comment_is_kept(text):
    tree, diags = parse(text, "m.tdsl")
    assert not diags, diags
    out = format_file(tree, text)
    assert _split(_comments(out)) == _split(_comments(text))
    tree2, _ = parse(out, "m.tdsl")
    assert tree2.definitions == tree.definitions
    assert format_file(tree2, out) == out


def test_continued_line_comment_stays_with_its_statement():
    text = "model M:\n    input [4]\n    layer a: linear(4, \\\n        bias=false)  # keep me\n"
    tree, _ = parse(text)
    assert format_file(tree, text).splitlines()[-1] == \
        "    layer a: linear(4, bias=false)  # keep me"
