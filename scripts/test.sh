#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite. Triton kernels run under the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export TRITON_INTERPRET=1
exec python -m pytest -q "$@"
