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
    vocab_size: int | None = None  # token models: ids 0..vocab_size-1, at most max_len of them
    max_len: int | None = None

    def check_input(self, x, cache=None) -> torch.Tensor:
        """x as the model takes it, else a ValueError naming the expected shape. A token model
        also advances its KV cache (``cache``, a KVCache) by the sequence length here."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{type(self).__name__} expects a tensor x, got {type(x).__name__}")
        if self.vocab_size is not None:
            return self._check_tokens(x, cache)
        if tuple(x.shape[1:]) != tuple(self.input_shape) or x.dim() != len(self.input_shape) + 1:
            want = ", ".join(map(str, self.input_shape))
            raise ValueError(f"{type(self).__name__} expects x of shape [batch, {want}], got x of "
                             f"shape {list(x.shape)}")
        if not x.is_floating_point():  # uint8 images: scale them to floats first
            raise ValueError(f"{type(self).__name__} expects floating-point x, got {x.dtype} of "
                             f"shape {list(x.shape)} (convert it, e.g. x.float() / 255)")
        return x

    def _check_tokens(self, x, cache):
        name = type(self).__name__
        if x.dim() != 2 or x.dtype.is_floating_point or x.dtype.is_complex or x.shape[1] < 1:
            raise ValueError(f"{name} expects token ids of shape [batch, seq] (integers, "
                             f"1 <= seq <= {self.max_len}), got {x.dtype} of shape "
                             f"{list(x.shape)}")
        if cache is None and x.shape[1] > self.max_len:
            raise ValueError(f"{name}: a sequence of {x.shape[1]} tokens is longer than "
                             f"max_len={self.max_len}")
        if not torch.compiler.is_compiling() and x.numel():
            if x.numel() <= 64:  # a decoding step: one small copy, not two reductions
                ids = x.flatten().tolist()
                lo, hi = min(ids), max(ids)
            else:
                lo, hi = x.min(), x.max()
            if lo < 0 or hi >= self.vocab_size:
                raise ValueError(f"{name}: token ids must be in 0..{self.vocab_size - 1}")
        if cache is not None:  # only a call that will run advances the cache
            cache.step(x.shape[1])
        return x.long()

    def example_input(self, batch: int = 1, generator=None) -> torch.Tensor:
        """A random input of the right shape: token ids (up to 32 of them) or a normal tensor."""
        if self.vocab_size is not None:
            return torch.randint(0, self.vocab_size, (batch, min(self.max_len, 32)),
                                 generator=generator)
        return torch.randn(batch, *self.input_shape, generator=generator)


def ternary_act(x: torch.Tensor, threshold: float = 0.5) -> torch.Tensor:
    """Activations to {-1, 0, +1}: sign(x) where |x| > threshold. The gradient passes where
    |x| <= 1 (a hard-tanh straight-through estimator, as in binarized and ternary networks)."""
    q = torch.sign(x) * (x.abs() > threshold).to(x.dtype)
    return ste(torch.clamp(x, -1, 1), q)
