"""The native decoding steps (kernels/cpu_decode.c): one token of an attention layer or a
feed-forward block in one call, held to pure-PyTorch twins on awkward shapes (grouped-query
heads, head sizes that are not multiples of 16, the first and the last cache row, NaN), and
whole models decoding through them held to the torch path they replace."""
import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

from triton_dsl import runtime as rt
from triton_dsl.kernels import native
from triton_dsl.kernels.cpu import PackedNative
from triton_dsl.runtime import decode_chain, decode_step
from triton_dsl.runtime.transformer import Attention, rotate
from test_lm import SRC, _net

needs_native = pytest.mark.skipif(native.library() is None, reason="no native CPU library here")


@pytest.fixture
def cpu_paths(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the CPU kernels, not Triton's


def _ternary(n, k, gen):
    return PackedNative(torch.randint(-1, 2, (n, k), dtype=torch.int8, generator=gen),
                        torch.rand(n, generator=gen) + 0.5, True)


def _identity(n):
    """y = x to 16-bit fixed point (float activations): the step's output is its input, to
    half a step of max|x| / 32639 (close() allows for it)."""
    return PackedNative(torch.eye(n, dtype=torch.int8), torch.ones(n), True)


def _plan(lins, norm=None, pre=None):
    """A step's plan for these (form, bias, act) projections, a sub-norm and a pre-norm."""
    owner = torch.nn.Module()
    if norm is not None:
        owner.sub = norm
    return decode_step._Plan(owner, (), lins, "sub" if norm is not None else None, pre)


def close(got, want):
    torch.testing.assert_close(got, want, rtol=1e-4, atol=3e-5 * want.abs().max().item())


def _angles(d, max_len):
    """The rotary tables [max_len, d] a KV cache holds."""
    return rt.KVCache(max_len).rotary(Attention(d, heads=1).inv_freq, torch.float32, max_len)


@needs_native
@pytest.mark.parametrize("heads,kv,d", [(4, 4, 16), (4, 2, 8), (6, 2, 6), (1, 1, 130)])
@pytest.mark.parametrize("pos", [0, 5, 47])  # 48 keys: the softmax's vector loop and tail
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_attention_step_matches_its_twin(heads, kv, d, pos, dtype):
    gen = torch.Generator().manual_seed(pos + d)
    dim, max_len = heads * d, 48
    qkv, o = _ternary((heads + 2 * kv) * d, dim, gen), _identity(dim)
    bias = torch.randn(qkv.n, generator=gen)
    plan = _plan([(qkv, bias, "dynamic"), (o, None, "none")])
    kc = torch.randn(1, kv, max_len, d, generator=gen).to(dtype)
    vc = torch.randn(1, kv, max_len, d, generator=gen).to(dtype)
    x = torch.randn(1, 1, dim, generator=gen)
    cos, sin = _angles(d, max_len)
    want_k, want_v = kc.clone(), vc.clone()
    y = decode_step.run_attention(plan, x, heads, kv, cos, sin, kc, vc, pos)

    proj = qkv.dynamic_matmul(x.view(1, dim), bias).view(-1)
    q, k, v = proj.split([heads * d, kv * d, kv * d])
    q, k = (rotate(t.view(-1, d), cos[pos], sin[pos]) for t in (q, k))
    want_k[0, :, pos], want_v[0, :, pos] = k.to(dtype), v.view(kv, d).to(dtype)
    assert torch.equal(kc, want_k) and torch.equal(vc, want_v)  # rotated and rounded as torch
    want = decode_step.reference_attention(q, want_k[0, :, :pos + 1], want_v[0, :, :pos + 1])
    close(y.view(-1), want.reshape(-1))


@needs_native
def test_attention_step_without_rotary_with_a_norm_and_nan():
    gen = torch.Generator().manual_seed(0)
    heads, d, max_len, pos = 3, 5, 8, 7  # odd head size: no rotary; the last cache row
    dim = heads * d
    qkv, o = _ternary(3 * dim, dim, gen), _identity(dim)
    norm = rt.RMSNorm(dim, eps=1e-5)
    with torch.no_grad():
        norm.weight.uniform_(0.5, 2, generator=gen)
    pre = rt.RMSNorm(dim, elementwise_affine=False)  # the block's norm, before the layer
    plan = _plan([(qkv, None, "none"), (o, None, "none")], norm, pre)
    kc, vc = torch.randn(2, 1, heads, max_len, d, generator=gen)
    x = torch.randn(1, 1, dim, generator=gen)
    y = decode_step.run_attention(plan, x, heads, heads, None, None, kc, vc, pos,
                                  residual=True)
    h = F.rms_norm(x.view(1, dim), (dim,), None, torch.finfo(torch.float32).eps)
    q = qkv.float_matmul(h).view(-1)[:dim].view(heads, d)
    att = decode_step.reference_attention(q, kc[0], vc[0]).reshape(dim)
    want = F.rms_norm(att, (dim,), norm.weight.detach(), 1e-5)
    close(y.view(-1) - x.view(-1), want)

    vc[0, 1, 3, 0] = float("nan")  # a NaN value in the cache: that head's output is NaN
    y = decode_step.run_attention(plan, x, heads, heads, None, None, kc, vc, pos)
    assert y.isnan().all()  # and the sub-norm spreads it over the row, as torch's does
    x[0, 0, 2] = float("nan")
    kc, vc = torch.randn(2, 1, heads, max_len, d, generator=gen)
    y = decode_step.run_attention(plan, x, heads, heads, None, None, kc, vc, 0)
    assert y.isnan().all()


@needs_native
def test_attention_step_refuses_what_does_not_fit():
    gen = torch.Generator().manual_seed(0)
    qkv, o = _ternary(48, 16, gen), _identity(16)
    plan = _plan([(qkv, None, "none"), (o, None, "none")])
    kc, vc = torch.zeros(2, 1, 4, 8, 4)
    x = torch.randn(1, 1, 16)
    for bad in (dict(pos=8), dict(pos=-1), dict(heads=3), dict(x=torch.randn(1, 1, 17)),
                dict(x=torch.randn(1, 32)[:, ::2]), dict(kc=torch.zeros(1, 4, 8, 5)),
                dict(cos=torch.ones(4)), dict(cos=torch.ones(1, 4), pos=1)):
        args = dict(x=x, heads=4, cos=None, kc=kc, pos=0) | bad
        with pytest.raises(ValueError, match="do not fit|must be"):
            decode_step.run_attention(plan, args["x"], args["heads"], 4, args["cos"],
                                      args["cos"], args["kc"], vc, args["pos"])


@needs_native
@pytest.mark.parametrize("gated", [True, False])
@pytest.mark.parametrize("activation", ["silu", "gelu", "relu"])
@pytest.mark.parametrize("with_norm", [True, False])
def test_mlp_step_matches_its_twin(gated, activation, with_norm):
    gen = torch.Generator().manual_seed(3)
    dim, hidden = 20, 37
    up = _ternary(hidden * (2 if gated else 1), dim, gen)
    down = _ternary(dim, hidden, gen) if with_norm else _identity(hidden)  # the residual's
    norm = rt.RMSNorm(hidden) if with_norm else None
    pre = rt.RMSNorm(dim, eps=1e-5) if with_norm else None  # the block's, and the residual
    if with_norm:
        with torch.no_grad():
            pre.weight.uniform_(0.5, 2, generator=gen)
    plan = _plan([(up, None, "dynamic"), (down, None, "none")], norm, pre)
    x = torch.randn(1, 1, dim, generator=gen)
    x[0, 0, 3] = 40.0  # a wide range: GELU's tails, ReLU's zeros
    y = decode_step.run_mlp(plan, x, gated, activation, residual=with_norm)
    if with_norm:
        y = y - x
        x = F.rms_norm(x, (dim,), pre.weight.detach(), 1e-5)
    h = up.dynamic_matmul(x.view(1, dim)).view(-1)
    act = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}[activation]
    want = act(h[:hidden]) * h[hidden:] if gated else act(h)
    if with_norm:
        want = F.rms_norm(want, (hidden,), norm.weight.detach(), norm.eps)
        want = down.float_matmul(want[None]).view(-1)
    close(y.view(-1), want)
    x[0, 0, 0] = float("nan")
    assert decode_step.run_mlp(plan, x, gated, activation).isnan().all()
    with pytest.raises(ValueError, match="must be one token"):
        decode_step.run_mlp(plan, torch.randn(1, 2, dim), gated, activation)


