"""How long `check` takes on a generated 200-layer file (target: well under 0.5 s).

    python benchmarks/check_speed.py [--layers 200] > benchmarks/results/check-speed-epyc-2core.txt
"""
import argparse
import datetime
import os
import platform
import subprocess
import sys
import tempfile
import time


def make(n: int) -> str:
    lines = ["model Deep:", "    input [64]"]
    for i in range(n // 2):
        lines += [f"    layer fc{i}: linear(64)", "    relu"]
    lines += ["", "precision:", "    default int8", "    layer fc1*: ternary", "    kind linear: fp16",
              "    layer fc0: fp32"]
    return "\n".join(lines) + "\n"


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=200)
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    print(f"date={datetime.date.today()} python={platform.python_version()} "
          f"machine={platform.machine()} cpus={os.cpu_count()}")
    with tempfile.TemporaryDirectory() as d:
        path = os.path.join(d, "deep.tdsl")
        with open(path, "w") as f:
            f.write(make(a.layers))
        from triton_dsl.lang.frontend import check_file
        check_file(path)  # builds the parser once, as a long-lived process would
        ts = []
        for _ in range(a.runs):
            t = time.perf_counter()
            r = check_file(path)
            ts.append(time.perf_counter() - t)
        assert r.ok, r.diagnostics
        ts.sort()
        print(f"in-process check of {a.layers} layers: median {ts[len(ts) // 2] * 1e3:.1f} ms")
        ts = []
        for _ in range(a.runs):
            t = time.perf_counter()
            subprocess.run([sys.executable, "-m", "triton_dsl", "check", path], check=True,
                           capture_output=True)
            ts.append(time.perf_counter() - t)
        ts.sort()
        print(f"`triton-dsl check` of {a.layers} layers, whole process: median "
              f"{ts[len(ts) // 2] * 1e3:.1f} ms")


if __name__ == "__main__":
    main()
