"""Layer kinds for token sequences: embedding, rmsnorm, attention and mlp. No torch here.

A token model's input is token ids of shape [seq]; after the embedding every shape is
[seq, dim]. Shapes are inferred with seq = max_len; at run time any length up to it works, since
these kinds act on each position alone or, as attention does, on however many there are.

Attention and mlp are composite: their projections are ordinary ``linear`` layers named
``NAME.q``, ``NAME.k``, ``NAME.v``, ``NAME.o`` and ``NAME.up``, ``NAME.gate``, ``NAME.down``, so
precision rules select them like any other layer (``blocks.*.attn.*``) and they are the
state-dict keys of the generated module.
"""
from __future__ import annotations

from .kind_base import Inferred, Kind, ShapeError, _need_rank
from .limits import MAX_SIZE
from .options import Option, spell

_POS = dict(number="int", lo=1, hi=MAX_SIZE)
_BIAS = Option("bias", False, (True, False), doc="learned biases on the projections")
_SUB_NORM = Option("sub_norm", False, (True, False),
                   doc="an rmsnorm before the output projection (BitNet's sub-norm)")


def fits_sequence(spec: Kind, shape, args: dict, tokens, embeddings: dict):
    """Token models (tokens = (vocab, max_len), else None): ids [seq] go through an embedding
    first, and every later layer must work for any sequence length up to max_len. Adds the
    vocabulary to an embedding's options, and a tied head's embedding (from ``embeddings``,
    {qualified name: (vocab, dim)} of those declared so far). Raises ShapeError."""
    if spec.name == "tied_head":
        emb = embeddings.get(args["embedding"])
        if emb is None:
            known = ", ".join(embeddings) or "none so far"
            raise ShapeError(f"no embedding layer named '{args['embedding']}' comes before it "
                             f"(embeddings: {known})", "embedding")
        args["vocab"], args["dim"] = emb
    if spec.name == "embedding":
        if tokens is None:
            raise ShapeError("embedding needs token ids: declare the model's input as "
                             "tokens(vocab=..., max_len=...)")
        if len(shape) != 1:
            raise ShapeError(f"embedding needs token ids [seq], got {list(shape)} (a model "
                             "embeds its input once)")
        args["vocab"] = tokens[0]
        return
    if tokens is None:
        return
    if len(shape) == 1:
        raise ShapeError(f"{spec.name} cannot take token ids; embed them first, e.g. "
                         "layer embed: embedding(256)")
    if not spec.per_position:
        raise ShapeError(f"{spec.name} mixes the positions of a token sequence, whose length "
                         "varies at run time (up to max_len)")
    if spec.name == "softmax" and args["dim"] not in (-1, len(shape) - 1):
        raise ShapeError("softmax over positions depends on the sequence length; use dim=-1",
                         "dim")


class LayerName(Option):
    """An option naming another layer (tied_head's embedding); the expander resolves it."""

    def accepts(self, v):
        if isinstance(v, str) and all(p.isidentifier() or p.isdigit() for p in v.split(".")):
            return None
        return f"'{self.name}' must be the name of an embedding layer, got {spell(v)}"


def _tied_head(shape, a):
    # the expander adds the named embedding's vocab and dim (or reports that none exists)
    if shape[-1] != a["dim"]:
        raise ShapeError(f"the width {shape[-1]} differs from the dim {a['dim']} of embedding "
                         f"'{a['embedding']}'", "embedding")
    return Inferred(tuple(shape[:-1]) + (a["vocab"],))


def _embedding(shape, a):
    # the expander adds the model's vocabulary to the options and checks the input is token ids
    return Inferred(tuple(shape) + (a["dim"],), a["vocab"] * a["dim"])


def _rmsnorm(shape, a):
    return Inferred(shape, shape[-1])


