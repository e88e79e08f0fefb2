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

ROPE_BASE = 10000.0
_ACTIVATIONS = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}


class KVCache:
    """Keys and values of every attention layer of one model, for incremental decoding.

    Each layer gets [batch, kv_heads, max_len, head_dim] buffers for keys and values on its first
    call (kv_heads, not heads: grouped-query attention keeps the cache that much smaller); a step
    writes its new positions in place and attends over the filled prefix, a view, so a token
    costs its projections plus attention over the context, and nothing is copied or concatenated.
    The model calls ``step(seq)`` once per forward pass (in its input check), before any layer.
    """

    def __init__(self, max_len: int):
        self.max_len = max_len
        self.start = self.end = 0  # this step's positions: start..end-1
        self.slots: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def step(self, seq: int):
        if self.end + seq > self.max_len:
            raise ValueError(f"the sequence would reach {self.end + seq} tokens, more than "
                             f"max_len={self.max_len}")
        self.start, self.end = self.end, self.end + seq

    def update(self, layer: nn.Module, k: torch.Tensor, v: torch.Tensor):
        """Store this step's k and v [batch, kv_heads, seq, head_dim]; return all so far."""
        slot = self.slots.get(id(layer))
        if slot is None:
            shape = (k.shape[0], k.shape[1], self.max_len, k.shape[3])
            slot = self.slots[id(layer)] = (k.new_empty(shape), v.new_empty(shape))
        keys, values = slot
        keys[:, :, self.start:self.end] = k
        values[:, :, self.start:self.end] = v
        return keys[:, :, :self.end], values[:, :, :self.end]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for kv in self.slots.values() for t in kv)


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary position embedding (the half-split form): pairs (x_i, x_{i+d/2}) rotated by the
    position's angle. x [..., seq, d]; cos, sin [seq, d/2]."""
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half], x[..., half:]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


class Attention(nn.Module):
    """Multi-head self-attention (grouped-query when kv_heads < heads), computed by
    F.scaled_dot_product_attention. The generated module adds the projections q, k, v, o (and
    o_norm, an RMSNorm before o, with sub_norm)."""

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

    def rope(self, start: int, end: int):
        pos = torch.arange(start, end, dtype=torch.float32, device=self.inv_freq.device)
        ang = torch.outer(pos, self.inv_freq.float())
        return ang.cos(), ang.sin()

    def forward(self, x: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        b, t, _ = x.shape
        q = self.q(x).view(b, t, self.heads, self.head_dim).transpose(1, 2)
        k = self.k(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v(x).view(b, t, self.kv_heads, self.head_dim).transpose(1, 2)
        start = cache.start if cache is not None else 0
        if self.rotary:
            cos, sin = self.rope(start, start + t)
            q, k = rotate(q, cos.to(q.dtype), sin.to(q.dtype)), rotate(k, cos.to(k.dtype),
                                                                        sin.to(k.dtype))
        if cache is not None:
            k, v = cache.update(self, k, v)
        y = attend(q, k, v, self.causal, start, self.kv_heads != self.heads)
        y = y.transpose(1, 2).reshape(b, t, self.dim)
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


class MLP(nn.Module):
    """Feed-forward block: down(act(up(x))), or with a gate down(act(gate(x)) * up(x)) (SwiGLU
    with silu). The generated module adds up, gate, down (and down_norm with sub_norm)."""

    def __init__(self, gate: bool = False, activation: str = "silu", sub_norm: bool = False):
        super().__init__()
        self.gated, self.activation, self.sub_norm = gate, activation, sub_norm
        self.act = _ACTIVATIONS[activation]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        h = self.act(self.gate(x)) * h if self.gated else self.act(h)
        if self.sub_norm:
            h = self.down_norm(h)
        return self.down(h)

    def extra_repr(self):
        return f"gate={self.gated}, activation={self.activation}, sub_norm={self.sub_norm}"
