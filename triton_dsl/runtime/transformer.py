"""Transformer layers for generated modules: self-attention with rotary embeddings and a KV
cache, and the feed-forward block. Their projections are ordinary (QAT) Linear layers that the
generated module adds as children (``attn.q``, ``mlp.down``), so ``freeze`` packs them like any
other layer and a frozen model decodes through the packed kernels (one token: the M = 1 path).

Shapes: x is [batch, seq, dim]; heads are [batch, heads, seq, head_dim].
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import native
from . import decode_chain, decode_step
from .joined import Joins, project
from .quant import TORCH_DTYPES

ROPE_BASE = 10000.0
_ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}


class RMSNorm(nn.RMSNorm):
    """torch's RMSNorm (same parameters, same checkpoints), computed by the native library in
    one call where nothing needs its gradient: an fp32 CPU tensor outside the compiler, once
    the library is loaded (a frozen model loads it; a float one never builds it for this). At
    batch 1 torch's composite rms_norm is a handful of tensor ops whose fixed costs outweigh
    the arithmetic; a decoding step runs one before every projection."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = self.weight
        if x.dtype is not torch.float32 or x.device.type != "cpu" or not x.is_contiguous() \
                or (w is not None and (w.dtype is not torch.float32 or not w.is_contiguous())) \
                or x.shape[-1] != self.normalized_shape[-1] or len(self.normalized_shape) != 1 \
                or torch.compiler.is_compiling() or (torch.is_grad_enabled() and (
                    x.requires_grad or (w is not None and w.requires_grad))):
            return super().forward(x)
        lib = native.loaded()
        if lib is None:
            return super().forward(x)
        return lib.rmsnorm(x, w, torch.finfo(x.dtype).eps if self.eps is None else self.eps)


KV_DTYPES = {"fp32": torch.float32, **TORCH_DTYPES}  # the float types the language names


class KVCache:
    """Keys and values of every attention layer of one model, for incremental decoding.

    ``dtype`` (default: the keys' own) stores them narrower: bf16 halves the bytes each step
    reads at a long context, and the attention then runs in bf16 (the query is cast to it).

    Each layer gets [batch, kv_heads, max_len, head_dim] buffers for keys and values on its first
    call (kv_heads, not heads: grouped-query attention keeps the cache that much smaller); a step
    writes its new positions in place and attends over the filled prefix, a view, so a token
    costs its projections plus attention over the context, and nothing is copied or concatenated.
    The model calls ``step(seq)`` once per forward pass (in its input check), before any layer.
    """

    def __init__(self, max_len: int, dtype: torch.dtype | None = None):
        if dtype not in KV_DTYPES.values() and dtype is not None:
            raise ValueError(f"a KV cache holds one of {', '.join(KV_DTYPES)}, not {dtype}")
        self.max_len, self.dtype = max_len, dtype
        self.start = self.end = 0  # this step's positions: start..end-1
        self.slots: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        self.tables: dict = {}  # rotary factors per head size, grown with the context

    def step(self, seq: int):
        if self.end + seq > self.max_len:
            raise ValueError(f"the sequence would reach {self.end + seq} tokens, more than "
                             f"max_len={self.max_len}")
        self.start, self.end = self.end, self.end + seq

    def slot(self, layer: nn.Module, batch: int, kv_heads: int, head_dim: int,
             dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The layer's key and value buffers [batch, kv_heads, max_len, head_dim] (made on first
        use, in the cache's type or else dtype)."""
        slot = self.slots.get(id(layer))
        if slot is None:
            shape = (batch, kv_heads, self.max_len, head_dim)
            dt = self.dtype or dtype
            slot = self.slots[id(layer)] = (torch.empty(shape, dtype=dt, device=device),
                                            torch.empty(shape, dtype=dt, device=device))
        return slot

    def update(self, layer: nn.Module, k: torch.Tensor, v: torch.Tensor):
        """Store this step's k and v [batch, kv_heads, seq, head_dim]; return all so far."""
        keys, values = self.slot(layer, k.shape[0], k.shape[1], k.shape[3], k.dtype, k.device)
        keys[:, :, self.start:self.end] = k
        values[:, :, self.start:self.end] = v
        return keys[:, :, :self.end], values[:, :, :self.end]

    def rotary(self, inv_freq: torch.Tensor, dtype: torch.dtype, end: int):
        """(cos, sin) [n, head_dim] for rotate() at positions 0..n-1, n >= end, one table per
        head size for every layer: a step slices rows, no tensor math. A table grows by
        doubling (up to max_len) as the context does."""
        key = (inv_freq.numel(), dtype, inv_freq.device)
        table = self.tables.get(key)
        if table is None or table[0].shape[0] < end:
            n = min(max(end, 64, 2 * (0 if table is None else table[0].shape[0])), self.max_len)
            table = self.tables[key] = angles(inv_freq, 0, max(n, end), dtype)
        return table

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for kv in self.slots.values() for t in kv)


