"""Measured results: fp32, int8 PTQ, ternary PTQ, ternary QAT and the mixed-precision network.

    python examples/results.py                    # digits (bundled with scikit-learn)
    python examples/results.py --data mnist:DIR   # real MNIST from its IDX files

Every number comes from this run: each network is trained here with a fixed seed, quantized,
frozen, saved as a packed checkpoint, reloaded, and evaluated from the reloaded file. Writes
examples/results/<data>.{md,json} and <data>-curves.png, and the table into examples/README.md.
The QAT-vs-PTQ curves are measured, epoch by epoch: PTQ at epoch e quantizes the fp32 network
as it stands after epoch e.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))

from triton_dsl import checkpoint as ck  # noqa: E402
from triton_dsl.workflow.data import load as load_data  # noqa: E402
from triton_dsl.files import write_atomic  # noqa: E402
from triton_dsl.runtime import freeze  # noqa: E402
from triton_dsl.workflow.train import evaluate, latency, train  # noqa: E402
from triton_dsl.workflow import build, load_float_weights  # noqa: E402


def _row(name, method, path, ds, base_acc, fp32_bytes):
    net = ck.load(path)  # every figure comes from the reloaded file
    acc = evaluate(net, ds)
    size = os.path.getsize(path)
    return {"network": name, "method": method, "accuracy": round(acc, 2),
            "delta": round(acc - base_acc, 2), "bytes": size,
            "compression": round(fp32_bytes / size, 1),
            "latency_b1_ms": round(latency(net, net.input_shape, 1), 3),
            "latency_b64_ms": round(latency(net, net.input_shape, 64), 3)}


def _ptq_copy(tdsl, float_net):
    """The file's quantized model with the fp32 network's current weights."""
    return load_float_weights(build(tdsl), float_net.state_dict())


def run(data: str, epochs: int, seed: int, work: str, log=print):
    """Train, quantize and measure; the checkpoints go to the folder ``work``."""
    ex = lambda f: os.path.join(HERE, f)  # noqa: E731
    tern, int8, mixed = ex("mnist_ternary.tdsl"), ex("mnist_int8.tdsl"), ex("mixed_precision.tdsl")
    p = lambda n: os.path.join(work, n)  # noqa: E731
    rows, curves = [], {}
    quiet = dict(progress=False, log=lambda s: None)

    def fit(tdsl, fp32, on_epoch=None):
        net = build(tdsl, fp32=fp32, seed=seed)
        ds = load_data(data, net.input_shape)
        hist = train(net, ds, epochs, seed=seed, on_epoch=on_epoch, **quiet)
        return net, ds, hist

    # fp32 baseline; at every epoch also measure ternary PTQ of the network as it stands
    def ptq_probe(rec, net):
        rec["ptq_ternary_acc"] = round(evaluate(_ptq_copy(tern, net), ds_probe, "val"), 3)
    ds_probe = load_data(data, build(tern).input_shape)
    f32, ds, h32 = fit(tern, True, ptq_probe)
    ck.save(f32, p("fp32.safetensors"), history=h32, data=ds)
    base = evaluate(f32, ds)
    fp32_bytes = os.path.getsize(p("fp32.safetensors"))
    rows.append(_row("MLP 784-256-128-10", "fp32", p("fp32.safetensors"), ds, base, fp32_bytes))
    log(f"fp32: {base:.2f}%")

    # int8 PTQ: the same network (same seed, same data) declared with int8 weights
    i32, _, _ = fit(int8, True)
    q = freeze(load_float_weights(build(int8), i32.state_dict()))
    ck.save(q, p("int8_ptq.safetensors"), data=ds)
    rows.append(_row("MLP 784-256-128-10", "int8 PTQ", p("int8_ptq.safetensors"), ds, base,
                     fp32_bytes))

    # ternary PTQ of the final fp32 network, and ternary QAT from scratch
    t = freeze(load_float_weights(build(tern), p("fp32.safetensors")))
    ck.save(t, p("ternary_ptq.safetensors"), data=ds)
    rows.append(_row("MLP 784-256-128-10", "ternary PTQ", p("ternary_ptq.safetensors"), ds, base,
                     fp32_bytes))
    qat, _, hq = fit(tern, False)
    ck.save(freeze(qat), p("ternary_qat.safetensors"), history=hq, data=ds)
    rows.append(_row("MLP 784-256-128-10", "ternary QAT", p("ternary_qat.safetensors"), ds, base,
                     fp32_bytes))

    # the mixed-precision network against its own fp32 baseline
    m32, _, _ = fit(mixed, True)
    ck.save(m32, p("mixed_fp32.safetensors"), data=ds)
    mbase = evaluate(m32, ds)
    mbytes = os.path.getsize(p("mixed_fp32.safetensors"))
    rows.append(_row("MixedPrecisionNet", "fp32", p("mixed_fp32.safetensors"), ds, mbase, mbytes))
    mq, _, _ = fit(mixed, False)
    ck.save(freeze(mq), p("mixed_qat.safetensors"), data=ds)
    rows.append(_row("MixedPrecisionNet", "mixed QAT (fp32 / ternary / ternary / fp32)",
                     p("mixed_qat.safetensors"), ds, mbase, mbytes))

    curves = {"epoch": [r["epoch"] for r in h32], "fp32": [r["val_acc"] for r in h32],
              "ptq_ternary": [r["ptq_ternary_acc"] for r in h32],
              "qat_ternary": [r["val_acc"] for r in hq]}  # validation split, per epoch
    return rows, curves, {"data": data, "epochs": epochs, "seed": seed,
                          "train": len(ds.x_train), "test": len(ds.x_test),
                          "torch": torch.__version__, "threads": torch.get_num_threads()}


def markdown(rows, info) -> str:
    head = ("| network | method | accuracy | vs fp32 | size on disk | compression | "
            "CPU latency b=1 | b=64 |\n|---|---|---:|---:|---:|---:|---:|---:|\n")
    body = "".join(f"| {r['network']} | {r['method']} | {r['accuracy']:.2f}% | "
                   f"{r['delta']:+.2f} | {r['bytes']:,} B | {r['compression']:.1f}x | "
                   f"{r['latency_b1_ms']:.3f} ms | {r['latency_b64_ms']:.3f} ms |\n" for r in rows)
    return (f"Data: `{info['data']}` ({info['train']} training, {info['test']} test samples), "
            f"{info['epochs']} epochs, seed {info['seed']}, torch {info['torch']}, "
            f"{info['threads']} CPU threads. Sizes are the packed checkpoint files; latency is "
            f"the frozen model on the CPU (median).\n\n" + head + body)


def plot(curves, path, data):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6.5, 4))
    ax.plot(curves["epoch"], curves["fp32"], "o-", label="fp32")
    ax.plot(curves["epoch"], curves["qat_ternary"], "s-", label="ternary QAT")
    ax.plot(curves["epoch"], curves["ptq_ternary"], "^--", label="ternary PTQ of the fp32 net")
    ax.set_xlabel("epoch")
    ax.set_ylabel("validation accuracy (%)")
    ax.set_title(f"QAT vs PTQ, measured ({data})")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", default="digits")
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(HERE, "results"))
    ap.add_argument("--no-readme", action="store_true", help="do not update examples/README.md")
    a = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as work:
        rows, curves, info = run(a.data, a.epochs, a.seed, work)
    os.makedirs(a.out, exist_ok=True)
    tag = a.data.split(":")[0]
    md = markdown(rows, info)
    write_atomic(os.path.join(a.out, f"{tag}.md"), md)
    write_atomic(os.path.join(a.out, f"{tag}.json"),
                 json.dumps({"info": info, "rows": rows, "curves": curves}, indent=1))
    plot(curves, os.path.join(a.out, f"{tag}-curves.png"), a.data)
    print(md)
    if not a.no_readme and a.out == os.path.join(HERE, "results"):
        _update_readme(tag, md)


def _update_readme(tag, md):
    path = os.path.join(HERE, "README.md")
    start, end = f"<!-- results:{tag} -->", f"<!-- /results:{tag} -->"
    text = open(path).read() if os.path.exists(path) else ""
    block = f"{start}\n{md}\n![QAT vs PTQ](results/{tag}-curves.png)\n{end}"
    if start in text:
        text = text[: text.index(start)] + block + text[text.index(end) + len(end):]
    else:
        text += ("\n" if text else "") + block + "\n"
    write_atomic(path, text)


if __name__ == "__main__":
    main()
