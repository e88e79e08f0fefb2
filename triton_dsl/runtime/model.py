"""What generated modules build on: a base class, a namespace container, stateless helpers."""
from __future__ import annotations

import torch
from torch import nn

from .quant import ste


class Group(nn.Module):
    """A block instance or a repeat: holds layers under a qualified name (stage2.0.conv1)."""

    def __getitem__(self, i: int) -> nn.Module:
        return self._modules[str(i)]

    def __setitem__(self, i: int, module: nn.Module):
        self.add_module(str(i), module)

    def forward(self, *args):
        raise TypeError("a Group only names layers; the model's forward calls them one by one")


class CompiledModel(nn.Module):
    """Base of every generated model. Subclasses set input_shape, TDSL_SOURCE and SOURCE_PATH."""

    input_shape: tuple = ()
    tdsl_fp32: bool = False  # True for the all-fp32 variant (triton_dsl.load(..., fp32=True))

    def check_input(self, x) -> torch.Tensor:
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{type(self).__name__} expects a tensor x, got {type(x).__name__}")
        if tuple(x.shape[1:]) != tuple(self.input_shape) or x.dim() != len(self.input_shape) + 1:
            want = ", ".join(map(str, self.input_shape))
            raise ValueError(f"{type(self).__name__} expects x of shape [batch, {want}], got x of "
                             f"shape {list(x.shape)}")
        return x


def ternary_act(x: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Activations to {-1, 0, +1}: sign(x) where |x| > threshold. The gradient passes where
    |x| <= 1 (a hard-tanh straight-through estimator, as in binarized and ternary networks)."""
    q = torch.sign(x) * (x.abs() > threshold).to(x.dtype)
    return ste(torch.clamp(x, -1, 1), q)
