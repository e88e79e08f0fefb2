"""Train, PTQ, freeze, checkpoints, data loading, evaluation and reports, end to end."""
import gzip
import json
import os
import struct
import subprocess
import sys

import numpy as np
import pytest
import torch

import triton_dsl
from triton_dsl import checkpoint as ck
from triton_dsl.workflow.data import DataError, load, read_idx
from triton_dsl.lang.summary import summarize
from triton_dsl.lang.frontend import check_file
from triton_dsl.workflow.train import evaluate
from triton_dsl.workflow import (evaluate_checkpoint, freeze_checkpoint, ptq, train_model)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TERNARY = os.path.join(ROOT, "examples", "mnist_ternary.tdsl")
QUIET = dict(progress=False, log=lambda s: None)


@pytest.fixture(autouse=True)
def cpu_kernels(monkeypatch):
    """Whole networks run the CPU paths; the Triton kernels are tested under the interpreter in
    test_kernels.py and test_frozen.py, where shapes are small enough for it."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A QAT checkpoint and an fp32 checkpoint of the ternary MLP, trained briefly on digits."""
    d = tmp_path_factory.mktemp("trained")
    qat = train_model(TERNARY, "digits", str(d / "qat.safetensors"), epochs=3, **QUIET)
    f32 = train_model(TERNARY, "digits", str(d / "fp32.safetensors"), epochs=3, fp32=True, **QUIET)
    return d, qat, f32


