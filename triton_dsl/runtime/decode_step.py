"""One decoding step of a frozen attention layer or feed-forward block as one native call
(kernels/cpu_decode.c): one token of batch 1, fp32 on the CPU, every projection packed for the
native kernel (an attention's q, k, v and a gated MLP's gate and up joined, joined.py). At
batch 1 the projections are about half of a step; the other half was some thirty small tensor
ops and module calls per block, each a few microseconds of fixed cost, more with the caches
cold after the weights streamed through. decode_chain.py runs a transformer's blocks, these
steps in order, as one call.

A plan holds the C structs of one module's step and what they point into; it is used while a
snapshot of what it was built from still holds (_snapshot). Anything else returns None and
the caller runs its torch path: training or gradients, the compiler tracing, longer inputs,
other forms (dense choices, static activations), a KV cache of another dtype than fp32, bf16
or fp16 (fp16 where the library has _Float16). reference_attention() is
the pure-PyTorch twin the tests hold the native step to.
"""
from __future__ import annotations

import ctypes

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import native
from ..kernels.common import interpreting
from ..kernels.cpu import PackedNative
from . import dispatch
from .frozen_linear import FrozenLinear
from .joined import joined_for
from .runners import Prepacked

# cpu_decode.c's CACHE_F32, CACHE_BF16, CACHE_F16 (fp16 where the compiler had _Float16)
CACHE_TYPES = {torch.float32: 0, torch.bfloat16: 1, torch.float16: 2}


def native_cache(dtype) -> bool:
    """Whether the native steps read and write a KV cache of this dtype."""
    if dtype not in CACHE_TYPES:
        return False
    lib = native.loaded()
    return dtype != torch.float16 or (lib is not None and lib.fp16)


ACTIVATIONS = {"silu": 0, "gelu": 1, "relu": 2}


def one_token(x: torch.Tensor) -> bool:
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


def _fits(norm, n: int) -> bool:
    """Whether the native step can apply norm (none, or an RMSNorm over n features with an
    fp32 weight [n] or none)."""
    if norm is None:
        return True
    w = getattr(norm, "weight", None)
    return isinstance(norm, nn.RMSNorm) and tuple(norm.normalized_shape) == (n,) and (
        w is None or (w.dtype is torch.float32 and w.device.type == "cpu"
                      and w.shape == (n,) and w.is_contiguous()))


def _ptr(t) -> int | None:
    """Where a tensor's data lives (None for anything else: torch's quantized Linear has a
    bias() method)."""
    return t.data_ptr() if isinstance(t, torch.Tensor) else None


def _snapshot(owner, names: tuple, norm_name: str | None, pre) -> tuple:
    """What a plan's structs copy or point to, compared with ==: the layers themselves (the
    owner's children now, by identity), their prepared forms and where their biases live; the
    norms, where their weights live (and shape), and eps."""
    out = []
    for n in names:
        m = owner._modules.get(n)
        out += (m, getattr(m, "prepared", None), _ptr(getattr(m, "bias", None)))
    for norm in (owner._modules.get(norm_name) if norm_name else None, pre):
        w = getattr(norm, "weight", None)
        out += (norm, getattr(norm, "eps", None), _ptr(w), None if w is None else w.shape)
    return tuple(out)


