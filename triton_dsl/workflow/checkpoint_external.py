"""Checkpoints of existing models quantized by rules files (triton_dsl.quantize).

The same safetensors format as compiled models (checkpoint_format.py: checked header, SHA-256
over metadata and tensors, narrow codes bit-packed by checkpoint_codes.py). The metadata holds
the rules' text in the order they were applied and the model's identity (its class, qualified);
the tensors are the model's whole state dict, trainable or frozen. The model itself is code the
user owns, so loading takes a freshly built one: it must be of the same class, the rules must
apply to it without error, and its state must then match the file's key for key, shape for shape.

    triton_dsl.quantize(model, "rules.tdsl"); ...; rt.freeze(model)
    checkpoint.save_quantized(model, "llama.safetensors")
    model = checkpoint.load_quantized("llama.safetensors", build_the_model())
"""
from __future__ import annotations

import json

from ..files import write_atomic
from ..version import __version__
from . import checkpoint_codes as C
from .checkpoint_format import FORMAT, CheckpointError, digest, parse, read_file


def identity(model) -> str:
    return f"{type(model).__module__}.{type(model).__qualname__}"


def _frozen(model) -> bool:
    from ..runtime.frozen import FrozenConv2d, FrozenLinear
    return any(isinstance(m, (FrozenLinear, FrozenConv2d)) for m in model.modules())


def dumps_quantized(model) -> bytes:
    from safetensors.torch import save as st_save
    rules = model.__dict__.get("tdsl_rules")
    if not rules:
        raise TypeError("save_quantized() takes a model quantized by triton_dsl.quantize (it "
                        "records the rules it applies)")
    encodings = C.encodings(model)
    tensors, seen = {}, set()
    for k, v in model.state_dict().items():
        v = v.detach().cpu()
        if v.numel() and v.data_ptr() in seen:  # tied weights: safetensors stores each once
            v = v.clone()
        seen.add(v.data_ptr())
        tensors[k] = (C.encode(v, encodings[k]) if k in encodings else v).contiguous()
    meta = {"format": FORMAT, "triton_dsl_version": __version__, "model": type(model).__name__,
            "tdsl_source": "\n".join(rules), "kind": "frozen" if _frozen(model) else
            "trainable", "fp32": "false", "encodings": json.dumps(encodings, sort_keys=True),
            "external": json.dumps({"class": identity(model), "rules": rules})}
    meta["sha256"] = digest(meta, tensors)
    return st_save(tensors, metadata=meta)


def save_quantized(model, path: str) -> int:
    """Write a quantized existing model (trainable or frozen) atomically; returns its size."""
    blob = dumps_quantized(model)
    write_atomic(path, blob)
    return len(blob)


def _external(meta: dict, name: str) -> dict:
    if "external" not in meta:
        raise CheckpointError(f"{name} holds the compiled .tdsl model {meta['model']!r}: load "
                              "it with triton_dsl.checkpoint.load")
    try:
        ext = json.loads(meta["external"])
    except ValueError:
        ext = None
    if not (isinstance(ext, dict) and isinstance(ext.get("class"), str) and
            isinstance(ext.get("rules"), list) and ext["rules"] and
            all(isinstance(r, str) for r in ext["rules"])):
        raise CheckpointError(f"{name}: metadata field 'external' is not {{class, rules}}")
    return ext


def load_quantized(path: str, model):
    """Apply the rules stored in ``path`` to ``model`` (freshly built, unquantized), freeze it
    if the checkpoint is frozen, and load the stored state; returns the model."""
    from ..lang.diagnostics import TdslError
    from ..lang.external import parse_rules
    from ..runtime.external import quantize
    from ..runtime.frozen import freeze
    tensors, meta, fields, _ = parse(read_file(path), path)
    ext = _external(meta, path)
    if ext["class"] != identity(model):
        raise CheckpointError(f"{path} was saved from a {ext['class']}, not a {identity(model)}")
    if model.__dict__.get("tdsl_rules"):
        raise CheckpointError(f"{path}: the model given is already quantized; pass a freshly "
                              "built one")
    for text in ext["rules"]:
        try:
            quantize(model, parse_rules(text, f"{path} (its rules)"))  # text, never a path
        except TdslError as e:
            first = next((l for l in str(e).splitlines() if "error" in l), str(e))
            raise CheckpointError(f"{path}: its rules do not fit this model, so its modules "
                                  f"differ from the saved one's: {' '.join(first.split())}"
                                  ) from None
    if meta["kind"] == "frozen":
        freeze(model, build=False)
    state = model.state_dict()
    why = "its modules differ from those of the model it was saved from"
    C.same_keys(state, tensors,
                lambda k: f"{path}: the model has {k!r}, the checkpoint does not: {why}",
                lambda k: f"{path}: the checkpoint has {k!r}, the model does not: {why}")
    return C.fill(model, tensors, meta, fields, path, "the model", state)


__all__ = ["save_quantized", "dumps_quantized", "load_quantized"]
