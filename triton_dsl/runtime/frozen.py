"""Deploy form: trained layers frozen into packed weights whose forward calls the kernels.

    frozen = freeze(model)   # in place; returns the model

The layers: FrozenLinear (frozen_linear.py) and FrozenConv2d (frozen_conv.py) hold the stored
form of their weight (forms.py); how each runs is dispatch.py's choice, among runners.py's ways.
Static activations keep their calibrated fake quantizer in front of the weight-only kernel.

The frozen output equals the trainable layer's fake-quantized eval forward up to float rounding:
the kernels sum in a different order (fp32 paths ~1e-6 relative), the CPU float paths carry
16-bit fixed-point activations (~1.5e-5 relative), and int8-activation paths are exact in their
integer part (the CPU ones bit-exact with the reference twins).
"""
from __future__ import annotations

import warnings

import torch
from torch import nn

from .fold import fold_batchnorm
from .frozen_conv import FrozenConv2d
from .frozen_linear import FrozenLinear
from .layers import Conv2d, Linear, to_torch
from .quantizers import NotCalibrated, static_quantizers, uncalibrated

__all__ = ["FrozenLinear", "FrozenConv2d", "freeze", "prepare"]


def freeze(model: nn.Module, build: bool = True) -> nn.Module:
    """Replace every Linear/Conv2d narrower than fp32 with its deploy form (and fp32 ones with
    torch's nn.Linear / nn.Conv2d), in place, fold
    batch normalization into the layer before it (runtime/fold.py), and prepare how each layer
    runs on its device (build=False leaves that to prepare(), for a model about to load other
    weights). Static activations must be calibrated first: a model none of whose static
    ranges has seen a batch is refused (NotCalibrated names the layers); one with only some
    uncalibrated (a layer the forward never reaches, say) freezes with a warning, and such a
    layer says so if it is ever called."""
    missing = [] if not build else uncalibrated(model)
    if missing:
        more = f" and {len(missing) - 3} more" if len(missing) > 3 else ""
        said = (f"layer {', '.join(missing[:3])}{more}: static activation ranges are not "
                "calibrated; calibrate first (triton-dsl ptq --calib DATA, triton_dsl.calibrate("
                "model, batches), or training, whose observers calibrate)")
        if len(missing) == len(static_quantizers(model)):
            raise NotCalibrated(said)
        warnings.warn(said, stacklevel=2)
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
