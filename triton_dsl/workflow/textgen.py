"""Text generation from a byte-level language model, decoding with a KV cache.

    text = generate("tiny_lm.safetensors", "def main(", max_new_tokens=80, seed=0)

Each new byte costs one forward pass of one token (the M = 1 path of the frozen kernels), its
attention reading the cached keys and values. When the context reaches the model's max_len, the
last max_len / 2 bytes are read again into a fresh cache (a sliding window), so any length can
be generated. Sampling is seeded: the same call gives the same text. temperature=0 takes the
most likely byte.
"""
from __future__ import annotations

import torch

from ..runtime import KVCache
from ..runtime.transformer import KV_DTYPES

MAX_NEW = 1_000_000  # bytes one call may generate


def generate(model, prompt: str | bytes, max_new_tokens: int = 64, temperature: float = 1.0,
             top_k: int | None = None, seed: int = 0, kv_cache: str = "fp32") -> str:
    """The continuation of ``prompt`` (the new text only), from a checkpoint path or a model.
    The prompt keeps its last max_len - 1 bytes. kv_cache: fp32, bf16 or fp16, the type the
    cached keys and values are kept in."""
    from . import checkpoint as ck
    net = ck.load(model) if isinstance(model, str) else model
    out = generate_ids(net, prompt.encode() if isinstance(prompt, str) else prompt,
                       max_new_tokens, temperature, top_k, seed, kv_cache)
    return bytes(out).decode("utf-8", errors="replace")


def check_options(net, max_new_tokens, temperature, top_k, kv_cache="fp32"):
    if getattr(net, "vocab_size", None) is None:
        raise ValueError(f"model {net.tdsl_model!r} does not take tokens: generate needs a "
                         "language model (input tokens(...))")
    if net.vocab_size < 256:
        raise ValueError(f"generate reads and writes bytes: the model needs vocab=256, it has "
                         f"vocab={net.vocab_size}")
    if type(max_new_tokens) is not int or not 1 <= max_new_tokens <= MAX_NEW:
        raise ValueError(f"max_new_tokens must be in 1..{MAX_NEW:,}, got {max_new_tokens!r}")
    if not (isinstance(temperature, (int, float)) and 0 <= temperature < float("inf")):
        raise ValueError(f"temperature must be a number >= 0, got {temperature!r}")
    if top_k is not None and (type(top_k) is not int or top_k < 1):
        raise ValueError(f"top_k must be a whole number of at least 1, got {top_k!r}")
    if kv_cache not in KV_DTYPES:
        raise ValueError(f"kv_cache must be one of {', '.join(KV_DTYPES)}, got {kv_cache!r}")


@torch.inference_mode()
def generate_ids(net, prompt: bytes, max_new_tokens: int, temperature: float = 1.0,
                 top_k: int | None = None, seed: int = 0, kv_cache: str = "fp32") -> list[int]:
    check_options(net, max_new_tokens, temperature, top_k, kv_cache)
    dtype = KV_DTYPES[kv_cache]
    net.eval()
    ids = list(prompt[-(net.max_len - 1):]) or [10]  # no prompt: start after a newline
    cache, logits = _prefill(net, ids, dtype)
    gen = torch.Generator().manual_seed(seed)
    out = []
    for i in range(max_new_tokens):
        nxt = sample(logits[:256].float(), temperature, top_k, gen)
        out.append(nxt)
        ids.append(nxt)
        if i + 1 == max_new_tokens:
            break
        if cache.end == net.max_len:  # full: slide, reading the last half again
            cache, logits = _prefill(net, ids[-(net.max_len // 2):], dtype)
        else:
            logits = net(torch.tensor([[nxt]]), cache)[0, -1]
    return out


def _prefill(net, ids, dtype):
    cache = KVCache(net.max_len, dtype)
    return cache, net(torch.tensor([ids]), cache)[0, -1]


def sample(logits: torch.Tensor, temperature: float, top_k: int | None, gen) -> int:
    if temperature == 0:
        return int(logits.argmax())
    logits = logits / temperature
    if top_k is not None and top_k < logits.numel():
        cut = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < cut, float("-inf"))
    return int(torch.multinomial(torch.softmax(logits, -1), 1, generator=gen))
