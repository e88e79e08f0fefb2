"""`triton-dsl bench --model FILE.tdsl`: whole models, where users feel speed.

The frozen model is timed against the same architecture in fp32 and against torch's own int8
deployment of that architecture, in one process, the methods taking turns in every round:

* fp32: the file compiled with every layer fp32 (triton_dsl.load(fp32=True)), random weights;
* frozen: the file as declared, initialised from the same weights, then rt.freeze (packed
  weights, batchnorm folded, CPU paths chosen by measurement);
* fp32-channels-last, for CNNs: the same fp32 model with weights and input in channels-last
  memory (frozen float convolutions run channels-last: this row shows what the layout alone
  gives);
* torch-int8: the fp32 model through torch's FX graph-mode post-training quantization (x86
  backend: int8 convolutions and linears with static activations, calibrated on random
  inputs), the standard torch int8 deployment of a CNN; for models without convolutions,
  torch's dynamic int8 linear (quantize_dynamic) instead;
* with --compile, torch.compile of fp32 and of the frozen model as well.

Each record gives the median and interquartile range in ms, the speedup over fp32 (with a
'noisy' flag when the two ranges overlap), and the weight bytes each holds.
"""
from __future__ import annotations

import copy
import time
import warnings

import torch
from torch import nn

from ..runtime import freeze
from .timing import spread
from ..runtime.build import load as load_class
from ..runtime.frozen import FrozenLinear
from ..runtime.layers import Conv2d, Linear, to_torch


def plain(model: nn.Module) -> nn.Module:
    """The fp32 model with torch's own nn.Linear and nn.Conv2d in place of the runtime's fp32
    layers (same weights): the baseline as a PyTorch user would write it, and what torch's
    quantization recognises (it matches module types exactly)."""
    for name, child in list(model.named_children()):
        if isinstance(child, (Linear, Conv2d)):
            setattr(model, name, to_torch(child).eval())
        else:
            plain(child)
    return model


def _torch_int8(fp32: nn.Module, shape) -> tuple[nn.Module | None, str]:
    """torch's int8 deployment of the fp32 model, and its name (or None and why not)."""
    from torch.ao import quantization as tq
    with warnings.catch_warnings():  # torch.ao.quantization is deprecated in favour of torchao
        warnings.simplefilter("ignore")
        if not any(isinstance(m, nn.Conv2d) for m in fp32.modules()):
            return tq.quantize_dynamic(copy.deepcopy(fp32), {nn.Linear}, torch.qint8), \
                "torch-dynamic-int8"
        from torch.ao.quantization.quantize_fx import convert_fx, prepare_fx
        model = copy.deepcopy(fp32)
        model.check_input = lambda x: x  # a shape check FX cannot trace; inputs are ours
        try:
            prepared = prepare_fx(model, tq.get_default_qconfig_mapping("x86"),
                                  (torch.randn(2, *shape),))
            with torch.no_grad():
                for _ in range(4):
                    prepared(torch.randn(16, *shape))
            return convert_fx(prepared), "torch-int8-fx"
        except Exception as e:  # FX cannot trace every model: say so, time the rest
            return None, f"torch-int8 unavailable: {type(e).__name__}: {str(e)[:80]}"


def weight_bytes(model: nn.Module) -> int:
    """Bytes of weights a model holds: frozen layers as FrozenLinear.weight_bytes counts them,
    everything else as its parameters and buffers (packed int8 modules: their parameters)."""
    frozen = [m for m in model.modules() if isinstance(m, FrozenLinear)]
    inside = {id(t) for m in frozen for t in list(m.buffers()) + list(m.parameters())}
    rest = sum(t.numel() * t.element_size() for t in list(model.parameters()) +
               list(model.buffers()) if id(t) not in inside)
    packed = 0
    for name, m in model.named_modules():  # torch's quantized modules: packed params
        if hasattr(m, "_weight_bias") and not name.endswith("_packed_params"):
            w, b = m._weight_bias()
            packed += w.numel() + (0 if b is None else b.numel() * b.element_size())
    return sum(m.weight_bytes() for m in frozen) + rest + packed


