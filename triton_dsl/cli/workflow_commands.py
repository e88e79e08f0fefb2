"""The CLI commands of the workflow: bench, train, ptq, freeze, eval, report.

Each imports torch and the rest only when it runs, so `triton-dsl check` stays instant.
"""
from __future__ import annotations

import argparse
import math
import os
import sys

from ..lang.precision import FLOAT_BITS
from .common import EXIT_INPUT, EXIT_OK, EXIT_USAGE


def bench_arguments(ap):
    """The options of `triton-dsl bench` and benchmarks/bench.py (no torch needed to list them)."""
    ap.add_argument("--M", type=_int_in(1, LIMIT_ROWS), nargs="+", default=[1, 16, 256],
                    metavar="M")
    ap.add_argument("--NK", type=_int_in(1, LIMIT_NK), nargs="+", default=[4096, 8192],
                    metavar="N")
    ap.add_argument("--device", choices=["cpu", "cuda"], default=None,
                    help="default: cuda when available")
    ap.add_argument("--repeat", type=_int_in(2, 100_000), default=10,
                    help="timed rounds (at least 2: the spread needs two)")
    ap.add_argument("--methods", nargs="+", metavar="METHOD")
    ap.add_argument("--json", metavar="PATH", help="write records and the environment to PATH")
    ap.add_argument("--cold", action="store_true", help="CPU layer bench: read a buffer twice "
                    "the last-level cache before every timed call, so weights stream from "
                    "memory as in a model larger than the cache")
    ap.add_argument("--model", metavar="FILE.tdsl", help="time a whole model instead: frozen "
                    "against fp32 and torch's int8 deployment of the same architecture; with "
                    "--rules, PKG.MODULE:FACTORY: an existing model, float against frozen")
    ap.add_argument("--rules", metavar="RULES.tdsl", help="with --model PKG.MODULE:FACTORY: "
                    "the precision rules to apply to the model the factory builds")
    ap.add_argument("--tokens", type=_positive_int, default=1, help="with --rules, for "
                    "language models: tokens per input (1: one decoding step)")
    ap.add_argument("--input-shape", type=_positive_int, nargs="+", metavar="D", help="with "
                    "--rules, for models without a vocabulary: one input's shape, no batch")
    ap.add_argument("--batch", type=_int_in(1, LIMIT_BATCH), nargs="+", default=[1, 64],
                    metavar="B",
                    help="batch sizes for --model")
    ap.add_argument("--compile", action="store_true",
                    help="with --model: also torch.compile the fp32 and frozen models")
    ap.add_argument("--decode", action="store_true", help="with --model of a language model: "
                    "tokens per second of incremental decoding (KV cache), and of the prompt "
                    "pass (prefill)")
    ap.add_argument("--prompt-len", type=_positive_int, nargs="+", default=[16], metavar="P",
                    help="with --decode: context lengths to decode after, timed in the same "
                    "interleaved rounds")
    ap.add_argument("--new-tokens", type=_int_in(2, 1_000_000), default=64, metavar="N",
                    help="with --decode (at least 2: the spread needs two)")
    ap.add_argument("--kv-cache", choices=tuple(FLOAT_BITS), default="fp32",
                    help="with --decode: the KV cache's type, for every method")


def _add_bench(sub):
    s = sub.add_parser("bench", help="time quantized matmuls against torch and the peers")
    bench_arguments(s)
    s.set_defaults(func=cmd_bench)


