"""`triton-dsl bench --model LM.tdsl --decode`: tokens per second of incremental decoding.

The same architecture three ways, from the same random weights, each with its own KV cache:
fp32 (torch's nn.Linear), the frozen model as the file declares it (packed weights through the
native M = 1 kernels), and torch's dynamic int8 (quantize_dynamic of the fp32 model). After a
prompt of P tokens, the methods take turns decoding one token each, N rounds, so every method
sees the same machine state; each record gives the median and interquartile range per token,
tokens per second, and the linear-weight bytes streamed per token against the machine's
streaming read bandwidth, measured in the same run. With several prompt lengths every
(length, method) pair takes its turn in the same rounds; "vs P0" is the per-token time against
the shortest prompt's, for the same method. The prompt pass itself (prefill: the whole prompt
in one forward, where many rows make the layers compute-bound) is timed too, PREFILL_ROUNDS
times per (length, method), interleaved.
"""
from __future__ import annotations

import copy
import statistics
import time
import warnings

import torch

from ..runtime import KVCache
from ..runtime.frozen import FrozenLinear
from ..runtime.transformer import KV_DTYPES
from .model_bench import fp32_and_frozen
from .timing import spread


MAX_CONTEXTS = 8
PREFILL_ROUNDS = 3  # prompt passes per (length, method), interleaved; the median is reported


def lm_models(tdsl: str, seed: int = 0) -> dict:
    fp32, frozen = fp32_and_frozen(tdsl, seed, language=True, batch=2)
    with warnings.catch_warnings():  # torch.ao.quantization is deprecated in favour of torchao
        warnings.simplefilter("ignore")
        from torch.ao.quantization import quantize_dynamic
        int8 = quantize_dynamic(copy.deepcopy(fp32), {torch.nn.Linear}, torch.qint8)
    return {"fp32": fp32, "frozen": frozen, "torch-dynamic-int8": int8}


def linear_bytes(model) -> int:
    """Bytes of the linear weights one token reads (frozen: packed codes and scales)."""
    total = 0
    for m in model.modules():
        if isinstance(m, FrozenLinear):
            total += m.weight_bytes()
        elif isinstance(m, torch.nn.Linear):
            total += m.weight.numel() * m.weight.element_size()
        elif hasattr(m, "_weight_bias") and type(m).__name__ == "Linear":  # torch's int8
            total += m._weight_bias()[0].numel()
    return total