def _head_dims(shape, a):
    _need_rank("attention", shape, (2,), "[seq, dim] (embed token ids first)")
    dim, heads = shape[-1], a["heads"]
    kv = a["kv_heads"] if a["kv_heads"] is not None else heads
    if dim % heads:
        raise ShapeError(f"heads={heads} does not divide the width {dim}", "heads")
    if kv > heads or heads % kv:
        raise ShapeError(f"kv_heads={kv} does not divide heads={heads}", "kv_heads")
    head_dim = dim // heads
    if a["rotary"] and head_dim % 2:
        raise ShapeError(f"rotary embeddings need an even head dimension; {dim} / {heads} "
                         f"heads = {head_dim}", "rotary")
    return dim, kv * head_dim


def _attention(shape, a):
    _head_dims(shape, a)
    return Inferred(tuple(shape))


def _attention_parts(shape, a):
    dim, kv_width = _head_dims(shape, a)
    out = [("q", "linear", _linear(dim, a), shape),
           ("k", "linear", _linear(kv_width, a), shape),
           ("v", "linear", _linear(kv_width, a), shape)]
    if a["sub_norm"]:
        out.append(("o_norm", "rmsnorm", {"eps": 1e-6}, shape))
    return out + [("o", "linear", _linear(dim, a), shape)]


def _linear(n, a):
    return {"out_features": n, "bias": a["bias"]}


def _mlp(shape, a):
    _need_rank("mlp", shape, (1, 2, 3), "[features] (or [seq, dim])")
    return Inferred(tuple(shape))


def _mlp_parts(shape, a):
    hidden = tuple(shape[:-1]) + (a["hidden"],)
    out = [("up", "linear", _linear(a["hidden"], a), shape)]
    if a["gate"]:
        out.append(("gate", "linear", _linear(a["hidden"], a), shape))
    if a["sub_norm"]:
        out.append(("down_norm", "rmsnorm", {"eps": 1e-6}, hidden))
    return out + [("down", "linear", _linear(shape[-1], a), hidden)]


SEQUENCE_KINDS = {k.name: k for k in [
    Kind("embedding", (Option("dim", None, required=True, **_POS, doc="embedding width"),),
         ("dim",), _embedding, doc="token ids [seq] -> vectors [seq, dim] (vocab from the input)",
         per_position=True),
    Kind("tied_head", (LayerName("embedding", None, required=True,
                                 doc="the embedding layer whose weights it shares"),),
         ("embedding",), _tied_head, doc="logits x @ embedding.weight^T: a head tied to the "
         "embedding, no weights of its own", per_position=True),
    Kind("rmsnorm", (Option("eps", 1e-6, number="float", lo=0, hi=1,
                            doc="added to the mean square"),),
         (), _rmsnorm, doc="root-mean-square normalization over the last dimension",
         per_position=True),
    Kind("attention", (
        Option("heads", None, required=True, **_POS, doc="attention heads; divide the width"),
        Option("kv_heads", None, (None,), **_POS,
               doc="key/value heads (grouped-query attention); divide heads; default heads"),
        Option("causal", True, (True, False), doc="each position sees only earlier ones"),
        Option("rotary", True, (True, False), doc="rotary position embeddings on q and k"),
        _BIAS, _SUB_NORM),
        ("heads",), _attention, doc="multi-head self-attention with q, k, v, o projections",
        per_position=True, parts=_attention_parts),
    Kind("mlp", (
        Option("hidden", None, required=True, **_POS, doc="hidden width"),
        Option("gate", False, (True, False), doc="a gated unit: act(gate(x)) * up(x) (SwiGLU)"),
        Option("activation", "silu", ("silu", "gelu", "relu"), doc="the hidden activation"),
        _BIAS,
        Option("sub_norm", False, (True, False),
               doc="an rmsnorm before the down projection (BitNet's sub-norm)")),
        ("hidden",), _mlp, doc="feed-forward block: down(act(up(x))), or gated",
        per_position=True, parts=_mlp_parts),
]}
