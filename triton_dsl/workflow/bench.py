"""`triton-dsl bench`: quantized matmuls against torch and the peers, baseline in the same run.

Every method computes y = x @ W^T for x [M, K] and a random W [N, K]; the table gives the median
over repeated runs after warm-up with its interquartile range (IQR), the weight bytes each method
reads, the speedup over the baseline (torch fp32 on the CPU, torch fp16 on the GPU) and the
achieved weight bandwidth. A speedup whose IQR overlaps the baseline's is flagged "noisy", with a
warning: the gap it reports is within the spread of the timings.
On the GPU the L2 cache is flushed before each timed run and CUDA-graph replay time is reported
beside the kernel time.
"""
from __future__ import annotations

import datetime
import json
import platform
import statistics
import time

import torch

from . import read_rate
from .timing import spread
from ..runtime.build import load as load_class

GPU_PEAK_GBS = {"H100": 3350, "H200": 4800, "A100": 2039}  # HBM bandwidth, vendor figures


def _methods(device):
    def torch_linear(dtype):
        def make(w):
            lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False, device=device, dtype=dtype)
            lin.weight.data.copy_(w)
            return (lambda x: lin(x.to(dtype))), w.numel() * w.element_size() // 4 * (
                torch.finfo(dtype).bits // 8)
        return make

    def dynamic_int8(w):
        import warnings
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            lin = torch.nn.Linear(w.shape[1], w.shape[0], bias=False)
            lin.weight.data.copy_(w)
            q = torch.ao.quantization.quantize_dynamic(torch.nn.Sequential(lin),
                                                       {torch.nn.Linear}, dtype=torch.qint8)
        return q, w.numel()

    def frozen(precision):
        """Our deploy path: a trainable layer holding w, frozen (packed weights + kernels)."""
        def make(w):
            from ..runtime import FrozenLinear, Linear
            layer = Linear(w.shape[1], w.shape[0], bias=False, precision=precision)
            layer.weight.data.copy_(w.cpu())
            mod = FrozenLinear(layer).to(device)
            with torch.no_grad():  # on the CPU this builds the form the kernel reads
                mod(torch.zeros(1, w.shape[1], device=device))
            return mod, mod.weight_bytes()
        return make

    def torchao(cfg_name):
        def make(w):
            import torchao.quantization as tq
            lin = torch.nn.Sequential(torch.nn.Linear(w.shape[1], w.shape[0], bias=False,
                                                      device=device, dtype=torch.float16))
            lin[0].weight.data.copy_(w)
            cfg = {"torchao_int8_weight_only": "Int8WeightOnlyConfig",
                   "torchao_int8_dynamic": "Int8DynamicActivationInt8WeightConfig"}[cfg_name]
            tq.quantize_(lin, getattr(tq, cfg)())
            return (lambda x: lin(x.half())), w.numel()
        return make

    m = {"torch_fp32": torch_linear(torch.float32), "torch_bf16": torch_linear(torch.bfloat16)}
    if device == "cuda":
        m["torch_fp16"] = torch_linear(torch.float16)
        m["torchao_int8_weight_only"] = torchao("torchao_int8_weight_only")
        m["torchao_int8_dynamic"] = torchao("torchao_int8_dynamic")
    else:
        m["torch_dynamic_int8"] = dynamic_int8
    from ..lang.precision import Int, Ternary
    m.update({"ternary": frozen(Ternary()), "ternary_a8": frozen(Ternary(activations="dynamic")),
              "int8_weight_only": frozen(Int()), "int8_w8a8": frozen(Int(activations="dynamic")),
              # 4-bit codes with a scale per 128 inputs, held as int8 codes in memory
              "int4_weight_only_g128": frozen(Int(bits=4, group_size=128))})
    return m


def _time_cpu_interleaved(fns: dict, x, repeat, warmup=3, evict=None) -> dict:
    """Median ms per method, the methods taking turns within each round: load from other
    processes on a shared machine then slows every method alike, and ratios stay fair.
    ``evict``: called before every timed call (--cold)."""
    for fn in fns.values():
        for _ in range(warmup):
            fn(x)
    ts = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            if evict is not None:
                evict()
            t = time.perf_counter()
            fn(x)
            ts[name].append(time.perf_counter() - t)
    return {name: (spread([t * 1e3 for t in v]), None) for name, v in ts.items()}


def _time_gpu(fn, x, repeat, warmup=10):
    flush = torch.empty(256 << 20, dtype=torch.int8, device="cuda")  # larger than any L2
    for _ in range(warmup):
        fn(x)
    torch.cuda.synchronize()
    ts = []
    for _ in range(repeat):
        flush.zero_()
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn(x)
        b.record()
        torch.cuda.synchronize()
        ts.append(a.elapsed_time(b))
    graph_ms = None
    try:
        g = torch.cuda.CUDAGraph()
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            fn(x)
        torch.cuda.current_stream().wait_stream(s)
        with torch.cuda.graph(g):
            fn(x)
        gs = []
        for _ in range(repeat):
            flush.zero_()
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            g.replay()
            b.record()
            torch.cuda.synchronize()
            gs.append(a.elapsed_time(b))
        graph_ms = statistics.median(gs)
    except Exception:  # a method that cannot be captured reports kernel time only
        pass
    return spread(ts), graph_ms


