"""Resident memory of one layer's weight, measured (process RSS), against fp32 nn.Linear.

Each case runs in a fresh process. A small layer of the same kind runs first, so code pages and
one-time buffers are not counted; then RSS is read before building the big layer, and after
building it, freezing it, dropping the trainable layer and running one forward pass (so caches
exist). malloc_trim returns freed heap to the system before each reading.

    python benchmarks/memory.py [--NK 4096]
"""
import argparse
import subprocess
import sys

CASE = r"""
import ctypes, gc, sys, torch
from triton_dsl import runtime as rt
libc = ctypes.CDLL("libc.so.6")
def rss():
    gc.collect()
    libc.malloc_trim(0)
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096
def build(n, kind):
    if kind == "fp32":
        return torch.nn.Linear(n, n)
    prec = {"ternary": rt.Ternary(), "ternary_a8": rt.Ternary(activations="dynamic"),
            "int8": rt.Int(), "int8_w8a8": rt.Int(activations="dynamic"),
            "int4_g128": rt.Int(bits=4, group_size=128)}[kind]
    return rt.FrozenLinear(rt.Linear(n, n, precision=prec))
nk, kind = int(sys.argv[1]), sys.argv[2]
torch.manual_seed(0)
with torch.no_grad():
    build(128, kind)(torch.randn(4, 128))  # warm-up: code pages, thread pools
    x = torch.randn(4, nk)
    before = rss()
    layer = build(nk, kind)
    layer(x)
print(rss() - before)
"""


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--NK", type=int, default=4096)
    a = ap.parse_args()
    fp32 = None
    from triton_dsl.workflow.bench import environment
    print(" ".join(f"{k}={v}" for k, v in environment("cpu").items()))
    print(f"N=K={a.NK}: resident bytes of one layer after a forward pass (process RSS delta)")
    for kind in ("fp32", "ternary", "ternary_a8", "int8", "int8_w8a8", "int4_g128"):
        out = subprocess.run([sys.executable, "-c", CASE, str(a.NK), kind], capture_output=True,
                             text=True, check=True).stdout.split()[-1]
        b = int(out)
        fp32 = fp32 or b
        print(f"{kind:<12}{b / 2 ** 20:>9.1f} MiB  {b / fp32:>6.3f} of fp32")


if __name__ == "__main__":
    main()
