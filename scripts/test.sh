#!/usr/bin/env bash
# Set up (if needed) and run the whole test suite. Triton kernels run under the interpreter.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
. .venv/bin/activate
export TRITON_INTERPRET=1
# two worker processes (pytest-xdist), one per core of the 2-core CI machine: much of the suite
# waits on compilers and subprocesses; `-n 0` after the command runs it in one process
exec python -m pytest -q -n 2 "$@"
