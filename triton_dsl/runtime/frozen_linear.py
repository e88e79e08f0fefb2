"""A frozen linear layer: the stored form of its weight (runtime/forms.py), run the way
runtime/dispatch.py chooses."""
from __future__ import annotations

import torch
from torch import nn

from ..kernels.common import interpreting
from . import compile_ops, dispatch
from .forms import form_for
from .layers import Conv2d, Linear


class FrozenLinear(nn.Module):
    """A trained Linear (or a Conv2d's weight, viewed as [out, C*kh*kw]) in its deploy form:
    buffers of its stored form (runtime/forms.py), run the way runtime/dispatch.py chooses."""

    def __init__(self, layer: Linear | Conv2d):
        super().__init__()
        w = layer.weight
        self.in_features, self.out_features = w[0].numel(), w.shape[0]
        self.precision = layer.precision
        self.bias = None if layer.bias is None else nn.Parameter(layer.bias.detach().clone(),
                                                               requires_grad=False)
        self.activations = getattr(self.precision, "activations", "none")
        self.act_quant = layer.act_quant if self.activations == "static" else None
        self.form = form_for(self.precision)
        self.mode = self.form.name  # ternary, int8, int16 or float16: what the checkpoint stores
        self.prepared = None  # a dispatch.Prepared: the runners and their choice per batch
        self.dense_only = False  # a grouped convolution's weight: F.conv2d on the fp32 weight
        self.in_conv = False  # a FrozenConv2d's weight: its choices live in the same slot
        self.fold = None  # a following batchnorm folded in (runtime/fold.py); not a child
        self.fast = None  # (shape, dtype, device, interpreting, call): the last input's path
        compile_ops.register(self)
        with torch.no_grad():
            self.form.store(self, layer)

    def _act(self) -> str:
        return "dynamic" if self.activations == "dynamic" else "none"

    def matmul(self, x):
        if x.shape[-1] != self.in_features:  # 2-bit packing pads K: the kernels cannot tell
            raise ValueError(f"x must have {self.in_features} features in its last dimension, "
                             f"got shape {tuple(x.shape)}")
        if self.act_quant is not None:
            x = self.act_quant(x)
        act = self._act()
        run = dispatch.runner(self, x, act)
        if self.act_quant is None:  # the next input of this shape skips all of the above
            self.fast = (x.shape, x.dtype, x.device, interpreting(), run.bind(self, act))
        return run(self, x, act)

    def prepare(self):
        """Build how the layer runs on the device of its buffers now (at freeze and load),
        rather than in the first forward pass."""
        device = next(self.buffers()).device
        if self.dense_only:
            dispatch.dense(self)
        else:
            dispatch.build_default(self, device, self._act())

    def dequantized_weight(self) -> torch.Tensor:
        """The weight as fp32 [out, in], computed from the stored buffers (nothing kept)."""
        self.restore_buffers()
        return self.form.dense(self)

    def weight_bytes(self) -> int:
        """Bytes of the weight as the layer holds it now: its buffers (bias excluded; a stored
        buffer a prepacked form replaced is empty) and what its runners prepared (a prepacked
        CPU form, a dequantized fp32 copy where that is measured faster)."""
        held = sum(b.numel() * b.element_size() for b in self.buffers())
        return held + (self.prepared.nbytes if self.prepared is not None else 0)

    def restore_buffers(self):
        """Put back a stored buffer a prepacked CPU form replaced, and drop the runners."""
        with dispatch.BUILD_LOCK:  # not while another thread builds from the stored buffer
            self.fast = None
            if self.prepared is not None:
                pre = self.prepared.prepacked()
                self.prepared = None
                if pre is not None:
                    self.form.rebuild(self, pre.codes())

    def _save_to_state_dict(self, destination, prefix, keep_vars):
        with dispatch.BUILD_LOCK:  # it swaps the stored buffer for a moment
            super()._save_to_state_dict(destination, prefix, keep_vars)
            pre = self.prepared.prepacked() if self.prepared is not None else None
            if pre is not None:
                tmp = getattr(self, self.form.stored)
                self.form.rebuild(self, pre.codes())
                destination[prefix + self.form.stored] = getattr(self, self.form.stored)
                setattr(self, self.form.stored, tmp)

    def _load_from_state_dict(self, *args, **kwargs):
        self.restore_buffers()
        super()._load_from_state_dict(*args, **kwargs)

    def _apply(self, fn, *args, **kwargs):
        self.restore_buffers()
        return super()._apply(fn, *args, **kwargs)

    def __getstate__(self):  # pickle and deepcopy carry the buffer, never a native object
        self.restore_buffers()
        return self.__dict__.copy()

    def forward(self, x):
        if torch.compiler.is_compiling():  # one custom op for the compiler (compile_ops.py)
            return torch.ops.triton_dsl.frozen_linear(x, self.op_handle)
        fast = self.fast  # small layers at batch 1 are all overhead: keep the common call short
        if fast is not None and fast[0] == x.shape and fast[1] == x.dtype \
                and fast[2] == x.device and fast[3] == interpreting():
            return fast[4](x)
        return self.matmul(x)

    def eager_forward(self, x):
        return self.matmul(x)

    def __setstate__(self, state):  # a copy is a new layer: a handle of its own
        super().__setstate__(state)
        compile_ops.register(self)

    def extra_repr(self):
        return (f"{self.in_features}, {self.out_features}, precision={self.precision.to_source()}"
                f", kernel={self.mode}")
