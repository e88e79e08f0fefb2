"""The `triton-dsl` command. main(argv) -> exit code: 0 success, 1 problems in the input, 2 usage.

The parser and dispatch live here; each command lives with its kind (lang_commands: check,
compile, summary, fmt, which import neither torch nor triton; workflow_commands: the rest, which
import torch only when they run; external_commands: plan, for models that already exist).
"""
from __future__ import annotations

import sys

from ..version import __version__
from . import external_commands, lang_commands, lm_commands, workflow_commands
from .common import EXIT_OK, EXIT_USAGE, Parser


def build_parser() -> Parser:
    p = Parser(prog="triton-dsl", description="Declare quantized networks; compile them to "
               "PyTorch modules with Triton kernels.")
    p.add_argument("--version", action="version", version=f"triton-dsl {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    lang_commands.add_commands(sub)
    workflow_commands.add_commands(sub)
    external_commands.add_commands(sub)
    lm_commands.add_commands(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
        if args.command is None:
            parser.print_help(sys.stderr)
            return EXIT_USAGE
        return args.func(args)
    except SystemExit as e:
        return e.code if isinstance(e.code, int) else EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return EXIT_OK
