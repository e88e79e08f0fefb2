"""`triton-dsl report CKPT -o DIR`: PNG plots and a markdown page for one checkpoint."""
from __future__ import annotations

import json
import os

import torch

from . import checkpoint as ck
from . import plots
from ..lang.frontend import check_source
from ..files import write_atomic
from ..lang.summary import render, summarize


def _layers(model):
    """[(name, float weight or None, quantized weight, ternary codes or None)] per layer that
    has a precision: trainable layers have both weights, frozen ones only the quantized."""
    from ..lang.precision import Binary, Ternary
    from ..runtime import Conv2d, FrozenConv2d, FrozenLinear, Linear
    from ..kernels.packing import unpack_ternary
    out = []
    for name, m in model.named_modules():
        with torch.no_grad():
            if isinstance(m, (Linear, Conv2d)):
                if m.precision.bits == 32:
                    continue
                m.eval()
                q = m.quantized_weight().detach()
                codes = None
                if isinstance(m.precision, Ternary):
                    codes = m.weight_quant.quantize(m.weight).codes
                out.append((name, m.weight.detach().reshape(len(q), -1), q.reshape(len(q), -1),
                            codes))
            elif isinstance(m, (FrozenLinear, FrozenConv2d)):
                lin = m.linear if isinstance(m, FrozenConv2d) else m
                codes = None
                if isinstance(lin.precision, (Ternary, Binary)):
                    lin.restore_buffers()
                    codes = unpack_ternary(lin.packed, lin.in_features)
                out.append((name, None, lin.dequantized_weight(), codes))
    return out


def write_report(path: str, out_dir: str, bench: str | None = None) -> str:
    model = ck.load(path)
    meta = model.checkpoint_meta
    os.makedirs(out_dir, exist_ok=True)
    layers = _layers(model)
    images = []
    if layers:
        plots.histograms([(n, b, a) for n, b, a, _ in layers], os.path.join(out_dir,
                                                                                "weights.png"))
        images.append(("Weights before and after quantization", "weights.png"))
        with_float = [(n, b, a) for n, b, a, _ in layers if b is not None]
        if with_float:
            plots.errors(with_float, os.path.join(out_dir, "errors.png"))
            images.append(("Quantization error", "errors.png"))
        counts = [(n, int((c == -1).sum()), int((c == 0).sum()), int((c == 1).sum()))
                  for n, _, _, c in layers if c is not None]
        if counts:
            plots.ternary_counts(counts, os.path.join(out_dir, "ternary.png"))
            images.append(("Ternary value counts and sparsity", "ternary.png"))
    hist = ck.history(meta)
    if hist:
        plots.curves(hist, os.path.join(out_dir, "training.png"),
                     f"{meta['model']}: training ({meta.get('trained', '')})")
        images.append(("Training curves", "training.png"))
    if bench:
        try:
            with open(bench) as f:
                data = json.load(f)
        except (OSError, ValueError) as e:
            raise ValueError(f"--bench {bench}: cannot read a bench --json file ({e})") from None
        plots.bench_bars(data, os.path.join(out_dir, "bench.png"))
        images.append(("Kernel benchmark", "bench.png"))
    r = check_source(meta["tdsl_source"], meta["model"] + ".tdsl", meta.get("fp32") == "true")
    table = "\n\n".join(render(summarize(m)) for m in r.models if m.name == meta["model"])
    lines = [f"# {meta['model']}: {os.path.basename(path)}", "",
             f"- kind: {meta['kind']} checkpoint, {os.path.getsize(path):,} bytes on disk",
             f"- written by triton-dsl {meta['triton_dsl_version']}; sha256 {meta['sha256'][:16]}…"]
    trained = json.loads(meta["trained"]) if "trained" in meta else {}
    if hist and isinstance(trained.get("val_acc"), (int, float)) and \
            isinstance(trained.get("best_epoch"), int):
        lines.append(f"- the weights of epoch {trained['best_epoch']} of {hist[-1]['epoch']}, "
                     f"best on validation ({trained['val_acc']:.2f}%)")
    if hist and isinstance(trained.get("val_bpb"), (int, float)) and \
            isinstance(trained.get("best_epoch"), int):
        lines.append(f"- the weights of epoch {trained['best_epoch']} of {hist[-1]['epoch']}, "
                     f"best on validation ({trained['val_bpb']:.4f} bits per byte)")
    if layers and all(b is None for _, b, _, _ in layers):
        lines.append("- frozen checkpoints keep only quantized weights: no float histograms or "
                     "quantization error (report a trainable checkpoint for those)")
    lines += ["", "## Summary", "", "```", table, "```", ""]
    for title, img in images:
        lines += [f"## {title}", "", f"![{title}]({img})", ""]
    page = os.path.join(out_dir, "report.md")
    write_atomic(page, "\n".join(lines))
    return page
