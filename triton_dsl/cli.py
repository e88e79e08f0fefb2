"""The `triton-dsl` command. main(argv) -> exit code: 0 success, 1 problems in the input, 2 usage.

check, compile, summary and fmt import neither torch nor triton, so they start instantly.
"""
from __future__ import annotations

import argparse
import os
import sys

from . import __version__
from .compiler import Result, check_file
from .diagnostics import render_all

EXIT_OK, EXIT_INPUT, EXIT_USAGE = 0, 1, 2


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # argparse exits 2 itself; keep its message short and plain
        self.print_usage(sys.stderr)
        print(f"{self.prog}: error: {message}", file=sys.stderr)
        raise SystemExit(EXIT_USAGE)


def _report(r: Result) -> bool:
    """Print a file's diagnostics to stderr; True when it has no errors."""
    if r.diagnostics:
        print(render_all(r.path, r.text, r.diagnostics), file=sys.stderr)
    return r.ok


def cmd_check(args) -> int:
    failed = 0
    for path in args.files:
        r = check_file(path)
        if _report(r):
            names = ", ".join(m.name for m in r.models)
            print(f"{path}: ok ({len(r.models)} model{'s' * (len(r.models) != 1)}: {names})")
        else:
            failed += 1
    return EXIT_INPUT if failed else EXIT_OK


def cmd_compile(args) -> int:
    from .codegen import generate
    from .files import write_atomic

    r = check_file(args.file)
    if not _report(r):
        return EXIT_INPUT
    out = args.output or os.path.splitext(args.file)[0] + ".py"
    if os.path.abspath(out) == os.path.abspath(args.file):
        print(f"triton-dsl: error: output {out} is the input file; choose another -o",
              file=sys.stderr)
        return EXIT_USAGE
    if os.path.isdir(out):
        print(f"triton-dsl: error: output {out} is a directory", file=sys.stderr)
        return EXIT_USAGE
    code = generate(r.models, r.path, r.text)
    if out == "-":
        sys.stdout.write(code)
        return EXIT_OK
    try:
        write_atomic(out, code)
    except OSError as e:
        print(f"triton-dsl: error: cannot write {out}: {e.strerror or e}", file=sys.stderr)
        return EXIT_INPUT
    print(f"wrote {out} ({', '.join(m.name for m in r.models)})")
    return EXIT_OK


def cmd_summary(args) -> int:
    from .summary import render, summarize, to_json

    r = check_file(args.file)
    if not _report(r):
        return EXIT_INPUT
    models = r.models
    if args.model:
        models = [m for m in models if m.name == args.model]
        if not models:
            print(f"triton-dsl: error: {args.file} has no model '{args.model}' (it has "
                  f"{', '.join(m.name for m in r.models)})", file=sys.stderr)
            return EXIT_INPUT
    sums = [summarize(m) for m in models]
    print(to_json(sums) if args.json else "\n\n".join(render(s, args.all) for s in sums))
    return EXIT_OK


def cmd_fmt(args) -> int:
    from .files import write_atomic
    from .format import format_file
    from .parser import parse
    from .source import read_source

    status = EXIT_OK
    for path in args.files:
        text, diags = read_source(path)
        tree = None
        if text is not None:
            tree, diags = parse(text, path)
        if tree is None:
            print(render_all(path, text, diags), file=sys.stderr)
            status = EXIT_INPUT
            continue
        new = format_file(tree, text)
        if args.check:
            if new != text:
                print(f"{path}: not formatted", file=sys.stderr)
                status = EXIT_INPUT
        elif args.write:
            if new != text:
                write_atomic(path, new)
                print(f"formatted {path}")
        else:
            sys.stdout.write(new)
    return status


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(prog="triton-dsl", description="Declare quantized networks; compile them to "
                "PyTorch modules with Triton kernels.")
    p.add_argument("--version", action="version", version=f"triton-dsl {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)
    s = sub.add_parser("check", help="check .tdsl files and report every problem")
    s.add_argument("files", nargs="+", metavar="FILE")
    s.set_defaults(func=cmd_check)
    s = sub.add_parser("compile", help="write the Python module for a .tdsl file")
    s.add_argument("file", metavar="FILE")
    s.add_argument("-o", "--output", metavar="OUT",
                   help="output path (default: FILE with .py; - for standard output)")
    s.set_defaults(func=cmd_compile)
    s = sub.add_parser("summary", help="per-layer precision, shape, parameters and packed bytes")
    s.add_argument("file", metavar="FILE")
    s.add_argument("--json", action="store_true", help="print JSON instead of a table")
    s.add_argument("--model", metavar="NAME", help="only this model of the file")
    s.add_argument("--all", action="store_true", help="also list layers without parameters")
    s.set_defaults(func=cmd_summary)
    s = sub.add_parser("fmt", help="print the canonical form of .tdsl files")
    s.add_argument("files", nargs="+", metavar="FILE")
    g = s.add_mutually_exclusive_group()
    g.add_argument("-w", "--write", action="store_true", help="rewrite the files in place")
    g.add_argument("--check", action="store_true", help="exit 1 if a file is not formatted")
    s.set_defaults(func=cmd_fmt)
    for extra in _EXTRA:
        extra(sub)
    return p


def _extra_commands(sub):
    """The commands that need torch (bench, train, ptq, freeze, eval, report): their module
    imports it only when one of them runs."""
    from .cli_workflow import add_commands
    add_commands(sub)


_EXTRA: list = [_extra_commands]  # commands that need torch; they import it only when run


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
