"""Checkpoints: safetensors files that rebuild their model without the .tdsl file.

Metadata: the format, the triton-dsl version, the .tdsl source and model name, the kind
("trainable": latent float weights for more training; "frozen": the packed deploy form), the
encodings of narrow tensors, the data normalisation, the training history and a SHA-256 over
all of the metadata and the tensors (checkpoint_format.py).

A frozen checkpoint stores exactly what `triton-dsl summary` counts: ternary weights at 2 bits
(the kernels' packing), binary at 1 bit, integer codes at their bit width (a bit stream per row),
scales, biases and norms. Writes are atomic: a failed save leaves any existing file untouched.
Loading checks the header, the metadata, the hash, the declared sizes (on the meta device, before
allocating) and every stored code; each failure is one line naming the field.
"""
from __future__ import annotations

import json

import torch

from ..version import __version__
from ..files import write_atomic
from . import checkpoint_codes as C
from .checkpoint_format import FORMAT, CheckpointError, digest
from .checkpoint_format import parse as _parse
from .checkpoint_format import read_file as _read_file

__all__ = ["FORMAT", "CheckpointError", "save", "dumps", "read", "load", "loads", "history",
           "normalization", "is_frozen", "save_quantized", "load_quantized"]


def is_frozen(model) -> bool:
    from ..runtime.frozen import FrozenConv2d, FrozenLinear
    return any(isinstance(m, (FrozenLinear, FrozenConv2d)) for m in model.modules())


def dumps(model, history=None, data=None, extra: dict | None = None) -> bytes:
    """The checkpoint of ``model`` (a generated model, trainable or frozen) as bytes."""
    from safetensors.torch import save as st_save
    if not hasattr(model, "tdsl_source"):
        raise TypeError("save() takes a model compiled by triton-dsl (it carries its .tdsl source)")
    encodings = C.encodings(model)
    tensors = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu()
        tensors[k] = (C.encode(v, encodings[k]) if k in encodings else v).contiguous()
    meta = {"format": FORMAT, "triton_dsl_version": __version__,
            "model": model.tdsl_model, "tdsl_source": model.tdsl_source,
            "kind": "frozen" if is_frozen(model) else "trainable",
            "fp32": "true" if model.tdsl_fp32 else "false",
            "encodings": json.dumps(encodings, sort_keys=True)}
    if history is not None:
        meta["history"] = json.dumps(history)
    if data is not None:  # a Dataset, or its {"name", "mean", "std"} from another checkpoint
        if not isinstance(data, dict):
            data = {"name": data.name, "mean": data.mean, "std": data.std}
        meta["data"] = json.dumps(data)
    for k, v in (extra or {}).items():
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    meta["sha256"] = digest(meta, tensors)
    return st_save(tensors, metadata=meta)


def save(model, path: str, history=None, data=None, extra: dict | None = None,
         verify: bool = False) -> int:
    """Write ``model`` to ``path`` atomically; returns its size. verify=True first rebuilds the
    model from the bytes and compares outputs, so a file that would not load is never written."""
    blob = dumps(model, history, data, extra)
    if verify:
        _verify(model, blob, path)
    write_atomic(path, blob)
    return len(blob)


def _verify(model, blob: bytes, path: str):
    try:
        again = loads(blob, path)
    except CheckpointError as e:
        why = str(e).removeprefix(f"{path}: ")
        raise CheckpointError(f"{path}: not written: the model would not reload from it "
                              f"({why})") from None
    x = model.example_input(2, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        a, b = model.eval()(x), again(x)
    if a.shape != b.shape or not torch.allclose(a, b, rtol=1e-4, atol=1e-5, equal_nan=True):
        raise CheckpointError(f"{path}: not written: the model rebuilt from it computes "
                              "different outputs")


def read(path: str) -> tuple[dict, dict]:
    """(tensors as stored, metadata), verified; raises CheckpointError with the reason."""
    tensors, meta, _, _ = _parse(_read_file(path), path)
    return tensors, meta


def load(path: str, expect_model: str | None = None):
    """Rebuild the model stored in ``path`` (trainable or frozen) from its embedded source."""
    return loads(_read_file(path), path, expect_model)


def loads(blob: bytes, name: str = "<bytes>", expect_model: str | None = None):
    """load() from bytes; ``name`` only names the file in messages."""
    from ..runtime.frozen import freeze
    tensors, meta, fields, infos = _parse(blob, name)
    if "external" in meta:
        raise CheckpointError(f"{name} holds an existing {meta['model']} quantized by rules, "
                              "not a compiled .tdsl model: build that model and call "
                              "triton_dsl.checkpoint.load_quantized(path, model)")
    if expect_model is not None and meta["model"] != expect_model:
        raise CheckpointError(f"{name} holds model {meta['model']!r}, not {expect_model!r}")
    cls = _compile(meta, name)
    C.check_declared(cls, infos, meta["kind"], name)
    model = cls()
    if meta["kind"] == "frozen":
        try:
            freeze(model, build=False)  # the CPU forms are built from the loaded codes below
        except (RuntimeError, ValueError) as e:
            raise CheckpointError(f"{name}: the model its source declares cannot be frozen: "
                                  f"{' '.join(str(e).split())[:200]}") from None
    return C.fill(model, tensors, meta, fields, name, "the model its source declares")


def save_quantized(model, path: str) -> int:
    """Save an existing model quantized by triton_dsl.quantize (checkpoint_external.py)."""
    from .checkpoint_external import save_quantized as _save
    return _save(model, path)


def load_quantized(path: str, model):
    """Apply a save_quantized() checkpoint to a freshly built ``model`` (checkpoint_external.py)."""
    from .checkpoint_external import load_quantized as _load
    return _load(path, model)


def _compile(meta: dict, name: str):
    """The model class from the embedded source. The source is compiled under a fixed name:
    the file's own path is data for messages only and never reaches generated code."""
    from ..lang.diagnostics import TdslError
    from ..runtime.build import load_source
    try:
        return load_source(meta["tdsl_source"], "<checkpoint>", model=meta["model"],
                           fp32=meta["fp32"] == "true")
    except TdslError as e:
        first = next((l for l in str(e).splitlines() if "error" in l), str(e).strip()[:200])
        raise CheckpointError(f"{name}: its embedded .tdsl source does not compile: "
                              f"{' '.join(first.split())}") from None
    except ValueError as e:
        raise CheckpointError(f"{name}: {' '.join(str(e).split())}") from None


def history(meta: dict) -> list:
    return json.loads(meta.get("history", "[]"))


def normalization(meta: dict) -> tuple[float, float] | None:
    """The (mean, std) the model was trained with, when the checkpoint records it."""
    if "data" not in meta:
        return None
    d = json.loads(meta["data"])
    if "mean" not in d:  # text: bytes are not standardised
        return None
    return float(d["mean"]), float(d["std"])