@torch.inference_mode()
def run(tdsl: str, prompt_lens=(16,), new_tokens: int = 64, stream_gbs: float | None = None,
        log=print, kv_cache: str = "fp32") -> list[dict]:
    """Records per (prompt length, method). Several prompt lengths share the interleaved
    rounds, so their per-token times compare within one run (ctx_ratio: against the shortest,
    for the same method); on a shared machine separate runs differ by more than that ratio."""
    prompt_lens = sorted(set([prompt_lens] if isinstance(prompt_lens, int) else prompt_lens))
    if len(prompt_lens) > MAX_CONTEXTS:  # each holds a KV cache per method
        raise ValueError(f"--prompt-len takes at most {MAX_CONTEXTS} lengths, got "
                         f"{len(prompt_lens)}")
    named = lm_models(tdsl)
    net = named["fp32"]
    if prompt_lens[0] < 1:
        raise ValueError(f"--prompt-len must be at least 1, got {prompt_lens[0]}")
    if prompt_lens[-1] + new_tokens > net.max_len:
        raise ValueError(f"--prompt-len {prompt_lens[-1]} + --new-tokens {new_tokens} exceed the "
                         f"model's max_len {net.max_len}")
    gen = torch.Generator().manual_seed(0)
    runs = [(p, n) for p in prompt_lens for n in named]
    prompts = {p: torch.randint(0, net.vocab_size, (1, p), generator=gen) for p in prompt_lens}
    caches, steps = {}, {}
    # the prompt pass (prefill) into a fresh cache, every (length, method) once a round; the
    # last round's caches are the ones decoding goes on from
    prefill = {r: [] for r in runs}
    for i in range(PREFILL_ROUNDS):
        for p, n in runs:
            cache = KVCache(p + new_tokens, KV_DTYPES[kv_cache])
            t = time.perf_counter()
            out = named[n](prompts[p], cache)
            prefill[p, n].append(time.perf_counter() - t)
            caches[p, n], steps[p, n] = cache, out[:, -1:].argmax(-1)
    ts = {r: [] for r in runs}
    inside = {r: [] for r in runs}  # of each step, the time inside the native linear kernels
    kernel_seconds = _kernel_seconds()
    for _ in range(new_tokens):
        for p, n in runs:
            k = kernel_seconds()
            t = time.perf_counter()
            steps[p, n] = named[n](steps[p, n], caches[p, n])[:, -1:].argmax(-1)
            ts[p, n].append(time.perf_counter() - t)
            inside[p, n].append(kernel_seconds() - k)
    recs = []
    for p, n in runs:
        med, q1, q3 = spread(ts[p, n])
        nbytes = linear_bytes(named[n])
        r = {"model": tdsl, "method": n, "prompt_len": p, "new_tokens": new_tokens,
             "kv_cache": kv_cache,
             "ms_per_token": round(med * 1e3, 4), "iqr_ms": round((q3 - q1) * 1e3, 4),
             "tokens_per_s": round(1 / med, 2),
             "speedup_vs_fp32": round(spread(ts[p, "fp32"])[0] / med, 3),
             "ctx_ratio": round(med / spread(ts[prompt_lens[0], n])[0], 3),
             "linear_weight_bytes": nbytes, "gbs": round(nbytes / med / 1e9, 2)}
        if stream_gbs:  # from the unrounded rate: a tiny model's rounds to 0.0 GB/s
            r["of_stream"] = round(nbytes / med / 1e9 / stream_gbs, 5)
        pre = statistics.median(prefill[p, n])
        r.update(prefill_ms=round(pre * 1e3, 3), prefill_tokens_per_s=round(p / pre, 1),
                 prefill_vs_fp32=round(statistics.median(prefill[p, "fp32"]) / pre, 3))
        kernel = statistics.median(inside[p, n])
        if kernel:
            r["kernel_ms_per_token"] = round(kernel * 1e3, 4)
        recs.append(r)
        log(f"{n:<22}{p:>7}{r['ms_per_token']:>10.3f}{r['iqr_ms']:>9.3f}{r['tokens_per_s']:>11.1f}"
            f"{r['speedup_vs_fp32']:>9.2f}x{r['ctx_ratio']:>8.2f}x{nbytes / 2**20:>13.1f}"
            f"{r['gbs']:>8.1f}" + (f"{100 * r['of_stream']:>7.0f}%" if stream_gbs else ""))
    return recs


def kernel_summary(recs: list[dict], stream_gbs: float | None, log=print):
    """Where a frozen step's time goes: inside the native linear kernels, and the rest."""
    for r in recs:
        if "kernel_ms_per_token" in r:
            k = r["kernel_ms_per_token"]
            gbs = r["linear_weight_bytes"] / (k / 1e3) / 1e9
            log(f"{r['method']} after {r['prompt_len']} tokens: {k:.3f} of {r['ms_per_token']:.3f} "
                f"ms per token inside the native linear kernels ({100 * k / r['ms_per_token']:.0f}"
                f"%), reading weights at {gbs:.1f} GB/s while there"
                + (f" ({100 * gbs / stream_gbs:.0f}% of read)" if stream_gbs else ""))


def prefill_summary(recs: list[dict], log=print):
    """The prompt pass of each length: the whole prompt in one forward (prompt processing,
    llama.cpp's "pp"), median of the interleaved rounds."""
    log(f"prefill, one forward over the prompt (median of {PREFILL_ROUNDS} interleaved rounds):")
    for r in recs:
        log(f"  {r['method']:<22}{r['prompt_len']:>5} tokens {r['prefill_ms']:>10.1f} ms "
            f"{r['prefill_tokens_per_s']:>9.1f} tokens/s {r['prefill_vs_fp32']:>7.2f}x fp32")


def _kernel_seconds():
    """A reader of the seconds spent in the native linear kernel so far: a frozen model's
    projections, called from Python or from the native decoding steps (torch's own layers are
    not counted). Always 0 without the native library."""
    from ..kernels import native
    lib = native.library()
    return lib.linear_seconds if lib is not None else lambda: 0.0


HEADER = (f"{'method':<22}{'prompt':>7}{'ms/token':>10}{'IQR ms':>9}{'tokens/s':>11}"
          f"{'vs fp32':>10}{'vs P0':>9}{'weights MiB':>13}{'GB/s':>8}{'of read':>8}")