def _steps(net, x, dtype=None):
    """Batch-1 decoding: a prompt of 3 tokens, then one token a call."""
    cache = rt.KVCache(x.shape[1], dtype)
    with torch.no_grad():
        parts = [net(x[:, :3], cache)] + [net(x[:, i:i + 1], cache)
                                          for i in range(3, x.shape[1])]
    return torch.cat(parts, 1)


@needs_native
@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16])
def test_a_frozen_model_decodes_through_the_steps_as_through_torch(cpu_paths, monkeypatch,
                                                                   dtype):
    net = rt.freeze(_net())
    x = torch.randint(0, 64, (1, 16), generator=torch.Generator().manual_seed(4))
    got = _steps(net, x, dtype)
    for block in (net.blocks[0], net.blocks[1]):
        assert "_step" in block.attn.__dict__ and "_step" in block.mlp.__dict__
    monkeypatch.setattr(decode_step, "attention", lambda *a, **k: None)
    monkeypatch.setattr(decode_step, "mlp", lambda *a, **k: None)
    want = _steps(copy.deepcopy(net), x, dtype)
    # the steps attend in fp32, torch in the cache's type: a 16-bit cache's tolerance is the
    # one test_decode_path allows bf16 against the full pass
    tol = 2e-3 if dtype is None else 0.05
    torch.testing.assert_close(got, want, rtol=tol, atol=tol)


