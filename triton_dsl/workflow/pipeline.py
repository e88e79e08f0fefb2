"""Train, quantize, freeze, evaluate: the workflow behind the CLI, as Python functions.

    path = train_model("model.tdsl", "digits", "model.safetensors", epochs=10)
    ptq("model.tdsl", "float.safetensors", "ptq.safetensors", calib="digits")
    freeze_checkpoint("model.safetensors", "packed.safetensors")
    evaluate_checkpoint("packed.safetensors", "digits")
"""
from __future__ import annotations

import json
import os

import torch

from . import checkpoint as ck
from . import data as D
from ..runtime.build import load as load_class
from .train import evaluate, latency, rank_and_world, train

# parameters a float checkpoint lacks: the quantizers' own, and calibration statistics
_QUANTIZER_STATE = ("weight_quant.", "act_quant.")


def _same_path(a: str, b: str) -> bool:
    return os.path.exists(a) and os.path.exists(b) and os.path.samefile(a, b)


def build(tdsl: str, model: str | None = None, fp32: bool = False, seed: int = 0):
    torch.manual_seed(seed)
    return load_class(tdsl, model, fp32=fp32)()


def train_model(tdsl: str, data: str, out: str, epochs: int = 10, seed: int = 0,
                lr: float = 1e-3, batch_size: int = 64, fp32: bool = False,
                freeze_output: bool = False, model: str | None = None, progress: bool = True,
                log=None) -> dict:
    """QAT (or fp32 training with fp32=True) on a data set; writes a checkpoint, trainable or
    (freeze_output) frozen. Returns {history, test_acc, bytes}."""
    net = build(tdsl, model, fp32, seed)
    ds = D.load(data, net.input_shape)
    hist = train(net, ds, epochs, lr, batch_size, seed, progress, log)
    if rank_and_world()[0] != 0:
        return {"history": hist}
    if freeze_output:
        from ..runtime import freeze
        freeze(net)
    size = ck.save(net, out, history=hist, data=ds, extra={"trained": {
        "epochs": epochs, "seed": seed, "lr": lr, "batch_size": batch_size, "data": data,
        "fp32": fp32}})
    return {"history": hist, "test_acc": evaluate(net, ds), "bytes": size}


def load_float_weights(net, weights):
    """Float weights into a (quantized) model of the same file: a triton-dsl checkpoint, a
    safetensors state dict, a torch .pt state dict, or a state dict already in memory."""
    if isinstance(weights, dict):
        tensors, weights = weights, "the state dict"
    elif weights.endswith(".safetensors"):
        try:
            tensors, meta = ck.read(weights)
        except ck.CheckpointError as e:
            if "not a triton-dsl checkpoint" not in str(e):
                raise
            from safetensors.torch import load_file
            tensors, meta = load_file(weights), {}
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
    return net


def needs_calibration(net) -> bool:
    return any(getattr(m, "mode", None) == "static" for m in net.modules())


@torch.no_grad()
def calibrate(net, ds: D.Dataset, batches: int = 8, batch_size: int = 64):
    """Observe static activation ranges on a few training batches (eval mode otherwise)."""
    net.eval()
    observers = [m for m in net.modules() if getattr(m, "mode", None) == "static"]
    for o in observers:
        o.calibrating = True
    try:
        for i, (x, _) in enumerate(ds.batches("train", batch_size, shuffle=True, seed=0)):
            if i >= batches:
                break
            net(x)
    finally:
        for o in observers:
            o.calibrating = False


def ptq(tdsl: str, weights: str, out: str, calib: str | None = None, calib_batches: int = 8,
        model: str | None = None) -> dict:
    """Post-training quantization: float weights -> the file's precisions -> frozen checkpoint."""
    from ..runtime import freeze
    net = load_float_weights(build(tdsl, model), weights)
    ds = None
    if needs_calibration(net):
        if calib is None:
            raise D.DataError("this model has static activations (activations=static): they "
                              "need calibration data, e.g. --calib digits")
        ds = D.load(calib, net.input_shape)
        calibrate(net, ds, calib_batches)
    elif calib is not None:
        ds = D.load(calib, net.input_shape)
    freeze(net)
    size = ck.save(net, out, data=ds, extra={"ptq": {"weights": os.path.basename(weights),
                                                     "calib": calib}})
    return {"bytes": size, "model": net}


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
    return ck.save(net, out, history=ck.history(meta) or None, data=data, extra=extra)


def evaluate_checkpoint(path: str, data: str = "digits", latency_batches=(1, 64)) -> dict:
    net = ck.load(path)
    ds = D.load(data, net.input_shape)
    return {"checkpoint": path, "model": net.tdsl_model, "kind": net.checkpoint_meta["kind"],
            "accuracy": round(evaluate(net, ds), 3), "bytes": os.path.getsize(path),
            "latency_ms": {str(b): round(latency(net, net.input_shape, b), 4)
                           for b in latency_batches}}
