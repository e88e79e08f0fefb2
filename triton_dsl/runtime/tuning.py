"""Measured choices, as Triton's autotune makes them: the first time a frozen layer meets a
batch bucket, each exact way to run it is timed on that layer's own shape and input, the
fastest is kept, and the choice is remembered in memory and on disk, keyed by the CPU, the
thread count, the layer's shape and the bucket. Later processes on the same machine reuse it.

TRITON_DSL_TUNE=0 turns measuring off (the size heuristics of dispatch.py decide instead: the
tests use this, so that a path they force is the path that runs). The disk cache lives in
$TRITON_DSL_CACHE (default ~/.cache/triton-dsl), one JSON file per CPU, native library build
and torch version; delete it to re-tune.
"""
from __future__ import annotations

import hashlib
import json
import os
import statistics
import time
from pathlib import Path

import torch

from ..files import write_atomic
from ..kernels import native, native_build

ROUNDS = 7  # timed rounds per candidate, interleaved; the median decides
_MEMORY: dict = {}
_LOADED: set = set()


def enabled() -> bool:
    return os.environ.get("TRITON_DSL_TUNE", "1") != "0"


def _path() -> Path:
    """One file per CPU and per build of what is timed (the native library, torch): a choice
    measured against other kernels is measured again (a faster quantizer turned an int8
    convolution's batch-1 choice around)."""
    lib = native.library()  # built by now: tuning times frozen layers
    what = [native_build.cpu_id(), lib.path.name if lib is not None else "no native library",
            torch.__version__]
    return native_build.cache_dir() / \
        f"tuning-{hashlib.sha256(chr(0).join(what).encode()).hexdigest()[:12]}.json"


def _load(path: Path):
    if path in _LOADED:
        return
    _LOADED.add(path)
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return  # no cache yet, or a damaged one: measure again
    if isinstance(saved, dict):
        _MEMORY.update({(str(path), k): v for k, v in saved.items() if isinstance(v, str)})


def _save(path: Path):
    mine = {k: v for (p, k), v in _MEMORY.items() if p == str(path)}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        write_atomic(str(path), json.dumps(mine, indent=0, sort_keys=True) + "\n")
    except OSError:
        pass  # a read-only cache only costs a re-measure in the next process


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def fastest(candidates: dict) -> str:
    """The name of the fastest of ``candidates`` (name -> a call that runs once), by the median
    of ROUNDS interleaved rounds after one warm-up call each. Under no_grad, not inference_mode:
    a runner built here (a dense weight) must stay usable where autograd records, as in a frozen
    layer after a module whose parameters require gradients."""
    with torch.no_grad():
        for fn in candidates.values():
            fn()
        times = {name: [] for name in candidates}
        for _ in range(ROUNDS):
            for name, fn in candidates.items():
                times[name].append(_time(fn))
    return min(times, key=lambda n: statistics.median(times[n]))


def choose(key: str, candidates: dict) -> str:
    """The remembered choice for ``key`` if it is still a candidate, else measured now."""
    if len(candidates) == 1:
        return next(iter(candidates))
    path = _path()
    _load(path)
    slot = (str(path), f"{key}|threads={torch.get_num_threads()}")
    name = _MEMORY.get(slot)
    if name not in candidates:
        name = _MEMORY[slot] = fastest(candidates)
        _save(path)
    return name
