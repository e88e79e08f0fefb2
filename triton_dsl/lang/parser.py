"""parse(text, path) -> ast.File, or a list of positioned diagnostics. The Lark parser is built once."""
from __future__ import annotations

import functools
import math
from importlib import resources

from lark import Lark, Token, Transformer, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken
from lark.indenter import DedentError, Indenter

from . import ast
from .diagnostics import Diagnostic, source_lines, suggest
from .limits import MAX_DIGITS
from .source import TAB_WIDTH, check_layout, dedent_line


class _Indenter(Indenter):
    NL_type = "_NL"
    OPEN_PAREN_types = ["LPAR", "LSQB"]
    CLOSE_PAREN_types = ["RPAR", "RSQB"]
    INDENT_type = "_INDENT"
    DEDENT_type = "_DEDENT"
    tab_len = TAB_WIDTH


@functools.lru_cache(maxsize=1)
def _parser() -> Lark:
    grammar = resources.files("triton_dsl.grammar").joinpath("tdsl.lark").read_text("utf-8")
    return Lark(grammar, parser="lalr", lexer="contextual", postlex=_Indenter(),
                propagate_positions=True, maybe_placeholders=True)


def _pos(tok) -> ast.Pos:
    return ast.Pos(tok.line, tok.column)


@v_args(meta=True)
class _ToAst(Transformer):
    """Builds nodes only; every check lives in the checker."""

    def __init__(self, path: str):
        super().__init__()
        self.path = path

    def start(self, meta, items):
        return ast.File(self.path, tuple(items))

    def model(self, meta, items):
        name, *rest = items
        inputs = tuple(i for i in rest if isinstance(i, (ast.List, ast.Call)))  # only `input`
        body = tuple(i for i in rest if not isinstance(i, (ast.List, ast.Call)))  # yields these
        return ast.Model(str(name), inputs, body, _pos(name))

    def input(self, meta, items):
        return items[0]

    def block(self, meta, items):
        name, *rest = items
        params = rest.pop(0) if rest and isinstance(rest[0], tuple) else ()
        return ast.Block(str(name), params, tuple(rest), _pos(name))

    def params(self, meta, items):
        return tuple(p for p in items if p is not None)

    def param(self, meta, items):
        name, default = items[0], (items[1] if len(items) > 1 else None)
        return ast.Param(str(name), default, _pos(name))

    def layer(self, meta, items):
        name = items.pop(0) if isinstance(items[0], Token) else None
        call = items[0]
        repeat = items[1] if len(items) > 1 else None
        pos = _pos(name) if name else call.pos  # diagnostics about the layer point at its name
        return ast.Layer(str(name) if name else None, call, repeat, pos)

    def repeat(self, meta, items):
        return self.number(meta, items)

    def residual(self, meta, items):
        name = items.pop(0)
        return ast.Residual(str(name) if name else None, tuple(items), ast.Pos(meta.line, meta.column))

    def precision(self, meta, items):
        name = items.pop(0)
        return ast.Precision(str(name) if name else None, tuple(items), ast.Pos(meta.line, meta.column))

    def default_rule(self, meta, items):
        return ast.Rule("default", "", items[0], ast.Pos(meta.line, meta.column))

    def layer_rule(self, meta, items):
        return ast.Rule("layer", str(items[0]), items[1], _pos(items[0]))

    def kind_rule(self, meta, items):
        return ast.Rule("kind", str(items[0]), items[1], _pos(items[0]))

    def call(self, meta, items):
        name, *args = items
        return ast.Call(str(name), tuple(a for a in args if a is not None), _pos(name))

    def arg(self, meta, items):
        if len(items) == 2:
            return ast.Arg(str(items[0]), items[1], _pos(items[0]))
        return ast.Arg(None, items[0], items[0].pos)

    def number(self, meta, items):
        t = items[0]
        return ast.Number(_number(str(t)), str(t), _pos(t))

    def word(self, meta, items):
        return ast.Word(str(items[0]), _pos(items[0]))

    def string(self, meta, items):
        t = items[0]
        return ast.String(str(t)[1:-1], _pos(t))

    def list(self, meta, items):
        return ast.List(tuple(i for i in items if i is not None), ast.Pos(meta.line, meta.column))