class _Plan:
    """The C structs of one module's step for inputs of one shape, built once. It holds what
    they point into (the packed forms, biases, norm weights), so that memory stays valid, and
    it is current while nothing they were built from has changed (_snapshot): a layer or norm
    replaced, a checkpoint save or reload (new prepared forms), a weight or bias given new
    memory, an eps changed."""

    def __init__(self, owner, names: tuple, lins: list, norm_name=None, pre=None, shape=None):
        self.owner, self.names, self.norm_name = owner, names, norm_name
        self.snapshot = _snapshot(owner, names, norm_name, pre)
        self.shape = shape
        self.keep = []  # tensors the structs point into
        self.lins = [self._lin(*p) for p in lins]
        norm = owner._modules.get(norm_name) if norm_name else None
        self.norm, self.pre = self._norm(norm), self._norm(pre)
        self.ptrs = [ctypes.addressof(s) for s in (*self.lins, self.norm, self.pre)]

    def same(self, pre) -> bool:
        return _snapshot(self.owner, self.names, self.norm_name, pre) == self.snapshot

    def current(self, x: torch.Tensor, pre) -> bool:
        """Whether this plan runs x now (after the caller found the compiler not tracing)."""
        return token_like(x, self.shape) and self.same(pre)

    def _hold(self, t: torch.Tensor) -> int:
        t = t.contiguous()
        self.keep.append(t)
        return t.data_ptr()

    def _norm(self, norm) -> native.Norm:
        if norm is None:
            return native.Norm(0, 0.0, None)
        w = None if norm.weight is None else self._hold(norm.weight.detach())
        return native.Norm(1, torch.finfo(torch.float32).eps if norm.eps is None else norm.eps,
                           w)

    def _lin(self, form: PackedNative, bias, act: str) -> native.Lin:
        if bias is not None:
            if bias.shape != (form.n,):
                raise ValueError(f"bias of shape {tuple(bias.shape)} for {form.n} outputs")
            bias = self._hold(bias.detach().float())
        w_sum = None if form.w_sum is None else self._hold(form.w_sum)
        return native.Lin(form.kind, 0 if act == "dynamic" else 1, form.n, form.k,
                          self._hold(form.weight), self._hold(form.scale), w_sum, bias)


def token_like(x: torch.Tensor, shape) -> bool:
    return (x.shape == shape and x.dtype is torch.float32 and x.is_contiguous()
            and x.device.type == "cpu" and not torch.is_grad_enabled() and not interpreting())


def _current_plan(mod, x, pre, build) -> _Plan | None:
    """mod's plan when it is current for x, else build(mod, x, pre): a new one, or None."""
    plan = mod.__dict__.get("_step")
    return plan if plan is not None and plan.current(x, pre) else build(mod, x, pre)


def attention(attn, x: torch.Tensor, cache, pre=None, residual: bool = False):
    """attn's output for x [1, 1, dim] at the cache's next position through one native call,
    or with ``pre`` (an RMSNorm) and ``residual`` x + attn(pre(x), cache); None where the step
    does not apply."""
    if torch.compiler.is_compiling():  # the members' own custom ops (compile_ops.py)
        return None
    plan = _current_plan(attn, x, pre, _attention_plan)
    if plan is None:
        return None
    kc, vc = cache.slot(attn, 1, attn.kv_heads, attn.head_dim, torch.float32, x.device)
    if not native_cache(kc.dtype) or cache.end != cache.start + 1:
        return None  # another dtype: torch's attention; a step of another length: torch's path
    # a slot of another shape (the cache held a batch of 2): run_attention says so
    cos = sin = None
    if attn.rotary:
        cos, sin = cache.rotary(attn.inv_freq, torch.float32, cache.end)
    return run_attention(plan, x, attn.heads, attn.kv_heads, cos, sin, kc, vc, cache.start,
                         residual)


def _attention_plan(attn, x, pre) -> _Plan | None:
    lib = native.loaded()
    if lib is None or not one_token(x):
        return None
    qkv = joined_for(attn, ("q", "k", "v"), x)
    o = _packed(attn._modules["o"], x)
    norm = attn._modules.get("o_norm")
    if qkv is None or qkv.form is None or o is None or \
            not (_fits(pre, x.shape[-1]) and _fits(norm, o[0].k)):
        return None
    names, norm_name = _layout(attn)
    plan = attn.__dict__["_step"] = _Plan(attn, names, [(qkv.form, qkv.bias, qkv.act), o],
                                          norm_name, pre, x.shape)
    return plan


