"""Batch normalization folded into the layer before it, at freeze (the standard deploy step).

In eval mode a batchnorm is a per-channel affine map, y = x * m + a with m = gamma / sqrt(var +
eps) and a = beta - mean * m. After a frozen linear or convolution layer, whose output rows carry
a scale of their own, it folds exactly into that scale and the bias: (W x + b) * m + a =
(W * m) x + (b * m + a). The codes do not change, and the result differs from the unfolded model
by float rounding only. The fold happens where a layer's runners are built (runtime/dispatch.py:
the prepacked kernels' row scales, the dense weight); the stored buffers and the batchnorm's own
parameters stay as they were, so state dicts and checkpoints are unchanged, and a loaded
checkpoint folds its own statistics. The batchnorm itself passes its input through.

Which layer feeds which batchnorm is read from the model's .tdsl declaration (its IR), not
guessed from module order: a pair folds only when the batchnorm directly follows the layer in
the same sequence.
"""
from __future__ import annotations

import torch
from torch import nn

from ..lang import ir
from ..lang.frontend import check_source


def pairs(model) -> list[tuple[str, str]]:
    """[(layer name, batchnorm name)] for each batchnorm that directly follows a linear or
    conv2d layer in a compiled model's declaration; [] for any other module."""
    source, name = getattr(model, "tdsl_source", None), getattr(model, "tdsl_model", None)
    if not source or not name:
        return []
    r = check_source(source, "<model>", getattr(model, "tdsl_fp32", False))
    found = [m for m in r.models if m.name == name]
    out: list[tuple[str, str]] = []
    for m in found:
        _sequences(m.body, out)
    return out


def _sequences(nodes, out):
    prev = None
    for n in nodes:
        if n.op is ir.Op.LAYER:
            if n.kind == "batchnorm" and prev is not None and prev.kind in ("conv2d", "linear"):
                out.append((prev.name, n.name))
            prev = n
            continue
        prev = None
        _sequences(n.body, out)
        if n.op is ir.Op.RESIDUAL:
            _sequences(n.shortcut, out)


class FoldedBatchNorm(nn.modules.batchnorm._BatchNorm):
    """A batchnorm folded into the layer before it: it keeps its parameters and statistics (the
    same state-dict keys) and passes its input through; the layer applies its affine map."""

    def _check_input_dim(self, x):
        pass

    def forward(self, x):
        return x

    def affine_map(self) -> tuple[torch.Tensor, torch.Tensor]:
        """(m, a) with batchnorm(x) = x * m + a per channel, in fp32."""
        var, mean = self.running_var.float(), self.running_mean.float()
        m = torch.rsqrt(var + self.eps)
        if self.affine:
            m = m * self.weight.detach().float()
        a = -mean * m + (self.bias.detach().float() if self.affine else 0)
        return m, a

    def extra_repr(self):
        return super().extra_repr() + ", folded into the layer before it"


def _folded(bn) -> FoldedBatchNorm:
    new = FoldedBatchNorm(bn.num_features, bn.eps, bn.momentum, bn.affine,
                          bn.track_running_stats, device=bn.running_mean.device,
                          dtype=bn.running_mean.dtype)
    new.load_state_dict(bn.state_dict())
    return new.eval()


def _set_module(model: nn.Module, name: str, new: nn.Module):
    parent, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, leaf, new)


def fold_batchnorm(model: nn.Module, frozen_linear) -> list[tuple[str, str]]:
    """Fold each batchnorm of a compiled model that follows a frozen layer into that layer, in
    place; ``frozen_linear(module)`` gives the FrozenLinear that holds a module's weight, or
    None. Returns the pairs folded."""
    done = []
    for layer_name, bn_name in pairs(model):
        layer, bn = model.get_submodule(layer_name), model.get_submodule(bn_name)
        target = frozen_linear(layer)
        if target is None or type(bn) not in (
                nn.BatchNorm1d, nn.BatchNorm2d) or not bn.track_running_stats:
            continue
        folded = _folded(bn)
        _set_module(model, bn_name, folded)
        target.restore_buffers()
        object.__setattr__(target, "fold", folded)  # a reference, not a second child
        done.append((layer_name, bn_name))
    return done
