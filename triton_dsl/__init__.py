"""triton-dsl: declare quantized networks in .tdsl files and compile them to PyTorch modules.

    Net = triton_dsl.load("model.tdsl")     # the nn.Module class, compiled in memory
    source = triton_dsl.compile("model.tdsl")  # the generated Python source

Importing this package imports neither torch nor triton; the runtime does, when a model is built.
"""
__version__ = "0.1.0"

from .api import check, compile, load, load_module, load_source  # noqa: E402
from .diagnostics import Diagnostic, TdslError  # noqa: E402

__all__ = ["load", "load_source", "load_module", "compile", "check", "TdslError", "Diagnostic",
           "__version__"]