def run_attention(plan: _Plan, x, heads: int, kv_heads: int, cos, sin, kc, vc, pos: int,
                  residual: bool = False) -> torch.Tensor:
    """The native step for x [..., dim] (one token, fp32, contiguous) with plan's projections
    and norms, the caches kc, vc [1, kv_heads, max_len, head_dim] (contiguous fp32, bf16, fp16)
    and the rotary factors cos, sin [max_len, head_dim] (or None): position pos's rows."""
    d = kc.shape[-1]
    check_attention(plan, heads, kv_heads, d)
    problem = cache_problem(kc, vc, kv_heads, d, cos, sin, pos)
    if problem:
        raise ValueError(problem)
    _check_x(x, plan.lins[0].k, plan.lins[1].n if residual else None)
    row = 4 * d * pos  # bytes to position pos's factors
    y = torch.empty(*x.shape[:-1], plan.lins[1].n)
    if native.library().dll.tdsl_attention_step(
            x.data_ptr(), plan.ptrs[3], plan.ptrs[0], plan.ptrs[1], heads, kv_heads, d,
            None if cos is None else cos.data_ptr() + row,
            None if sin is None else sin.data_ptr() + row,
            kc.data_ptr(), vc.data_ptr(), CACHE_TYPES[kc.dtype], kc.shape[2], pos, plan.ptrs[2],
            int(residual), y.data_ptr(), torch.get_num_threads()):
        raise MemoryError("native attention step: could not allocate scratch memory")
    return y


def mlp(block, x: torch.Tensor, pre=None, residual: bool = False):
    """The feed-forward block's output for x [1, 1, dim] through one native call, or with
    ``pre`` (an RMSNorm) and ``residual`` x + block(pre(x)); None where the step does not
    apply."""
    if torch.compiler.is_compiling():
        return None
    plan = _current_plan(block, x, pre, _mlp_plan)
    if plan is None:
        return None
    return run_mlp(plan, x, block.gated, block.activation, residual)


def _mlp_plan(block, x, pre) -> _Plan | None:
    lib = native.loaded()
    if lib is None or not one_token(x):
        return None
    if block.gated:
        j = joined_for(block, ("gate", "up"), x)
        up = None if j is None or j.form is None else (j.form, j.bias, j.act)
    else:
        up = _packed(block._modules["up"], x)
    down_mod = block._modules["down"]
    down = _packed(down_mod, x.new_zeros(1, 1, down_mod.in_features))
    norm = block._modules.get("down_norm")
    if up is None or down is None or not (_fits(pre, x.shape[-1]) and _fits(norm, down[0].k)):
        return None
    names, norm_name = _layout(block)
    plan = block.__dict__["_step"] = _Plan(block, names, [up, down], norm_name, pre, x.shape)
    return plan


def run_mlp(plan: _Plan, x, gated: bool, activation: str,
            residual: bool = False) -> torch.Tensor:
    """The native step for x [..., dim] (one token, fp32, contiguous) with plan's projections
    (up, or gate and up joined; down) and norms."""
    check_mlp(plan, gated)
    _check_x(x, plan.lins[0].k, plan.lins[1].n if residual else None)
    y = torch.empty(*x.shape[:-1], plan.lins[1].n)
    if native.library().dll.tdsl_mlp_step(
            x.data_ptr(), plan.ptrs[3], plan.ptrs[0], int(gated), ACTIVATIONS[activation],
            plan.ptrs[2], plan.ptrs[1], int(residual), y.data_ptr(), torch.get_num_threads()):
        raise MemoryError("native feed-forward step: could not allocate scratch memory")
    return y


def step_kind(layer) -> str | None:
    """transformer.py's Attention and MLP say which step they take (that module imports this
    one, so the classes are not named here)."""
    return getattr(type(layer), "step_kind", None)


def _layout(layer) -> tuple:
    """(the projection children, the sub-norm child) a step of ``layer`` reads."""
    if step_kind(layer) == "attention":
        return ("q", "k", "v", "o"), "o_norm"
    if step_kind(layer) == "mlp":
        return ("gate", "up", "down") if layer.gated else ("up", "down"), "down_norm"
    return (), None


