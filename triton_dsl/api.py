"""The public facade: what the CLI does, in memory. Every name here is re-exported by the package.

    Net = triton_dsl.load("model.tdsl")        # the nn.Module class, compiled in memory
    source = triton_dsl.compile("model.tdsl")  # the generated Python source
    result = triton_dsl.check("model.tdsl")    # .models, .diagnostics, .ok

The loaders import torch (through the runtime) only when they are called.
"""
from __future__ import annotations

import types

from .lang.codegen import generate
from .lang.diagnostics import Diagnostic, TdslError
from .lang.frontend import Result, check_file

__all__ = ["check", "compile", "load", "load_source", "load_module", "plan", "quantize",
           "calibrate", "Result", "Diagnostic", "TdslError"]


def check(path: str) -> Result:
    """Parse and check a .tdsl file; the result holds the models and every diagnostic."""
    return check_file(path)


def compile(path: str) -> str:  # noqa: A001 - mirrors the CLI verb
    """The generated Python source for a .tdsl file; raises TdslError listing every error."""
    r = check_file(path)
    r.raise_for_errors()
    return generate(r.models, r.path, r.text)


def load_source(text: str, path: str = "<string>", model: str | None = None, fp32: bool = False):
    """Compile .tdsl text and return the model class (``model`` picks one of several)."""
    from .runtime.build import load_source as _load_source
    return _load_source(text, path, model, fp32)


def load(path: str, model: str | None = None, fp32: bool = False):
    """Compile a .tdsl file in memory and return its nn.Module class:

        Net = triton_dsl.load("examples/mnist_ternary.tdsl")
        net = Net()

    fp32=True builds every layer in fp32 (the float model post-training quantization starts
    from); its state dict loads into the quantized model of the same file.
    """
    from .runtime.build import load as _load
    return _load(path, model, fp32)


def load_module(path: str) -> types.ModuleType:
    """The whole generated module (every model of the file) without writing it to disk."""
    from .runtime.build import load_module as _load_module
    return _load_module(path)


def plan(model, rules):
    """What a rules file (a path, or its text: `precision:` and rules) would do to an existing
    ``model``: each Linear, Conv2d and Conv1D module's precision, bits and packed bytes, and the
    totals. Changes nothing; raises TdslError with every problem in the rules."""
    from .runtime.external import plan as _plan
    return _plan(model, rules)


def quantize(model, rules):
    """Apply a rules file to an existing ``model`` in place: each selected module becomes a
    trainable quantized layer holding the same weights (then ``runtime.freeze(model)`` packs
    it). Returns the plan; raises TdslError, changing nothing, when the rules have an error."""
    from .runtime.external import quantize as _quantize
    return _quantize(model, rules)


def calibrate(model, batches) -> int:
    """Observe static activation ranges (activations=static) on the user's own batches:
    tensors (model(x)), tuples (model(*b)) or dicts (model(**b)). Returns the batches seen."""
    from .runtime.external import calibrate as _calibrate
    return _calibrate(model, batches)
