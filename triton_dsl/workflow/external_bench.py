"""`triton-dsl bench --model PKG.MODULE:FACTORY --rules RULES.tdsl`: an existing model in float
against the same model quantized by the rules and frozen, timed in one process, the two taking
turns in every round (model_bench.time_models), with the weight bytes each holds.

Inputs: a model with a `config.vocab_size` (a Hugging Face language model) takes random token
ids [batch, tokens]; `--tokens 1` (the default) times one decoding step without a cache, where
every projection is an M = batch matrix-vector product and weights dominate. Any other model
takes float inputs [batch, *--input-shape].
"""
from __future__ import annotations

import copy

import torch

from ..runtime.external import quantize
from ..runtime.frozen import freeze
from .factory import build_model
from .model_bench import time_models, weight_bytes


def make_input(model, batch: int, tokens: int, shape) -> torch.Tensor:
    vocab = getattr(getattr(model, "config", None), "vocab_size", None)
    if shape:
        return torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0))
    if vocab:
        return torch.randint(0, vocab, (batch, tokens), generator=torch.Generator().manual_seed(0))
    raise ValueError("cannot tell what this model takes as input: pass --input-shape (the "
                     "shape of one sample, without the batch dimension)")


def run(spec: str, rules: str, batches=(1,), repeat: int = 20, tokens: int = 1,
        input_shape=None, log=print) -> list[dict]:
    fp32 = build_model(spec).eval()
    frozen = copy.deepcopy(fp32)
    plan = quantize(frozen, rules)
    freeze(frozen)
    log(f"# {plan.model}: {len(plan.quantized)} of {len(plan.entries)} modules quantized by "
        f"{plan.rules}")
    named = {"float": fp32, "frozen": frozen}
    sizes = {n: weight_bytes(m) for n, m in named.items()}
    recs = []
    for b in batches:
        x = make_input(fp32, b, tokens, input_shape)
        res = time_models(named, x, repeat)
        base, bq1, bq3 = res["float"]
        for n, (med, q1, q3) in res.items():
            r = {"model": spec, "rules": rules, "method": n, "batch": b, "tokens": tokens,
                 "median_ms": round(med, 4), "iqr_ms": round(q3 - q1, 4),
                 "speedup_vs_float": round(base / med, 3),
                 "noisy": n != "float" and q1 <= bq3 and bq1 <= q3, "weight_bytes": sizes[n]}
            recs.append(r)
            log(f"{n:<22}{b:>6}{med:>11.3f}{q3 - q1:>9.3f}{base / med:>9.2f}x"
                f"{'  noisy' if r['noisy'] else '':<7}{sizes[n] / 1024:>11.1f}")
    return recs


HEADER = (f"{'method':<22}{'batch':>6}{'median ms':>11}{'IQR ms':>9}{'vs float':>10}{'':<7}"
          f"{'weights KiB':>11}")
