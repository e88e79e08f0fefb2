"""Language models through the workflow (issue 11): text data split by position, training a few
steps, freezing, reloading, bits per byte, and seeded generation, from Python and the CLI."""
import os

import pytest
import torch

import triton_dsl
from triton_dsl import workflow
from triton_dsl.workflow import checkpoint as ck
from triton_dsl.workflow.data import DataError
from triton_dsl.workflow.text_data import STDLIB_FILES, bits_per_byte, load_text

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = """
block Block(hidden):
    residual:
        layer attn_norm: rmsnorm
        layer attn: attention(heads=2, sub_norm=true)
    residual:
        layer mlp_norm: rmsnorm
        layer mlp: mlp(hidden, gate=true, sub_norm=true)

model Tiny:
    input tokens(vocab=256, max_len=32)
    layer embed: embedding(32)
    layer blocks: Block(64) * 1
    layer norm: rmsnorm
    layer head: linear(256, bias=false)

precision:
    layer blocks.*.attn.*: ternary(threshold=absmean, scale=absmean, activations=dynamic)
    layer blocks.*.mlp.*: ternary(threshold=absmean, scale=absmean, activations=dynamic)
"""
TEXT = "text:" + os.path.join(ROOT, "docs", "language.md")  # real text, about 20 KB


@pytest.fixture
def tiny(tmp_path, monkeypatch):
    # whole networks on the CPU paths (the native kernels); the Triton kernels' own tests run
    # them under the interpreter, which would take minutes for every byte decoded here
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    path = tmp_path / "tiny.tdsl"
    path.write_text(TINY)
    return str(path)


def test_text_is_split_by_position(tmp_path):
    (tmp_path / "a.txt").write_bytes(bytes(range(1, 101)))
    (tmp_path / "b.bin").write_bytes(b"\0binary")  # skipped
    d = load_text(f"text:{tmp_path}", seq_len=4)
    assert d.train.tolist() == list(range(1, 81)) and d.val.tolist() == list(range(81, 91))
    assert d.test.tolist() == list(range(91, 101))
    x, y = next(d.batches("train", 3))
    assert x.shape == (3, 4) and torch.equal(x[:, 1:], y[:, :-1]) and x[1, 0] == 5


def test_default_corpus_is_the_interpreters_stdlib():
    d = load_text("stdlib", seq_len=64)
    assert "Python" in d.name and len(d.train) > 400_000 and len(STDLIB_FILES) == 10
    again = load_text("stdlib", seq_len=64)
    assert torch.equal(d.test, again.test)  # read deterministically


@pytest.mark.parametrize("spec,match", [("text:/no/such/file", "no such file"),
                                        ("stdlib", "is text, but model")])
def test_bad_text_data(tmp_path, spec, match):
    if spec == "stdlib":  # a classifier given text
        path = tmp_path / "m.tdsl"
        path.write_text("model M:\n    input [4]\n    layer fc: linear(2)\n")
        with pytest.raises(DataError, match=match):
            workflow.train_model(str(path), spec, str(tmp_path / "o.safetensors"), epochs=1)
    else:
        with pytest.raises(DataError, match=match):
            load_text(spec, 8)


@pytest.mark.slow
def test_train_freeze_reload_evaluate_generate(tiny, tmp_path):
    torch.set_num_threads(1)
    qat = str(tmp_path / "qat.safetensors")
    r = workflow.train_model(tiny, TEXT, qat, epochs=2, steps=3, batch_size=8, lr=3e-3,
                             progress=False, log=lambda s: None)
    assert r["val_bpb"] < 8.5 and r["test_bpb"] > 0 and len(r["history"]) == 2
    packed = str(tmp_path / "packed.safetensors")
    workflow.freeze_checkpoint(qat, packed)
    assert os.path.getsize(packed) < os.path.getsize(qat)
    net = ck.load(packed)
    assert net.checkpoint_meta["kind"] == "frozen"
    ds = workflow.pipeline.load_data(TEXT, net)
    trained = ck.load(qat)
    assert abs(bits_per_byte(net, ds, "val") - bits_per_byte(trained, ds, "val")) < 0.01
    e = workflow.evaluate_checkpoint(packed, TEXT)
    assert e["kind"] == "frozen" and e["test_bpb"] > 0 and e["decode_ms_per_token"] > 0
    a = workflow.generate(packed, "The ", max_new_tokens=20, seed=3, top_k=20)
    b = workflow.generate(net, "The ", max_new_tokens=20, seed=3, top_k=20)
    assert a == b and len(a.encode("utf-8", errors="surrogateescape")) >= 1
    with pytest.raises(ValueError, match="temperature must be a number >= 0"):
        workflow.generate(net, "x", temperature=-1)
    greedy = workflow.generate(net, "", max_new_tokens=8, temperature=0)
    assert greedy == workflow.generate(net, "", max_new_tokens=8, temperature=0, seed=9)


@pytest.mark.slow
def test_ptq_of_a_language_model_calibrates_on_text(tiny, tmp_path):
    torch.set_num_threads(1)
    fp32 = str(tmp_path / "f.safetensors")
    workflow.train_model(tiny, TEXT, fp32, epochs=1, steps=2, batch_size=4, fp32=True,
                         progress=False, log=lambda s: None)
    int8 = tmp_path / "int8.tdsl"
    int8.write_text(TINY[:TINY.index("precision:")] + "precision:\n    default int8("
                    "activations=static)\n")
    r = workflow.ptq(str(int8), fp32, str(tmp_path / "p.safetensors"), calib=TEXT,
                     calib_batches=2)
    assert r["test_bpb"] > 0
    assert ck.load(str(tmp_path / "p.safetensors")).checkpoint_meta["kind"] == "frozen"


