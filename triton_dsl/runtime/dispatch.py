"""The one place that chooses how a frozen layer runs, and the one cache of what it prepared.

On CUDA tensors, and on the CPU under TRITON_INTERPRET=1, a layer runs its form's generic path
(the Triton kernels). On the CPU it runs one of:

* a prepacked CPU form (kernels/cpu_paths.py: the native kernel at 2 bits or int8, its grouped
  variant, or torch's int8 GEMM), built once from the stored codes; the stored buffer is then
  released, so the layer keeps one resident copy of its weight;
* an fp32 matmul on the weight dequantized once ("dense"): for small layers, where the kernels'
  fixed costs per call outweigh their few weights, and wherever no CPU form fits;
* the form's generic path, for forms no CPU kernel takes (16-bit weights).

The choice and what it built live in the layer's ``prepared`` slot, keyed by (device, activation
mode); moving, loading or copying the layer empties the slot (see FrozenLinear.restore_buffers).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ..kernels import cpu_paths
from ..kernels.common import HAS_TRITON, interpreting
from ..kernels.per_token import fake_quantize_per_token


def dense_below(path: str, act: str) -> int:
    """CPU layers with at most this many weights run dense: 2^18 (1 MiB in fp32) in front of the
    int8 GEMM, 2^14 in front of the native kernels, and none with int8 activations there.
    Measured on the 2-core EPYC: the native kernel wins from 256 x 256 up, and the dense path
    pays for fake-quantizing int8 activations."""
    if path in ("native", "grouped"):
        return 1 << 14 if act == "none" else 0
    return 1 << 18


def on_cpu_paths(device: torch.device) -> bool:
    """Whether tensors on ``device`` run the CPU paths (a CPU outside Triton's interpreter)."""
    return device.type == "cpu" and not (HAS_TRITON and interpreting())


class Generic:
    """The form's own path: Triton kernels or reference twins (ops.py decides)."""
    name = "generic"
    nbytes = 0

    def __init__(self, mod):
        self.form = mod.form

    def __call__(self, mod, x, act):
        return self.form.matmul(mod, x, act)


class Dense:
    """fp32 matmul on the weight dequantized once; int8 activations fake-quantized first."""
    name = "dense"

    def __init__(self, mod):
        self.weight = mod.form.dense(mod)
        self.nbytes = self.weight.numel() * self.weight.element_size()

    def __call__(self, mod, x, act):
        if act == "dynamic":
            x = fake_quantize_per_token(x)
        bias = None if mod.bias is None else mod.bias.to(x.dtype)
        return F.linear(x, self.weight.to(x.dtype), bias)


class Prepacked:
    """One prepacked CPU form per part of the weight (TTQ has two: T and |T|), summed."""

    def __init__(self, mod, path, parts):
        self.name = path.name
        self.forms = [path.build(codes, scale, spec) for codes, scale, spec in parts]
        self.nbytes = sum(f.nbytes for f in self.forms)
        self.k = parts[0][2].k

    def __call__(self, mod, x, act):
        x2 = x.reshape(-1, self.k)
        y = None
        for i, form in enumerate(self.forms):
            run = form.dynamic_matmul if act == "dynamic" else form.float_matmul
            part = run(x2, mod.bias if i == 0 else None)
            y = part if y is None else y.add_(part)
        return y.to(x.dtype).reshape(*x.shape[:-1], -1)

    def codes(self) -> torch.Tensor:
        return self.forms[0].codes()


def select(mod, device: torch.device, act: str):
    """How ``mod`` (a FrozenLinear) runs on ``device`` with activations ``act`` ("none" or
    "dynamic"), built now: a Generic, Dense or Prepacked runner."""
    if not on_cpu_paths(device):
        return Generic(mod)
    parts = mod.form.cpu_parts(mod)
    if parts is None:
        return Generic(mod)
    path = cpu_paths.choose(parts[0][2], act)
    if path is None or mod.in_features * mod.out_features <= dense_below(path.name, act):
        return Dense(mod)
    return Prepacked(mod, path, parts)


def runner(mod, device: torch.device, act: str):
    """The layer's runner for (device, act), from its ``prepared`` slot or built and kept there.
    A prepacked form replaces the stored buffer it was built from."""
    key = (device, act, on_cpu_paths(device))
    if mod.prepared is not None and mod.prepared[0] == key:
        return mod.prepared[1]
    mod.restore_buffers()
    run = select(mod, device, act)
    if isinstance(run, Prepacked):
        stored = getattr(mod, mod.form.stored)
        setattr(mod, mod.form.stored, torch.empty(0, dtype=stored.dtype))
    mod.prepared = (key, run)
    return run