def cmd_bench(args) -> int:
    from ..lang.diagnostics import TdslError
    from ..workflow import bench
    from ..workflow.factory import FactoryError
    try:
        if args.json:  # before minutes of timing, not after
            _check_output(args.json)
        return bench.run_cli(args)
    except TdslError as e:  # --model FILE.tdsl or --rules with errors
        print(str(e), file=sys.stderr)
        return EXIT_INPUT
    except FactoryError as e:  # --model PKG.MODULE:FACTORY that gives no model
        print(f"triton-dsl: error: {e}", file=sys.stderr)
        return EXIT_INPUT
    except ValueError as e:
        print(f"triton-dsl: error: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:  # a file that cannot be read or written
        print(f"triton-dsl: error: {e}", file=sys.stderr)
        return EXIT_INPUT


def _workflow_errors(fn):
    """Bad data, checkpoints, .tdsl files and files that cannot be read or written become a
    message and exit 1, not a traceback."""
    def run(args):
        from ..workflow.checkpoint import CheckpointError
        from ..workflow.data import DataError
        from ..lang.diagnostics import TdslError
        try:
            return fn(args)
        except TdslError as e:
            print(str(e), file=sys.stderr)
        except (CheckpointError, DataError, ValueError, OSError) as e:
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
    from ..workflow.pipeline import train_model
    _check_output(args.output)
    _init_distributed()
    try:
        r = train_model(args.file, args.data, args.output, args.epochs, args.seed, args.lr,
                        args.batch_size, args.fp32, args.freeze, args.model, not args.quiet,
                        optimizer=args.optimizer, weight_decay=args.weight_decay,
                        schedule=args.schedule, resume=args.resume, steps=args.steps)
    finally:
        _end_distributed()
    if "bytes" in r and "test_bpb" in r:
        best = (f"best epoch {r['best_epoch']} on validation ({r['val_bpb']:.4f} bits/byte)"
                if r["val_bpb"] is not None else f"epoch {r['best_epoch']} (no validation split)")
        print(f"wrote {args.output} ({r['bytes']:,} bytes): {best}; test {r['test_bpb']:.4f} "
              "bits/byte")
    elif "bytes" in r:
        best = (f"best epoch {r['best_epoch']} on validation ({r['val_acc']:.2f}%)"
                if r["val_acc"] is not None else f"epoch {r['best_epoch']} (no validation split)")
        print(f"wrote {args.output} ({r['bytes']:,} bytes): {best}; test accuracy "
              f"{r['test_acc']:.2f}%")
    return EXIT_OK


@_workflow_errors
def cmd_ptq(args) -> int:
    from ..workflow.pipeline import ptq
    _check_output(args.output)
    r = ptq(args.file, args.weights, args.output, args.calib, args.calib_batches, args.model)
    msg = f"wrote {args.output} ({r['bytes']:,} bytes)"
    if r.get("test_bpb") is not None:
        msg += f": test {r['test_bpb']:.4f} bits/byte on {args.calib}"
    elif r["test_acc"] is not None:
        msg += f": test accuracy {r['test_acc']:.2f}% on {args.calib}"
    print(msg)
    return EXIT_OK


@_workflow_errors
def cmd_freeze(args) -> int:
    from ..workflow.pipeline import freeze_checkpoint
    _check_output(args.output)
    before = os.path.getsize(args.checkpoint)
    size = freeze_checkpoint(args.checkpoint, args.output)
    print(f"wrote {args.output} ({size:,} bytes, {ratio(before, size)} {args.checkpoint})")
    return EXIT_OK


def ratio(before: int, after: int) -> str:
    """'4.2x smaller than' or '1.3x larger than': a ratio above 1, in the right direction."""
    if after <= before:
        return f"{before / max(after, 1):.1f}x smaller than"
    return f"{after / max(before, 1):.1f}x larger than"


@_workflow_errors
def cmd_eval(args) -> int:
    import json

    from ..workflow.pipeline import evaluate_checkpoint
    r = evaluate_checkpoint(args.checkpoint, args.data)
    if args.json:
        print(json.dumps(r, indent=2))
    elif "test_bpb" in r:
        print(f"{r['model']} ({r['kind']}): {r['test_bpb']:.4f} bits/byte on the test split of "
              f"{r['data']} (validation {r['val_bpb']:.4f}); {r['bytes']:,} bytes on disk; "
              f"decoding {r['decode_ms_per_token']:.3f} ms per token")
    else:
        lat = ", ".join(f"batch {b}: {ms:.3f} ms" for b, ms in r["latency_ms"].items())
        if r["normalization"]["from"] == "data":
            print(f"triton-dsl: warning: {args.checkpoint} records no input normalisation; "
                  f"standardised {args.data or 'digits'} with its own statistics",
                  file=sys.stderr)
        print(f"{r['model']} ({r['kind']}): accuracy {r['accuracy']:.2f}% on "
              f"{args.data or 'digits'}; "
              f"{r['bytes']:,} bytes on disk; CPU latency {lat}")
    return EXIT_OK


@_workflow_errors
def cmd_report(args) -> int:
    from ..workflow.report import write_report
    page = write_report(args.checkpoint, args.output, args.bench)
    print(f"wrote {page}")
    return EXIT_OK


def _int_in(lo: int, hi: int | None = None):
    """An argparse type: a whole number in lo..hi (no upper bound when hi is None)."""
    def parse(text):
        try:
            v = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
        if v < lo:
            raise argparse.ArgumentTypeError(f"must be at least {lo}, got {v}")
        if hi is not None and v > hi:
            raise argparse.ArgumentTypeError(f"must be at most {hi:,}, got {v:,}")
        return v
    return parse


_positive_int = _int_in(1)
# bench sizes: beyond these a run would allocate more than this machine class holds (an fp32
# 32768 x 32768 weight is 4 GiB) rather than fail with a message
LIMIT_NK, LIMIT_ROWS, LIMIT_BATCH = 32768, 65536, 4096


def _number(minimum, strict):
    def parse(text):
        try:
            v = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
        if not math.isfinite(v) or v < minimum or (strict and v == minimum):
            raise argparse.ArgumentTypeError(f"must be {'>' if strict else '>='} {minimum}, "
                                             f"got {text}")
        return v
    return parse


def _add_workflow(sub):
    s = sub.add_parser("train", help="train a model (QAT for quantized layers) and save it",
                       description="Train on the training split; keep the epoch best on a "
                       "validation split held out of it; report accuracy on the test split.",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    s.add_argument("file", metavar="FILE")
    s.add_argument("--data", help="digits (the default), mnist:DIR, x.pt, x.npz; for a "
                   "language model stdlib (the default) or text:FILE_OR_FOLDER")
    s.add_argument("--epochs", type=_positive_int, default=10, help="epochs to train")
    s.add_argument("--steps", type=_positive_int, help="language models: at most this many "
                   "batches per epoch (default: every window of the training text)")
    s.add_argument("--seed", type=int, default=0, help="initial weights and batch order")
    s.add_argument("--lr", type=_number(0, True), default=1e-3, help="peak learning rate")
    s.add_argument("--weight-decay", type=_number(0, False), default=0.0,
                   help="L2 penalty (adam, sgd) or decoupled decay (adamw)")
    s.add_argument("--optimizer", choices=["adam", "adamw", "sgd"], default="adam",
                   help="sgd uses momentum 0.9")
    s.add_argument("--schedule", choices=["cosine", "none"], default="cosine",
                   help="learning rate: cosine decay to 0 over the run, or constant")
    s.add_argument("--batch-size", type=_positive_int, default=64, help="samples per step")
    s.add_argument("--resume", metavar="CKPT", help="continue from a trainable checkpoint of "
                   "this model: its weights, history and normalisation (the optimizer restarts)")
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
    s.add_argument("--calib-batches", type=_positive_int, default=8,
                   help="batches of 64 training samples the static ranges observe (default 8)")
    s.add_argument("--model", metavar="NAME")
    s.add_argument("-o", "--output", required=True, metavar="OUT.safetensors")
    s.set_defaults(func=cmd_ptq)
    s = sub.add_parser("freeze", help="a trained checkpoint -> its packed deploy form",
                       description="Freeze a trainable checkpoint: pack its weights (ternary at "
                       "2 bits, integers at their width), fold its batchnorms, and write the "
                       "deploy checkpoint. Static activations must have been calibrated "
                       "(by training, or by ptq --calib).")
    s.add_argument("checkpoint")
    s.add_argument("-o", "--output", required=True, metavar="OUT.safetensors")
    s.set_defaults(func=cmd_freeze)
    s = sub.add_parser("eval", help="accuracy, CPU latency and size of a checkpoint")
    s.add_argument("checkpoint")
    s.add_argument("--data", help="default: digits, or stdlib for a language model")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_eval)
    s = sub.add_parser("report", help="plots and a markdown page for a checkpoint")
    s.add_argument("checkpoint")
    s.add_argument("-o", "--output", required=True, metavar="DIR")
    s.add_argument("--bench", metavar="JSON", help="a `bench --json` file to plot as well")
    s.set_defaults(func=cmd_report)


def add_commands(sub):
    _add_bench(sub)
    _add_workflow(sub)
