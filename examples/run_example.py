"""The demo: a .tdsl file -> compiled module -> seeded QAT on digits -> frozen packed weights,
with the figures that matter measured here and now: accuracy, size on disk, and CPU speed of the
frozen model against the same network in fp32.

    python examples/run_example.py [examples/mnist_ternary.tdsl] [--epochs 8] [--out out/demo]
"""
import argparse
import os
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("file", nargs="?", default=os.path.join(HERE, "mnist_ternary.tdsl"))
    ap.add_argument("--epochs", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=os.path.join(HERE, "..", "out", "demo"))
    ap.add_argument("--nk", type=int, default=4096, help="the large layer of step 5")
    a = ap.parse_args(argv)
    import triton_dsl
    from triton_dsl import checkpoint as ck
    from triton_dsl.files import write_atomic
    from triton_dsl.lang.frontend import check_file
    from triton_dsl.lang.summary import summarize
    from triton_dsl.workflow import build, freeze_checkpoint, train_model
    from triton_dsl.workflow.data import load
    from triton_dsl.workflow.model_bench import plain, time_models
    from triton_dsl.workflow.train import evaluate

    out = os.path.relpath(a.out)
    os.makedirs(out, exist_ok=True)
    stem = os.path.splitext(os.path.basename(a.file))[0]
    t0 = time.perf_counter()

    # 1. compile: the readable module, and the precision chosen for each layer
    module = os.path.join(out, stem + ".py")
    write_atomic(module, triton_dsl.compile(a.file))
    model = check_file(a.file).models[0]
    plan = ", ".join(f"{r['name']} {r['precision']}" for r in summarize(model)["layers"]
                     if r.get("precision"))
    print(f"1. compiled {a.file} -> {module}\n   {model.name}: {plan}")

    # 2. train: seeded QAT, the epoch best on the validation split kept
    qat, packed = os.path.join(out, "qat.safetensors"), os.path.join(out, "packed.safetensors")
    t = time.perf_counter()
    r = train_model(a.file, "digits", qat, epochs=a.epochs, seed=a.seed, progress=False,
                    log=lambda s: None)
    print(f"2. trained {a.epochs} epoch{'s' * (a.epochs != 1)} on digits (seed {a.seed}) in "
          f"{time.perf_counter() - t:.1f} s: best epoch {r['best_epoch']}, validation accuracy {r['val_acc']:.2f}%")

    # 3. freeze: packed weights, reloaded from disk as a deployment would
    freeze_checkpoint(qat, packed)
    frozen = ck.load(packed)
    ds = load("digits", frozen.input_shape, norm=ck.normalization(frozen.checkpoint_meta))
    acc = evaluate(frozen, ds)
    big, small = os.path.getsize(qat), os.path.getsize(packed)
    print(f"3. froze -> {packed}\n   test accuracy {acc:.2f}% ({len(ds.x_test)} held-out digits;"
          f" {r['test_acc']:.2f}% before freezing)\n   size on disk {small:,} B, {big / small:.1f}x"
          f" smaller than the fp32 checkpoint ({big:,} B)")

    # 4. speed: the frozen model against the same network, same weights, in plain fp32
    fp32 = build(a.file, fp32=True)
    fp32.load_state_dict(ck.load(qat).state_dict(), strict=False)
    fp32 = plain(fp32.eval())  # torch's own nn.Linear: the baseline a PyTorch user has
    print(f"4. CPU forward time, median of 60 interleaved runs ({torch.get_num_threads()} "
          "threads, inference_mode):")
    for batch in (1, 64):
        x = torch.randn(batch, *frozen.input_shape)
        tm = time_models({"fp32": fp32, "frozen": frozen}, x, repeat=60, warmup=5)
        (f_ms, f1, f3), (q_ms, q1, q3) = tm["fp32"], tm["frozen"]
        noisy = "  (within noise: the IQRs overlap)" if q1 <= f3 and f1 <= q3 else ""
        print(f"   batch {batch:>2}: fp32 {f_ms:.3f} ms (IQR {f3 - f1:.3f}), frozen {q_ms:.3f} ms"
              f" (IQR {q3 - q1:.3f}): {f_ms / q_ms:.1f}x{noisy}")
    # 5. where packed weights pay off: one large layer, where reading the weight dominates
    from triton_dsl.workflow.bench import run as bench
    nk = a.nk
    recs = bench([1, 64], [nk], "cpu", repeat=20, methods=["ternary", "ternary_a8"],
                 log=lambda s: None)
    print(f"5. one {nk}x{nk} linear layer (`triton-dsl bench` for more), time against fp32:")
    for m in (1, 64):
        cells = [f"{r['method']} {r['median_ms']:.2f} ms ({r['speedup']:.1f}x"
                 f"{', within noise' if r['noisy'] else ''})" for r in recs
                 if r["M"] == m and r["method"] != "torch_fp32"]
        base = next(r for r in recs if r["M"] == m)["baseline_ms"]
        print(f"   batch {m:>2}: fp32 {base:.2f} ms, " + ", ".join(cells))
    print(f"done in {time.perf_counter() - t0:.1f} s; outputs in {out}/")
    return 0


if __name__ == "__main__":
    sys.exit(main())
