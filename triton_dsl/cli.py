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


def _add_bench(sub):
    s = sub.add_parser("bench", help="time quantized matmuls against torch and the peers")
    s.add_argument("--M", type=int, nargs="+", default=[1, 16, 256], metavar="M")
    s.add_argument("--NK", type=int, nargs="+", default=[4096, 8192], metavar="N")
    s.add_argument("--device", choices=["cpu", "cuda"], default=None,
                   help="default: cuda when available")
    s.add_argument("--repeat", type=int, default=10)
    s.add_argument("--methods", nargs="+", metavar="METHOD")
    s.add_argument("--json", metavar="PATH", help="write records and the environment to PATH")
    s.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    import torch

    from . import bench
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    try:
        return bench.run_cli(args)
    except ValueError as e:
        print(f"triton-dsl: error: {e}", file=sys.stderr)
        return EXIT_USAGE


def _workflow_errors(fn):
    """Bad data, checkpoints and .tdsl files become a message and exit 1, not a traceback."""
    def run(args):
        from .checkpoint import CheckpointError
        from .data import DataError
        from .diagnostics import TdslError
        try:
            return fn(args)
        except TdslError as e:
            print(str(e), file=sys.stderr)
        except (CheckpointError, DataError, ValueError) as e:
            print(f"triton-dsl: error: {e}", file=sys.stderr)
        return EXIT_INPUT
    return run


def _check_output(path: str):
    if os.path.isdir(path):
        raise ValueError(f"output {path} is a directory")
    folder = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(folder):
        raise ValueError(f"output folder {folder} does not exist")


def _init_distributed():
    """Under torchrun (WORLD_SIZE > 1): join the process group; gloo on the CPU, nccl on GPUs."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import torch
        import torch.distributed as dist
        if not dist.is_initialized():
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo")


def _end_distributed():
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.barrier()  # no rank tears the group down while another still uses it
        dist.destroy_process_group()


@_workflow_errors
def cmd_train(args) -> int:
    from .workflow import train_model
    _check_output(args.output)
    _init_distributed()
    try:
        r = train_model(args.file, args.data, args.output, args.epochs, args.seed, args.lr,
                        args.batch_size, args.fp32, args.freeze, args.model, not args.quiet)
    finally:
        _end_distributed()
    if "bytes" in r:
        print(f"wrote {args.output} ({r['bytes']:,} bytes): test accuracy {r['test_acc']:.2f}%")
    return EXIT_OK


@_workflow_errors
def cmd_ptq(args) -> int:
    from .train import evaluate
    from .workflow import ptq
    _check_output(args.output)
    r = ptq(args.file, args.weights, args.output, args.calib, args.calib_batches, args.model)
    msg = f"wrote {args.output} ({r['bytes']:,} bytes)"
    if args.calib:
        from .data import load
        msg += f": test accuracy {evaluate(r['model'], load(args.calib, r['model'].input_shape)):.2f}%"
    print(msg)
    return EXIT_OK


@_workflow_errors
def cmd_freeze(args) -> int:
    from .workflow import freeze_checkpoint
    _check_output(args.output)
    size = freeze_checkpoint(args.checkpoint, args.output)
    print(f"wrote {args.output} ({size:,} bytes, {os.path.getsize(args.checkpoint) / size:.1f}x "
          f"smaller than {args.checkpoint})")
    return EXIT_OK


@_workflow_errors
def cmd_eval(args) -> int:
    import json

    from .workflow import evaluate_checkpoint
    r = evaluate_checkpoint(args.checkpoint, args.data)
    if args.json:
        print(json.dumps(r, indent=2))
    else:
        lat = ", ".join(f"batch {b}: {ms:.3f} ms" for b, ms in r["latency_ms"].items())
        print(f"{r['model']} ({r['kind']}): accuracy {r['accuracy']:.2f}% on {args.data}; "
              f"{r['bytes']:,} bytes on disk; CPU latency {lat}")
    return EXIT_OK


@_workflow_errors
def cmd_report(args) -> int:
    from .report import write_report
    page = write_report(args.checkpoint, args.output, args.bench)
    print(f"wrote {page}")
    return EXIT_OK


def _add_workflow(sub):
    s = sub.add_parser("train", help="train a model (QAT for quantized layers) and save it")
    s.add_argument("file", metavar="FILE")
    s.add_argument("--data", default="digits", help="digits (default), mnist:DIR, x.pt, x.npz")
    s.add_argument("--epochs", type=int, default=10)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--lr", type=float, default=1e-3)
    s.add_argument("--batch-size", type=int, default=64)
    s.add_argument("--fp32", action="store_true", help="every layer fp32 (a float baseline)")
    s.add_argument("--freeze", action="store_true", help="save the packed deploy form")
    s.add_argument("--model", metavar="NAME", help="which model of the file")
    s.add_argument("--quiet", action="store_true", help="no progress bar")
    s.add_argument("-o", "--output", required=True, metavar="OUT.safetensors")
    s.set_defaults(func=cmd_train)
    s = sub.add_parser("ptq", help="post-training quantization of float weights")
    s.add_argument("file", metavar="FILE")
    s.add_argument("--weights", required=True, help="float weights: a checkpoint from "
                   "`train --fp32`, a safetensors or a torch state_dict")
    s.add_argument("--calib", metavar="DATA", help="calibration data (needed for "
                   "activations=static); also reports accuracy on its test split")
    s.add_argument("--calib-batches", type=int, default=8)
    s.add_argument("--model", metavar="NAME")
    s.add_argument("-o", "--output", required=True, metavar="OUT.safetensors")
    s.set_defaults(func=cmd_ptq)
    s = sub.add_parser("freeze", help="a trained checkpoint -> its packed deploy form")
    s.add_argument("checkpoint")
    s.add_argument("-o", "--output", required=True, metavar="OUT.safetensors")
    s.set_defaults(func=cmd_freeze)
    s = sub.add_parser("eval", help="accuracy, CPU latency and size of a checkpoint")
    s.add_argument("checkpoint")
    s.add_argument("--data", default="digits")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_eval)
    s = sub.add_parser("report", help="plots and a markdown page for a checkpoint")
    s.add_argument("checkpoint")
    s.add_argument("-o", "--output", required=True, metavar="DIR")
    s.add_argument("--bench", metavar="JSON", help="a `bench --json` file to plot as well")
    s.set_defaults(func=cmd_report)


_EXTRA: list = [_add_bench, _add_workflow]  # commands that need torch; they import it only when run


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
