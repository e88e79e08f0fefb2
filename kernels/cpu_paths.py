"""Which prepacked CPU form serves a weight: one registry, one choice, used by the public ops
(kernels/ops.py) and by frozen layers (triton_dsl/runtime/dispatch.py) alike.

A path is a class with a name, ``fits(spec, activations)`` and ``build(codes, scale, spec)``;
PATHS lists them in order of preference, and ``choose`` takes the first that fits. A new CPU
kernel is one new class in that list.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from . import cpu


@dataclass(frozen=True)
class WeightSpec:
    """What a CPU path needs to know of a weight [n, k]: ternary codes ({-1, 0, 1}) or int8
    codes, with per-channel scales (group None) or a scale per ``group`` inputs."""
    n: int
    k: int
    ternary: bool
    group: int | None = None


class NativeGrouped:
    """cpu_linear.c's grouped kernel: int8 (or 4-bit, as nibbles) codes, per-group scales,
    float activations (W8A16 / W4A16). VNNI only."""
    name = "grouped"

    @staticmethod
    def fits(spec: WeightSpec, activations: str) -> bool:
        return (spec.group is not None and activations == "none"
                and cpu.native_grouped(spec.k, spec.group))

    @staticmethod
    def build(codes: torch.Tensor, scale: torch.Tensor, spec: WeightSpec):
        return cpu.PackedGrouped(codes, scale)


class Native:
    """cpu_linear.c: ternary weights at 2 bits (AVX-512 VNNI or AVX2), int8 weights (VNNI)."""
    name = "native"

    @staticmethod
    def fits(spec: WeightSpec, activations: str) -> bool:
        return (spec.group is None and cpu.native_fits(spec.k)
                and (spec.ternary or cpu.native_int8()))

    @staticmethod
    def build(codes: torch.Tensor, scale: torch.Tensor, spec: WeightSpec):
        return cpu.PackedNative(codes, scale, spec.ternary)


class Int8Gemm:
    """torch's fbgemm / oneDNN int8 GEMM. Without VNNI their u8 x s8 pair sums saturate at
    int16 unless the weights are small: ternary codes (|w| <= 1, pair sums <= 510) are safe,
    int8 codes are not, so int8 weights take this path only where it is exact."""
    name = "int8-gemm"

    @staticmethod
    def fits(spec: WeightSpec, activations: str) -> bool:
        if spec.group is not None:
            return False
        return cpu.fbgemm_exact() or (spec.ternary and cpu.engine() is not None)

    @staticmethod
    def build(codes: torch.Tensor, scale: torch.Tensor, spec: WeightSpec):
        return cpu.PackedInt8(codes, scale)


PATHS = [NativeGrouped, Native, Int8Gemm]


def choose(spec: WeightSpec, activations: str):
    """The first path of PATHS that serves this weight with these activations ("none" or
    "dynamic"), or None: then the caller runs an fp32 matmul on the dequantized weight."""
    for path in PATHS:
        if path.fits(spec, activations):
            return path
    return None
