"""triton-dsl: declare quantized networks in .tdsl files and compile them to PyTorch modules.

    Net = triton_dsl.load("model.tdsl")     # the nn.Module class, compiled in memory
    source = triton_dsl.compile("model.tdsl")  # the generated Python source
    plan = triton_dsl.quantize(model, "rules.tdsl")  # a precision section applied to any module

The package is layered, and imports flow one way (tests/test_layers.py enforces it):
    lang/      .tdsl text -> AST -> checked IR -> Python source, summary, fmt (no torch)
    runtime/   QAT layers, quantizers, frozen deploy forms; builds modules from .tdsl
    workflow/  data, training, checkpoints, reports, benchmarks
    cli/       the `triton-dsl` command
    kernels/   Triton kernels, their reference twins, the native CPU kernel (no triton_dsl imports)

Importing this package imports neither torch nor triton; the runtime does, when a model is built.
"""
from .version import __version__
from .api import (Diagnostic, TdslError, calibrate, check, compile, load, load_module,
                  load_source, plan, quantize)

__all__ = ["load", "load_source", "load_module", "compile", "check", "plan", "quantize",
           "calibrate", "TdslError", "Diagnostic", "__version__"]


def __getattr__(name):
    # `from triton_dsl import checkpoint` (documented) without importing torch up front.
    if name == "checkpoint":
        from .workflow import checkpoint
        return checkpoint
    raise AttributeError(f"module 'triton_dsl' has no attribute {name!r}")