@needs_native
def test_steps_take_the_torch_path_where_they_do_not_apply(cpu_paths):
    net = rt.freeze(_net())
    x = torch.randint(0, 64, (2, 6))
    _steps(net, x)  # batch 2
    with torch.no_grad():
        net(x[:1, :1])  # no cache: the attention is torch's, the MLP steps
    assert "_step" not in net.blocks[0].attn.__dict__ and "_step" in net.blocks[0].mlp.__dict__
    with torch.enable_grad():  # gradients wanted: torch's path
        net(x[:1, :1])
    float_net = _net()
    _steps(float_net, x[:1])  # not frozen
    assert "_step" not in float_net.blocks[0].mlp.__dict__


@needs_native
def test_an_fp16_cache_takes_torch_attention_without_native_fp16(cpu_paths, monkeypatch):
    """A library built without _Float16 says so (Library.fp16), and an fp16 cache then runs
    torch's attention: the same numbers within the 16-bit tolerance, no native call."""
    from triton_dsl.kernels import native
    net = rt.freeze(_net())
    x = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(6))
    want = _steps(copy.deepcopy(net), x, torch.float16)
    monkeypatch.setattr(native.library(), "fp16", False)
    calls = []
    monkeypatch.setattr(decode_step, "run_attention", lambda *a, **k: calls.append(1))
    got = _steps(net, x, torch.float16)
    assert not calls
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)


@needs_native
def test_copies_and_pickles_drop_the_step(cpu_paths):
    net = rt.freeze(_net())
    x = torch.randint(0, 64, (1, 6))
    want = _steps(net, x)
    for again in (copy.deepcopy(net), pickle.loads(pickle.dumps(net))):
        assert not {"_step", "_chain"} & set(again.blocks[0].attn.__dict__)
        assert torch.equal(_steps(again, x), want)


@needs_native
@pytest.mark.parametrize("dtype", [None, torch.bfloat16, torch.float16])
def test_a_chain_of_blocks_gives_the_steps_outputs_exactly(cpu_paths, monkeypatch, dtype):
    """rt.pre_norms runs a token through every block in one native call (decode_chain.chain);
    layer by layer, through the same native steps, the numbers are the same bit for bit."""
    net = rt.freeze(_net())
    apart = copy.deepcopy(net)
    x = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(5))
    got = _steps(net, x, dtype)
    chain = net.blocks[0].attn.__dict__["_chain"]
    assert len(chain.plans) == 4 and chain.modules[1] is net.blocks[0].attn
    monkeypatch.setattr(decode_chain, "chain", lambda *a: None)
    assert torch.equal(_steps(apart, x, dtype), got)
    held = apart.blocks[0].attn.__dict__
    assert "_chain" not in held and "_step" in held


