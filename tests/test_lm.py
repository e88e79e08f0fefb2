"""Token models (issue 11): the language's sequence kinds, the generated module's names, and
decoding with a KV cache, trainable and frozen, equal to the full forward pass."""
import copy

import pytest
import torch

import triton_dsl
from triton_dsl import runtime as rt
from triton_dsl.lang.frontend import check_source
from triton_dsl.lang.summary import summarize

BITNET = "ternary(threshold=absmean, scale=absmean, activations=dynamic)"
SRC = f"""
block Block(hidden):
    residual:
        layer attn_norm: rmsnorm
        layer attn: attention(heads=4, kv_heads=2, sub_norm=true)
    residual:
        layer mlp_norm: rmsnorm
        layer mlp: mlp(hidden, gate=true, sub_norm=true)

model LM:
    input tokens(vocab=64, max_len=24)
    layer embed: embedding(32)
    layer blocks: Block(48) * 2
    layer norm: rmsnorm
    layer head: linear(64, bias=false)

precision:
    layer blocks.*.attn.*: {BITNET}
    layer blocks.*.mlp.*: {BITNET}
    layer blocks.1.mlp.down: int8(activations=dynamic)
"""


def _net(src=SRC, seed=0):
    torch.manual_seed(seed)
    return triton_dsl.load_source(src)().eval()


def test_projections_are_named_layers_that_rules_select():
    r = check_source(SRC, "lm.tdsl")
    assert r.ok, r.diagnostics
    layers = {l.name: l for l in r.models[0].layers()}
    for name in ("blocks.0.attn.q", "blocks.1.attn.k", "blocks.0.mlp.gate", "blocks.1.mlp.down"):
        assert layers[name].kind == "linear"
    assert layers["blocks.0.attn.k"].weight == (16, 32)  # 2 kv heads of 8
    assert layers["blocks.0.attn.o"].precision.to_source() == BITNET
    assert layers["blocks.1.mlp.down"].precision.to_source() == "int8(activations=dynamic)"
    assert layers["head"].precision.bits == 32 and layers["embed"].precision is None
    assert not [d for d in r.diagnostics if d.code == "W601"]  # the embedding comes first


def test_state_dict_keys_are_the_qualified_names():
    keys = set(_net().state_dict())
    assert {"embed.weight", "blocks.0.attn.q.weight", "blocks.0.attn.o_norm.weight",
            "blocks.1.mlp.down_norm.weight", "blocks.1.mlp.gate.weight", "norm.weight",
            "head.weight"} <= keys
    assert not any("inv_freq" in k for k in keys)  # rotary angles are not state


def test_summary_counts_embedding_and_every_projection():
    s = summarize(check_source(SRC, "lm.tdsl").models[0])
    rows = {r["name"]: r for r in s["layers"]}
    assert rows["embed"]["params"] == 64 * 32
    assert rows["blocks.0.attn.v"]["params"] == 32 * 16 and rows["blocks.0.attn.v"]["bits"] == 2
    assert s["params"] == sum(p.numel() for p in _net().parameters())
    assert s["tokens"] == {"vocab": 64, "max_len": 24}


def test_a_bad_attention_hides_the_rules_on_its_projections():
    src = SRC.replace("kv_heads=2", "kv_heads=3")
    errors = [d for d in check_source(src, "lm.tdsl").diagnostics if d.is_error]
    assert [d.code for d in errors] == ["E401"]


@pytest.mark.parametrize("frozen", [False, True])
def test_kv_cache_decoding_equals_the_full_pass(frozen):
    net = _net()
    if frozen:
        rt.freeze(net)
        assert isinstance(net.blocks[0].attn.q, rt.FrozenLinear)
    x = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = net(x)
        cache = rt.KVCache(24)
        parts = [net(x[:, :5], cache)] + [net(x[:, i:i + 1], cache) for i in range(5, 9)]
        parts.append(net(x[:, 9:], cache))  # a chunk after a prefix: its own causal mask
    torch.testing.assert_close(torch.cat(parts, 1), full, rtol=1e-4, atol=1e-4)
    assert cache.end == 12 and cache.nbytes() == 2 * 2 * (2 * 2 * 24 * 8) * 4  # kv heads only


def test_frozen_model_matches_the_trained_one():
    net = _net()
    x = torch.randint(0, 64, (1, 10))
    with torch.no_grad():
        want = net(x)
        got = rt.freeze(copy.deepcopy(net))(x)
    torch.testing.assert_close(got, want, rtol=1e-3, atol=1e-3)


def test_bad_token_inputs_are_value_errors():
    net = _net()
    with pytest.raises(ValueError, match="longer than max_len=24"):
        net(torch.zeros(1, 25, dtype=torch.long))
    with pytest.raises(ValueError, match="token ids must be in 0..63"):
        net(torch.full((1, 3), 64))
    with pytest.raises(ValueError, match="token ids of shape"):
        net(torch.zeros(1, 3))
    cache = rt.KVCache(24)
    net(torch.zeros(1, 20, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="more than max_len=24"):
        net(torch.zeros(1, 5, dtype=torch.long), cache)


def test_training_step_reaches_every_projection():
    net = _net().train()
    x = torch.randint(0, 64, (2, 8))
    loss = torch.nn.functional.cross_entropy(net(x)[:, :-1].reshape(-1, 64), x[:, 1:].reshape(-1))
    loss.backward()
    for name, p in net.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name


def test_frozen_lm_compiles_in_one_graph(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    torch._dynamo.reset()
    frozen = rt.freeze(_net())
    x = torch.randint(0, 64, (1, 6))
    explained = torch._dynamo.explain(frozen)(x)
    assert explained.graph_break_count == 0, explained.break_reasons
    with torch.no_grad():
        torch.testing.assert_close(torch.compile(frozen, backend="aot_eager")(x), frozen(x))


def test_tied_head_shares_the_embedding():
    src = "model T:\n    input tokens(vocab=32, max_len=8)\n    layer embed: embedding(16)\n" \
          "    layer attn: attention(2)\n    layer head: tied_head(embed)\n"
    net = _net(src)
    assert set(net.state_dict()) == {"embed.weight", "attn.q.weight", "attn.k.weight",
                                     "attn.v.weight", "attn.o.weight"}  # no head weight
    x = torch.randint(0, 32, (1, 5))
    assert net(x).shape == (1, 5, 32)
    assert summarize(check_source(src, "t.tdsl").models[0])["params"] == \
        sum(p.numel() for p in net.parameters())


def test_packed_checkpoint_holds_what_summary_counts(tmp_path):
    from triton_dsl.workflow import checkpoint as ck
    size = ck.save(rt.freeze(_net()), str(tmp_path / "lm.safetensors"), verify=True)
    predicted = summarize(check_source(SRC, "lm.tdsl").models[0])["total_bytes"]
    assert predicted <= size <= predicted + 16384  # the header: source, encodings, names
    again = ck.load(str(tmp_path / "lm.safetensors"))
    assert isinstance(again.blocks[1].mlp.down, rt.FrozenLinear)


def test_a_rule_naming_an_attention_points_at_its_projections():
    src = SRC + "    layer blocks.0.attn: int8\n"
    errors = [d for d in check_source(src, "lm.tdsl").diagnostics if d.is_error]
    assert [d.code for d in errors] == ["E503"]
    assert "blocks.0.attn.q, blocks.0.attn.k" in errors[0].message
    assert errors[0].help == "write `layer blocks.0.attn.*: ...` to select them all"
