"""Bar chart of a benchmark results file: speedup per method for each (M, N=K).

    python benchmarks/plot.py benchmarks/results/cpu-epyc-2core.json [-o out.png]
"""
import argparse
import json
import os

from triton_dsl.workflow.plots import bench_bars

if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("-o", "--output")
    a = ap.parse_args()
    out = a.output or os.path.splitext(a.results)[0] + ".png"
    with open(a.results) as f:
        bench_bars(json.load(f), out)
    print(out)
