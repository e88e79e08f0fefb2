"""Runtime used by generated modules: trainable layers, quantizers, containers."""
from ..lang.precision import FP32, Binary, Float, Int, Ternary
from .layers import Conv2d, Linear
from .frozen import FrozenConv2d, FrozenLinear, freeze, prepare
from .frozen_conv import conv_add_relu, conv_relu
from .model import CompiledModel, Group, ternary_act
from .transformer import MLP, Attention, KVCache, RMSNorm, pre_norm, pre_norms

__all__ = ["Linear", "Conv2d", "freeze", "prepare", "FrozenLinear", "FrozenConv2d",
           "CompiledModel", "Group", "ternary_act", "conv_relu", "conv_add_relu",
           "Attention", "MLP", "KVCache", "RMSNorm", "pre_norm", "pre_norms",
           "Float", "Int", "Ternary", "Binary", "FP32"]