@pytest.mark.slow
def test_cli_trains_freezes_evaluates_and_generates(tiny, tmp_path, run_cli):
    torch.set_num_threads(1)
    qat, packed = str(tmp_path / "q.safetensors"), str(tmp_path / "p.safetensors")
    rc, out, err = run_cli("train", tiny, "--data", TEXT, "--epochs", "1", "--steps", "2",
                           "--batch-size", "4", "--quiet", "-o", qat)
    assert rc == 0 and "bits/byte" in out, err
    assert run_cli("freeze", qat, "-o", packed)[0] == 0
    rc, out, err = run_cli("eval", packed, "--data", TEXT)
    assert rc == 0 and "bits/byte on the test split" in out, err
    rc, out, err = run_cli("report", qat, "-o", str(tmp_path / "report"))
    assert rc == 0 and "bits per byte" in (tmp_path / "report" / "report.md").read_text(), err
    rc, out, err = run_cli("generate", packed, "--prompt", "def ", "--max-new-tokens", "12",
                           "--seed", "1")
    assert rc == 0 and out.endswith("\n"), err
    assert run_cli("generate", packed, "--prompt", "def ", "--max-new-tokens", "12",
                   "--seed", "1")[1] == out
    rc, out, err = run_cli("generate", packed, "--max-new-tokens", "70", "--top-k", "5")
    assert rc == 0 and len(out) >= 20, err  # past max_len=32: the context slides
    rc, _, err = run_cli("generate", str(tmp_path / "missing.safetensors"))
    assert rc == 1 and "no such file" in err


@pytest.mark.slow
def test_ddp_trains_a_language_model(tiny, tmp_path):
    import subprocess
    import sys
    out = tmp_path / "ddp.safetensors"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node", "2", "-m", "triton_dsl", "train", tiny, "--data",
                        TEXT, "--epochs", "1", "--steps", "2", "--batch-size", "4", "--quiet",
                        "-o", str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "bits/byte" in r.stdout and ck.load(str(out)).checkpoint_meta["kind"] == "trainable"


@pytest.mark.slow
def test_bench_decode_times_three_ways(tiny, tmp_path, run_cli, monkeypatch):
    import json
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the CPU kernels it times
    out = tmp_path / "decode.json"
    rc, text, err = run_cli("bench", "--model", tiny, "--decode", "--device", "cpu",
                            "--prompt-len", "8", "4", "--new-tokens", "6", "--kv-cache", "bf16",
                            "--json", str(out))
    assert rc == 0, err
    recs = json.loads(out.read_text())["records"]
    assert [(r["prompt_len"], r["method"]) for r in recs] == [
        (p, m) for p in (4, 8) for m in ("fp32", "frozen", "torch-dynamic-int8")]
    assert all(r["tokens_per_s"] > 0 and 0 < r["of_stream"] and r["kv_cache"] == "bf16"
               for r in recs)
    assert [r["ctx_ratio"] for r in recs[:3]] == [1.0, 1.0, 1.0]
    kernel = [r for r in recs if "kernel_ms_per_token" in r]  # frozen only: native calls timed
    assert [r["method"] for r in kernel] == ["frozen", "frozen"]
    assert all(0 < r["kernel_ms_per_token"] < r["ms_per_token"] for r in kernel)
    assert "inside the native linear kernels" in text
    assert all(r["prefill_ms"] > 0 and r["prefill_tokens_per_s"] > 0 for r in recs)
    assert [r["prefill_vs_fp32"] for r in recs if r["method"] == "fp32"] == [1.0, 1.0]
    assert "prefill, one forward over the prompt" in text
    assert recs[1]["linear_weight_bytes"] < recs[0]["linear_weight_bytes"]  # fp32 head kept
    rc, _, err = run_cli("bench", "--decode", "--device", "cpu")
    assert rc == 2 and "--decode needs --model" in err
    rc, _, err = run_cli("bench", "--model", tiny, "--decode", "--device", "cpu",
                         "--prompt-len", "4", "30", "--new-tokens", "6")
    assert rc == 2 and "exceed the model's max_len 32" in err
    rc, _, err = run_cli("bench", "--model", tiny, "--decode", "--device", "cpu",
                         "--prompt-len", "0")
    assert rc == 2 and "--prompt-len: must be at least 1" in err
    rc, _, err = run_cli("bench", "--model", tiny, "--decode", "--device", "cpu",
                         "--prompt-len", *map(str, range(1, 10)))
    assert rc == 2 and "--prompt-len takes at most 8 lengths, got 9" in err
    rc, out, err = run_cli("bench", "--model", tiny, "--device", "cpu")  # no --decode
    assert rc == 2 and "language model" in err and "--decode" in err and "Traceback" not in err


def test_a_language_model_given_images_is_told_so(tmp_path):
    """An LM given digits: the message says it needs text, not a shape mismatch with [128]."""
    from triton_dsl.workflow.pipeline import load_data
    net = triton_dsl.load_source("model L:\n    input tokens(vocab=256, max_len=16)\n"
                                 "    layer e: embedding(8)\n    layer h: linear(256)\n")()
    with pytest.raises(DataError, match="digits is not text, but model 'L' is a language model"):
        load_data("digits", net)