def chosen_methods(methods, device, avail=None) -> list[str]:
    """The methods to time (all of this device's, avail, by default), each checked."""
    avail = _methods(device) if avail is None else avail
    unknown = [m for m in methods or () if m not in avail]
    if unknown:
        raise ValueError(f"unknown method(s) on {device}: {', '.join(unknown)}; "
                         f"available: {', '.join(avail)}")
    return list(methods or avail)


def run(ms, nks, device="cpu", repeat=10, methods=None, log=print, stream_gbs=None,
        cold=False):
    torch.manual_seed(0)
    if cold and device != "cpu":
        raise ValueError("--cold is for the CPU layer bench (the GPU bench flushes its L2 "
                         "already)")
    avail = _methods(device)
    chosen = chosen_methods(methods, device, avail)
    evict = read_rate.evictor() if cold else None
    base = "torch_fp16" if device == "cuda" else "torch_fp32"
    records = []
    for nk in nks:
        w = torch.randn(nk, nk) / nk ** 0.5
        wd = w.to(device)
        built = {}
        for name in dict.fromkeys([base] + chosen):
            try:
                built[name] = avail[name](wd)
            except Exception as e:  # a missing peer (torchao not installed) is skipped, not fatal
                log(f"skip {name}: {type(e).__name__}: {e}")
        for m in ms:
            x = torch.randn(m, nk, device=device)
            with torch.no_grad():
                if device == "cuda":
                    times = {name: _time_gpu(fn, x, repeat) for name, (fn, _) in built.items()}
                else:
                    times = _time_cpu_interleaved({n: fn for n, (fn, _) in built.items()}, x,
                                                  repeat, evict=evict)
                base_ms, base_q1, base_q3 = times[base][0]
                for name, (fn, nbytes) in built.items():
                    (ms_, q1, q3), graph = times[name]
                    # the speedup is within noise when the two middle halves overlap
                    noisy = name != base and q1 <= base_q3 and base_q1 <= q3
                    records.append({"method": name, "M": m, "N": nk, "K": nk, "device": device,
                                    "median_ms": round(ms_, 4),
                                    "graph_ms": None if graph is None else round(graph, 4),
                                    "weight_bytes": int(nbytes),
                                    "speedup": round(base_ms / ms_, 3), "baseline": base,
                                    "baseline_ms": round(base_ms, 4),
                                    "gbs": round(nbytes / ms_ / 1e6, 1),
                                    "of_stream": (round(nbytes / ms_ / 1e6 / stream_gbs, 3)
                                                  if stream_gbs else None),
                                    "iqr_ms": round(q3 - q1, 4), "q1_ms": round(q1, 4),
                                    "q3_ms": round(q3, 4),
                                    "baseline_iqr_ms": round(base_q3 - base_q1, 4),
                                    "noisy": noisy, "repeat": repeat, "cold": cold})
                    log(_row(records[-1]))
                for r in records:
                    if r["noisy"] and r["M"] == m and r["N"] == nk:
                        log(f"warning: {r['method']} at M={m}, N=K={nk}: its interquartile range "
                            f"overlaps {base}'s; the {r['speedup']:.2f}x is within noise "
                            "(more --repeat, or a quieter machine)")
    return records


# (title, width): every width exceeds its title, so headers and figures never run together
COLUMNS = [("method", 26), ("M", 6), ("N=K", 7), ("median ms", 11), ("IQR ms", 9),
           ("graph ms", 10), ("weight MiB", 12), ("speedup", 10), ("compr.", 9), ("GB/s", 9),
           ("noise", 7)]
HEADER = "".join(f"{t:<{w}}" if i == 0 else f"{t:>{w}}" for i, (t, w) in enumerate(COLUMNS))


def _row(r):
    g = f"{r['graph_ms']:.3f}" if r.get("graph_ms") else "-"
    cells = [r["method"], r["M"], r["N"], f"{r['median_ms']:.3f}", f"{r['iqr_ms']:.3f}", g,
             f"{r['weight_bytes'] / 2 ** 20:.2f}", f"{r['speedup']:.2f}x",
             f"{r['N'] * r['K'] * 4 / r['weight_bytes']:.1f}x", f"{r['gbs']:.1f}",
             "noisy" if r["noisy"] else ""]
    return "".join(f"{c:<{w}}" if i == 0 else f"{c:>{w}}"
                   for i, (c, (_, w)) in enumerate(zip(cells, COLUMNS)))


