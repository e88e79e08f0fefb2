"""The pipeline in one place: read -> parse -> check -> (generate). No torch imported here."""
from __future__ import annotations

from dataclasses import dataclass, field

from . import ir
from .checker import check
from .diagnostics import Checked, Diagnostic
from .parser import parse
from .source import read_source


@dataclass
class Result(Checked):
    path: str
    text: str | None
    models: list[ir.Model] = field(default_factory=list)
    diagnostics: list[Diagnostic] = field(default_factory=list)
    all_fp32: bool = False  # every layer forced to fp32 (the float baseline of the file)


def check_source(text: str, path: str = "<string>", all_fp32: bool = False) -> Result:
    tree, diags = parse(text, path)
    if tree is None:
        return Result(path, text, [], diags)
    models, diags = check(tree, text, all_fp32)
    return Result(path, text, models, diags, all_fp32)


def check_file(path: str, all_fp32: bool = False) -> Result:
    text, diags = read_source(path)
    if text is None:
        return Result(path, None, [], diags)
    return check_source(text, path, all_fp32)