def fp32_and_frozen(tdsl: str, seed: int, language: bool, batch: int = 8):
    """(fp32, frozen) of one .tdsl file from the same random weights: the quantized model takes
    the fp32 weights, one training-mode pass on an example batch gives its quantizers the
    statistics a trained model has, and the fp32 model takes back what that pass changed
    (batchnorm statistics). ``language``: whether the bench needs a token model."""
    torch.manual_seed(seed)
    fp32 = load_class(tdsl, fp32=True)().eval()
    if (getattr(fp32, "vocab_size", None) is not None) != language:
        raise ValueError(f"{tdsl}: --decode needs a language model (input tokens(...))"
                         if language else f"{tdsl} declares a language model (input "
                         "tokens(...)): time its decoding with --decode")
    quant = load_class(tdsl)()
    quant.load_state_dict(fp32.state_dict(), strict=False)  # quantizers keep their own state
    with torch.no_grad():
        quant.train()(quant.example_input(batch))
    mine = fp32.state_dict()
    fp32.load_state_dict({k: v for k, v in quant.state_dict().items() if k in mine},
                         strict=False)
    return plain(fp32), freeze(quant.eval())


class ChannelsLast(nn.Module):
    """An fp32 CNN with its weights and its input in channels-last (NHWC) memory: the layout
    oneDNN's convolutions run fastest, which a frozen model's float convolutions use too."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = copy.deepcopy(model).to(memory_format=torch.channels_last)

    def forward(self, x):
        # .to, not .contiguous: a one-channel input counts as channels-last contiguous with
        # NCHW strides, and oneDNN then answers NCHW for the whole network (as frozen_conv.py)
        return self.model(x.to(memory_format=torch.channels_last))


def models(tdsl: str, compile_: bool = False, seed: int = 0) -> tuple[dict, dict]:
    """({method name: model}, {method: note}) for one .tdsl file."""
    fp32, frozen = fp32_and_frozen(tdsl, seed, language=False)
    out, notes = {"fp32": fp32, "frozen": frozen}, {}
    if any(isinstance(m, nn.Conv2d) for m in fp32.modules()):
        out["fp32-channels-last"] = ChannelsLast(fp32)
    int8, name = _torch_int8(fp32, fp32.input_shape)
    if int8 is None:
        notes["torch-int8"] = name
    else:
        out[name] = int8
    if compile_:
        out["fp32-compiled"] = torch.compile(fp32)
        out["frozen-compiled"] = torch.compile(frozen)
    return out, notes


def time_models(named: dict, x: torch.Tensor, repeat: int, warmup: int = 3) -> dict:
    """{name: (median, q1, q3) in ms}: every model runs once per round, in turn."""
    ts = {n: [] for n in named}
    with torch.inference_mode():
        for m in named.values():
            for _ in range(warmup):
                m(x)
        for _ in range(repeat):
            for n, m in named.items():
                t = time.perf_counter()
                m(x)
                ts[n].append((time.perf_counter() - t) * 1e3)
    return {n: spread(v) for n, v in ts.items()}


def run(tdsl: str, batches=(1, 64), repeat: int = 30, compile_: bool = False, log=print):
    named, notes = models(tdsl, compile_)
    for note in notes.values():
        log(f"# {note}")
    shape = named["fp32"].input_shape
    recs = []
    for b in batches:
        x = torch.randn(b, *shape)
        res = time_models(named, x, repeat)
        base, bq1, bq3 = res["fp32"]
        for n, (med, q1, q3) in res.items():
            r = {"model": tdsl, "method": n, "batch": b, "median_ms": round(med, 4),
                 "iqr_ms": round(q3 - q1, 4), "speedup_vs_fp32": round(base / med, 3),
                 "noisy": n != "fp32" and q1 <= bq3 and bq1 <= q3,
                 # what it holds after running this batch: a frozen layer keeps a dense copy
                 # where that measured faster
                 "weight_bytes": weight_bytes(named[n.replace("-compiled", "")])}
            recs.append(r)
            log(f"{n:<22}{b:>6}{med:>11.3f}{q3 - q1:>9.3f}{base / med:>9.2f}x"
                f"{'  noisy' if r['noisy'] else '':<7}{(r['weight_bytes'] or 0) / 1024:>11.1f}")
    return recs


HEADER = (f"{'method':<22}{'batch':>6}{'median ms':>11}{'IQR ms':>9}{'vs fp32':>10}{'':<7}"
          f"{'weights KiB':>11}")
