"""One decoding step of a frozen attention layer or feed-forward block as one native call
(kernels/cpu_decode.c): one token of batch 1, fp32 on the CPU, every projection packed for the
native kernel (an attention's q, k, v and a gated MLP's gate and up joined, joined.py). At
batch 1 the projections are about half of a step; the other half was some thirty small
tensor ops and module calls per block, each a few microseconds of fixed cost.

Anything else returns None and the caller runs its torch path: training or gradients, the
compiler tracing, longer inputs, other forms (dense choices, static activations), an fp16 KV
cache. reference_attention() is the pure-PyTorch twin the tests hold the native step to.
"""
from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F

from ..kernels import native
from ..kernels.cpu import PackedNative
from . import dispatch
from .frozen_linear import FrozenLinear
from .joined import joined_for
from .runners import Prepacked

CACHE_TYPES = {torch.float32: 0, torch.bfloat16: 1}  # cpu_decode.c's CACHE_F32, CACHE_BF16
ACTIVATIONS = {"silu": 0, "gelu": 1, "relu": 2}


def _one_token(x: torch.Tensor) -> bool:
    return (x.dtype is torch.float32 and x.device.type == "cpu" and x.dim() == 3
            and x.shape[0] == 1 and x.shape[1] == 1 and x.is_contiguous()
            and not torch.is_grad_enabled() and dispatch.on_cpu_paths(x.device))


def _packed(mod, x):
    """(form, bias, act) of a frozen layer that runs x as one native packed form, else None."""
    if not isinstance(mod, FrozenLinear) or mod.act_quant is not None:
        return None
    act = mod._act()
    run = dispatch.runner(mod, x, act)
    if not isinstance(run, Prepacked) or len(run.forms) != 1 \
            or not isinstance(run.forms[0], PackedNative):
        return None
    return run.forms[0], run.bias, act


class _Plan:
    """The C structs of one module's step, and what they were built from: current while the
    layers' choices stand (the same objects; holding them keeps the pointed-to memory alive)."""

    def __init__(self, made_of: tuple, lins: list, norm):
        self.made_of = made_of
        self.keep = []  # tensors the structs point into
        self.lins = [self._lin(*p) for p in lins]
        self.norm = native.Norm(0, 0.0, None)
        if norm is not None:
            w = None if norm.weight is None else self._hold(norm.weight.detach().float())
            eps = torch.finfo(torch.float32).eps if norm.eps is None else norm.eps
            self.norm = native.Norm(1, eps, w)
        self.ptrs = [ctypes.addressof(s) for s in (*self.lins, self.norm)]

    def _hold(self, t: torch.Tensor) -> int:
        t = t.contiguous()
        self.keep.append(t)
        return t.data_ptr()

    def _lin(self, form: PackedNative, bias, act: str) -> native.Lin:
        if bias is not None:
            if bias.shape != (form.n,):
                raise ValueError(f"bias of shape {tuple(bias.shape)} for {form.n} outputs")
            bias = self._hold(bias.detach().float())
        w_sum = None if form.w_sum is None else self._hold(form.w_sum)
        return native.Lin(form.kind, 0 if act == "dynamic" else 1, form.n, form.k,
                          self._hold(form.weight), self._hold(form.scale), w_sum, bias)


def _plan(owner, made_of: tuple, build):
    plan = owner.__dict__.get("_step")
    if plan is None or len(plan.made_of) != len(made_of) or \
            any(a is not b for a, b in zip(plan.made_of, made_of)):
        plan = owner.__dict__["_step"] = build()
    return plan


def attention(attn, x: torch.Tensor, cache) -> torch.Tensor | None:
    """attn's output for x [1, 1, dim] at the cache's next position, through one native call;
    None where the step does not apply."""
    if torch.compiler.is_compiling():  # the members' own custom ops (compile_ops.py)
        return None
    lib = native.loaded()
    if lib is None or (cache.dtype or torch.float32) not in CACHE_TYPES or not _one_token(x) \
            or cache.end != cache.start + 1:
        return None
    qkv = joined_for(attn, ("q", "k", "v"), x)
    o = _packed(attn._modules["o"], x)
    if qkv is None or qkv.form is None or o is None:
        return None
    d, heads, kv = attn.head_dim, attn.heads, attn.kv_heads
    made_of = (qkv, *o[:2])
    plan = _plan(attn, made_of, lambda: _Plan(
        made_of, [(qkv.form, qkv.bias, qkv.act), o], attn._modules.get("o_norm")))
    kc, vc = cache.slot(attn, 1, kv, d, torch.float32, x.device)
    if kc.shape != (1, kv, cache.max_len, d) or kc.dtype != (cache.dtype or torch.float32) \
            or not kc.is_contiguous() or not vc.is_contiguous():
        return None  # another call's slot (batch 2, say): the torch path says what is wrong
    cos = sin = None
    if attn.rotary:
        cos, sin = attn.angles(cache.start, cache.end, torch.float32, cache)
    return run_attention(lib, plan, x, heads, kv, cos, sin, kc, vc, cache.start)