def test_training_learns_and_is_deterministic(trained, tmp_path):
    d, qat, _ = trained
    assert qat["history"][-1]["loss"] < qat["history"][0]["loss"]
    assert qat["test_acc"] > 80  # 10 classes: chance is 10%
    again = train_model(TERNARY, "digits", str(tmp_path / "again.safetensors"), epochs=3, **QUIET)
    assert again["history"] == [dict(r, seconds=again["history"][i]["seconds"])
                                for i, r in enumerate(qat["history"])]
    a, _ = ck.read(str(d / "qat.safetensors"))
    b, _ = ck.read(str(tmp_path / "again.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_freeze_round_trip_is_small_and_equal(trained, tmp_path):
    d, qat, _ = trained
    out = tmp_path / "packed.safetensors"
    size = freeze_checkpoint(str(d / "qat.safetensors"), str(out))
    trainable = ck.load(str(d / "qat.safetensors"))
    frozen = ck.load(str(out))
    assert frozen.checkpoint_meta["kind"] == "frozen"
    ds = load("digits", frozen.input_shape)
    assert evaluate(frozen, ds) == pytest.approx(evaluate(trainable, ds), abs=0.6)
    # the packed file is what summary predicts, plus a small header (names, the source, the
    # training history and settings: a few KB whatever the model's size)
    predicted = summarize(check_file(TERNARY).models[0])["total_bytes"]
    assert predicted <= size <= predicted + 4096
    assert os.path.getsize(d / "qat.safetensors") / size > 10


def test_checkpoint_data_bytes_match_summary_for_every_example(tmp_path):
    from triton_dsl.runtime import freeze
    for name in ("mnist_ternary", "mixed_precision", "small_cnn", "resnet_ternary"):
        path = os.path.join(ROOT, "examples", name + ".tdsl")
        net = triton_dsl.load(path)()
        net.train()(torch.randn(2, *net.input_shape))
        out = tmp_path / f"{name}.safetensors"
        size = ck.save(freeze(net.eval()), str(out))
        header = struct.unpack("<Q", out.read_bytes()[:8])[0]
        predicted = summarize(check_file(path).models[0])["total_bytes"]
        # tensor bytes; batchnorm's num_batches_tracked (8 bytes each) is the only extra
        assert predicted <= size - 8 - header <= predicted * 1.01, name


def test_ptq_int8_and_calibration(trained, tmp_path):
    d, _, f32 = trained
    net = ck.load(str(d / "fp32.safetensors"))
    ds = load("digits", net.input_shape)
    base = evaluate(net, ds)
    int8 = tmp_path / "int8.tdsl"
    int8.write_text(open(TERNARY).read().split("precision:")[0] +
                    "precision:\n    default int8(activations=static)\n")
    with pytest.raises(DataError, match="static activations"):
        ptq(str(int8), str(d / "fp32.safetensors"), str(tmp_path / "x.safetensors"))
    assert not (tmp_path / "x.safetensors").exists()
    r = ptq(str(int8), str(d / "fp32.safetensors"), str(tmp_path / "q.safetensors"),
            calib="digits")
    q = ck.load(str(tmp_path / "q.safetensors"))
    assert abs(evaluate(q, ds) - base) <= 1.5
    assert r["bytes"] < os.path.getsize(d / "fp32.safetensors") / 3


def test_checkpoint_errors(trained, tmp_path):
    d, _, _ = trained
    good = (d / "qat.safetensors").read_bytes()
    (tmp_path / "trunc.safetensors").write_bytes(good[: len(good) // 2])
    with pytest.raises(ck.CheckpointError, match="truncated or corrupt"):
        ck.load(str(tmp_path / "trunc.safetensors"))
    flipped = bytearray(good)
    flipped[-10] ^= 0xFF
    (tmp_path / "flip.safetensors").write_bytes(bytes(flipped))
    with pytest.raises(ck.CheckpointError, match="SHA-256"):
        ck.load(str(tmp_path / "flip.safetensors"))
    from safetensors.torch import load_file, save_file
    t = load_file(str(d / "qat.safetensors"))
    _, meta = ck.read(str(d / "qat.safetensors"))
    save_file(t, str(tmp_path / "v99.safetensors"), dict(meta, format="triton-dsl-checkpoint/99"))
    with pytest.raises(ck.CheckpointError, match="format 'triton-dsl-checkpoint/99'"):
        ck.load(str(tmp_path / "v99.safetensors"))
    with pytest.raises(ck.CheckpointError, match="holds model 'MnistTernary', not 'Other'"):
        ck.load(str(d / "qat.safetensors"), expect_model="Other")
    mixed = os.path.join(ROOT, "examples", "mixed_precision.tdsl")
    with pytest.raises(ck.CheckpointError, match="MnistTernary"):
        ptq(mixed, str(d / "fp32.safetensors"), str(tmp_path / "m.safetensors"))
    torch.save({"fc1.weight": torch.zeros(3, 3)}, tmp_path / "sd.pt")
    with pytest.raises(ck.CheckpointError, match="shape mismatch"):
        ptq(TERNARY, str(tmp_path / "sd.pt"), str(tmp_path / "m.safetensors"))
    from triton_dsl.workflow import build, load_float_weights  # a state dict in memory too
    with pytest.raises(ck.CheckpointError, match="the state dict does not fit .* shape mismatch"):
        load_float_weights(build(TERNARY), {"fc1.weight": torch.zeros(3, 3)})
    float_net = ck.load(str(d / "fp32.safetensors"))
    net = load_float_weights(build(TERNARY), float_net.state_dict())
    assert torch.equal(net.fc1.weight, float_net.fc1.weight)


def test_failed_save_keeps_the_old_file(trained, tmp_path, monkeypatch):
    out = tmp_path / "keep.safetensors"
    out.write_bytes(b"precious")

    def boom(*a, **k):
        raise KeyboardInterrupt  # an interrupted run
    monkeypatch.setattr("triton_dsl.workflow.train.evaluate", boom)
    with pytest.raises(KeyboardInterrupt):
        train_model(TERNARY, "digits", str(out), epochs=1, **QUIET)
    assert out.read_bytes() == b"precious"


def _idx(path, magic_type, data: np.ndarray, gz=False):
    raw = bytes([0, 0, magic_type, data.ndim]) + struct.pack(f">{data.ndim}I", *data.shape)
    raw += data.astype(data.dtype.newbyteorder(">")).tobytes()
    (gzip.open if gz else open)(path, "wb").write(raw)


def test_idx_reader_and_mnist_folder(tmp_path):
    rng = np.random.default_rng(0)
    imgs = rng.integers(0, 256, (12, 28, 28), dtype=np.uint8)
    labels = rng.integers(0, 10, 12, dtype=np.uint8)
    _idx(tmp_path / "train-images-idx3-ubyte.gz", 0x08, imgs, gz=True)
    _idx(tmp_path / "train-labels-idx1-ubyte", 0x08, labels)
    _idx(tmp_path / "t10k-images-idx3-ubyte", 0x08, imgs[:4])
    _idx(tmp_path / "t10k-labels-idx1-ubyte.gz", 0x08, labels[:4], gz=True)
    assert torch.equal(read_idx(str(tmp_path / "train-images-idx3-ubyte.gz")),
                       torch.from_numpy(imgs))
    _idx(tmp_path / "ints.idx", 0x0C, np.arange(6, dtype=np.int32).reshape(2, 3))
    assert read_idx(str(tmp_path / "ints.idx")).tolist() == [[0, 1, 2], [3, 4, 5]]
    ds = load(f"mnist:{tmp_path}", (1, 28, 28))
    # a tenth of the training images is held out for validation
    assert ds.x_train.shape == (11, 1, 28, 28) and ds.x_val.shape == (1, 1, 28, 28)
    assert ds.y_test.tolist() == labels[:4].tolist()
    raw = (tmp_path / "t10k-images-idx3-ubyte").read_bytes()
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(raw[:-5])
    with pytest.raises(DataError, match="truncated or corrupt"):
        load(f"mnist:{tmp_path}")
    (tmp_path / "t10k-images-idx3-ubyte").write_bytes(b"\x01\x02garbage")
    with pytest.raises(DataError, match="bad magic"):
        load(f"mnist:{tmp_path}")
    os.remove(tmp_path / "t10k-images-idx3-ubyte")
    with pytest.raises(DataError, match="no t10k-images-idx3-ubyte"):
        load(f"mnist:{tmp_path}")


def test_tensor_files(tmp_path):
    x, y = torch.rand(50, 8, 8), torch.randint(0, 10, (50,))
    torch.save({"x": x, "y": y}, tmp_path / "d.pt")
    np.savez(tmp_path / "d.npz", x=x.numpy(), y=y.numpy(), x_test=x[:5].numpy(),
             y_test=y[:5].numpy())
    assert len(load(str(tmp_path / "d.pt")).x_test) == 10
    assert load(str(tmp_path / "d.npz"), (64,)).x_test.shape == (5, 64)
    torch.save({"a": x}, tmp_path / "bad.pt")
    with pytest.raises(DataError, match="x and y"):
        load(str(tmp_path / "bad.pt"))
    with pytest.raises(DataError, match="unknown data set"):
        load("imagenet")
    with pytest.raises(DataError, match="do not fit"):
        load("digits", (3, 32, 32))


def test_cli_end_to_end(tmp_path, run_cli):
    qat = str(tmp_path / "qat.safetensors")
    code, out, err = run_cli("train", TERNARY, "--epochs", "2", "--quiet", "-o", qat)
    assert code == 0, err
    assert "epoch   2/2" in err and "test accuracy" in out
    packed = str(tmp_path / "packed.safetensors")
    assert run_cli("freeze", qat, "-o", packed)[0] == 0
    code, out, _ = run_cli("eval", packed, "--json")
    r = json.loads(out)
    assert code == 0 and r["kind"] == "frozen" and r["accuracy"] > 50
    code, out, _ = run_cli("report", qat, "-o", str(tmp_path / "rep"))
    assert code == 0
    names = set(os.listdir(tmp_path / "rep"))
    assert {"report.md", "weights.png", "errors.png", "ternary.png", "training.png"} <= names
    # bad input: clean message, exit 1, nothing written
    code, _, err = run_cli("eval", str(tmp_path / "nope.safetensors"))
    assert code == 1 and "no such file" in err and "Traceback" not in err
    code, _, err = run_cli("train", TERNARY, "--data", "mnist:/nowhere", "-o",
                           str(tmp_path / "z.safetensors"))
    assert code == 1 and "not a directory" in err
    assert not (tmp_path / "z.safetensors").exists()
    code, _, err = run_cli("freeze", packed, "-o", str(tmp_path / "p2.safetensors"))
    assert code == 1 and "already frozen" in err


def test_evaluate_checkpoint_reports_size_and_latency(trained):
    d, _, _ = trained
    r = evaluate_checkpoint(str(d / "qat.safetensors"))
    assert r["bytes"] == os.path.getsize(d / "qat.safetensors")
    assert set(r["latency_ms"]) == {"1", "64"} and all(v > 0 for v in r["latency_ms"].values())


@pytest.mark.slow
def test_ddp_two_processes_stay_identical(tmp_path):
    out = tmp_path / "ddp.json"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                        "--nproc_per_node", "2", os.path.join(ROOT, "tests", "ddp_worker.py"),
                        str(out)], cwd=ROOT, env=env, capture_output=True, text=True,
                       timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["world"] == 2 and res["identical"]
    assert res["losses"][-1] < res["losses"][0]


@pytest.mark.parametrize("args,said", [
    (("--device", "cuda", "--M", "1", "--NK", "64"), "--device cuda: this torch sees no CUDA"),
    (("--cold", "--device", "cpu", "--model", "examples/small_cnn.tdsl"), "--cold is for the CPU"),
    (("--methods", "fp32", "--device", "cpu", "--M", "1", "--NK", "64"),
     "unknown method(s) on cpu: fp32; available: torch_fp32"),
])
def test_bench_refuses_what_it_cannot_do_in_one_line(run_cli, monkeypatch, args, said):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    from triton_dsl.workflow import read_rate
    monkeypatch.setattr(read_rate, "stream_read_gbs",
                        lambda *a, **k: pytest.fail("measured first"))
    code, _, err = run_cli("bench", *args)
    assert code == 2 and said in err and "Traceback" not in err  # a usage error


def test_llc_bytes_reads_what_sysfs_says_and_skips_the_rest(tmp_path):
    from triton_dsl.workflow import read_rate
    for i, size in enumerate(["48K", "2048K", "300M", "", "1.5M", "12KiB", "64"]):
        (tmp_path / f"index{i}").mkdir()
        (tmp_path / f"index{i}" / "size").write_text(size + "\n")
    (tmp_path / "index9").mkdir()  # no size file
    assert read_rate.llc_bytes(str(tmp_path)) == 300 << 20
    assert read_rate.llc_bytes(str(tmp_path / "none")) == 512 << 20


def test_bench_cold_evicts_before_every_timed_call(tmp_path, run_cli, monkeypatch):
    """--cold: a read of twice the last-level cache before each timed call, said in the output
    and in the records."""
    import json
    from triton_dsl.workflow import read_rate
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    reads = []
    plain = read_rate.evictor
    monkeypatch.setattr(read_rate, "evictor", lambda: (lambda f: lambda: reads.append(1) or f())(
        plain()))
    monkeypatch.setattr(read_rate, "llc_bytes", lambda: 8 << 20)  # a small buffer for the test
    out_json = tmp_path / "c.json"
    code, out, err = run_cli("bench", "--M", "1", "--NK", "64", "--repeat", "3", "--methods",
                             "ternary", "--cold", "--json", str(out_json))
    assert code == 0, err
    assert "--cold: 64 MiB read before every timed call (last-level cache 8 MiB)" in out
    recs = json.loads(out_json.read_text())["records"]
    assert all(r["cold"] for r in recs) and len(reads) == 3 * 2  # rounds x (fp32, ternary)


def test_bench_cli_table_and_json(tmp_path, run_cli, monkeypatch):
    """`triton-dsl bench` on the CPU: every method, the baseline in the same run, records with
    the fields the issue names, and weight bytes that match each storage format."""
    import json
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # the CPU paths, not the interpreter
    out_json = tmp_path / "b.json"
    code, out, err = run_cli("bench", "--M", "1", "3", "--NK", "256", "--repeat", "2",
                             "--json", str(out_json))
    assert code == 0, err
    recs = json.loads(out_json.read_text())["records"]
    methods = {r["method"] for r in recs}
    assert {"torch_fp32", "torch_dynamic_int8", "ternary", "ternary_a8", "int8_weight_only",
            "int8_w8a8", "int4_weight_only_g128"} <= methods
    for r in recs:
        assert {"method", "M", "N", "K", "device", "median_ms", "weight_bytes"} <= set(r)
        assert r["median_ms"] > 0 and r["baseline"] == "torch_fp32"
        assert r["method"] in out
    nbytes = {r["method"]: r["weight_bytes"] for r in recs}
    assert nbytes["torch_fp32"] == 256 * 256 * 4
    assert 256 * 256 // 4 <= nbytes["ternary"] <= 256 * 256 // 4 + 256 * 4 * 2  # 2 bits + scales
    assert 256 * 256 <= nbytes["int8_w8a8"] <= 256 * 256 + 256 * 4 * 2


@pytest.mark.parametrize("argv, says", [
    (("--repeat", "1"), "--repeat: must be at least 2, got 1"),
    (("--repeat", "-5"), "--repeat: must be at least 2, got -5"),
    (("--M", "0"), "--M: must be at least 1, got 0"),
    (("--NK", "1000000000"), "--NK: must be at most 32,768, got 1,000,000,000"),
    (("--NK", "1e9"), "--NK: '1e9' is not a whole number"),
    (("--model", "x.tdsl", "--batch", "0"), "--batch: must be at least 1, got 0"),
    (("--model", "x.tdsl", "--batch", "99999999"), "--batch: must be at most 4,096"),
    (("--model", "x.tdsl", "--decode", "--new-tokens", "1"), "--new-tokens: must be at least 2"),
    (("--model", "x.tdsl", "--decode", "--prompt-len", "16", "-3"),
     "--prompt-len: must be at least 1, got -3"),
    (("--model", "x.tdsl", "--decode", "--kv-cache", "int4"), "--kv-cache: invalid choice"),
])
def test_bench_numbers_out_of_range_are_usage_errors(run_cli, argv, says):
    """Before anything is built or allocated: a size that would exhaust memory, a repeat count
    that leaves no spread, a negative length."""
    code, out, err = run_cli("bench", "--device", "cpu", *argv)
    assert code == 2 and says in err and "Traceback" not in err
    assert out == ""


def test_bench_headers_apart_and_spread_reported(monkeypatch):
    """Every column title stands apart; each median comes with its IQR; a speedup whose IQR
    overlaps the baseline's is flagged and warned about."""
    from triton_dsl.workflow import bench
    titles = [t for t, _ in bench.COLUMNS]
    for a, b in zip(titles, titles[1:]):
        assert f"{a} " in bench.HEADER and f" {b}" in bench.HEADER
        assert bench.HEADER.index(a) + len(a) < bench.HEADER.index(b)
    spreads = {"torch_fp32": (1.0, 0.9, 1.2), "ternary": (0.5, 0.45, 0.55),
               "int8_w8a8": (0.95, 0.8, 1.1)}  # ternary clearly faster; int8 within noise
    monkeypatch.setattr(bench, "_time_cpu_interleaved",
                        lambda fns, x, repeat, evict=None: {n: (spreads[n], None) for n in fns})
    lines = []
    recs = bench.run([1], [64], "cpu", 3, ["ternary", "int8_w8a8"], log=lines.append)
    by = {r["method"]: r for r in recs}
    assert by["ternary"]["iqr_ms"] == 0.1 and not by["ternary"]["noisy"]
    assert by["int8_w8a8"]["noisy"] and by["int8_w8a8"]["iqr_ms"] == 0.3
    assert {"median_ms", "speedup", "baseline_ms", "gbs"} <= set(by["ternary"])  # kept
    warnings = [l for l in lines if l.startswith("warning:")]
    assert len(warnings) == 1 and "int8_w8a8" in warnings[0] and "within noise" in warnings[0]
    row = next(l for l in lines if l.startswith("int8_w8a8"))
    assert "0.300" in row and "noisy" in row


def test_demo_trains_freezes_and_measures(tmp_path, capsys, monkeypatch):
    """scripts/demo.sh's main job: compile, train, freeze, then accuracy, size and speed
    against fp32 at batch 1 and 64, all measured, and no warning about the example itself."""
    import importlib.util
    spec = importlib.util.spec_from_file_location("run_example", os.path.join(ROOT, "examples",
                                                                               "run_example.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert mod.main([TERNARY, "--epochs", "1", "--out", str(tmp_path), "--nk", "256"]) == 0
    out, err = capsys.readouterr()
    for text in ("1. compiled", "2. trained 1 epoch on digits (seed 0)", "test accuracy",
                 "x smaller than the fp32 checkpoint", "batch  1: fp32", "batch 64: fp32",
                 "frozen", "ternary_a8"):
        assert text in out, text
    assert "warning" not in (out + err).lower()
    assert {"mnist_ternary.py", "qat.safetensors", "packed.safetensors"} <= set(os.listdir(tmp_path))
