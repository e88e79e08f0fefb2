"""Plots for reports and benchmarks (matplotlib, an optional extra: pip install 'triton-dsl[plots]')."""
from __future__ import annotations


def _plt():
    try:
        import matplotlib
    except ImportError as e:
        raise ValueError("plots need matplotlib: pip install 'triton-dsl[plots]'") from e
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _save(plt, fig, path, dpi=100):
    fig.tight_layout()
    fig.savefig(path, dpi=dpi)
    plt.close(fig)


def _grid(n, width=3.2, height=2.6):
    plt = _plt()
    cols = min(n, 4)
    rows = -(-n // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(width * cols, height * rows), squeeze=False)
    flat = [a for row in axes for a in row]
    for a in flat[n:]:
        a.axis("off")
    return plt, fig, flat[:n]


def histograms(layers, path):
    """layers: [(name, float weights or None, quantized weights)] -> one panel per layer."""
    plt, fig, axes = _grid(len(layers))
    for ax, (name, before, after) in zip(axes, layers):
        if before is not None:
            ax.hist(before.flatten().numpy(), bins=60, alpha=0.55, label="float")
        ax.hist(after.flatten().numpy(), bins=60, alpha=0.75, label="quantized")
        ax.set_title(name, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=6)
    fig.suptitle("weights before and after quantization", fontsize=9)
    _save(plt, fig, path)


def errors(layers, path):
    """|float - quantized| per layer (needs float weights)."""
    plt, fig, axes = _grid(len(layers))
    for ax, (name, before, after) in zip(axes, layers):
        ax.hist((before - after).abs().flatten().numpy(), bins=60, color="tab:red")
        ax.set_title(f"{name}: quantization error", fontsize=8)
        ax.tick_params(labelsize=7)
    _save(plt, fig, path)


def ternary_counts(counts, path):
    """counts: [(name, n_minus, n_zero, n_plus)] -> bars with the sparsity in each title."""
    plt, fig, axes = _grid(len(counts), 2.6, 2.4)
    for ax, (name, neg, zero, pos) in zip(axes, counts):
        total = neg + zero + pos
        ax.bar(["-1", "0", "+1"], [neg, zero, pos], color=["tab:blue", "gray", "tab:orange"])
        ax.set_title(f"{name}: {100 * zero / total:.1f}% zeros", fontsize=8)
        ax.tick_params(labelsize=7)
    _save(plt, fig, path)


def curves(history, path, title="training"):
    """history: the per-epoch records train() returns (plus any ptq_* accuracies)."""
    plt = _plt()
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.4))
    ep = [r["epoch"] for r in history]
    a.plot(ep, [r["loss"] for r in history], "o-")
    a.set_xlabel("epoch")
    a.set_ylabel("training loss")
    if any(r.get("val_bpb") is not None for r in history):  # a language model
        b.plot(ep, [r.get("val_bpb") for r in history], "o-", label="val")
        b.plot(ep, [r.get("train_bpb") for r in history], ".--", label="train")
        b.set_xlabel("epoch")
        b.set_ylabel("bits per byte")
        b.legend(fontsize=7)
        for ax in (a, b):
            ax.grid(alpha=0.3)
        fig.suptitle(title, fontsize=9)
        return _save(plt, fig, path)
    key = "val_acc" if any(r.get("val_acc") is not None for r in history) else "test_acc"
    if any(r.get(key) is not None for r in history):  # older checkpoints logged test accuracy
        b.plot(ep, [r.get(key) for r in history], "o-", label=key[:-4] + " (this model)")
    b.plot(ep, [r.get("train_acc") for r in history], ".--", label="train")
    for key in sorted({k for r in history for k in r if k.startswith("ptq_")}):
        b.plot(ep, [r.get(key) for r in history], "^--", label=key.replace("_", " "))
    b.set_xlabel("epoch")
    b.set_ylabel("accuracy (%)")
    b.legend(fontsize=7)
    for ax in (a, b):
        ax.grid(alpha=0.3)
    fig.suptitle(title, fontsize=9)
    _save(plt, fig, path)


def bench_bars(data, path):
    """A `bench --json` file's records: speedup over the baseline for each (M, N=K)."""
    recs, env = data["records"], data["environment"]
    shapes = sorted({(r["N"], r["M"]) for r in recs})
    methods = list(dict.fromkeys(r["method"] for r in recs))
    plt, fig, axes = _grid(len(shapes), 3.4, 3.6)
    for ax, (nk, m) in zip(axes, shapes):
        rows = {r["method"]: r for r in recs if r["N"] == nk and r["M"] == m}
        names = [x for x in methods if x in rows]
        ax.barh(names, [rows[x]["speedup"] for x in names],
                color=["gray" if x.startswith("torch") else "tab:green" for x in names])
        ax.axvline(1.0, color="black", linewidth=0.8)
        ax.set_title(f"M={m}, N=K={nk}", fontsize=9)
        ax.tick_params(labelsize=7)
        ax.set_xlabel(f"speedup over {rows[names[0]]['baseline']}", fontsize=8)
    where = env.get("gpu") or env.get("cpu", "")
    fig.suptitle(f"{where}, {env.get('threads')} threads, torch {env.get('torch')}, "
                 f"{env.get('date')}", fontsize=9)
    _save(plt, fig, path, dpi=110)
