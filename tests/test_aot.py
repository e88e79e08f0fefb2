"""Every kernel variant compiles for an H100/H200 (cuda sm_90) here, without a GPU: PTX and a
cubin from Triton's own ptxas, within the shared-memory budget. Whether the results are right is
for the GPU tests; this catches illegal dots, dtypes, layouts and oversized tiles before a GPU is
at hand. The default run compiles the largest autotune config of one variant per kernel and
kind of arithmetic (5 of 15: a full compile costs about 8 s of CPU each); `pytest -m sweep`
adds every config of every variant (the full table, as `python -m triton_dsl.kernels.aot`
prints it: benchmarks/results/aot-sm90.txt)."""
import os
import re
import subprocess
import sys

import pytest

from triton_dsl.kernels.common import HAS_TRITON


def _compile(*args: str) -> int:
    env = dict(os.environ, TRITON_DEFAULT_FP_FUSION="1")
    env.pop("TRITON_INTERPRET", None)  # interpreted kernels cannot be compiled
    r = subprocess.run([sys.executable, "-m", "triton_dsl.kernels.aot", "90", *args],
                       capture_output=True, text=True, env=env, timeout=1800)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "0 over the shared-memory limit" in r.stdout
    return int(re.search(r"compiled (\d+) kernel variants", r.stdout).group(1))


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON, reason="needs triton to compile kernels")
def test_each_kind_of_kernel_compiles_for_sm90():
    assert _compile("--pick", "largest", "--some") == 5


@pytest.mark.sweep
@pytest.mark.skipif(not HAS_TRITON, reason="needs triton to compile kernels")
def test_every_config_compiles_for_sm90():
    assert _compile("--pick", "all") >= 161
