"""Bar chart of a benchmark results file: time per method for each (M, N=K), baseline marked.

    python benchmarks/plot.py benchmarks/results/cpu-epyc-2core.json [-o out.png]
"""
import argparse
import json
import os

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402


def plot(path: str, out: str) -> str:
    with open(path) as f:
        data = json.load(f)
    recs, env = data["records"], data["environment"]
    shapes = sorted({(r["N"], r["M"]) for r in recs})
    methods = list(dict.fromkeys(r["method"] for r in recs))
    fig, axes = plt.subplots(1, len(shapes), figsize=(3.2 * len(shapes), 4.2), sharey=False)
    for ax, (nk, m) in zip(axes if len(shapes) > 1 else [axes], shapes):
        rows = {r["method"]: r for r in recs if r["N"] == nk and r["M"] == m}
        names = [x for x in methods if x in rows]
        speed = [rows[x]["speedup"] for x in names]
        colors = ["gray" if x.startswith("torch") else "tab:green" for x in names]
        ax.barh(names, speed, color=colors)
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_title(f"M={m}, N=K={nk}", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.set_xlabel(f"speedup over {rows[names[0]]['baseline']}", fontsize=8)
        if ax is not axes[0]:
            ax.set_yticklabels([])
    where = env.get("gpu") or env.get("cpu", "")
    fig.suptitle(f"{where}, {env['threads']} threads, torch {env['torch']}, {env['date']}",
                 fontsize=9)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    return out


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("results")
    ap.add_argument("-o", "--output")
    a = ap.parse_args()
    print(plot(a.results, a.output or os.path.splitext(a.results)[0] + ".png"))
