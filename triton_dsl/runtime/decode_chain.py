"""A run of pre-norm residual steps (a transformer's blocks, rt.pre_norms) for one token of
a frozen model as one native call (tdsl_decode_steps in kernels/cpu_decode.c), so that a
decoding step returns to Python once rather than twice a block. Each step is a layer's own
plan from decode_step.py; the chain keeps an array of them and binds a copy to the KV cache at
each call.
"""
from __future__ import annotations

import ctypes

import torch

from ..kernels import native
from .decode_step import (ACTIVATIONS, CACHE_TYPES, cache_problem, check_attention, check_mlp,
                          layer_plan, layer_snapshot, one_token, step_kind, token_like)


class Chain:
    """Pre-norm residual steps (norm, layer) run in order as one native call
    (tdsl_decode_steps): the layers' own plans, and an array of steps pointing into them and,
    bound at each call, into the KV cache's slots and rotary tables."""

    def __init__(self, modules: tuple, plans: list, dim: int):
        self.modules, self.plans = modules, plans
        self.steps = (native.Step * len(plans))()
        self.attention = []  # (index, layer) of the attention steps
        for i, (st, plan, layer) in enumerate(zip(self.steps, plans, modules[1::2])):
            st.a, st.b, st.norm, st.pre = plan.ptrs
            if step_kind(layer) == "attention":
                check_attention(plan, layer.heads, layer.kv_heads, layer.head_dim)
                st.attention, st.heads, st.kv_heads = 1, layer.heads, layer.kv_heads
                st.head_dim = layer.head_dim
                self.attention.append((i, layer))
            else:
                check_mlp(plan, layer.gated)
                st.gated, st.activation = int(layer.gated), ACTIVATIONS[layer.activation]
            if plan.lins[0].k != dim or plan.lins[1].n != dim:  # each adds to its input
                raise ValueError(f"a step from {plan.lins[0].k} to {plan.lins[1].n} features "
                                 f"in a chain of {dim}")
        self.shape = plans[0].shape

    def current(self, x, modules) -> bool:
        """Plan.current for every layer, the modules (norms and layers) by identity."""
        return modules == self.modules and token_like(x, self.shape) and \
            all(p.same(pre) for p, pre in zip(self.plans, modules[::2]))

    def bound(self, cache):
        """A copy of the steps pointing at cache's buffers (made if new) and rotary tables,
        each checked to fit; None where one does not (another batch size, an fp16 cache where
        the library has no _Float16). A
        copy per call: two threads decoding with two caches must not share one array."""
        steps = type(self.steps)()
        ctypes.memmove(steps, self.steps, ctypes.sizeof(steps))
        for i, layer in self.attention:
            st, kv, d = steps[i], layer.kv_heads, layer.head_dim
            kc, vc = cache.slot(layer, 1, kv, d, torch.float32, torch.device("cpu"))
            cos = sin = None
            if layer.rotary:
                cos, sin = cache.rotary(layer.inv_freq, torch.float32, cache.end)
            if cache_problem(kc, vc, kv, d, cos, sin, cache.start):
                return None  # each layer's own step then says what does not fit
            st.kc, st.vc, st.cache_type = kc.data_ptr(), vc.data_ptr(), CACHE_TYPES[kc.dtype]
            st.max_len = kc.shape[2]
            if cos is not None:
                st.cos, st.sin = cos.data_ptr(), sin.data_ptr()
        return steps


def chain(pairs: tuple, x: torch.Tensor, cache):
    """x through the pre-norm residuals ``pairs`` ((norm, layer), ...) in order, for one token
    of batch 1 at the cache's next position, as one native call; None where that does not
    apply (then each pair runs as pre_norm does)."""
    if torch.compiler.is_compiling() or cache is None or not pairs:
        return None
    modules = tuple(m for pair in pairs for m in pair)
    plan = modules[1].__dict__.get("_chain")
    if plan is None or not plan.current(x, modules):
        plan = _chain_plan(modules, x)
    if plan is None or isinstance(plan, Unchained):
        return None
    pos = cache.start
    steps = plan.bound(cache) if cache.end == pos + 1 else None
    if steps is None:
        return None
    y = torch.empty_like(x)
    if native.library().dll.tdsl_decode_steps(x.data_ptr(), steps, len(plan.plans), pos,
                                              y.data_ptr(), torch.get_num_threads()):
        raise MemoryError("native decoding steps: could not allocate scratch memory")
    return y


class Unchained:
    """What a chain that cannot run natively was tried with (a layer of another precision,
    say): while nothing of it changes, the next token goes straight to the layer-by-layer
    path instead of trying every layer again."""

    def __init__(self, modules: tuple, x):
        self.modules, self.shape = modules, x.shape
        self.snapshots = self._snapshots(modules)

    @staticmethod
    def _snapshots(modules) -> tuple:
        return tuple(layer_snapshot(layer, pre)
                     for pre, layer in zip(modules[::2], modules[1::2]))

    def current(self, x, modules) -> bool:
        return modules == self.modules and token_like(x, self.shape) and \
            self._snapshots(modules) == self.snapshots


def _chain_plan(modules: tuple, x) -> Chain | Unchained | None:
    plans = []
    for pre, layer in zip(modules[::2], modules[1::2]):
        # the layers' own plans where current: a layer that cannot join the chain does not
        # make the others rebuild theirs every token
        plan = layer_plan(layer, x, pre)
        if plan is None:
            if one_token(x) and native.loaded() is not None:  # remember; else x says it all
                modules[1].__dict__["_chain"] = Unchained(modules, x)
            return None
        plans.append(plan)
    chain = modules[1].__dict__["_chain"] = Chain(modules, plans, x.shape[-1])
    return chain
