"""Deploy form: trained layers frozen into packed weights whose forward calls the kernels.

    frozen = freeze(model)   # in place; returns the model

Ternary and binary weights become 2-bit packed codes plus scales (binary is ternary without
zeros); symmetric int weights and asymmetric ones up to 7 bits become int8 codes plus scales.
TTQ's separate positive and negative scales are served as a*T + d*|T| with a = (p + n) / 2 and
d = (p - n) / 2: two ternary matmuls. Asymmetric 8-bit weights, grouped convolutions and 16-bit
layers keep their (dequantized) float weights. Static activations keep their calibrated fake
quantizer in front of the weight-only kernel.

The frozen output equals the trainable layer's fake-quantized eval forward up to float rounding:
the kernels sum in a different order (fp32 paths ~1e-6 relative), the CPU float paths carry
16-bit fixed-point activations (~1.5e-5 relative), and int8-activation paths are exact in their
integer part (the CPU ones bit-exact with the reference twins).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..kernels import cpu_conv
from ..kernels.common import interpreting, m_bucket
from . import compile_ops, dispatch, tuning
from .fold import fold_batchnorm
from .forms import form_for
from .layers import Conv2d, Linear, im2col_conv, to_torch


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
        self.fast = None
        if self.prepared is not None:
            pre = self.prepared.prepacked()
            self.prepared = None
            if pre is not None:
                self.form.rebuild(self, pre.codes())

    def _save_to_state_dict(self, destination, prefix, keep_vars):
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


class FrozenConv2d(nn.Module):
    """A convolution whose weight is stored as a FrozenLinear [out, C/groups*kh*kw]. It runs as
    unfold + the frozen matmul ("im2col": the kernels; the only way for per-token int8
    activations, whose tokens are the patches) or as F.conv2d on the weight dequantized once
    ("conv": oneDNN's direct convolution, exact for float activations). Grouped convolutions and
    'same' padding always take "conv"; otherwise the faster of the two is measured per batch
    bucket and input shape (runtime/tuning.py), or "im2col" with TRITON_DSL_TUNE=0."""

    def __init__(self, layer: Conv2d):
        super().__init__()
        self.stride, self.padding = layer.stride, layer.padding
        self.dilation, self.groups = layer.dilation, layer.groups
        self.kernel_size, self.out_channels = layer.kernel_size, layer.out_channels
        self.im2col = layer.groups == 1 and layer.padding != "same"
        self.linear = FrozenLinear(layer)
        self.linear.dense_only = not self.im2col
        self.linear.in_conv = True
        compile_ops.register(self)

    def __setstate__(self, state):
        super().__setstate__(state)
        compile_ops.register(self)

    def forward(self, x):
        if torch.compiler.is_compiling():
            return torch.ops.triton_dsl.frozen_conv2d(x, self.op_handle)
        return self.eager_forward(x)

    def eager_forward(self, x):
        lin = self.linear
        kh, kw = self.kernel_size
        if x.dim() != 4 or x.shape[1] * kh * kw != lin.in_features * self.groups:
            raise ValueError(f"x must be [batch, {lin.in_features * self.groups // (kh * kw)}, "
                             f"height, width], got shape {tuple(x.shape)}")
        way = self._way(x)
        if way == "im2col":
            return im2col_conv(x, self, lin)
        if way == "qconv":
            y = self.forward_qconv(x)
            if y is not None:
                return y
        return self.forward_conv(x)

    def _qconv(self):
        """The int8 convolution for static int8 activations (kernels/cpu_conv.py), built once
        into the layer's slot; None where it does not apply."""
        lin = self.linear
        q = lin.act_quant
        if not (self.im2col and q is not None and q.mode == "static" and int(q.batches) > 0
                and cpu_conv.available()):
            return None
        spec = lin.form.cpu_spec(lin)
        if spec is None or spec.group is not None or hasattr(lin, "scale_abs"):
            return None  # grouped scales and TTQ's two parts have no single int8 weight
        prep = lin.prepared
        if "qconv" not in prep.runners:
            prep.runners["qconv"] = dispatch.QConv(lin, self)
        return prep.runners["qconv"]

    def forward_qconv(self, x):
        run = self._qconv()
        return None if run is None else run(x)

    def forward_conv(self, x):
        lin = self.linear
        if lin.act_quant is not None:
            x = lin.act_quant(x)
        run = dispatch.dense(lin)  # the weight dequantized once, a folded batchnorm in it
        w = run.weight.reshape(self.out_channels, -1, *self.kernel_size)
        bias = None if run.bias is None else run.bias.to(x.dtype)
        return F.conv2d(x, w.to(x.dtype), bias, self.stride, self.padding, self.dilation,
                        self.groups)

    def _way(self, x) -> str:
        lin = self.linear
        if not self.im2col:
            return "conv"
        if lin.activations == "dynamic" or not dispatch.on_cpu_paths(x.device):
            return "im2col"
        prep = dispatch.prepare(lin, x.device, lin._act())
        key = ("conv", m_bucket(x.shape[0]), tuple(x.shape[1:]))
        way = prep.picks.get(key)
        if way is None:
            qconv = self._qconv() is not None
            way = "qconv" if qconv else "im2col"  # without measuring: the int8 convolution
            if tuning.enabled():
                name = (f"conv|{self.out_channels}x{lin.in_features}|{lin.form.name}|"
                        f"{self.kernel_size}/{self.stride}/{self.padding}/{self.dilation}|"
                        f"batch={key[1]}|{'x'.join(map(str, x.shape[1:]))}|{lin.activations}")
                ways = {"im2col": lambda: im2col_conv(x, self, lin),
                        "conv": lambda: self.forward_conv(x)}
                if qconv:
                    ways["qconv"] = lambda: self.forward_qconv(x)
                way = tuning.choose(name, ways)
            prep.picks[key] = way
            dispatch.release_unused(lin)
        return way


def freeze(model: nn.Module, build: bool = True) -> nn.Module:
    """Replace every Linear/Conv2d narrower than fp32 with its deploy form (and fp32 ones with
    torch's nn.Linear / nn.Conv2d), in place, fold
    batch normalization into the layer before it (runtime/fold.py), and prepare how each layer
    runs on its device (build=False leaves that to prepare(), for a model about to load other
    weights)."""
    model.eval()
    _swap(model)
    fold_batchnorm(model, lambda m: m.linear if isinstance(m, FrozenConv2d) else
                   m if isinstance(m, FrozenLinear) else None)
    return prepare(model) if build else model


def _swap(model: nn.Module):
    for name, child in list(model.named_children()):
        if isinstance(child, (Linear, Conv2d)) and child.precision.bits < 32:
            setattr(model, name, (FrozenLinear if isinstance(child, Linear) else FrozenConv2d)(child))
        elif isinstance(child, (Linear, Conv2d)) and child.weight.dtype == torch.float32:
            setattr(model, name, to_torch(child))  # fp32 layers: torch's own, no quantizer calls
        else:
            _swap(child)


def prepare(model: nn.Module) -> nn.Module:
    """Build every frozen layer's runner now (the native kernel, the CPU layouts), so the first
    forward pass does no one-off work."""
    for m in model.modules():
        if isinstance(m, FrozenLinear):
            m.prepare()
    return model
