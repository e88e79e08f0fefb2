"""Building a user's model from `--model PKG.MODULE:FACTORY` (triton-dsl plan, bench).

The string comes from the command line, so each step is checked and each failure is one line
(FactoryError): the form, the import (with the current directory on the path, as `python -m`
would have it), the attribute, the call, and that the result is an nn.Module.
"""
from __future__ import annotations

import importlib
import os
import re
import sys

from ..lang.diagnostics import suggest

_DOTTED = r"[A-Za-z_][A-Za-z0-9_]*(?:\.[A-Za-z_][A-Za-z0-9_]*)*"
_FORM = re.compile(rf"({_DOTTED}):({_DOTTED})")


class FactoryError(ValueError):
    """A --model string that does not give a model; the message is one line."""


def _one_line(e: BaseException) -> str:
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text[:300]}" if text else type(e).__name__


def load_factory(spec: str):
    """The callable that ``spec`` (PKG.MODULE:FACTORY) names."""
    m = _FORM.fullmatch(spec)
    if m is None:
        raise FactoryError(f"--model {spec!r} is not of the form PKG.MODULE:FACTORY "
                           "(for example mypkg.models:build)")
    module_name, attr = m.groups()
    here = os.getcwd()
    if here not in sys.path:
        sys.path.insert(0, here)
    try:
        mod = importlib.import_module(module_name)
    except ModuleNotFoundError as e:
        if e.name and module_name.startswith(e.name):
            raise FactoryError(f"--model {spec}: no module named {e.name!r} (imported from "
                               f"{here} and the installed packages)") from None
        raise FactoryError(f"--model {spec}: importing {module_name} failed: "
                           f"{_one_line(e)}") from None
    except Exception as e:  # noqa: BLE001 - the user's module may raise anything at import
        raise FactoryError(f"--model {spec}: importing {module_name} failed: "
                           f"{_one_line(e)}") from None
    obj = mod
    for part in attr.split("."):
        if not hasattr(obj, part):
            names = [n for n in dir(obj) if not n.startswith("_")]
            hint = suggest(part, names)
            raise FactoryError(f"--model {spec}: {module_name} has no attribute {attr!r}"
                               + (f" ({hint})" if hint else "")) from None
        obj = getattr(obj, part)
    if not callable(obj):
        raise FactoryError(f"--model {spec}: {attr} is not callable (a {type(obj).__name__} "
                           "object); name a function or class that builds the model")
    return obj


def build_model(spec: str):
    """Call the factory ``spec`` names with no arguments; the nn.Module it returns."""
    from torch import nn
    factory = load_factory(spec)
    try:
        model = factory()
    except Exception as e:  # noqa: BLE001 - the user's factory may raise anything
        raise FactoryError(f"--model {spec}: calling it failed: {_one_line(e)}") from None
    if not isinstance(model, nn.Module):
        raise FactoryError(f"--model {spec} returned a {type(model).__name__}, not a "
                           "torch.nn.Module")
    return model


__all__ = ["FactoryError", "load_factory", "build_model"]
