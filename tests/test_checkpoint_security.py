"""Crafted and corrupted checkpoints: every one is refused with one line naming the problem, or
loads to a model that computes exactly what the original does. Nothing is allocated for a
declared model the file does not hold, and nothing in a file runs as code."""
import json
import resource
import struct
import time

import pytest
import torch
from safetensors.torch import save as st_save

import triton_dsl
from triton_dsl import checkpoint as ck
from triton_dsl.runtime import freeze
from triton_dsl.workflow.checkpoint_format import digest

# every stored form: 1-bit binary, ternary at 2 bits, 4-bit codes, int8 codes, a float bias;
# K = 13, 11 and 7 leave padding bits in the 1-bit, 4-bit and 2-bit rows
TINY = """model Tiny:
    input [13]
    layer a: linear(11)
    relu
    layer b: linear(7)
    relu
    layer c: linear(6)
    relu
    layer d: linear(4)

precision:
    layer a: binary
    layer b: int(bits=4)
    layer c: ternary
    layer d: int8
"""


@pytest.fixture(autouse=True)
def cpu_paths(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)


@pytest.fixture(scope="module")
def frozen_file(tmp_path_factory):
    torch.manual_seed(0)
    net = triton_dsl.load_source(TINY, "tiny.tdsl")()
    net.train()(torch.randn(4, 13))
    freeze(net.eval())
    path = tmp_path_factory.mktemp("ck") / "tiny.safetensors"
    ck.save(net, str(path), history=[{"epoch": 1, "loss": 1.0, "val_acc": 50.0}],
            data={"name": "digits", "mean": 0.3, "std": 0.4}, extra={"trained": {"epochs": 1}})
    return path


X = torch.randn(5, 13, generator=torch.Generator().manual_seed(1))


def _outputs(model):
    with torch.inference_mode():
        return model(X)


def _parts(path):
    raw = open(path, "rb").read()
    tensors, meta = ck.read(str(path))
    return raw, tensors, meta


def craft(path, tensors, meta, rehash=True):
    """A file an attacker writes: any tensors and metadata, with a correct SHA-256."""
    meta = dict(meta)
    if rehash:
        meta["sha256"] = digest(meta, tensors)
    with open(path, "wb") as f:
        f.write(st_save(tensors, metadata=meta))
    return str(path)


def refused(path, match=None):
    with pytest.raises(ck.CheckpointError) as e:
        ck.load(str(path))
    msg = str(e.value)
    assert "\n" not in msg and len(msg) < 400, msg
    if match:
        assert match in msg, msg
    return msg


def test_the_tiny_file_round_trips(frozen_file):
    net = ck.load(str(frozen_file))
    assert ck.load(str(frozen_file)).checkpoint_meta["kind"] == "frozen"
    assert torch.equal(_outputs(net), _outputs(ck.load(str(frozen_file))))
    enc = json.loads(net.checkpoint_meta["encodings"])
    assert {"a.packed", "b.codes"} <= set(enc)  # the narrow encodings are exercised


def test_every_flipped_header_byte_is_refused_or_harmless(frozen_file, tmp_path):
    raw = frozen_file.read_bytes()
    want = _outputs(ck.load(str(frozen_file)))
    end = 8 + struct.unpack("<Q", raw[:8])[0]
    t0, loaded = time.perf_counter(), 0
    out = tmp_path / "f.safetensors"
    for i in range(end):
        for mask in (0x01, 0xFF):
            b = bytearray(raw)
            b[i] ^= mask
            out.write_bytes(bytes(b))
            try:
                net = ck.load(str(out))
            except ck.CheckpointError as e:
                assert "\n" not in str(e), (i, mask, str(e))
                continue
            loaded += 1
            assert torch.equal(_outputs(net), want), (i, mask)
    assert time.perf_counter() - t0 < 30
    assert loaded < end // 10  # almost every flip is caught by the parser or the hash


