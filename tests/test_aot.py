"""Every kernel variant compiles for an H100/H200 (cuda sm_90) here, without a GPU: PTX and a
cubin from Triton's own ptxas, within the shared-memory budget. Whether the results are right is
for the GPU tests; this catches illegal dots, dtypes, layouts and oversized tiles before a GPU is
at hand. The test compiles each variant's largest and smallest autotune config; the full table:
`python -m triton_dsl.kernels.aot` (benchmarks/results/aot-sm90.txt)."""
import os
import re
import subprocess
import sys

import pytest

from triton_dsl.kernels.common import HAS_TRITON


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON, reason="needs triton to compile kernels")
def test_every_variant_compiles_for_sm90():
    env = dict(os.environ, TRITON_DEFAULT_FP_FUSION="1")
    env.pop("TRITON_INTERPRET", None)  # interpreted kernels cannot be compiled
    r = subprocess.run([sys.executable, "-m", "triton_dsl.kernels.aot", "90", "--quick"],
                       capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-3000:]
    assert "0 over the shared-memory limit" in r.stdout
    compiled = int(re.search(r"compiled (\d+) kernel variants", r.stdout).group(1))
    assert compiled >= 15  # at least one config for each of the 15 variants