def run_attention(lib, plan: _Plan, x, heads: int, kv_heads: int, cos, sin, kc, vc,
                  pos: int) -> torch.Tensor:
    """The native step for x [..., dim] (one token, fp32, contiguous) with plan's projections,
    the caches kc, vc [1, kv_heads, max_len, head_dim] (contiguous, fp32 or bf16) and the
    rotary factors cos, sin [head_dim] (or None) of position pos."""
    _, kv, max_len, d = kc.shape
    qkv, o = plan.lins[:2]
    if not 0 <= pos < max_len or kv != kv_heads or heads % kv_heads or vc.shape != kc.shape \
            or vc.dtype != kc.dtype or not (kc.is_contiguous() and vc.is_contiguous()) \
            or qkv.n != (heads + 2 * kv) * d or o.k != heads * d:
        raise ValueError(f"position {pos} and caches of shape {tuple(kc.shape)}, "
                         f"{tuple(vc.shape)} do not fit {heads} heads, {kv_heads} kv heads "
                         f"and projections of {qkv.n} and {o.k} rows")
    _check_x(x, qkv.k)
    for name, t in (("cos", cos), ("sin", sin)):
        if t is not None and (t.dtype != torch.float32 or t.numel() != d
                              or not t.is_contiguous()):
            raise ValueError(f"{name} must be {d} contiguous fp32 values, got "
                             f"{t.dtype} of shape {tuple(t.shape)}")
    y = torch.empty(*x.shape[:-1], plan.lins[1].n)
    if lib.dll.tdsl_attention_step(
            x.data_ptr(), plan.ptrs[0], plan.ptrs[1], heads, kv_heads, d,
            None if cos is None else cos.data_ptr(), None if sin is None else sin.data_ptr(),
            kc.data_ptr(), vc.data_ptr(), CACHE_TYPES[kc.dtype], max_len, pos, plan.ptrs[2],
            y.data_ptr(), torch.get_num_threads()):
        raise MemoryError("native attention step: could not allocate scratch memory")
    return y


def mlp(block, x: torch.Tensor) -> torch.Tensor | None:
    """The feed-forward block's output for x [1, 1, dim] through one native call; None where
    the step does not apply."""
    if torch.compiler.is_compiling():
        return None
    lib = native.loaded()
    if lib is None or not _one_token(x):
        return None
    if block.gated:
        j = joined_for(block, ("gate", "up"), x)
        up = None if j is None or j.form is None else (j.form, j.bias, j.act)
        made_of = (j,)
    else:
        up = _packed(block._modules["up"], x)
        made_of = up[:2] if up else ()
    down = _packed(block._modules["down"], x.new_zeros(1, 1, block._modules["down"].in_features))
    if up is None or down is None:
        return None
    made_of += down[:2]
    plan = _plan(block, made_of, lambda: _Plan(made_of, [up, down],
                                               block._modules.get("down_norm")))
    return run_mlp(lib, plan, x, block.gated, block.activation)


def run_mlp(lib, plan: _Plan, x, gated: bool, activation: str) -> torch.Tensor:
    """The native step for x [..., dim] (one token, fp32, contiguous) with plan's projections
    (up, or gate and up joined; down)."""
    up, down = plan.lins[:2]
    if up.n != down.k * (2 if gated else 1):
        raise ValueError(f"up projection of {up.n} rows for a down projection of {down.k} "
                         f"inputs (gated: {gated})")
    _check_x(x, up.k)
    y = torch.empty(*x.shape[:-1], plan.lins[1].n)
    if lib.dll.tdsl_mlp_step(x.data_ptr(), plan.ptrs[0], int(gated), ACTIVATIONS[activation],
                             plan.ptrs[2], plan.ptrs[1], y.data_ptr(), torch.get_num_threads()):
        raise MemoryError("native feed-forward step: could not allocate scratch memory")
    return y


def _check_x(x: torch.Tensor, k: int):
    if x.dtype != torch.float32 or x.numel() != k or x.shape[-1] != k or not x.is_contiguous():
        raise ValueError(f"x must be one token of {k} contiguous fp32 features, got {x.dtype} "
                         f"of shape {tuple(x.shape)}")


def reference_attention(q, keys, values) -> torch.Tensor:
    """The pure-PyTorch twin of the native step's attention: q [heads, d] of one token against
    the cache's rows keys, values [kv_heads, ctx, d] (any float type), in fp32."""
    heads, kv = q.shape[0], keys.shape[0]
    k = keys.float().repeat_interleave(heads // kv, 0)
    v = values.float().repeat_interleave(heads // kv, 0)
    return F.scaled_dot_product_attention(q.float()[:, None], k, v)[:, 0]
