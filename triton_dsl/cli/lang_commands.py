"""The language commands: check, compile, summary, fmt. None of them imports torch or triton."""
from __future__ import annotations

import os
import sys

from ..lang.diagnostics import display_name, render_all
from ..lang.frontend import check_file
from .common import EXIT_INPUT, EXIT_OK, EXIT_USAGE, report


def cmd_check(args) -> int:
    failed = 0
    for path in args.files:
        r = check_file(path)
        rules = _as_rules(r)
        if rules is not None:  # precision sections only: rules for existing models
            if rules.diagnostics:
                print(render_all(path, rules.text, rules.diagnostics), file=sys.stderr)
            if rules.ok:
                n = sum(len(s.rules) for s in rules.sections)
                print(f"{display_name(path)}: ok (rules for existing models: {n} "
                      f"rule{'s' * (n != 1)})")
            else:
                failed += 1
        elif report(r):
            names = ", ".join(m.name for m in r.models)
            print(f"{display_name(path)}: ok ({len(r.models)} model{'s' * (len(r.models) != 1)}: "
                  f"{names})")
        else:
            failed += 1
    return EXIT_INPUT if failed else EXIT_OK


def _as_rules(r):
    """A file with no model whose every definition is an unnamed precision section, checked as
    a rules file (lang/external.py); None for any other file."""
    from ..lang.external import check_rules, parse_rules
    if r.text is None or not any(d.code == "E106" for d in r.diagnostics):
        return None
    rules = parse_rules(r.text, r.path)
    if not rules.sections or any(d.code == "E513" for d in rules.diagnostics):
        return None
    return check_rules(rules)


def cmd_compile(args) -> int:
    from ..lang.codegen import generate
    from ..files import write_atomic

    r = check_file(args.file)
    if not report(r):
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
    print(f"wrote {display_name(out)} ({', '.join(m.name for m in r.models)})")
    return EXIT_OK


def cmd_summary(args) -> int:
    from ..lang.summary import render, summarize, to_json

    r = check_file(args.file)
    if not report(r):
        return EXIT_INPUT
    models = r.models
    if args.model:
        models = [m for m in models if m.name == args.model]
        if not models:
            print(f"triton-dsl: error: {args.file} has no model '{args.model}' (it has "
                  f"{', '.join(m.name for m in r.models)})", file=sys.stderr)
            return EXIT_INPUT
    sums = [summarize(m, stateless=args.all) for m in models]  # one list for both forms
    print(to_json(sums) if args.json else "\n\n".join(render(s) for s in sums))
    return EXIT_OK


def cmd_fmt(args) -> int:
    from ..files import write_atomic
    from ..lang.format import format_file
    from ..lang.parser import parse
    from ..lang.source import read_source

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
                print(f"{display_name(path)}: not formatted", file=sys.stderr)
                status = EXIT_INPUT
        elif args.write:
            if new != text:
                write_atomic(path, new)
                print(f"formatted {display_name(path)}")
        else:
            sys.stdout.write(new)
    return status


def add_commands(sub):
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
    s.add_argument("--all", action="store_true",
                   help="also list layers without parameters (in the table and in --json)")
    s.set_defaults(func=cmd_summary)
    s = sub.add_parser("fmt", help="print the canonical form of .tdsl files")
    s.add_argument("files", nargs="+", metavar="FILE")
    g = s.add_mutually_exclusive_group()
    g.add_argument("-w", "--write", action="store_true", help="rewrite the files in place")
    g.add_argument("--check", action="store_true", help="exit 1 if a file is not formatted")
    s.set_defaults(func=cmd_fmt)
