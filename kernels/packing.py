"""Weight packing. Pure PyTorch; the layout is the contract between packers, kernels and checkpoints.

Ternary, "K-planar" 2-bit layout. A row of K codes c = w + 1 in {0, 1, 2} is padded with code 1
(weight 0) to 4*KQ, KQ = ceil(K / 4), and split into four planes of KQ codes:

    packed[n, j] = c[n, j] | c[n, j + KQ] << 2 | c[n, j + 2 KQ] << 4 | c[n, j + 3 KQ] << 6

so a kernel that loads a tile of bytes gets, with one shift and one mask per plane, four
contiguous K-slices of the weight (no shuffles), and K need not be a multiple of 4.

Int8: symmetric codes in [-127, 127] with fp32 scales per output channel ([N]) or per group of
``group_size`` consecutive inputs ([N, K // group_size]).
"""
from __future__ import annotations

import torch

PLANES = 4
PAD_CODE = 1  # the code of weight 0


def packed_cols(k: int) -> int:
    return -(-k // PLANES)


def pack_ternary(w: torch.Tensor) -> torch.Tensor:
    """int8 (or any integer/float) tensor [N, K] with values in {-1, 0, 1} -> uint8 [N, ceil(K/4)]."""
    if w.dim() != 2:
        raise ValueError(f"pack_ternary: w must be 2-d [N, K], got shape {tuple(w.shape)}")
    if w.numel() and (w.min() < -1 or w.max() > 1 or (w.is_floating_point() and (w != w.round()).any())):
        raise ValueError("pack_ternary: w must hold only -1, 0 and +1")
    n, k = w.shape
    kq = packed_cols(k)
    codes = torch.full((n, PLANES * kq), PAD_CODE, dtype=torch.uint8, device=w.device)
    codes[:, :k] = (w.to(torch.int16) + 1).to(torch.uint8)
    planes = codes.view(n, PLANES, kq)
    return (planes[:, 0] | planes[:, 1] << 2 | planes[:, 2] << 4 | planes[:, 3] << 6).contiguous()


def unpack_ternary(packed: torch.Tensor, k: int) -> torch.Tensor:
    """uint8 [N, ceil(K/4)] -> int8 [N, K] in {-1, 0, 1}: the inverse of pack_ternary."""
    if packed.dtype != torch.uint8 or packed.dim() != 2:
        raise ValueError(f"unpack_ternary: packed must be 2-d uint8, got {packed.dtype} of shape "
                         f"{tuple(packed.shape)}")
    if packed.shape[1] != packed_cols(k):
        raise ValueError(f"unpack_ternary: packed has {packed.shape[1]} columns, K={k} needs "
                         f"{packed_cols(k)}")
    planes = [(packed >> (2 * s)) & 3 for s in range(PLANES)]
    codes = torch.cat(planes, dim=1)[:, :k]
    return codes.to(torch.int8) - 1


def quantize_int8(w: torch.Tensor, group_size: int | None = None):
    """float [N, K] -> (int8 codes [N, K], fp32 scales [N] or [N, K // group_size])."""
    if w.dim() != 2:
        raise ValueError(f"quantize_int8: w must be 2-d [N, K], got shape {tuple(w.shape)}")
    n, k = w.shape
    v = w.float()
    if group_size:
        if k % group_size:
            raise ValueError(f"quantize_int8: group_size={group_size} does not divide K={k}")
        v = v.view(n, k // group_size, group_size)
    amax = v.abs().amax(dim=-1, keepdim=True)
    scale = torch.where(amax > 0, amax / 127, torch.ones_like(amax))
    q = torch.clamp(torch.round(v / scale), -127, 127).to(torch.int8).view(n, k)
    return q, scale.squeeze(-1).contiguous()


def dequantize_int8(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    n, k = q.shape
    if k == 0:  # no inputs: the scale's shape says nothing more
        return q.float()
    if scale.dim() == 2:
        g = k // scale.shape[1]
        return (q.float().view(n, -1, g) * scale[..., None]).view(n, k)
    return q.float() * scale.view(-1, 1)


def abs_packed(packed: torch.Tensor) -> torch.Tensor:
    """The packing of |W| from the packing of W, on the bytes: in each 2-bit field code 1
    (weight 0) stays 1 and codes 0 and 2 (weights -1, +1) become 2 (weight +1)."""
    low = packed & 0x55
    return low | ((low ^ 0x55) << 1)


def pack_bits(values: torch.Tensor, bits: int) -> torch.Tensor:
    """Unsigned integers [N, K] below 2**bits -> uint8 [N, ceil(K * bits / 8)], each row a
    little-endian bit stream (value k occupies bits k*bits .. k*bits + bits - 1)."""
    n, k = values.shape
    v = values.to(torch.int32)
    if v.numel() and (v.min() < 0 or v.max() >= 1 << bits):
        raise ValueError(f"pack_bits: values must lie in [0, {(1 << bits) - 1}]")
    stream = ((v[..., None] >> torch.arange(bits, dtype=torch.int32)) & 1).reshape(n, k * bits)
    pad = (-stream.shape[1]) % 8
    stream = torch.nn.functional.pad(stream, (0, pad)).reshape(n, -1, 8)
    return (stream << torch.arange(8, dtype=torch.int32)).sum(-1).to(torch.uint8)


def unpack_bits(packed: torch.Tensor, bits: int, k: int) -> torch.Tensor:
    """The inverse of pack_bits: int32 [N, K]."""
    n = packed.shape[0]
    stream = ((packed.to(torch.int32)[..., None] >> torch.arange(8, dtype=torch.int32)) & 1)
    stream = stream.reshape(n, -1)[:, : k * bits].reshape(n, k, bits)
    return (stream << torch.arange(bits, dtype=torch.int32)).sum(-1)