def layer_plan(layer, x, pre) -> _Plan | None:
    """The current plan of an attention or feed-forward layer for x after the norm pre, built
    if need be; None where the native step does not apply."""
    kind = step_kind(layer)
    build = _attention_plan if kind == "attention" else _mlp_plan if kind == "mlp" else None
    return None if build is None else _current_plan(layer, x, pre, build)


def layer_snapshot(layer, pre) -> tuple:
    """What a plan of ``layer`` after the norm ``pre`` would be built from (_snapshot)."""
    return _snapshot(layer, *_layout(layer), pre)


def cache_problem(kc, vc, kv_heads: int, d: int, cos, sin, pos: int) -> str | None:
    """Why key and value caches [1, kv_heads, max_len, d] and rotary tables cos, sin
    [positions, d] (both, or neither) do not fit a step at position pos; None when they do.
    The one check before a pointer into them reaches C: they come from a KVCache, whose slots
    and tables a caller can replace."""
    if not (isinstance(kc, torch.Tensor) and isinstance(vc, torch.Tensor)) \
            or not native_cache(kc.dtype) or kc.device.type != "cpu" or kc.dim() != 4 \
            or kc.shape[0] != 1 or kc.shape[1] != kv_heads or kc.shape[3] != d \
            or not 0 <= pos < kc.shape[2] or vc.shape != kc.shape or vc.dtype != kc.dtype \
            or vc.device != kc.device or not (kc.is_contiguous() and vc.is_contiguous()):
        return (f"position {pos} and caches {_describe(kc)}, {_describe(vc)} do not fit "
                f"{kv_heads} kv heads of {d} (contiguous fp32, bf16 or fp16 on the CPU, batch 1)")
    if (cos is None) != (sin is None):
        return "rotary factors need both cos and sin"
    for name, t in (("cos", cos), ("sin", sin)):
        if t is not None and (not isinstance(t, torch.Tensor) or t.dtype != torch.float32
                              or t.device.type != "cpu" or t.dim() != 2 or t.shape[1] != d
                              or t.shape[0] <= pos or not t.is_contiguous()):
            return (f"{name} must be contiguous fp32 [positions > {pos}, {d}] on the CPU, "
                    f"got {_describe(t)}")
    return None


def _describe(t) -> str:
    if not isinstance(t, torch.Tensor):
        return type(t).__name__
    return f"{t.dtype} {tuple(t.shape)} on {t.device}"


def check_attention(plan: _Plan, heads: int, kv_heads: int, d: int):
    qkv, o = plan.lins[:2]
    if heads < 1 or kv_heads < 1 or heads % kv_heads or qkv.n != (heads + 2 * kv_heads) * d \
            or o.k != heads * d:
        raise ValueError(f"projections of {qkv.n} and {o.k} rows do not fit {heads} heads of "
                         f"{d} and {kv_heads} kv heads")


def check_mlp(plan: _Plan, gated: bool):
    up, down = plan.lins[:2]
    if up.n != down.k * (2 if gated else 1):
        raise ValueError(f"up projection of {up.n} rows for a down projection of {down.k} "
                         f"inputs (gated: {gated})")


def _check_x(x: torch.Tensor, k: int, out: int | None):
    """x is one token of k contiguous fp32 features (and, added to the output, out = k)."""
    if x.dtype != torch.float32 or x.numel() != k or x.shape[-1] != k or not x.is_contiguous() \
            or out not in (None, k):
        raise ValueError(f"x must be one token of {k} contiguous fp32 features"
                         + ("" if out in (None, k) else f" (added to {out} outputs)")
                         + f", got {x.dtype} of shape {tuple(x.shape)}")


def reference_attention(q, keys, values) -> torch.Tensor:
    """The pure-PyTorch twin of the native step's attention: q [heads, d] of one token against
    the cache's rows keys, values [kv_heads, ctx, d] (any float type), in fp32."""
    heads, kv = q.shape[0], keys.shape[0]
    k = keys.float().repeat_interleave(heads // kv, 0)
    v = values.float().repeat_interleave(heads // kv, 0)
    return F.scaled_dot_product_attention(q.float()[:, None], k, v)[:, 0]
