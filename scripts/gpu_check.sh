#!/usr/bin/env bash
# The one prepared run for a session that has a GPU machine (see the device tool's README):
# the kernel tests on CUDA (the requires_gpu ones included) and the GPU benchmark, results to $OUT.
#
# Before the call, here (the GPU image has no lark):
#   echo /.whl/ >> .git/info/exclude
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 -d .whl lark==1.3.1
#   (optionally torchao too, for the torchao_* peers)
# Then: run(command="bash scripts/gpu_check.sh", carry=[".whl"], timeout_s=540)
set -u
out=${OUT:-out/gpu}
mkdir -p "$out"
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl || exit 1
python3 -m pip install -q --no-deps --no-build-isolation --target /tmp/site . || exit 1
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1
cd /tmp  # import the installed package, not the checkout
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$out/device.txt" 2>&1
python3 -c "import torch, triton; print(torch.__version__, triton.__version__)" >> "$out/device.txt"
repo=$OLDPWD
timeout 240 python3 -m pytest -q -p no:cacheprovider "$repo/tests/test_kernels.py" \
    "$repo/tests/test_frozen.py" 2>&1 | tee "$out/gpu-tests.txt" | tail -5
timeout 280 python3 -m triton_dsl bench --device cuda --M 1 16 256 --NK 4096 8192 --repeat 20 \
    --json "$out/gpu-bench.json" 2>&1 | tee "$out/gpu-bench.txt"
