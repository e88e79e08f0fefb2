"""Golden-file tests: tests/golden/x.tdsl compiles byte-for-byte to x.py, and the result runs.

Regenerate after an intended change with: UPDATE_GOLDEN=1 pytest tests/test_codegen.py
"""
import difflib
import glob
import os
import pickle
import subprocess
import sys

import pytest
import torch

import triton_dsl
from triton_dsl.lang.frontend import check_file
from triton_dsl.lang.codegen import generate

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")
SOURCES = sorted(glob.glob(os.path.join(GOLDEN, "*.tdsl")))


@pytest.mark.parametrize("src", SOURCES, ids=os.path.basename)
def test_golden(src):
    r = check_file(src)
    assert r.ok, r.diagnostics
    got = generate(r.models, src, r.text)
    want_path = src[:-5] + ".py"
    if os.environ.get("UPDATE_GOLDEN"):
        with open(want_path, "w") as f:
            f.write(got)
    with open(want_path) as f:
        want = f.read()
    if got != want:
        diff = "".join(difflib.unified_diff(want.splitlines(True), got.splitlines(True),
                                            want_path, "generated"))
        pytest.fail("generated code differs from the golden file:\n" + diff)


@pytest.mark.parametrize("src", SOURCES, ids=os.path.basename)
def test_golden_runs(src):
    """The golden module imports and every model runs forward and backward."""
    ns = {}
    with open(src[:-5] + ".py") as f:
        exec(compile(f.read(), src, "exec"), ns)
    for name in ns["__all__"]:
        torch.manual_seed(0)
        net = ns[name]()
        x = net.example_input(3)  # token ids for a token model
        net.train()
        y = net(x)
        y.float().sum().backward()
        assert torch.isfinite(y).all()
        net.eval()  # static activations were observed in the training pass above
        assert net(x).shape == y.shape


def test_output_is_deterministic_across_processes():
    """Two processes with different hash seeds (set and dict order of strings differ) write the
    same bytes for every golden file."""
    code = ("import sys, glob, triton_dsl; sys.stdout.write(''.join("
            f"triton_dsl.compile(p) for p in sorted(glob.glob({os.path.join(GOLDEN, '*.tdsl')!r}))))")
    outs = []
    for seed in ("1", "2"):
        env = dict(os.environ, PYTHONHASHSEED=seed)
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                           check=True)
        outs.append(p.stdout)
    assert outs[0] == outs[1] and "# brief.tdsl:" in outs[0]


def test_generated_module_imports_runtime_only():
    code = triton_dsl.compile(SOURCES[0])
    imports = [l for l in code.splitlines() if l.startswith(("import", "from"))]
    assert all("parser" not in l and "checker" not in l and "lark" not in l for l in imports)


def test_state_dict_save_and_to(tmp_path):
    Net = triton_dsl.load(os.path.join(GOLDEN, "resnet.tdsl"))
    net = Net()
    path = tmp_path / "w.pt"
    torch.save(net.state_dict(), path)
    other = Net()
    other.load_state_dict(torch.load(path))
    x = torch.randn(2, 3, 32, 32)
    net.eval(), other.eval()
    assert torch.equal(net(x), other(x))
    assert net.to(torch.float64)(x.double()).dtype == torch.float64
    pickle.dumps(net)  # the whole module pickles (its class lives in a registered module)


def test_a_pre_norm_residual_nested_in_another_runs_before_its_add():
    """Pre-norm residuals wait to be emitted as one rt.pre_norms run; one at the end of an
    outer residual's body must still come before that residual's add."""
    import torch
    import triton_dsl
    src = ("model LM:\n    input tokens(vocab=64, max_len=16)\n    layer embed: embedding(32)\n"
           "    residual outer:\n        layer fc: linear(32)\n        residual:\n"
           "            layer n1: rmsnorm\n            layer attn: attention(heads=4)\n"
           "    layer head: linear(64)\n")
    torch.manual_seed(0)
    net = triton_dsl.load_source(src)().eval()
    x = torch.randint(0, 64, (1, 5))
    with torch.no_grad():
        e = net.embed(x)
        h = net.fc(e)
        want = net.head(e + h + net.attn(net.n1(h)))
        torch.testing.assert_close(net(x), want)