@needs_native
def test_a_chain_follows_the_model_it_runs(cpu_paths, monkeypatch):
    net = rt.freeze(_net())
    x = torch.randint(0, 64, (1, 10), generator=torch.Generator().manual_seed(6))
    want = _steps(net, x)
    net.blocks[1].mlp = copy.deepcopy(net.blocks[1].mlp)  # a module replaced: a new chain
    assert torch.equal(_steps(net, x), want)
    assert net.blocks[0].attn.__dict__["_chain"].modules[7] is net.blocks[1].mlp
    with torch.no_grad():  # a norm's weight changed in place: the step reads the new one
        net.blocks[1].mlp_norm.weight.mul_(2)
    moved = _steps(net, x)
    assert not torch.equal(moved, want)
    w = net.blocks[1].mlp_norm.weight
    w.data = w.data / 2  # back, in new memory: the chain points at it anew
    assert torch.equal(_steps(net, x), want)
    w.data = w.data * 2
    monkeypatch.setattr(decode_chain, "chain", lambda *a: None)
    monkeypatch.setattr(decode_step, "attention", lambda *a, **k: None)
    monkeypatch.setattr(decode_step, "mlp", lambda *a, **k: None)
    torch.testing.assert_close(moved, _steps(net, x), rtol=2e-3, atol=2e-3)  # torch's path


@needs_native
def test_a_chain_with_a_layer_it_cannot_run_runs_layer_by_layer(cpu_paths):
    net = rt.freeze(_net(SRC + "    layer blocks.1.attn.q: int8(activations=dynamic)\n"))
    x = torch.randint(0, 64, (1, 8))
    got = _steps(net, x)
    # q, k, v of block 1 do not join: remembered, so tokens go layer by layer at once
    assert isinstance(net.blocks[0].attn.__dict__["_chain"], decode_chain.Unchained)
    step = net.blocks[0].mlp.__dict__["_step"]
    _steps(net, x)
    assert net.blocks[0].mlp.__dict__["_step"] is step  # the other layers' plans are kept
    assert "_step" in net.blocks[0].mlp.__dict__  # the others still step natively
    torch.testing.assert_close(got, _decode_torch(net, x), rtol=2e-3, atol=2e-3)


def _decode_torch(net, x):
    from unittest import mock
    with mock.patch.object(decode_chain, "chain", lambda *a: None), \
            mock.patch.object(decode_step, "attention", lambda *a, **k: None), \
            mock.patch.object(decode_step, "mlp", lambda *a, **k: None):
        return _steps(copy.deepcopy(net), x)


def _torch_path(monkeypatch):
    monkeypatch.setattr(decode_chain, "chain", lambda *a: None)
    monkeypatch.setattr(decode_step, "attention", lambda *a, **k: None)
    monkeypatch.setattr(decode_step, "mlp", lambda *a, **k: None)


