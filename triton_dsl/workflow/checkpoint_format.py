"""The checkpoint file format: the safetensors header read and checked by hand, the metadata
schema, and the SHA-256 that covers the metadata and the tensors.

A checkpoint is a safetensors file: 8 bytes (little-endian header length), a JSON header
({tensor name: {dtype, shape, data_offsets}, "__metadata__": {field: string}}), the tensor data.
Everything in the header is checked before a byte of tensor data is trusted, so that a crafted
file fails with one line naming the field, never a traceback or an allocation it did not pay for.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re

import torch

FORMAT = "triton-dsl-checkpoint/2"
OLD_FORMATS = ("triton-dsl-checkpoint/1",)  # their hash left the metadata out: not trusted
MAX_HEADER = 100_000_000  # safetensors' own limit

DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16,
          "BF16": torch.bfloat16, "I64": torch.int64, "I32": torch.int32, "I16": torch.int16,
          "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}
REQUIRED = ("format", "triton_dsl_version", "model", "tdsl_source", "kind", "fp32", "encodings",
            "sha256")


class CheckpointError(Exception):
    """The file is missing, truncated, corrupt, from another format, or for another model."""


def _one_line(text) -> str:
    return " ".join(str(text).split())


def parse_header(blob: bytes, name: str) -> tuple[dict, dict]:
    """({tensor name: (dtype, shape)}, metadata) from a safetensors blob, checked."""
    if len(blob) < 8:
        raise CheckpointError(f"{name}: {len(blob)} bytes: too short for a safetensors file")
    n = int.from_bytes(blob[:8], "little")
    if (n > len(blob) - 8 or n > MAX_HEADER) and all(32 <= c < 127 or c in b"\t\r\n"
                                                      for c in blob[:64]):
        raise CheckpointError(f"{name}: a text file, not a safetensors checkpoint (a .tdsl "
                              "file is trained into one: triton-dsl train FILE -o OUT)")
    if n > len(blob) - 8 or n > MAX_HEADER:
        raise CheckpointError(f"{name}: header length {n:,} exceeds the file's {len(blob):,} "
                              "bytes (truncated or corrupt)")
    try:
        header = json.loads(blob[8:8 + n].decode("utf-8"), parse_constant=_no_constant)
    except (UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{name}: header is not UTF-8 JSON (corrupt): "
                              f"{_one_line(e)}") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{name}: header is not a JSON object (corrupt)")
    meta = header.pop("__metadata__", None)
    if meta is None:
        raise CheckpointError(f"{name}: not a triton-dsl checkpoint (no metadata)")
    if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
        raise CheckpointError(f"{name}: header field __metadata__ is not a map of strings")
    infos = {}
    for key, info in header.items():
        ok = (isinstance(info, dict) and info.get("dtype") in DTYPES
              and isinstance(info.get("shape"), list)
              and all(type(d) is int and 0 <= d < 2 ** 40 for d in info["shape"]))
        if not ok:
            raise CheckpointError(f"{name}: header entry {key!r} is not a valid tensor "
                                  "description (dtype, shape)")
        infos[key] = (DTYPES[info["dtype"]], tuple(info["shape"]))
    return infos, meta


def _no_constant(c):
    raise ValueError(f"{c} is not a number")


def nbytes(info) -> int:
    dtype, shape = info
    return math.prod(shape) * torch.empty((), dtype=dtype).element_size()


def check_format(meta: dict, name: str, version: str):
    fmt = meta.get("format")
    if fmt == FORMAT:
        return
    if fmt in OLD_FORMATS:
        raise CheckpointError(f"{name}: format {fmt!r} is from an older triton-dsl whose SHA-256 "
                              f"did not cover the metadata; triton-dsl {version} reads {FORMAT!r}:"
                              " re-create it with train, ptq or freeze")
    raise CheckpointError(f"{name}: format {fmt!r}, but this triton-dsl {version} reads "
                          f"{FORMAT!r}" if fmt is not None else
                          f"{name}: not a triton-dsl checkpoint (no format in its metadata)")


def digest(meta: dict, tensors: dict) -> str:
    """SHA-256 over every metadata field but the hash itself (canonical JSON) and the tensors
    (name, dtype, shape, bytes), so no field that changes what is built escapes it."""
    fields = {k: v for k, v in meta.items() if k != "sha256"}
    h = hashlib.sha256(json.dumps(fields, sort_keys=True, ensure_ascii=True,
                                  separators=(",", ":")).encode() + b"\n")
    for k in sorted(tensors):
        t = tensors[k]
        h.update(k.encode() + str(t.dtype).encode() + str(tuple(t.shape)).encode())
        if t.numel():
            h.update(t.contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _json(meta, field, name, kind):
    try:
        v = json.loads(meta[field], parse_constant=_no_constant)
    except ValueError:
        raise CheckpointError(f"{name}: metadata field {field!r} is not valid JSON") from None
    if not isinstance(v, kind):
        raise CheckpointError(f"{name}: metadata field {field!r} is not a JSON {kind.__name__}")
    return v


def _int(v, lo, hi) -> bool:
    return type(v) is int and lo <= v <= hi


def _number(v) -> bool:
    return type(v) in (int, float) and math.isfinite(v)


def validate(meta: dict, name: str) -> dict:
    """Every field of the right type and range; returns {"encodings", "data", "history"}."""
    for field in REQUIRED:
        if field not in meta:
            raise CheckpointError(f"{name}: metadata field {field!r} is missing")

    def bad(field, want):
        raise CheckpointError(f"{name}: metadata field {field!r} is {_one_line(meta[field])[:40]!r}"
                              f", expected {want}")
    if len(meta["triton_dsl_version"]) > 64 or not meta["triton_dsl_version"].isprintable():
        bad("triton_dsl_version", "a version string")
    if not (meta["model"].isidentifier() and len(meta["model"]) <= 256):
        bad("model", "a model name")
    if meta["kind"] not in ("trainable", "frozen"):
        bad("kind", "'trainable' or 'frozen'")
    if meta["fp32"] not in ("true", "false"):
        bad("fp32", "'true' or 'false'")
    if not re.fullmatch(r"[0-9a-f]{64}", meta["sha256"]):
        bad("sha256", "64 hex digits")
    out = {"encodings": _json(meta, "encodings", name, dict), "data": None, "history": []}
    for key, enc in out["encodings"].items():
        binary = (isinstance(enc, dict) and enc == {"encoding": "binary", "k": enc.get("k")}
                  and _int(enc["k"], 1, 2 ** 31))
        bits = (isinstance(enc, dict) and set(enc) == {"encoding", "bits", "offset", "dtype"}
                and enc["encoding"] == "bits" and _int(enc["bits"], 1, 16)
                and _int(enc["offset"], 0, 2 ** 16) and enc["dtype"] in ("int8", "int16"))
        if not (binary or bits):
            raise CheckpointError(f"{name}: metadata field 'encodings' has an invalid entry "
                                  f"for {key!r}")
    if "data" in meta:
        d = _json(meta, "data", name, dict)
        text = (d.get("kind") == "text" and set(d) == {"name", "kind", "seq_len"}
                and isinstance(d["name"], str) and _int(d["seq_len"], 1, 1 << 16))
        if not text and not (isinstance(d.get("name"), str) and _number(d.get("mean"))
                             and _number(d.get("std")) and d["std"] > 0):
            bad("data", "{name, mean, std > 0} or {name, kind: text, seq_len}")
        out["data"] = d
    if "history" in meta:
        h = _json(meta, "history", name, list)
        if not all(isinstance(r, dict) and all(_number(v) or v is None for v in r.values())
                   and type(r.get("epoch")) is int and _number(r.get("loss")) for r in h):
            bad("history", "a list of records of numbers with an epoch and a loss")
        out["history"] = h
    for field in ("trained", "ptq"):
        if field in meta:
            _json(meta, field, name, dict)
    return out


def read_file(path: str) -> bytes:
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise CheckpointError(f"{path}: cannot read ({e.strerror})") from None


def parse(blob: bytes, name: str):
    """(tensors, metadata, checked fields, tensor headers) of a checkpoint's bytes: header,
    format, metadata and SHA-256 checked; raises CheckpointError."""
    from safetensors.torch import load as st_load

    from ..version import __version__
    infos, meta = parse_header(blob, name)
    check_format(meta, name, __version__)
    fields = validate(meta, name)
    try:
        tensors = st_load(blob)
    except Exception as e:  # safetensors reports bad offsets and truncation as various errors
        raise CheckpointError(f"{name}: not a readable safetensors file (truncated or corrupt: "
                              f"{' '.join(str(e).split())})") from None
    if digest(meta, tensors) != meta["sha256"]:
        raise CheckpointError(f"{name}: contents do not match their SHA-256: the file is corrupt")
    return tensors, meta, fields, infos
