#!/usr/bin/env bash
# Set up (if needed), compile examples/mnist_ternary.tdsl, run the model, show its summary.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
exec python examples/run_example.py "${1:-examples/mnist_ternary.tdsl}"