@needs_native
def test_two_threads_decode_with_their_own_caches(cpu_paths):
    """Each call binds its own copy of the chain's steps: a shared array let one thread's
    call read the other's cache (wrong numbers, or memory out of bounds)."""
    import threading
    net = rt.freeze(_net(SRC.replace("max_len=24", "max_len=40")))
    xs = [torch.randint(0, 64, (1, n), generator=torch.Generator().manual_seed(n))
          for n in (40, 12)]  # caches of different lengths
    want = [_steps(net, x) for x in xs]
    got = {}

    def run(i):
        got[i] = [_steps(net, xs[i]) for _ in range(5)]
    threads = [threading.Thread(target=run, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(torch.equal(y, want[i]) for i in (0, 1) for y in got[i])


@needs_native
def test_steps_follow_layers_and_parameters_changed_after_a_first_token(cpu_paths,
                                                                        monkeypatch):
    """A plan is current only while what it copied or points to is unchanged: replaced
    layers and norms, weights and biases in new memory, a new eps."""
    other = rt.freeze(_net(seed=1))
    net = rt.freeze(_net(SRC.replace("sub_norm=true)", "sub_norm=true, bias=true)")))
    x = torch.randint(0, 64, (1, 8), generator=torch.Generator().manual_seed(7))
    b0 = net.blocks[0]
    edits = [lambda: setattr(b0.attn, "q", copy.deepcopy(other.blocks[0].attn.q)),
             lambda: setattr(b0.mlp, "down", copy.deepcopy(other.blocks[0].mlp.down)),
             lambda: setattr(b0.attn, "o_norm", copy.deepcopy(other.blocks[0].attn.o_norm)),
             lambda: setattr(b0.attn_norm, "weight",
                             torch.nn.Parameter(2 * b0.attn_norm.weight.detach())),
             lambda: setattr(b0.mlp_norm, "eps", 0.5),
             lambda: setattr(b0.attn.o.bias, "data", b0.attn.o.bias.data + 1)]
    for edit in edits:
        _steps(net, x)  # plans built
        edit()
        got = _steps(net, x)
        with monkeypatch.context() as m:
            _torch_path(m)
            torch.testing.assert_close(got, _steps(net, x), rtol=2e-3, atol=2e-3)


@needs_native
def test_a_norm_weight_of_another_length_never_reaches_native_code(cpu_paths):
    net = rt.freeze(_net())
    x = torch.randint(0, 64, (1, 6))
    _steps(net, x)
    w = net.blocks[0].attn.o_norm.weight
    w.data = torch.ones(64)[:1]  # 1 weight for 32 features
    with pytest.raises(ValueError, match="weight"):  # torch's own complaint
        _steps(net, x)


@needs_native
def test_half_drops_the_native_plans(cpu_paths):
    net = rt.freeze(_net())
    _steps(net, torch.randint(0, 64, (1, 6)))
    net.half()
    assert not {"_step", "_chain", "_joined"} & set(net.blocks[0].attn.__dict__)


def test_rotary_tables_grow_with_the_context():
    cache = rt.KVCache(65536)
    inv = Attention(128, heads=1).inv_freq
    cos, _ = cache.rotary(inv, torch.float32, 10)
    assert cos.shape == (64, 128)  # not 65536 rows up front
    cos2, _ = cache.rotary(inv, torch.float32, 100)
    assert cos2.shape == (128, 128) and torch.equal(cos2[:64], cos)


def test_rejected_token_ids_do_not_advance_the_cache():
    net = _net()
    cache = rt.KVCache(24)
    with torch.no_grad(), pytest.raises(ValueError, match="token ids"):
        net(torch.tensor([[64]]), cache)
    assert cache.end == 0


@needs_native
@pytest.mark.parametrize("swap", ["short slot", "slot of another dtype", "bf16 table",
                                  "short sin", "not a tensor"])
def test_a_cache_with_replaced_buffers_never_reaches_native_memory(cpu_paths, swap):
    """A KVCache's slots and rotary tables are plain attributes a caller can replace; what the
    chain and each step would hand to C is checked first: a clear error, never a read or a
    write past a buffer."""
    net = rt.freeze(_net())
    x = torch.randint(0, 64, (1, 6))
    cache = rt.KVCache(24)
    with torch.no_grad():
        net(x[:, :3], cache)
        attn = net.blocks[1].attn
        k, v = cache.slots[id(attn)]
        key = next(iter(cache.tables))
        cos, sin = cache.tables[key]
        if swap == "short slot":
            cache.slots[id(attn)] = (k[:, :, :2].contiguous(), v[:, :, :2].contiguous())
        elif swap == "slot of another dtype":
            cache.slots[id(attn)] = (k.double(), v.double())
        elif swap == "bf16 table":
            cache.tables[key] = (cos.bfloat16(), sin.bfloat16())
        elif swap == "short sin":
            cache.tables[key] = (cos, sin[:2].contiguous())
        else:
            cache.slots[id(attn)] = ("keys", "values")
        if swap == "slot of another dtype":  # not one C reads: torch's attention, in fp64
            assert net(x[:, 3:4], cache).shape == (1, 1, 64)
            return
        with pytest.raises((ValueError, RuntimeError, TypeError, AttributeError)):
            net(x[:, 3:4], cache)
