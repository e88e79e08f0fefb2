"""Checkpoints: safetensors files that rebuild their model without the .tdsl file.

Metadata: the format, the triton-dsl version, the .tdsl source and model name, the kind
("trainable": latent float weights for more training; "frozen": the packed deploy form), a
SHA-256 over source and tensors, the data normalisation and the training history.

A frozen checkpoint stores exactly what `triton-dsl summary` counts: ternary weights at 2 bits
(the kernels' packing), binary at 1 bit, integer codes at their bit width (a bit stream per row),
scales, biases and norms. Writes are atomic: a failed save leaves any existing file untouched.
"""
from __future__ import annotations

import hashlib
import json
import os

import torch

from ..version import __version__
from ..files import write_atomic
from ..kernels.packing import pack_bits, pack_ternary, unpack_bits, unpack_ternary

FORMAT = "triton-dsl-checkpoint/1"


class CheckpointError(Exception):
    """The file is missing, truncated, corrupt, from another format, or for another model."""


def _encodings(model) -> dict:
    """{state key: how it is stored narrower than its in-memory dtype}."""
    from ..lang.precision import Binary, Int
    from ..runtime.frozen import FrozenLinear
    out = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, FrozenLinear):
            continue
        p, key = mod.precision, (name + "." if name else "")
        if isinstance(p, Binary):
            out[key + "packed"] = {"encoding": "binary", "k": mod.in_features}
        elif isinstance(p, Int) and mod.mode in ("int8", "int16"):
            bits = p.bits + (not p.symmetric)  # codes relative to the zero point
            offset = (1 << (bits - 1)) - (1 if p.symmetric else 0)
            if bits < 16 and (bits < 8 or mod.mode == "int16"):
                out[key + "codes"] = {"encoding": "bits", "bits": bits, "offset": offset,
                                      "dtype": str(mod.codes.dtype).replace("torch.", "")}
    return out


def _encode(t: torch.Tensor, enc: dict) -> torch.Tensor:
    if enc["encoding"] == "binary":  # the 2-bit ternary packing holds only -1 and +1: keep signs
        return pack_bits((unpack_ternary(t, enc["k"]) > 0).to(torch.int32), 1)
    return pack_bits(t.to(torch.int32) + enc["offset"], enc["bits"])


def _decode(t: torch.Tensor, enc: dict, like: torch.Tensor) -> torch.Tensor:
    if enc["encoding"] == "binary":
        signs = unpack_bits(t, 1, enc["k"])
        return pack_ternary((signs * 2 - 1).to(torch.int8))
    k = like.shape[1]
    return (unpack_bits(t, enc["bits"], k) - enc["offset"]).to(getattr(torch, enc["dtype"]))


def _digest(source: str, tensors: dict) -> str:
    h = hashlib.sha256(source.encode())
    for k in sorted(tensors):
        t = tensors[k]
        h.update(k.encode() + str(t.dtype).encode() + str(tuple(t.shape)).encode())
        h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def is_frozen(model) -> bool:
    from ..runtime.frozen import FrozenConv2d, FrozenLinear
    return any(isinstance(m, (FrozenLinear, FrozenConv2d)) for m in model.modules())


def save(model, path: str, history=None, data=None, extra: dict | None = None) -> int:
    """Write ``model`` (a generated model, trainable or frozen) to ``path``; returns its size."""
    from safetensors.torch import save as st_save
    if not hasattr(model, "tdsl_source"):
        raise TypeError("save() takes a model compiled by triton-dsl (it carries its .tdsl source)")
    encodings = _encodings(model)
    tensors = {}
    for k, v in model.state_dict().items():
        v = v.detach().cpu()
        tensors[k] = (_encode(v, encodings[k]) if k in encodings else v).contiguous()
    meta = {"format": FORMAT, "triton_dsl_version": __version__,
            "model": model.tdsl_model, "tdsl_source": model.tdsl_source,
            "kind": "frozen" if is_frozen(model) else "trainable",
            "fp32": "true" if model.tdsl_fp32 else "false",
            "encodings": json.dumps(encodings, sort_keys=True),
            "sha256": _digest(model.tdsl_source, tensors)}
    if history is not None:
        meta["history"] = json.dumps(history)
    if data is not None:  # a Dataset, or its {"name", "mean", "std"} from another checkpoint
        if not isinstance(data, dict):
            data = {"name": data.name, "mean": data.mean, "std": data.std}
        meta["data"] = json.dumps(data)
    for k, v in (extra or {}).items():
        meta[k] = v if isinstance(v, str) else json.dumps(v)
    blob = st_save(tensors, metadata=meta)
    write_atomic(path, blob)
    return len(blob)


def read(path: str) -> tuple[dict, dict]:
    """(tensors as stored, metadata), verified; raises CheckpointError with the reason."""
    from safetensors import safe_open
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors reports truncation and corruption as various errors
        raise CheckpointError(f"{path}: not a readable safetensors file (truncated or corrupt: "
                              f"{e})") from None
    fmt = meta.get("format")
    if fmt != FORMAT:
        raise CheckpointError(f"{path}: format {fmt!r}, but this triton-dsl {__version__} reads "
                              f"{FORMAT!r}" if fmt else f"{path}: not a triton-dsl checkpoint "
                              "(no format in its metadata)")
    if _digest(meta.get("tdsl_source", ""), tensors) != meta.get("sha256"):
        raise CheckpointError(f"{path}: contents do not match their SHA-256: the file is corrupt")
    return tensors, meta


def load(path: str, expect_model: str | None = None):
    """Rebuild the model stored in ``path`` (trainable or frozen) from its embedded source."""
    from ..runtime.build import load_source
    from ..runtime.frozen import freeze
    tensors, meta = read(path)
    if expect_model is not None and meta["model"] != expect_model:
        raise CheckpointError(f"{path} holds model {meta['model']!r}, not {expect_model!r}")
    cls = load_source(meta["tdsl_source"], f"<{os.path.basename(path)}>", model=meta["model"],
                      fp32=meta.get("fp32") == "true")
    model = cls()
    if meta["kind"] == "frozen":
        freeze(model)
    state = model.state_dict()
    encodings = json.loads(meta.get("encodings", "{}"))
    for k, enc in encodings.items():
        if k in tensors and k in state:
            tensors[k] = _decode(tensors[k], enc, state[k])
    try:
        model.load_state_dict(tensors, strict=True)
    except RuntimeError as e:
        raise CheckpointError(f"{path}: tensors do not fit model {meta['model']!r}: {e}") from None
    model.eval()
    model.checkpoint_meta = meta
    return model


def history(meta: dict) -> list:
    return json.loads(meta.get("history", "[]"))
