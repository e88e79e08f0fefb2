"""Build nn.Module classes from .tdsl files: compile in memory, then import the generated code.

The generated module imports the runtime, so this lives beside it rather than in the language.
"""
from __future__ import annotations

import builtins
import hashlib
import os
import sys
import types

from ..lang.codegen import generate
from ..lang.frontend import Result, check_file, check_source

def load_source(text: str, path: str = "<string>", model: str | None = None,
                fp32: bool = False):
    """Compile .tdsl text and return the model class (``model`` picks one of several)."""
    return _load(check_source(text, path, fp32), model)


def load(path: str, model: str | None = None, fp32: bool = False):
    """Compile a .tdsl file in memory and return its nn.Module class:

        Net = triton_dsl.load("examples/mnist_ternary.tdsl")
        net = Net()

    fp32=True builds every layer in fp32 (the float model post-training quantization starts
    from); its state dict loads into the quantized model of the same file.
    """
    return _load(check_file(path, fp32), model)


def load_module(path: str) -> types.ModuleType:
    """The whole generated module (every model of the file) without writing it to disk."""
    return _module(check_file(path))


def _module(r: Result) -> types.ModuleType:
    r.raise_for_errors()
    code = generate(r.models, r.path, r.text, r.all_fp32)
    stem = os.path.splitext(os.path.basename(r.path))[0]
    digest = hashlib.sha256(code.encode()).hexdigest()[:12]
    name = f"triton_dsl._generated.{''.join(c if c.isalnum() else '_' for c in stem)}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    mod = types.ModuleType(name)
    mod.__file__ = f"<triton-dsl:{r.path}>"
    exec(builtins.compile(code, mod.__file__, "exec"), mod.__dict__)
    sys.modules[name] = mod  # so classes pickle and reload within this process
    return mod


def _load(r: Result, model: str | None):
    mod = _module(r)
    names = mod.__all__
    if model is None:
        if len(names) > 1:
            raise ValueError(f"{r.path} declares {len(names)} models ({', '.join(names)}); "
                             "pass model=NAME")
        model = names[0]
    if model not in names:
        raise ValueError(f"{r.path} has no model {model!r}; it declares {', '.join(names)}")
    return getattr(mod, model)
