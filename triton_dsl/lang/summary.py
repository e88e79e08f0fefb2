"""Per-layer size and precision table (in the spirit of Larq's model summary). No torch.

Bytes are what the packed deploy form stores (and what a packed checkpoint holds):
  weights: rows x ceil(K * bits / 8)   (K = inputs per output; ternary 2 bits, binary 1 bit)
  scales:  4 bytes each (fp32): 1 per tensor, 1 per channel, or 1 per group; TTQ stores two sets
  asymmetric integer weights are stored relative to their zero point, which takes one more bit
  per weight (and no separate zero points); static activations: a 4-byte scale
  bias:    4 bytes per output (2 for fp16/bf16 layers); other layers: 4 bytes per parameter and
           per running statistic (batchnorm's mean and variance)
Bits per weight come from precision.storage_bits, the one place they are written.

Parameters are every trained value, as sum(p.numel() for p in model.parameters()) counts them:
weights, biases, norm affine parameters, learned ternary thresholds and TTQ scales. The text and
JSON forms list the same layers (those with parameters or bytes, or all with ``stateless``).
"""
from __future__ import annotations

import json
import math

from . import ir
from .precision import Binary, Float, Int, Ternary, learned_params, storage_bits


def layer_bytes(l: ir.Layer) -> int:
    if l.precision is None:
        return 4 * (l.params + l.buffers)
    return weight_bytes(l.precision, *l.weight, l.bias)


def weight_bytes(p, n: int, k: int, bias: bool) -> int:
    """Packed bytes of an [n, k] weight (and an n-long bias) at precision ``p``; also what a
    precision section applied to an existing module counts (lang/plan.py)."""
    if isinstance(p, Float):
        return storage_bits(p) // 8 * (n * k + n * bias)
    weights = n * math.ceil(k * storage_bits(p) / 8)
    per = n if p.granularity == "per_channel" else 1
    if isinstance(p, Int):
        scales = n * (k // p.group_size) if p.group_size else per
        return weights + 4 * scales + 4 * (p.activations == "static") + 4 * n * bias
    if isinstance(p, Ternary):
        scales = per * {"none": 0, "learned": 2}.get(p.scale, 1)
        return weights + 4 * scales + 4 * n * bias
    if isinstance(p, Binary):
        return weights + 4 * per + 4 * n * bias
    raise TypeError(f"no size rule for {p!r}")


def layer_params(l: ir.Layer) -> int:
    """Trained parameters: the layer's own plus those its weight quantizer learns."""
    return l.params + (learned_params(l.precision, l.weight[0]) if l.precision else 0)


def rows(model: ir.Model, stateless: bool = False) -> list[dict]:
    """One row per layer; layers without parameters or bytes only with ``stateless``."""
    out = []
    for l in model.layers():
        r = {"name": l.name, "kind": l.kind,
             "precision": l.precision.to_source() if l.precision else None,
             "bits": l.precision.bits if l.precision else 32,
             "params": layer_params(l), "bytes": layer_bytes(l),
             "output_shape": list(l.out_shape)}
        if stateless or r["params"] or r["bytes"]:
            out.append(r)
    return out


def summarize(model: ir.Model, stateless: bool = False) -> dict:
    """The size report of one model; totals count every layer whichever rows are listed."""
    every = rows(model, stateless=True)
    total = sum(r["bytes"] for r in every)
    fp32 = sum(4 * (l.params + l.buffers) for l in model.layers())
    out = {"model": model.name, "input_shape": list(model.input_shape),
            "output_shape": list(model.output_shape),
            "layers": every if stateless else rows(model),
            "params": sum(r["params"] for r in every), "total_bytes": total,
            "fp32_bytes": fp32, "compression": round(fp32 / total, 3) if total else 1.0}
    if model.tokens:  # shapes are given at seq = max_len; any shorter sequence runs too
        out["tokens"] = {"vocab": model.tokens[0], "max_len": model.tokens[1]}
    return out


def _size(b: int) -> str:
    for unit, f in (("MiB", 1 << 20), ("KiB", 1 << 10)):
        if b >= f:
            return f"{b / f:.2f} {unit}"
    return f"{b} B"


def render(s: dict) -> str:
    """The text table of ``summarize``'s result: exactly the layers its JSON form lists."""
    head = ("layer", "kind", "precision", "output", "params", "bits", "bytes")
    body = [(r["name"], r["kind"], r["precision"] or "-",
             "[" + ", ".join(map(str, r["output_shape"])) + "]",
             f"{r['params']:,}", str(r["bits"]) if r["params"] else "-", f"{r['bytes']:,}")
            for r in s["layers"]]
    given = f"[{', '.join(map(str, s['input_shape']))}]"
    if "tokens" in s:
        given = f"tokens(vocab={s['tokens']['vocab']}, max_len={s['tokens']['max_len']})"
    title = (f"{s['model']}: input {given} -> output [{', '.join(map(str, s['output_shape']))}]"
             + (" (seq = max_len)" if "tokens" in s else ""))
    return "\n".join(table(title, head, body, first_right=4) + [
            f"parameters: {s['params']:,}",
            f"packed size: {s['total_bytes']:,} bytes ({_size(s['total_bytes'])})",
            f"fp32 size:   {s['fp32_bytes']:,} bytes ({_size(s['fp32_bytes'])})",
            f"compression: {s['compression']:.2f}x"])


def table(title: str, head: tuple, body: list, first_right: int) -> list:
    """Lines of a text table: the title, ruled head and body, a closing rule; columns from
    ``first_right`` on are right-aligned (the numbers)."""
    widths = [max(len(x) for x in col) for col in zip(head, *body)]

    def line(cells):
        return "  ".join(c.rjust(w) if i >= first_right else c.ljust(w)
                         for i, (c, w) in enumerate(zip(cells, widths))).rstrip()

    rule = "-" * len(line(head))
    return [title, rule, line(head), rule] + [line(b) for b in body] + [rule]


def to_json(summaries: list[dict]) -> str:
    return json.dumps(summaries[0] if len(summaries) == 1 else summaries, indent=2)
