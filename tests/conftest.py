import os

import pytest

# Frozen layers choose their CPU path by the size rule, not by timing (runtime/tuning.py), so
# the path a test forces is the path that runs; the tuner's own tests turn it back on.
os.environ["TRITON_DSL_TUNE"] = "0"

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")


def pytest_collection_modifyitems(config, items):
    try:
        import torch
        has_gpu = torch.cuda.is_available()
    except Exception:
        has_gpu = False
    if not has_gpu:
        skip = pytest.mark.skip(reason="needs a CUDA GPU; none is present")
        for item in items:
            if "requires_gpu" in item.keywords:
                item.add_marker(skip)


@pytest.fixture
def run_cli(capsys):
    """Run the CLI in-process: returns (exit code, stdout, stderr)."""
    from triton_dsl.cli import main

    def run(*argv):
        code = main(list(argv))
        out, err = capsys.readouterr()
        return code, out, err
    return run

