#!/usr/bin/env bash
# The first thing to run: set up (if needed), then compile examples/mnist_ternary.tdsl, train it
# briefly (seeded) on the bundled digits, freeze it to packed 2-bit weights, and print its
# accuracy, size on disk and CPU speed against fp32. About a minute on 2 cores after set-up;
# outputs go to out/demo/ (git-ignored) and are overwritten on every run.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec python examples/run_example.py "${1:-examples/mnist_ternary.tdsl}" --out out/demo
