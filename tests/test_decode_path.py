"""The CPU decoding path of frozen language models: projections of one input joined into one
kernel call, the native RMSNorm, rotary angles once per step, and a narrower KV cache. Each is
checked against what it replaces: the members one by one, torch's rms_norm, an fp32 cache."""
import copy
import pickle

import pytest
import torch
import torch.nn.functional as F

from triton_dsl import runtime as rt
from triton_dsl.kernels import native
from triton_dsl.kernels.cpu import PackedNative
from triton_dsl.runtime import joined
from test_lm import SRC, _net

needs_native = pytest.mark.skipif(native.library() is None, reason="no native CPU library here")


@pytest.fixture
def cpu_paths(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the CPU kernels, not Triton's


def _decode(net, x, cache_dtype=None):
    with torch.no_grad():
        cache = rt.KVCache(24, cache_dtype)
        parts = [net(x[:, :5], cache)] + [net(x[:, i:i + 1], cache) for i in range(5, x.shape[1])]
    return torch.cat(parts, 1)


@needs_native
def test_joined_projections_give_the_members_outputs_exactly(cpu_paths, monkeypatch):
    net = rt.freeze(_net())
    apart = copy.deepcopy(net)
    x = torch.randint(0, 64, (2, 10), generator=torch.Generator().manual_seed(2))
    got = _decode(net, x)
    for attn in (net.blocks[0].attn, net.blocks[1].attn):
        assert attn._joined.form is not None and attn._joined.sizes == [32, 16, 16]
    assert net.blocks[1].mlp._joined.sizes == [48, 48]  # gate and up; down is int8 alone
    monkeypatch.setattr(joined, "_joinable", lambda mods, x: None)
    want = _decode(apart, x)
    assert apart.blocks[0].attn._joined.form is None
    assert torch.equal(got, want)


@needs_native
def test_joined_weights_are_views_not_copies(cpu_paths):
    net = rt.freeze(_net())
    before = sum(m.weight_bytes() for m in net.modules() if isinstance(m, rt.FrozenLinear))
    with torch.no_grad():
        net(torch.randint(0, 64, (1, 4)))
    after = sum(m.weight_bytes() for m in net.modules() if isinstance(m, rt.FrozenLinear))
    assert after == before
    j = net.blocks[0].attn._joined
    storage = j.form.weight.untyped_storage().data_ptr()
    assert all(f.weight.untyped_storage().data_ptr() == storage for f in j.forms)


@needs_native
def test_a_joined_model_copies_pickles_and_saves(cpu_paths, tmp_path):
    from triton_dsl.workflow import checkpoint as ck
    net = rt.freeze(_net())
    x = torch.randint(0, 64, (1, 7))
    with torch.no_grad():
        want = net(x)
        for again in (copy.deepcopy(net), pickle.loads(pickle.dumps(net))):
            assert "_joined" not in again.blocks[0].attn.__dict__
            assert torch.equal(again(x), want)
        ck.save(net, str(tmp_path / "lm.safetensors"), verify=True)
        assert torch.equal(ck.load(str(tmp_path / "lm.safetensors"))(x), want)
        assert torch.equal(net(x), want)  # saving put buffers back: the join is rebuilt


@needs_native
def test_members_of_different_kinds_run_apart(cpu_paths):
    net = rt.freeze(_net(SRC + "    layer blocks.0.attn.q: int8(activations=dynamic)\n"))
    x = torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        y = net(x)
    assert net.blocks[0].attn._joined.form is None  # int8 q, ternary k and v
    assert net.blocks[1].attn._joined.form is not None
    torch.testing.assert_close(y, _decode(copy.deepcopy(net), x)[:, :6], rtol=1e-4, atol=1e-4)


@needs_native
def test_packed_forms_join_only_when_alike():
    lib = native.library()
    t = PackedNative(torch.randint(-1, 2, (8, 64), dtype=torch.int8), torch.rand(8), True)
    other_k = PackedNative(torch.randint(-1, 2, (8, 128), dtype=torch.int8), torch.rand(8), True)
    ragged = PackedNative(torch.randint(-1, 2, (lib.tile_rows + 1, 64), dtype=torch.int8),
                          torch.rand(lib.tile_rows + 1), True)
    for forms in ([t, other_k], [ragged, t]):
        with pytest.raises(ValueError, match="can be joined"):
            PackedNative.join(forms)


@needs_native
@pytest.mark.parametrize("shape", [(1, 1, 2048), (3, 5, 17), (70, 33), (0, 8), (2, 0, 16)])
@pytest.mark.parametrize("affine", [True, False])
def test_native_rmsnorm_matches_torch(shape, affine):
    norm = rt.RMSNorm(shape[-1], eps=1e-6, elementwise_affine=affine)
    if affine:
        with torch.no_grad():
            norm.weight.uniform_(-2, 2)
    x = torch.randn(shape) * 3
    rows = x.view(-1, shape[-1])
    if x.numel():
        rows[0, 0] = float("nan")  # a NaN row stays NaN, the others untouched
        rows[-1, -1] = float("inf") if len(rows) > 1 else rows[-1, -1]  # NaN there, 0 around
    with torch.no_grad():
        got = norm(x)
    want = F.rms_norm(x, (shape[-1],), norm.weight, 1e-6)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, equal_nan=True)


