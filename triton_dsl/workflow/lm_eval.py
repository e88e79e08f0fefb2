"""Evaluating a language-model checkpoint: bits per byte and decoding speed."""
from __future__ import annotations

import os
import statistics
import time

import torch

from .text_data import TextData, bits_per_byte


def evaluate_lm(net, path: str, ds: TextData) -> dict:
    """Bits per byte on the val and test splits, size on disk and decoding speed."""
    return {"checkpoint": path, "model": net.tdsl_model, "kind": net.checkpoint_meta["kind"],
            "data": ds.name, "seq_len": ds.seq_len,
            "val_bpb": round(bits_per_byte(net, ds, "val"), 4),
            "test_bpb": round(bits_per_byte(net, ds, "test"), 4),
            "bytes": os.path.getsize(path),
            "decode_ms_per_token": round(decode_latency(net), 4)}


@torch.inference_mode()
def decode_latency(net, prompt: int = 16, tokens: int = 32) -> float:
    """Median ms per generated token with a KV cache (batch 1), after a prompt."""
    from ..runtime import KVCache
    net.eval()
    prompt = max(1, min(prompt, net.max_len - 1))
    tokens = max(1, min(tokens, net.max_len - prompt))
    cache = KVCache(prompt + tokens)
    x = torch.randint(0, net.vocab_size, (1, prompt), generator=torch.Generator().manual_seed(0))
    net(x, cache)
    step = x[:, -1:]
    times = []
    for _ in range(tokens):
        t = time.perf_counter()
        net(step, cache)
        times.append(time.perf_counter() - t)
    return statistics.median(times) * 1e3