def _number(text: str):
    """The literal's value. Never raises and never takes long: an integer of more than MAX_DIGITS
    digits (int() of thousands of digits is slow, then refused) and a float that overflows become
    an infinity, which every range in the checker refuses with the literal's position."""
    digits = text.lstrip("+-")
    if digits.isdigit():
        if len(digits) > MAX_DIGITS:
            return -math.inf if text.startswith("-") else math.inf
        return int(text)
    return float(text)


_FRIENDLY = {
    "NAME": "a name", "TARGET": "a layer name or pattern", "INT": "an integer",
    "SIGNED_NUMBER": "a number", "STRING": "a string", "_NL": "end of line",
    "_INDENT": "an indented block", "_DEDENT": "end of block", "$END": "end of file",
}


def _describe(terminal: str) -> str:
    if terminal in _FRIENDLY:
        return _FRIENDLY[terminal]
    for t in _parser().terminals:
        if t.name == terminal and t.pattern.type == "str":
            return f"'{t.pattern.value}'"
    return terminal.lower()


def _expected(names) -> str:
    shown = sorted({_describe(n) for n in names})
    return ", ".join(shown[:8]) + (", ..." if len(shown) > 8 else "")


def _syntax_error(e: UnexpectedInput, text: str) -> Diagnostic:
    line, col = getattr(e, "line", 0) or 0, getattr(e, "column", 0) or 0
    if isinstance(e, UnexpectedCharacters):
        ch = text[e.pos_in_stream] if e.pos_in_stream < len(text) else "?"
        if ch == "\t":
            return Diagnostic("E110", "tab inside a line", line, col, help="use spaces")
        return Diagnostic("E110", f"unexpected character {ch!r}", line, col,
                          help=f"expected {_expected(e.allowed)}" if e.allowed else None)
    at_end = isinstance(e, UnexpectedToken) and (
        e.token.type == "$END" or e.token.type == "_DEDENT" and e.token.end_pos >= len(text.rstrip()))
    if isinstance(e, UnexpectedEOF) or at_end:
        lines = source_lines(text) or [""]
        return Diagnostic("E112", "unexpected end of file", len(lines), len(lines[-1]) + 1,
                          help=f"expected {_expected(e.expected)}")
    tok = e.token
    if tok.type == "LSQB":  # `inptu [1, 28, 28]`: a misspelt input line reads as a layer kind
        lines = source_lines(text)
        first = (lines[tok.line - 1].split() or [""])[0] if 0 < tok.line <= len(lines) else ""
        if first.isidentifier() and first != "input" and suggest(first, ["input"]):
            return Diagnostic("E111", f"unknown statement '{first}'", tok.line,
                              lines[tok.line - 1].index(first) + 1,
                              "did you mean 'input'? (input [C, H, W])", len(first))
    if tok.type == "_INDENT":  # the token borrows the newline's start; point at the indented line
        line, col = tok.end_line, tok.end_column
        return Diagnostic("E111", "unexpected indentation", line, col,
                          help="this line is indented more than the line above it expects")
    what = {"_NL": "end of line", "_INDENT": "indentation", "_DEDENT": "end of block"}.get(
        tok.type, f"'{tok}'")
    help_ = f"expected {_expected(e.expected)}"
    if "COLON" in e.expected and tok.type == "_NL":
        help_ = "a line that opens a block ends with ':'"
    return Diagnostic("E111", f"unexpected {what}", tok.line or line, tok.column or col,
                      help=help_, width=max(1, len(str(tok))) if tok.type not in _FRIENDLY else 1)


def parse(text: str, path: str = "<string>") -> tuple[ast.File | None, list[Diagnostic]]:
    """Parse .tdsl source. Returns (file, []) or (None, [one syntax diagnostic])."""
    diags = check_layout(text)
    if diags:
        return None, diags
    try:
        tree = _parser().parse(text if text.endswith("\n") else text + "\n")
    except DedentError:
        line = dedent_line(text)
        return None, [Diagnostic("E113", "indentation does not match any outer block", line, 1,
                                 help="indent with the same number of spaces as an enclosing line")]
    except UnexpectedInput as e:
        return None, [_syntax_error(e, text)]
    return _ToAst(path).transform(tree), []


__all__ = ["parse"]
