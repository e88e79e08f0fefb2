"""Precision sections applied to existing PyTorch models: the torch side.

    plan = triton_dsl.quantize(model, "rules.tdsl")  # selected layers -> QAT layers, in place
    triton_dsl.calibrate(model, batches)             # only for activations=static
    rt.freeze(model)                                 # packed weights, as for compiled models

``describe`` reads a model's modules into plain records (lang/external.Module); the language
resolves the rules against them (the same engine as compiled models); ``quantize`` then swaps
each selected module for the runtime's Linear or Conv2d holding the very same weight and bias
Parameters (so devices, dtypes, requires_grad and optimizer references stay), or, for a
Conv1D, the transposed weight.
"""
from __future__ import annotations

import torch
from torch import nn

from ..lang.external import Module, Rules, plan as resolve, read_rules
from ..lang.plan import Plan
from .layers import Conv2d, Linear
from .quantizers import ActQuantizer


def _kind(m: nn.Module) -> str | None:
    """The selectable kind of a module: exact classes only, since a subclass may compute
    something else in its forward (MultiheadAttention's out_proj is one, read by its parent)."""
    if type(m) is nn.Linear:
        return "Linear"
    if type(m) is nn.Conv2d:
        return "Conv2d"
    if type(m).__name__ == "Conv1D" and hasattr(m, "nf") and getattr(m, "weight", None) is not \
            None and m.weight.dim() == 2:  # transformers.pytorch_utils.Conv1D: y = x @ W + b
        return "Conv1D"
    return None


def _problem(m: nn.Module, kind: str) -> str | None:
    w = m.weight
    if w.device.type == "meta":
        return "its weight is on the meta device (load the model's weights first)"
    if not w.dtype.is_floating_point:
        return f"its weight is {w.dtype}, not a float tensor"
    if kind == "Conv2d" and m.padding_mode != "zeros":
        return f"padding_mode='{m.padding_mode}': frozen convolutions pad with zeros"
    return None


def _why(name: str, m: nn.Module) -> str:
    if isinstance(m, (Linear, Conv2d)):
        return "which triton-dsl has already quantized"
    if isinstance(m, (nn.Linear, nn.Conv2d)):
        return "a subclass that rules cannot select: its forward may differ from its base class's"
    if next(m.children(), None) is not None:
        return f"which holds other modules: select them by name or with a pattern ('{name}.*')"
    return "which precision rules cannot select"


def describe(model: nn.Module) -> tuple[list[Module], int]:
    """(a record per named module, the bytes of every parameter and buffer no rule can
    select, as they are now)."""
    out, held = [], set()
    for name, m in model.named_modules():
        if not name:
            continue
        kind = _kind(m)
        if kind is None:
            out.append(Module(name, type(m).__name__, why=_why(name, m)))
            continue
        w = m.weight
        if kind == "Conv1D":
            shape = (w.shape[1], w.shape[0])
        else:
            shape = (w.shape[0], w[0].numel())
        dynamic_ok = kind != "Conv2d" or (m.groups == 1 and m.padding != "same")
        out.append(Module(name, kind, shape, m.bias is not None, 8 * w.element_size(),
                          dynamic_ok, _problem(m, kind)))
        held |= {id(w), id(m.bias)}
    other = sum(t.numel() * t.element_size() for t in (*model.parameters(), *model.buffers())
                if id(t) not in held)
    return out, other


def _rules(rules) -> Rules:
    r = rules if isinstance(rules, Rules) else read_rules(rules)
    r.raise_for_errors()
    return r


def plan(model: nn.Module, rules) -> Plan:
    """What ``rules`` (a path, or a rules file's text) would do to ``model``; changes nothing.
    Raises TdslError with every problem, each at its place in the rules file."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"expected a torch.nn.Module, got {type(model).__name__}")
    r = _rules(rules)
    modules, other = describe(model)
    return resolve(r, modules, other, type(model).__name__)


def quantize(model: nn.Module, rules) -> Plan:
    """Replace the modules the rules select, in place, with trainable quantized layers (fake
    quantization, straight-through gradients) holding the same weights; returns the plan.
    Nothing changes when the rules have an error. The model remembers the rules' text
    (``tdsl_rules``, in the order applied) so that a checkpoint can apply them again."""
    r = _rules(rules)
    p = plan(model, r)
    new = {id(model.get_submodule(e.name)): _qat(model.get_submodule(e.name), e.kind,
                                                 e.precision) for e in p.quantized}
    for owner in list(model.modules()):  # every place a module is used, should it be shared
        for leaf, child in list(owner._modules.items()):  # named_children() lists each once
            if id(child) in new:
                setattr(owner, leaf, new[id(child)])
    model.__dict__["tdsl_rules"] = [*model.__dict__.get("tdsl_rules", []), r.text]
    return p


def _qat(old: nn.Module, kind: str, precision) -> nn.Module:
    """The runtime layer for ``old``, built around its own Parameters (no new weight is
    allocated or initialised, except a Conv1D's transposed copy)."""
    w = old.weight
    if kind == "Conv2d":
        new = Conv2d.__new__(Conv2d)
        nn.Module.__init__(new)
        for k, v in vars(old).items():  # in_channels, kernel_size, stride, padding, ...
            if not k.startswith("_") and k != "training":
                setattr(new, k, v)
        new._reversed_padding_repeated_twice = old._reversed_padding_repeated_twice
        if new.padding == "valid":  # the same convolution; frozen layers take numbers
            new.padding = (0, 0)
    else:
        new = Linear.__new__(Linear)
        nn.Module.__init__(new)
        if kind == "Conv1D":  # weight [in, out]: y = x @ W + b, so Linear's weight is W.T
            w = nn.Parameter(w.detach().t().contiguous(), requires_grad=w.requires_grad)
        new.out_features, new.in_features = w.shape
    new.weight = w
    new.register_parameter("bias", old.bias)
    with torch.device(w.device):  # quantizer parameters (learned thresholds) beside the weight
        new._setup(precision)
    new.weight_quant.to(dtype=w.dtype)
    return new.train(old.training)


@torch.no_grad()
def calibrate(model: nn.Module, batches) -> int:
    """Observe static activation ranges (layers with activations=static) on ``batches``: each
    is what the model takes, a tensor (model(x)), a tuple or list (model(*b)) or a dict
    (model(**b)). Runs in eval mode; returns the number of batches seen."""
    observers = [m for m in model.modules() if isinstance(m, ActQuantizer) and m.mode == "static"]
    if not observers:
        raise ValueError("no layer of this model has activations=static: nothing to calibrate")
    was_training, seen = model.training, 0
    model.eval()
    for o in observers:
        o.calibrating = True
    try:
        for b in batches:
            model(**b) if isinstance(b, dict) else model(*b) if isinstance(b, (tuple, list)) \
                else model(b)
            seen += 1
    finally:
        for o in observers:
            o.calibrating = False
        model.train(was_training)
    if not seen:
        raise ValueError("calibrate() got no batches")
    return seen


__all__ = ["describe", "plan", "quantize", "calibrate"]
