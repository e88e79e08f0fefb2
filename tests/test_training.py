"""Training as users expect it: a validation split, best-on-validation weights, optimizer and
schedule options, resuming, the stored input normalisation at evaluation and PTQ, and outputs
that a failed step never leaves broken."""
import json
import os

import numpy as np
import pytest
import torch

from triton_dsl import checkpoint as ck
from triton_dsl.workflow import data as D
from triton_dsl.workflow import evaluate_checkpoint, ptq, train_model
from triton_dsl.workflow import train as T

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TERNARY = os.path.join(ROOT, "examples", "mnist_ternary.tdsl")
QUIET = dict(progress=False, log=lambda s: None)


@pytest.fixture(autouse=True)
def cpu_paths(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.fixture(scope="module")
def float_ckpt(tmp_path_factory):
    path = tmp_path_factory.mktemp("t") / "fp32.safetensors"
    r = train_model(TERNARY, "digits", str(path), epochs=1, fp32=True, **QUIET)
    return path, r


def test_validation_is_held_out_of_training_and_test_is_never_used(monkeypatch, tmp_path):
    ds = D.load("digits")
    assert len(ds.x_val) == int(0.1 * (len(ds.x_val) + len(ds.x_train)))
    train_rows = {tuple(r.tolist()) for r in ds.x_train.reshape(len(ds.x_train), -1)}
    assert not any(tuple(r.tolist()) in train_rows for r in ds.x_val.reshape(len(ds.x_val), -1)
                   [:50])
    seen = []
    real = D.Dataset.batches
    monkeypatch.setattr(D.Dataset, "batches",
                        lambda self, split, *a, **k: seen.append(split) or real(self, split, *a, **k))
    net = __import__("triton_dsl").load(TERNARY)()
    T.train(net, ds.fitted(net.input_shape), epochs=1, **QUIET)
    assert "val" in seen and "test" not in seen


def test_the_saved_model_is_the_best_epoch_on_validation(monkeypatch, tmp_path):
    scripted = iter([50.0, 90.0, 70.0])  # validation accuracy after epochs 1, 2, 3
    real = T.evaluate
    monkeypatch.setattr(T, "evaluate", lambda m, d, split="test", **k:
                        next(scripted) if split == "val" else real(m, d, split, **k))
    states = []
    orig_train = T.train

    def spy(*a, **k):
        k["on_epoch"] = lambda rec, m: states.append({n: v.clone()
                                                       for n, v in m.state_dict().items()})
        return orig_train(*a, **k)
    monkeypatch.setattr("triton_dsl.workflow.pipeline.train", spy)
    out = tmp_path / "best.safetensors"
    r = train_model(TERNARY, "digits", str(out), epochs=3, **QUIET)
    assert r["best_epoch"] == 2 and r["val_acc"] == 90.0
    saved, meta = ck.read(str(out))
    assert all(torch.equal(saved[k], states[1][k]) for k in saved)
    assert not torch.equal(saved["fc1.weight"], states[2]["fc1.weight"])
    assert json.loads(meta["trained"])["best_epoch"] == 2


@pytest.mark.parametrize("optimizer,schedule", [("sgd", "none"), ("adamw", "cosine")])
def test_optimizer_and_schedule_options(tmp_path, optimizer, schedule):
    r = train_model(TERNARY, "digits", str(tmp_path / "o.safetensors"), epochs=1, lr=0.01,
                    weight_decay=1e-4, optimizer=optimizer, schedule=schedule, **QUIET)
    lr = r["history"][-1]["lr"]  # at the end of the run: decayed to 0, or constant
    assert lr == 0.01 if schedule == "none" else lr < 0.001
    meta = json.loads(ck.read(str(tmp_path / "o.safetensors"))[1]["trained"])
    assert (meta["optimizer"], meta["schedule"], meta["weight_decay"]) == (optimizer, schedule,
                                                                           1e-4)


def test_bad_options_are_usage_errors(tmp_path, run_cli):
    for epochs in (0, -3):
        with pytest.raises(ValueError, match="epochs"):
            train_model(TERNARY, "digits", str(tmp_path / "x.safetensors"), epochs=epochs)
        code, _, err = run_cli("train", TERNARY, "--epochs", str(epochs), "-o",
                               str(tmp_path / "x.safetensors"))
        assert code == 2 and "--epochs" in err
    for args in (["--lr", "0"], ["--lr", "nan"], ["--weight-decay", "-1"],
                 ["--optimizer", "lion"], ["--schedule", "step"], ["--batch-size", "0"]):
        assert run_cli("train", TERNARY, *args, "-o", str(tmp_path / "x.safetensors"))[0] == 2
    assert not (tmp_path / "x.safetensors").exists()


def test_help_shows_the_defaults(capsys):
    from triton_dsl.cli import main
    assert main(["train", "--help"]) == 0
    out = capsys.readouterr().out
    for text in ("--optimizer", "(default: adam)", "(default: cosine)", "(default: 0.001)",
                 "--weight-decay", "--resume", "(default: 10)"):
        assert text in out, text


def test_resume_continues_weights_history_and_normalisation(float_ckpt, tmp_path, run_cli):
    path, first = float_ckpt
    out = tmp_path / "more.safetensors"
    code, _, err = run_cli("train", TERNARY, "--fp32", "--epochs", "1", "--quiet", "--resume",
                           str(path), "-o", str(out))
    assert code == 0, err
    _, meta = ck.read(str(out))
    assert [h["epoch"] for h in ck.history(meta)] == [1, 2]
    assert ck.normalization(meta) == ck.normalization(ck.read(str(path))[1])
    code, _, err = run_cli("train", TERNARY, "--epochs", "1", "--resume", str(path), "-o",
                           str(tmp_path / "q.safetensors"))
    assert code == 1 and "--fp32" in err and len(err.strip().splitlines()) == 1
    frozen = tmp_path / "f.safetensors"
    ptq(TERNARY, str(path), str(frozen))
    code, _, err = run_cli("train", TERNARY, "--epochs", "1", "--resume", str(frozen), "-o",
                           str(tmp_path / "r.safetensors"))
    assert code == 1 and "frozen" in err


def _shifted_digits(path):
    """digits with other statistics: brighter and of less contrast than training saw."""
    ds = D._digits(0.2)
    x = torch.cat([ds.x_train, ds.x_test]) * 0.5 + 0.4
    y = torch.cat([ds.y_train, ds.y_test])
    np.savez(path, x=x.numpy(), y=y.numpy())
    return str(path)


def test_eval_and_ptq_use_the_stored_normalisation(float_ckpt, tmp_path):
    path, _ = float_ckpt
    stored = ck.normalization(ck.read(str(path))[1])
    npz = _shifted_digits(tmp_path / "shifted.npz")
    own = D.load(npz)
    assert abs(own.mean - stored[0]) > 0.1  # the data's own statistics differ
    r = evaluate_checkpoint(str(path), npz, latency_batches=(1,))
    assert (r["normalization"]["mean"], r["normalization"]["std"]) == stored
    net = ck.load(str(path))
    want = T.evaluate(net, D.load(npz, net.input_shape, norm=stored))
    assert r["accuracy"] == round(want, 3)
    int8 = tmp_path / "int8.tdsl"
    int8.write_text(open(TERNARY).read().split("precision:")[0] +
                    "precision:\n    default int8(activations=static)\n")
    q = ptq(str(int8), str(path), str(tmp_path / "q.safetensors"), calib=npz)
    assert ck.normalization(ck.read(str(tmp_path / "q.safetensors"))[1]) == stored
    assert q["test_acc"] is not None


def test_latency_runs_under_inference_mode():
    seen = []

    class Probe(torch.nn.Module):
        def forward(self, x):
            seen.append(torch.is_inference_mode_enabled())
            return x
    T.latency(Probe(), (4,), 1, repeat=2)
    assert seen and all(seen)


def test_failed_freeze_or_ptq_leaves_no_broken_output(float_ckpt, tmp_path, monkeypatch,
                                                      run_cli):
    """The written file is rebuilt and compared first; when that fails nothing is written."""
    path, _ = float_ckpt
    out = tmp_path / "keep.safetensors"
    out.write_bytes(b"precious")

    def broken(blob, name="<bytes>", expect_model=None):
        raise ck.CheckpointError(f"{name}: would not reload")
    monkeypatch.setattr(ck, "loads", broken)
    for argv in (["train", TERNARY, "--epochs", "1", "--quiet", "--freeze", "-o", str(out)],
                 ["ptq", TERNARY, "--weights", str(path), "-o", str(out)],
                 ["freeze", str(path), "-o", str(out)]):
        code, _, err = run_cli(*argv)
        assert code == 1 and "would not reload" in err, argv
        assert out.read_bytes() == b"precious"
        assert os.listdir(tmp_path) == ["keep.safetensors"]


def test_freeze_says_larger_when_a_file_grows():
    from triton_dsl.cli.workflow_commands import ratio
    assert ratio(1000, 250) == "4.0x smaller than"
    assert ratio(1000, 1600) == "1.6x larger than"