def environment(device):
    env = {"date": datetime.date.today().isoformat(), "torch": torch.__version__,
           "python": platform.python_version(), "machine": platform.machine(),
           "threads": torch.get_num_threads(), "device": device}
    try:
        import triton
        env["triton"] = triton.__version__
    except Exception:
        env["triton"] = None
    if device == "cuda":
        env["gpu"] = torch.cuda.get_device_name()
    else:
        from ..kernels import cpu, native
        from ..kernels.common import cpu_info
        env["cpu_kernels"] = (f"ternary: {native.describe()}; int8: "
                              f"{native.describe() if cpu.native_int8() else cpu.engine()}")
        names = [l.split(":", 1)[1].strip() for l in cpu_info().splitlines()
                 if l.startswith("model name")]
        env["cpu"] = names[0] if names else platform.processor()
    return env


def _bandwidth_summary(recs, env):
    """M = 1 reads each weight byte once: print each method's rate against the best read rate
    seen in this run (the streaming measurement, or a GEMV that beat it), and record it."""
    m1 = [r for r in recs if r["M"] == 1]
    if not m1 or "stream_read_gbs" not in env:
        return
    peak = max([env["stream_read_gbs"]] + [r["gbs"] for r in m1])
    env["peak_read_gbs"] = peak
    print(f"M=1 weight streaming, against the best read rate of this run ({peak} GB/s):")
    for r in m1:
        r["of_peak_read"] = round(r["gbs"] / peak, 3)
        print(f"  N=K={r['N']:<6} {r['method']:<24} {r['gbs']:>6.1f} GB/s  "
              f"{100 * r['of_peak_read']:>4.0f}%")


def run_cli(a) -> int:
    if a.device is None:
        a.device = "cuda" if torch.cuda.is_available() else "cpu"
    if a.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: this torch sees no CUDA device "
                         "(torch.cuda.is_available() is False); use --device cpu")
    if getattr(a, "cold", False) and (a.device != "cpu" or getattr(a, "model", None)):
        raise ValueError("--cold is for the CPU layer bench (--device cpu, without --model)")
    if a.methods and not getattr(a, "model", None):  # before the bandwidth measurement
        chosen_methods(a.methods, a.device)
    if getattr(a, "rules", None) and getattr(a, "model", None):
        from .factory import load_factory
        load_factory(a.model)  # a misspelt factory is one line before anything is printed
    env = environment(a.device)
    print(" ".join(f"{k}={v}" for k, v in env.items()))
    decode = getattr(a, "decode", False)
    if decode and not getattr(a, "model", None):
        raise ValueError("--decode needs --model FILE.tdsl (a language model)")
    if a.device == "cpu" and (decode or not getattr(a, "model", None)):
        env["stream_read_gbs"] = read_rate.stream_read_gbs()
        print(f"streaming read bandwidth, measured now: {env['stream_read_gbs']} GB/s")
    if decode:
        from . import decode_bench
        if a.device != "cpu":
            raise ValueError("--decode times the CPU deployment; use --device cpu")
        print(decode_bench.HEADER)
        recs = decode_bench.run(a.model, a.prompt_len, a.new_tokens, env["stream_read_gbs"],
                                kv_cache=getattr(a, "kv_cache", "fp32"))
        decode_bench.kernel_summary(recs, env["stream_read_gbs"])
        decode_bench.prefill_summary(recs)
    elif getattr(a, "rules", None):
        from . import external_bench
        if not getattr(a, "model", None):
            raise ValueError("--rules needs --model PKG.MODULE:FACTORY")
        if a.device != "cpu":
            raise ValueError("--model times the CPU deployment; use --device cpu")
        print(external_bench.HEADER)
        recs = external_bench.run(a.model, a.rules, a.batch, a.repeat, a.tokens, a.input_shape)
    elif getattr(a, "model", None):
        from . import model_bench
        if a.device != "cpu":
            raise ValueError("--model times the CPU deployment; use --device cpu")
        load_class(a.model)  # a file with errors says so before the table's header
        print(model_bench.HEADER)
        recs = model_bench.run(a.model, a.batch, a.repeat, a.compile)
    else:
        print(HEADER)
        if getattr(a, "cold", False):
            env["evicted_bytes"] = read_rate.evict_bytes()
            print(f"--cold: {env['evicted_bytes'] >> 20} MiB read before every timed call "
                  f"(last-level cache {read_rate.llc_bytes() >> 20} MiB)")
        recs = run(a.M, a.NK, a.device, a.repeat, a.methods, stream_gbs=env.get("stream_read_gbs"),
                   cold=getattr(a, "cold", False))
        _bandwidth_summary(recs, env)
    if a.json:
        from ..files import write_atomic
        write_atomic(a.json, json.dumps({"environment": env, "records": recs}, indent=1) + "\n")
        print(f"wrote {a.json}")
    return 0