def test_metadata_is_covered_by_the_hash(frozen_file, tmp_path):
    """The issue's case: one encoding offset changed, the old hash kept."""
    _, tensors, meta = _parts(frozen_file)
    enc = json.loads(meta["encodings"])
    enc["b.codes"]["offset"] += 1
    p = craft(tmp_path / "e.safetensors", tensors, dict(meta, encodings=json.dumps(enc)),
              rehash=False)
    refused(p, "SHA-256")
    for field, value in (("model", "Tinz"), ("kind", "trainable"), ("fp32", "true"),
                         ("data", json.dumps({"name": "digits", "mean": 9.0, "std": 1.0}))):
        p = craft(tmp_path / f"{field}.safetensors", tensors, dict(meta, **{field: value}),
                  rehash=False)
        refused(p, "SHA-256")


def test_crafted_metadata_with_a_valid_hash_is_refused(frozen_file, tmp_path):
    _, tensors, meta = _parts(frozen_file)
    enc = json.loads(meta["encodings"])
    enc["b.codes"]["offset"] += 1
    cases = {
        "encodings": json.dumps(enc),
        "model": "os.system('x')",
        "kind": "packed",
        "fp32": "yes",
        "data": json.dumps({"name": "digits", "mean": 0.0, "std": 0.0}),
        "history": "[{\"epoch\": NaN}]",
        "trained": "{not json",
        "triton_dsl_version": "1\n2",
    }
    for field, value in cases.items():
        p = craft(tmp_path / f"{field}.safetensors", tensors, dict(meta, **{field: value}))
        assert field in refused(p), field
    for entry in (5, [1, 2], "binary", None):  # an encoding that is not even an object
        p = craft(tmp_path / "e.safetensors", tensors,
                  dict(meta, encodings=json.dumps({"b.codes": entry})))
        assert "'encodings'" in refused(p)
    p = craft(tmp_path / "h.safetensors", tensors, dict(meta, history='[{"loss": 1.0}]'))
    assert "history" in refused(p)  # the plots need an epoch
    refused(craft(tmp_path / "k.safetensors", tensors, dict(meta, kind="trainable")), "tensor")
    refused(craft(tmp_path / "m.safetensors", tensors, {k: v for k, v in meta.items()
                                                         if k != "model"}), "'model'")
    refused(craft(tmp_path / "s.safetensors", tensors,
                  dict(meta, tdsl_source="model Tiny:\n    input [16]\n    layer a: lineer(1)\n")),
            "does not compile")
    refused(craft(tmp_path / "v1.safetensors", tensors,
                  dict(meta, format="triton-dsl-checkpoint/1")), "re-create it")


def test_invalid_codes_and_tensors_are_refused(frozen_file, tmp_path):
    _, tensors, meta = _parts(frozen_file)

    def with_(**changes):
        t = dict(tensors)
        for k, v in changes.items():
            if v is None:
                t.pop(k.replace("__", "."))
            else:
                t[k.replace("__", ".")] = v
        return craft(tmp_path / "t.safetensors", t, meta)
    packed = tensors["c.packed"].clone()
    packed[0, 0] |= 0x03  # the unused 2-bit code 3
    refused(with_(c__packed=packed), "code 3")
    codes = tensors["d.codes"].clone()
    codes[0, 0] = -128
    refused(with_(d__codes=codes), "-128")
    refused(with_(d__codes=tensors["d.codes"].float()), "'d.codes' is float32, expected int8")
    refused(with_(d__scale=tensors["d.scale"][:2]), "'d.scale' has shape [2]")
    refused(with_(d__bias=None), "'d.bias' is missing")
    refused(with_(e__weight=torch.zeros(2)), "unexpected tensor 'e.weight'")
    a = tensors["a.packed"].clone()
    a[0, -1] |= 0x80  # 13 signs in 2 bytes: the top 3 bits are padding
    refused(with_(a__packed=a), "padding")
    b = tensors["b.codes"].clone()
    b[0, -1] |= 0x80  # 11 codes of 4 bits in 6 bytes: the top nibble is padding
    refused(with_(b__codes=b), "padding")
    c = tensors["c.packed"].clone()
    c[0, 1] &= 0x3F  # slot 7 of 8 (plane 3 of byte 1) pads K = 7: weight -1 instead of 0
    refused(with_(c__packed=c), "padding")


