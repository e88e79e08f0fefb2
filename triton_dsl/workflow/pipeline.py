"""Train, quantize, freeze, evaluate: the workflow behind the CLI, as Python functions.

    path = train_model("model.tdsl", "digits", "model.safetensors", epochs=10)
    ptq("model.tdsl", "float.safetensors", "ptq.safetensors", calib="digits")
    freeze_checkpoint("model.safetensors", "packed.safetensors")
    evaluate_checkpoint("packed.safetensors", "digits")
"""
from __future__ import annotations

import itertools
import json
import os

import torch

from . import checkpoint as ck
from . import data as D
from ..runtime.build import load as load_class
from .lm_train import train_lm
from .text_data import TextData, bits_per_byte, load_text
from .train import best_record, check_options, evaluate, latency, rank_and_world, train

# parameters a float checkpoint lacks: the quantizers' own, and calibration statistics
_QUANTIZER_STATE = ("weight_quant.", "act_quant.")


def _same_path(a: str, b: str) -> bool:
    return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)


def build(tdsl: str, model: str | None = None, fp32: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    return load_class(tdsl, model, fp32=fp32)()


def train_model(tdsl: str, data: str | None, out: str, epochs: int = 10, seed: int = 0,
                lr: float = 1e-3, batch_size: int = 64, fp32: bool = False,
                freeze_output: bool = False, model: str | None = None, progress: bool = True,
                log=None, optimizer: str = "adam", weight_decay: float = 0.0,
                schedule: str = "cosine", resume: str | None = None,
                steps: int | None = None) -> dict:
    """QAT (or fp32 training with fp32=True) on a data set; writes a checkpoint, trainable or
    (freeze_output) frozen, holding the epoch best on the validation split. ``resume``: a
    trainable checkpoint of the same model to continue from (its weights, history and input
    normalisation; the optimizer and schedule start afresh for ``epochs`` more epochs).
    Returns {history, best_epoch, val_acc, test_acc, bytes}; the test split is only reported.
    A language model (token input) trains on text (data None: stdlib) with the next-byte loss,
    ``steps`` batches at most per epoch, and reports val_bpb and test_bpb (bits per byte)."""
    check_options(epochs, lr, weight_decay, batch_size, optimizer, schedule)
    net = build(tdsl, model, fp32, seed)
    norm, prior = None, []
    if resume is not None:
        norm, prior = _resume(net, resume, fp32)
    lm = is_token_model(net)
    data = data or ("stdlib" if lm else "digits")
    ds = load_data(data, net, norm)
    start, best = (prior[-1]["epoch"] if prior else 0), best_record(prior)
    if lm:
        hist = prior + train_lm(net, ds, epochs, lr, batch_size, seed, progress, log,
                                optimizer, weight_decay, schedule, start, best, steps)
    else:
        hist = prior + train(net, ds, epochs, lr, batch_size, seed, progress, log,
                             optimizer=optimizer, weight_decay=weight_decay,
                             schedule=schedule, start_epoch=start, best=best)
    if rank_and_world()[0] != 0:
        return {"history": hist}
    best = best_record(hist) or hist[-1]
    if freeze_output:
        from ..runtime import freeze
        freeze(net)
    metric = "val_bpb" if lm else "val_acc"
    score = {"test_bpb": round(bits_per_byte(net, ds), 4)} if lm else \
        {"test_acc": evaluate(net, ds)}
    size = ck.save(net, out, history=hist, data=ds.meta() if lm else ds, verify=freeze_output,
                   extra={"trained": {
                       "epochs": epochs, "seed": seed, "lr": lr, "batch_size": batch_size,
                       "data": data, "fp32": fp32, "optimizer": optimizer,
                       "weight_decay": weight_decay, "schedule": schedule,
                       "resume": resume and os.path.basename(resume), "steps": steps,
                       "best_epoch": best["epoch"], metric: best.get(metric)}})
    return {"history": hist, "best_epoch": best["epoch"], metric: best.get(metric), **score,
            "bytes": size}


def is_token_model(net) -> bool:
    return getattr(net, "vocab_size", None) is not None


def load_data(spec: str, net, norm=None):
    """The data set ``spec`` for ``net``: text for a language model, samples otherwise."""
    text = spec == "stdlib" or spec.startswith("text:")
    if is_token_model(net) != text:  # before loading: the loader's shape message would mislead
        raise D.DataError(f"{spec} is {'text' if text else 'not text'}, but model "
                          f"{net.tdsl_model!r} {'is' if not text else 'is not'} a language "
                          "model (token input): use stdlib or text:PATH for language models")
    ds = load_text(spec, net.input_shape[0]) if text else D.load(spec, net.input_shape, norm=norm)
    if text and net.vocab_size < 256:
        raise D.DataError(f"{spec}: byte-level text needs vocab=256 (a token is a byte); "
                          f"model {net.tdsl_model!r} has vocab={net.vocab_size}")
    return ds


def _resume(net, path: str, fp32: bool):
    """Load a trainable checkpoint's weights into net; (its normalisation, its history)."""
    old = ck.load(path, expect_model=net.tdsl_model)
    meta = old.checkpoint_meta
    if meta["kind"] != "trainable":
        raise ck.CheckpointError(f"{path} is a frozen checkpoint; --resume continues from a "
                                 "trainable one")
    if (meta["fp32"] == "true") != fp32:
        raise ck.CheckpointError(f"{path} was trained {'with' if not fp32 else 'without'} "
                                 f"--fp32; resume it {'with' if not fp32 else 'without'} it too")
    try:
        net.load_state_dict(old.state_dict())
    except RuntimeError as e:
        raise ck.CheckpointError(f"{path} does not fit {net.tdsl_model!r} of this file: "
                                 f"{str(e).strip().splitlines()[0]}") from None
    return ck.normalization(meta), ck.history(meta)


def load_float_weights(net, weights, with_meta: bool = False):
    """Float weights into a (quantized) model of the same file: a triton-dsl checkpoint, a
    safetensors state dict, a torch .pt state dict, or a state dict already in memory.
    with_meta=True returns (net, the checkpoint's metadata or {})."""
    meta = {}
    if isinstance(weights, dict):
        tensors, weights = weights, "the state dict"
    elif weights.endswith(".safetensors"):
        try:
            tensors, meta = ck.read(weights)
        except ck.CheckpointError as e:
            if "not a triton-dsl checkpoint" not in str(e):
                raise
            from safetensors.torch import load_file
            try:
                tensors, meta = load_file(weights), {}
            except Exception as e2:
                raise ck.CheckpointError(f"{weights}: cannot read ({' '.join(str(e2).split())})"
                                         ) from None
        if meta:
            if meta["model"] != net.tdsl_model:
                raise ck.CheckpointError(f"{weights} holds model {meta['model']!r}, not "
                                         f"{net.tdsl_model!r}")
            if meta["kind"] != "trainable":
                raise ck.CheckpointError(f"{weights} is a frozen checkpoint; post-training "
                                         "quantization starts from float (trainable) weights")
    else:
        if not os.path.isfile(weights):
            raise ck.CheckpointError(f"{weights}: no such file")
        try:
            tensors = torch.load(weights, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ck.CheckpointError(f"{weights}: cannot read ({e})") from None
        if not isinstance(tensors, dict):
            raise ck.CheckpointError(f"{weights}: expected a state_dict (a dict of tensors)")
    state = net.state_dict()
    unexpected = [k for k in tensors if k not in state]
    missing = [k for k in state if k not in tensors and not any(q in k for q in _QUANTIZER_STATE)]
    wrong = [f"{k}: {tuple(tensors[k].shape)} vs {tuple(state[k].shape)}" for k in tensors
             if k in state and tensors[k].shape != state[k].shape]
    if unexpected or missing or wrong:
        parts = [f"unexpected {unexpected[:5]}" if unexpected else "",
                 f"missing {missing[:5]}" if missing else "",
                 f"shape mismatch {wrong[:5]}" if wrong else ""]
        raise ck.CheckpointError(f"{weights} does not fit model {net.tdsl_model!r}: " +
                                 "; ".join(p for p in parts if p))
    net.load_state_dict(tensors, strict=False)
    for mod in net.modules():  # learned thresholds and TTQ scales restart from these weights
        wq = getattr(mod, "weight_quant", None)
        if hasattr(wq, "init_from"):
            wq.init_from(mod.weight)
    return (net, meta) if with_meta else net


def needs_calibration(net) -> bool:
    return any(getattr(m, "mode", None) == "static" for m in net.modules())


def calibrate(net, ds: D.Dataset, batches: int = 8, batch_size: int = 64):
    """Observe static activation ranges on the first ``batches`` shuffled training batches
    (runtime.external.calibrate, which any model takes); the model is left in eval mode."""
    from ..runtime.external import calibrate as observe
    xs = (x for x, _ in ds.batches("train", batch_size, shuffle=True, seed=0))
    observe(net, itertools.islice(xs, batches))
    net.eval()


def ptq(tdsl: str, weights: str, out: str, calib: str | None = None, calib_batches: int = 8,
        model: str | None = None) -> dict:
    """Post-training quantization: float weights -> the file's precisions -> frozen checkpoint.
    Calibration data is standardised as the float model's training data was (the statistics
    its checkpoint stores; a bare state dict has none, so the calibration data's own are used
    and stored). Returns {bytes, model, test_acc (with calib)}; nothing is written on failure."""
    from ..runtime import freeze
    net, meta = load_float_weights(build(tdsl, model), weights, with_meta=True)
    norm = ck.normalization(meta) if meta else None
    data = json.loads(meta["data"]) if meta and "data" in meta else None
    ds = None
    if needs_calibration(net) and calib is None:
        raise D.DataError("this model has static activations (activations=static): they "
                          "need calibration data, e.g. --calib digits")
    if calib is not None:
        ds = load_data(calib, net, norm)
        data = ds.meta() if isinstance(ds, TextData) else \
            {"name": ds.name, "mean": ds.mean, "std": ds.std}
    if needs_calibration(net):
        calibrate(net, ds, calib_batches)
    freeze(net)
    out_score = {}
    if isinstance(ds, TextData):
        out_score["test_bpb"] = round(bits_per_byte(net, ds), 4)
    out_score["test_acc"] = evaluate(net, ds) if ds is not None and not out_score else None
    size = ck.save(net, out, data=data, verify=True, extra={"ptq": {
        "weights": os.path.basename(weights), "calib": calib}})
    return {"bytes": size, "model": net, **out_score}


def freeze_checkpoint(src: str, out: str) -> int:
    from ..runtime import freeze
    if _same_path(src, out):
        raise ck.CheckpointError(f"{out} is the input checkpoint; write the frozen one elsewhere")
    net = ck.load(src)
    if net.checkpoint_meta["kind"] == "frozen":
        raise ck.CheckpointError(f"{src} is already frozen")
    meta = net.checkpoint_meta
    freeze(net)
    extra = {k: meta[k] for k in ("trained", "ptq") if k in meta}
    data = json.loads(meta["data"]) if "data" in meta else None
    return ck.save(net, out, history=ck.history(meta) or None, data=data, extra=extra,
                   verify=True)


def evaluate_checkpoint(path: str, data: str | None = None, latency_batches=(1, 64)) -> dict:
    """Accuracy on the test split, size and CPU latency. Inputs are standardised with the
    normalisation the checkpoint stores (the training data's), not the evaluated data's own.
    A language model: bits per byte on the validation and test splits (data None: stdlib)."""
    net = ck.load(path)
    if is_token_model(net):
        from .lm_eval import evaluate_lm
        return evaluate_lm(net, path, load_data(data or "stdlib", net))
    norm = ck.normalization(net.checkpoint_meta)
    ds = load_data(data or "digits", net, norm)
    return {"checkpoint": path, "model": net.tdsl_model, "kind": net.checkpoint_meta["kind"],
            "accuracy": round(evaluate(net, ds), 3), "bytes": os.path.getsize(path),
            "normalization": {"mean": ds.mean, "std": ds.std,
                              "from": "checkpoint" if norm else "data"},
            "latency_ms": {str(b): round(latency(net, net.input_shape, b), 4)
                           for b in latency_batches}}