def test_rmsnorm_takes_torch_where_gradients_or_odd_inputs_are(monkeypatch):
    norm = rt.RMSNorm(8)
    calls = []
    monkeypatch.setattr(native, "library", lambda: calls.append(1))  # would fail if called
    x = torch.randn(4, 8, requires_grad=True)
    norm(x).sum().backward()  # training: torch's autograd
    with torch.no_grad():
        norm(torch.randn(8, 4).t())  # non-contiguous
        rt.RMSNorm(8, dtype=torch.float64)(torch.randn(4, 8, dtype=torch.float64))
    assert not calls and x.grad is not None


def test_rotary_angles_are_computed_once_a_cache():
    net = _net()
    cache = rt.KVCache(24)
    with torch.no_grad():
        net(torch.randint(0, 64, (1, 5)), cache)
        cos, sin = cache.rotary(net.blocks[0].attn.inv_freq, torch.float32, 6)
        net(torch.randint(0, 64, (1, 1)), cache)
    assert len(cache.tables) == 1  # both layers, every step: one table of every position
    assert cache.rotary(net.blocks[1].attn.inv_freq, torch.float32, 6)[0] is cos
    want = rt.transformer.angles(net.blocks[0].attn.inv_freq, 3, 4, torch.float32)
    torch.testing.assert_close((cos[3:4], sin[3:4]), want)


def test_a_bf16_cache_decodes_close_to_the_full_pass():
    net = _net()
    x = torch.randint(0, 64, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        full = net(x)
    got = _decode(net, x, torch.bfloat16)
    assert got.dtype == torch.float32
    torch.testing.assert_close(got, full, rtol=0.05, atol=0.05)
    with pytest.raises(ValueError, match="fp32, fp16, bf16"):
        rt.KVCache(8, torch.int8)


def test_generate_takes_a_kv_cache_type(run_cli, tmp_path, cpu_paths):
    from triton_dsl.workflow import checkpoint as ck
    from triton_dsl.workflow.textgen import generate
    path = str(tmp_path / "lm.safetensors")
    src = SRC.replace("vocab=64", "vocab=256").replace("linear(64", "linear(256")
    ck.save(rt.freeze(_net(src)), path)
    code, out, err = run_cli("generate", path, "--prompt", "ab", "--max-new-tokens", "5",
                             "--kv-cache", "bf16", "--seed", "3")
    assert code == 0, err
    assert out == generate(path, "ab", 5, 0.8, None, 3, "bf16") + "\n"
    with pytest.raises(ValueError, match="kv_cache must be one of"):
        generate(path, "ab", 5, kv_cache="int4")


def test_a_float_model_never_builds_the_native_library():
    """RMSNorm takes the native library only once a frozen layer has loaded it: evaluating a
    float model must not wait for a compiler (or warn about kernels it never uses)."""
    import subprocess
    import sys
    code = ("import torch, triton_dsl\n"
            "from test_lm import SRC\n"
            "net = triton_dsl.load_source(SRC)().eval()\n"
            "with torch.no_grad():\n"
            "    net(torch.randint(0, 64, (1, 5)))\n"
            "from triton_dsl.kernels import native\n"
            "print(native.library.cache_info().currsize)\n")
    tests = __import__("os").path.dirname(__file__)
    r = subprocess.run([sys.executable, "-c", code], cwd=tests, capture_output=True, text=True,
                       timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "0"
