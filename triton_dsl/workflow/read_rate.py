"""How fast this machine reads memory, measured now, and how to make a timed call read its
weights from memory rather than the last-level cache (`triton-dsl bench`, --cold)."""
from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch


def llc_bytes(root: str = "/sys/devices/system/cpu/cpu0/cache") -> int:
    """The last-level cache's size (the largest cache sysfs lists for CPU 0), or 512 MiB."""
    sizes = []
    for index in Path(root).glob("index*"):
        try:
            text = (index / "size").read_text().strip().upper()
            sizes.append(int(text.rstrip("KMG")) << {"K": 10, "M": 20, "G": 30}.get(text[-1], 0))
        except (OSError, ValueError, IndexError):
            continue
    return max(sizes, default=512 << 20)


def evict_bytes() -> int:
    """Twice the last-level cache, at least 64 MiB, at most 2 GiB."""
    return min(max(2 * llc_bytes(), 64 << 20), 2 << 30)


def evictor():
    """A call that reads evict_bytes(): run before a timed call, it leaves that call's weights
    in memory, not in the cache."""
    buf = torch.ones(evict_bytes() // 4)
    return lambda: buf.sum()


def stream_read_gbs(device: str = "cpu", gib: float = 1.0, repeat: int = 5) -> float:
    """The machine's streaming read bandwidth, measured now: GB/s of the faster of two reads of
    a buffer far larger than the last-level cache, a sum and an fp32 matrix-vector product (a
    BLAS GEMV streams its matrix; a plain reduction alone stays below it on some CPUs). The
    physical limit of an M = 1 layer, which reads each weight byte once. Median of ``repeat``."""
    buf = torch.ones(1 << 14, int(gib * 2 ** 30) // 4 >> 14, device=device)
    vec = torch.ones(buf.shape[1], device=device)
    best = 0.0
    for read in (lambda: buf.sum(), lambda: torch.mv(buf, vec)):
        ts = []
        for _ in range(repeat + 1):
            if device == "cuda":
                torch.cuda.synchronize()
            t = time.perf_counter()
            read().cpu()
            ts.append(time.perf_counter() - t)
        best = max(best, buf.numel() * 4 / statistics.median(ts[1:]) / 1e9)
    return round(best, 1)