def angles(inv_freq: torch.Tensor, start: int, end: int, dtype: torch.dtype):
    """(cos, sin) [end - start, head_dim] for rotate() at positions start..end-1."""
    pos = torch.arange(start, end, dtype=torch.float32, device=inv_freq.device)
    ang = torch.outer(pos, inv_freq.float())
    cos, sin = ang.cos(), ang.sin()
    return torch.cat((cos, cos), -1).to(dtype), torch.cat((-sin, sin), -1).to(dtype)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding (the half-split form): pairs (x_i, x_{i+d/2}) rotated by the
    position's angle. x [..., seq, d]; cos [seq, d] and sin [seq, d] from angles(): the halves'
    cos and sin, sin with the first half negated, so that x cos + roll(x, d/2) sin is
    (x1 cos - x2 sin, x2 cos + x1 sin) in four tensor ops."""
    return x * cos + x.roll(x.shape[-1] // 2, -1) * sin


class Attention(Joins, nn.Module):
    """Multi-head self-attention (grouped-query when kv_heads < heads), computed by
    F.scaled_dot_product_attention. The generated module adds the projections q, k, v, o (and
    o_norm, an RMSNorm before o, with sub_norm)."""

    step_kind = "attention"  # the native step a token takes (decode_step.py)

    def __init__(self, dim: int, heads: int, kv_heads: int | None = None, causal: bool = True,
                 rotary: bool = True, max_len: int = 2048, sub_norm: bool = False):
        super().__init__()
        self.dim, self.heads = dim, heads
        self.kv_heads = kv_heads or heads
        self.head_dim = dim // heads
        self.causal, self.rotary, self.max_len, self.sub_norm = causal, rotary, max_len, sub_norm
        half = self.head_dim // 2
        # angles are computed per call from the positions (a few tiny ops) rather than kept as
        # a [max_len, head_dim] table per layer: nothing to size, and torch.compile traces it
        self.register_buffer("inv_freq", ROPE_BASE ** (-torch.arange(half) / half),
                             persistent=False)

    def angles(self, start: int, end: int, dtype: torch.dtype, cache: "KVCache | None"):
        """(cos, sin) for rotate() at positions start..end-1; with a cache, rows of its tables,
        shared by every layer of the same head size."""
        if cache is None:
            return angles(self.inv_freq, start, end, dtype)
        cos, sin = cache.rotary(self.inv_freq, dtype, end)
        return cos[start:end], sin[start:end]

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        if cache is not None:  # one token of a frozen model: one native call, if it can
            y = decode_step.attention(self, x, cache)
            if y is not None:
                return y
        b, t, _ = x.shape
        q, k, v = project(self, ("q", "k", "v"), x)
        q = q.view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = k.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = v.view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        start = cache.start if cache is not None else 0
        if self.rotary:
            cos, sin = self.angles(start, start + t, q.dtype, cache)
            q, k = rotate(q, cos, sin), rotate(k, cos, sin)
        if cache is not None:
            k, v = cache.update(self, k, v)
        y = attend(q.to(k.dtype), k, v, self.causal, start, self.kv_heads != self.heads)
        y = y.transpose(1, 2).reshape(b, t, self.dim).to(x.dtype)
        if self.sub_norm:
            y = self.o_norm(y)
        return self.o(y)

    def extra_repr(self):
        return (f"{self.dim}, heads={self.heads}, kv_heads={self.kv_heads}, causal={self.causal}"
                f", rotary={self.rotary}, max_len={self.max_len}")


def attend(q, k, v, causal: bool, start: int, gqa: bool) -> torch.Tensor:
    """q [b, h, t, d] at positions start..start+t-1 against k, v [b, kv, start+t, d]."""
    t, total = q.shape[2], k.shape[2]
    mask, is_causal = None, False
    if causal and t > 1:
        if start == 0:
            is_causal = True  # top-left aligned, which is right when the keys start with q
        else:  # a chunk after a prefix: query i sees keys up to start + i
            mask = torch.ones(t, total, dtype=torch.bool, device=q.device).tril(start)
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal,
                                          enable_gqa=gqa)


def pre_norm(norm: nn.Module, layer: nn.Module, x: torch.Tensor, *args) -> torch.Tensor:
    """x + layer(norm(x), *args): a pre-norm residual, each half of a transformer block. One
    token of a frozen model (an RMSNorm before an attention or a feed-forward block) runs it
    as one native call (decode_step.py); then neither the norm's nor the layer's forward (nor
    their hooks) is called."""
    if isinstance(layer, Attention) and args and args[0] is not None:
        y = decode_step.attention(layer, x, args[0], pre=norm, residual=True)
    elif isinstance(layer, MLP) and not args:
        y = decode_step.mlp(layer, x, pre=norm, residual=True)
    else:
        y = None
    return layer(norm(x), *args) + x if y is None else y


def pre_norms(x: torch.Tensor, cache: KVCache | None, *pairs) -> torch.Tensor:
    """x through the pre-norm residuals ``pairs`` ((norm, layer), ...) in order, each as
    pre_norm: a transformer's blocks. One token of a frozen model runs them all as one native
    call (decode_chain.py), so a decoding step returns to Python once, not twice a block."""
    y = decode_chain.chain(pairs, x, cache)
    if y is not None:
        return y
    for norm, layer in pairs:
        x = pre_norm(norm, layer, x, cache) if isinstance(layer, Attention) else \
            pre_norm(norm, layer, x)
    return x


class MLP(Joins, nn.Module):
    """Feed-forward block: down(act(up(x))), or with a gate down(act(gate(x)) * up(x)) (SwiGLU
    with silu). The generated module adds up, gate, down (and down_norm with sub_norm)."""

    step_kind = "mlp"  # the native step a token takes (decode_step.py)

    def __init__(self, gate: bool = False, activation: str = "silu", sub_norm: bool = False):
        super().__init__()
        self.gated, self.activation, self.sub_norm = gate, activation, sub_norm
        self.act = _ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = decode_step.mlp(self, x)
        if y is not None:
            return y
        if self.gated:
            g, h = project(self, ("gate", "up"), x)
            h = self.act(g) * h
        else:
            h = self.act(self.up(x))
        if self.sub_norm:
            h = self.down_norm(h)
        return self.down(h)

    def extra_repr(self):
        return f"gate={self.gated}, activation={self.activation}, sub_norm={self.sub_norm}"
