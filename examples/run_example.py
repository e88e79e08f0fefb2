"""Compile a .tdsl file, import the generated module, run a batch through it, print the summary.

    python examples/run_example.py examples/mnist_ternary.tdsl
"""
import importlib.util
import os
import subprocess
import sys
import time

import torch


def main(path: str) -> int:
    out_dir = os.path.relpath(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "out"))
    os.makedirs(out_dir, exist_ok=True)
    out = os.path.join(out_dir, os.path.splitext(os.path.basename(path))[0] + ".py")
    cli = [sys.executable, "-m", "triton_dsl"]
    if subprocess.call(cli + ["compile", path, "-o", out]):
        return 1
    spec = importlib.util.spec_from_file_location("generated", out)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    torch.manual_seed(0)
    for name in mod.__all__:
        net = getattr(mod, name)().eval()
        x = torch.randn(32, *net.input_shape)
        with torch.no_grad():
            t = time.perf_counter()
            y = net(x)
            ms = (time.perf_counter() - t) * 1e3
        print(f"{name}: forward of a batch of 32 -> output {list(y.shape)} in {ms:.1f} ms (CPU, "
              "untrained weights)")
    print()
    return subprocess.call(cli + ["summary", path])


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "examples/mnist_ternary.tdsl"))
