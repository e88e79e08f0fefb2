"""Measured results for examples/tiny_lm.tdsl: test bits per byte of fp32, int8 PTQ, ternary
QAT (the BitNet b1.58 recipe) and a mixed model, same architecture and training budget.

    python examples/lm_results.py [--epochs 4] [--steps 120] [--data stdlib]

Every number comes from this run: each model is trained with a fixed seed on the default corpus
(the interpreter's standard-library sources, workflow/text_data.py), frozen to a packed
checkpoint, reloaded and evaluated from the file. Writes examples/results/lm-<data>.{md,json}
and the table into examples/README.md.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import re
import sys
import tempfile
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from triton_dsl.files import write_atomic  # noqa: E402
from triton_dsl import workflow  # noqa: E402
from triton_dsl.workflow import checkpoint as ck  # noqa: E402
from triton_dsl.workflow.lm_eval import decode_latency  # noqa: E402
from triton_dsl.workflow.text_data import bits_per_byte  # noqa: E402

SOURCE = os.path.join(HERE, "tiny_lm.tdsl")
BITNET = "ternary(threshold=absmean, scale=absmean, activations=dynamic)"
# the precision sections of the variants; the architecture is tiny_lm.tdsl's
VARIANTS = {
    "int8": "precision:\n    default int8(activations=dynamic)\n",
    "mixed": f"precision:\n    layer blocks.*.attn.*: {BITNET}\n"
             "    layer blocks.*.mlp.*: int8(activations=dynamic)\n",
}


def variant(work: str, name: str) -> str:
    with open(SOURCE) as f:
        text = f.read()
    path = os.path.join(work, f"tiny_lm_{name}.tdsl")
    with open(path, "w") as f:
        f.write(text[:text.index("precision:")] + VARIANTS[name])
    return path


def row(method, path, ds, base):
    net = ck.load(path)
    bpb = bits_per_byte(net, ds, "test")
    return {"method": method, "test_bpb": round(bpb, 4),
            "vs_fp32": round(100 * (bpb - base) / base, 2) if base else 0.0,
            "val_bpb": round(bits_per_byte(net, ds, "val"), 4),
            "bytes": os.path.getsize(path), "kind": net.checkpoint_meta["kind"],
            "decode_ms_per_token": round(decode_latency(net), 3)}


def run(data, epochs, steps, batch, lr, work, log=print):
    common = dict(epochs=epochs, steps=steps, batch_size=batch, lr=lr, optimizer="adamw",
                  seed=0, progress=False, log=log)
    t0 = time.time()
    fp32 = os.path.join(work, "fp32.safetensors")
    workflow.train_model(SOURCE, data, fp32, fp32=True, **common)
    ds = workflow.pipeline.load_data(data, ck.load(fp32))
    rows = [row("fp32", fp32, ds, None)]
    base = rows[0]["test_bpb"]
    ptq = os.path.join(work, "int8_ptq.safetensors")
    workflow.ptq(variant(work, "int8"), fp32, ptq)
    rows.append(row("int8 PTQ (weights and activations)", ptq, ds, base))
    for name, src in (("ternary QAT (BitNet b1.58 recipe)", SOURCE),
                      ("mixed QAT (ternary attention, int8 mlp)", variant(work, "mixed"))):
        qat = os.path.join(work, "qat.safetensors")
        packed = os.path.join(work, f"{len(rows)}.safetensors")
        workflow.train_model(src, data, qat, **common)
        workflow.freeze_checkpoint(qat, packed)
        rows.append(row(name, packed, ds, base))
    setup = {"data": ds.name, "train_bytes": len(ds.train), "test_bytes": len(ds.test),
             "seq_len": ds.seq_len, "epochs": epochs, "steps_per_epoch": steps,
             "batch": batch, "lr": lr, "optimizer": "adamw", "seed": 0,
             "torch": torch.__version__, "threads": torch.get_num_threads(),
             "machine": platform.machine(), "minutes": round((time.time() - t0) / 60, 1)}
    return setup, rows


def table(setup, rows) -> str:
    out = [f"Data: `{setup['data']}` ({setup['train_bytes']:,} training and "
           f"{setup['test_bytes']:,} test bytes), windows of {setup['seq_len']}, "
           f"{setup['epochs']} epochs of {setup['steps_per_epoch']} steps, batch "
           f"{setup['batch']}, AdamW lr {setup['lr']}, seed 0, torch {setup['torch']}, "
           f"{setup['threads']} CPU threads, {setup['minutes']} minutes in all. Sizes are the "
           "packed checkpoint files; decoding is the reloaded model, batch 1, with its KV "
           "cache (median ms per token).",
           "",
           "| model | test bits/byte | vs fp32 | val bits/byte | size on disk | decode ms/token |",
           "|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['method']} | {r['test_bpb']:.4f} | {r['vs_fp32']:+.2f}% | "
                   f"{r['val_bpb']:.4f} | {r['bytes']:,} B | {r['decode_ms_per_token']:.3f} |")
    return "\n".join(out) + "\n"


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="stdlib")
    ap.add_argument("--epochs", type=int, default=4)
    ap.add_argument("--steps", type=int, default=120, help="batches per epoch")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--lr", type=float, default=3e-3)
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        setup, rows = run(a.data, a.epochs, a.steps, a.batch, a.lr, work)
    md = table(setup, rows)
    print(md)
    stem = os.path.join(HERE, "results", f"lm-{a.data.replace(':', '_').replace('/', '_')}")
    write_atomic(stem + ".json", json.dumps({"setup": setup, "rows": rows}, indent=1) + "\n")
    write_atomic(stem + ".md", md)
    readme = os.path.join(HERE, "README.md")
    with open(readme) as f:
        text = f.read()
    tag = f"results:lm-{a.data}"
    block = f"<!-- {tag} -->\n{md}<!-- /{tag} -->"
    if f"<!-- {tag} -->" in text:
        text = re.sub(rf"<!-- {re.escape(tag)} -->.*?<!-- /{re.escape(tag)} -->",
                      lambda _: block, text, flags=re.S)
    else:
        text = text.rstrip("\n") + f"\n\n### Results ({a.data})\n\n`python " \
            f"examples/lm_results.py --data {a.data}` wrote this table:\n\n{block}\n"
    write_atomic(readme, text)


if __name__ == "__main__":
    main()