def test_truncated_garbage_and_huge_headers(frozen_file, tmp_path):
    raw = frozen_file.read_bytes()
    p = tmp_path / "x.safetensors"
    cases = {"truncated": raw[: len(raw) // 2], "empty": b"", "short": raw[:5],
             "huge header": struct.pack("<Q", 2 ** 62) + raw[8:],
             "non-UTF-8": raw[:8] + b"\xff\xfe" + raw[10:],
             "not an object": struct.pack("<Q", 2) + b"[]",
             "no metadata": struct.pack("<Q", 2) + b"{}"}
    for name, blob in cases.items():
        p.write_bytes(blob)
        refused(p)


def test_a_huge_declared_layer_is_refused_without_allocating(frozen_file, tmp_path):
    """A file of a few KB whose source declares a 100000 x 100000 layer (40 GB in fp32)."""
    _, tensors, meta = _parts(frozen_file)
    huge = ("model Tiny:\n    input [100000]\n    layer a: linear(100000)\n"
            "precision:\n    default ternary\n")
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    for kind in ("frozen", "trainable"):
        p = craft(tmp_path / f"{kind}.safetensors", tensors,
                  dict(meta, tdsl_source=huge, kind=kind, encodings="{}"))
        t0 = time.perf_counter()
        refused(p)
        assert time.perf_counter() - t0 < 1.0
    grew_kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grew_kb < 200_000  # far below the 40 GB declared


def test_the_file_name_is_data_only(frozen_file, tmp_path, monkeypatch):
    """A checkpoint's own name never reaches generated code, whatever characters it holds."""
    monkeypatch.chdir(tmp_path)
    marker = tmp_path / "MARKER"
    evil = "x\n__import__('pathlib').Path('MARKER').touch()\n#'\"\"\"\\é.safetensors"
    p = tmp_path / evil
    p.write_bytes(frozen_file.read_bytes())
    net = ck.load(str(p))
    assert torch.equal(_outputs(net), _outputs(ck.load(str(frozen_file))))
    assert not marker.exists()


def test_cli_gives_one_line_and_exit_1(frozen_file, tmp_path, run_cli):
    _, tensors, meta = _parts(frozen_file)
    p = craft(tmp_path / "bad.safetensors", tensors, dict(meta, kind="packed"))
    code, out, err = run_cli("eval", p)
    assert code == 1 and len(err.strip().splitlines()) == 1 and "'kind'" in err
    assert "Traceback" not in err


def test_missing_files_and_folders_are_one_line_errors(frozen_file, tmp_path, run_cli):
    """freeze of a file that is not there; bench writing into a folder that is not there, said
    before any timing rather than after it."""
    code, out, err = run_cli("freeze", str(tmp_path / "nothing.safetensors"), "-o",
                             str(tmp_path / "f.safetensors"))
    assert code == 1 and "nothing.safetensors" in err and "Traceback" not in err
    code, out, err = run_cli("bench", "--device", "cpu", "--M", "1", "--NK", "64", "--repeat",
                             "2", "--json", str(tmp_path / "no" / "such" / "b.json"))
    assert code == 2 and "does not exist" in err and out == ""  # a bad argument: usage


def test_a_text_file_is_named_as_such(tmp_path):
    """eval on a .tdsl (or any text) file: say what it is, not 'header length ... corrupt'."""
    from triton_dsl.workflow import checkpoint as ck
    src = tmp_path / "model.tdsl"
    src.write_text("model M:\n    input [4]\n    layer fc: linear(2)\n")
    with pytest.raises(ck.CheckpointError, match="a text file, not a safetensors checkpoint"):
        ck.load(str(src))
