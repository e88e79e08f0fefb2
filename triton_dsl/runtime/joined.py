"""Projections of one input as one kernel call: an attention's q, k, v and a gated MLP's gate
and up, when they are frozen with the same packed kind on the CPU. At batch 1 each call of the
M = 1 kernel pays fixed costs (Python, a per-token quantization, waking threads) and a small N
keeps the kernel short of the memory bandwidth; one call with N = n_q + n_k + n_v pays once.

The outputs are exactly the members' own (the same quantization of the same x, the same integer
sums per column): the joined weight is the members' packed weights concatenated along N, and
the members then read views of it, so nothing is held twice. Anything else (other forms, dense
choices, a folded batchnorm, static activations, the compiler tracing) runs the members one by
one as before.
"""
from __future__ import annotations

import torch

from ..kernels.common import as_rows, interpreting
from ..kernels.cpu import PackedNative
from . import dispatch
from .frozen_linear import FrozenLinear
from .runners import Prepacked


class Joined:
    """The joined form of some members for inputs like x (shape, dtype, device), or none."""

    def __init__(self, key, mods, runs=None, reuse: "Joined | None" = None):
        self.key, self.mods = key, mods
        self.prepared = tuple(getattr(m, "prepared", None) for m in mods)
        self.biases = _bias_ptrs(mods)  # the joined bias is a copy: rebuilt if one moves
        self.form, self.forms = None, []
        if runs is None:
            return
        forms = [r.forms[0] for r in runs]
        if reuse is not None and reuse.forms == forms:  # another shape, the same choice
            self.form, self.run, self.bias = reuse.form, reuse.run, reuse.bias
            self.act = reuse.act
        else:
            self.form = PackedNative.join(forms)
            self.act = act = mods[0]._act()
            self.run = self.form.dynamic_matmul if act == "dynamic" else self.form.float_matmul
            biases = [r.bias for r in runs]
            self.bias = None if all(b is None for b in biases) else torch.cat(
                [torch.zeros(f.n) if b is None else b.float() for b, f in zip(biases, forms)])
        self.forms, self.sizes = forms, [f.n for f in forms]

    def current(self, key) -> bool:
        return key == self.key and all(getattr(m, "prepared", None) is p
                                       for m, p in zip(self.mods, self.prepared)) \
            and _bias_ptrs(self.mods) == self.biases

    def __call__(self, x):
        if self.form is None:
            return tuple(m(x) for m in self.mods)
        y = self.run(as_rows(x), self.bias)
        return y.view(*x.shape[:-1], y.shape[-1]).split(self.sizes, dim=-1)


def _bias_ptrs(mods) -> tuple:
    return tuple(m.bias.data_ptr() if isinstance(getattr(m, "bias", None), torch.Tensor)
                 else None for m in mods)


def project(owner: torch.nn.Module, names: tuple, x: torch.Tensor) -> tuple:
    """``owner``'s child layers ``names`` applied to x, as a tuple: jointly where they can be."""
    joined = joined_for(owner, names, x)
    if joined is None:
        return tuple(owner._modules[n](x) for n in names)
    return joined(x)


def joined_for(owner: torch.nn.Module, names: tuple, x: torch.Tensor) -> Joined | None:
    """How ``owner``'s frozen child layers ``names`` run x (its form None: one by one), built
    once per kind of input; None for layers not frozen, or the compiler tracing."""
    if torch.compiler.is_compiling() or not isinstance(owner._modules[names[0]], FrozenLinear):
        # training, or the compiler tracing the members' own custom ops (compile_ops.py)
        return None
    key = (x.shape, x.dtype, x.device, interpreting())
    joined = owner.__dict__.get("_joined")
    if joined is None or not joined.current(key):
        mods = [owner._modules[n] for n in names]
        runs = _joinable(mods, x)
        # the member layers choose and build first (runner), so the key sees their slots
        joined = Joined(key, mods, runs, joined)
        owner.__dict__["_joined"] = joined
    return joined


def _joinable(mods, x) -> list | None:
    """The members' Prepacked runners for x when all are one native form that joins."""
    if x.dtype != torch.float32 or not dispatch.on_cpu_paths(x.device) or \
            not all(isinstance(m, FrozenLinear) and m.act_quant is None for m in mods):
        return None
    acts = {m._act() for m in mods}
    if len(acts) != 1 or len({m.in_features for m in mods}) != 1:
        return None
    act = acts.pop()
    runs = [dispatch.runner(m, x, act) for m in mods]
    if not all(isinstance(r, Prepacked) and len(r.forms) == 1
               and isinstance(r.forms[0], PackedNative) for r in runs):
        return None
    forms = [r.forms[0] for r in runs]
    if len({(f.kind, f.k) for f in forms}) != 1 or any(f.n % f.lib.tile_rows for f in forms[:-1]):
        return None
    return runs


class Joins:
    """Mixin for a module whose forward uses project(): pickling and copies carry the members'
    buffers, never a joined native form (nor a native decoding step, decode_step.py)."""

    NATIVE = ("_joined", "_step", "_chain")  # what the decoding path builds on the module

    def __getstate__(self):
        state = dict(super().__getstate__())
        for name in self.NATIVE:
            state.pop(name, None)
        return state

    def _apply(self, fn, *args, **kwargs):  # half(), to(): the forms are rebuilt; drop these
        for name in self.NATIVE:       # now, so they do not keep the old ones alive
            self.__dict__.pop(name, None)
        return super()._apply(fn, *args, **kwargs)
