#!/usr/bin/env bash
# Create .venv and install triton-dsl with everything the tests, examples and benchmarks use.
# Idempotent: a second run only checks that the install is complete.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
. .venv/bin/activate
stamp=.venv/.triton-dsl-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
  python -m pip install -q --upgrade pip
  # torch first and pinned: an open range could pull a multi-GB CUDA build; 2.13.0 is the CPU
  # build this project's machines carry.
  python -m pip install -q "torch==2.13.0"
  # hf: transformers, so the tests of rules files on Hugging Face models run in CI too
  python -m pip install -q -e ".[dev,hf]"
  touch "$stamp"
fi
# Build the native CPU kernel now rather than on the first forward pass (cached in
# ~/.cache/triton-dsl; without a C compiler the CPU paths fall back to torch's int8 GEMMs).
# A failed build is said once and remembered: after fixing the compiler, rerun with
# TRITON_DSL_CPU_RETRY=1 (or delete the cache folder). TRITON_DSL_CC_TIMEOUT bounds it (120 s).
python -c "from triton_dsl.kernels import native; print('CPU kernel:', native.describe())"
