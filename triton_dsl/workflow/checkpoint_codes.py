"""How a frozen checkpoint stores weights narrower than their in-memory form, and the checks that
stored tensors fit the model their source declares, before and after it is allocated.

Binary weights are kept as 1 sign bit each, integer codes below 8 bits (or asymmetric 8-bit
ones) as a little-endian bit stream per row. Every stored code must be one the encoder writes:
the unused 2-bit ternary code 3, int8 -128 for symmetric weights, or padding bits that are not
zero would otherwise be wrapped into some other weight silently.
"""
from __future__ import annotations

import torch

from ..kernels.packing import pack_bits, pack_ternary, unpack_bits, unpack_ternary
from .checkpoint_format import CheckpointError, nbytes

# A frozen layer stores at least 1 bit per weight; its trainable form, built before freezing,
# holds fp32 weights: at most 32x the stored bytes, plus room for small layers and headers.
_GROWTH, _SLACK = 32, 1 << 20


def encodings(model) -> dict:
    """{state key: how it is stored narrower than its in-memory dtype}."""
    from ..lang.precision import Binary, Int, storage_bits
    from ..runtime.frozen import FrozenLinear
    out = {}
    for name, mod in model.named_modules():
        if not isinstance(mod, FrozenLinear):
            continue
        p, key = mod.precision, (name + "." if name else "")
        if isinstance(p, Binary):
            out[key + "packed"] = {"encoding": "binary", "k": mod.in_features}
        elif isinstance(p, Int) and mod.mode in ("int8", "int16"):
            bits = storage_bits(p)  # codes relative to the zero point: + 1 when asymmetric
            offset = (1 << (bits - 1)) - (1 if p.symmetric else 0)
            if bits < 16 and (bits < 8 or mod.mode == "int16"):
                out[key + "codes"] = {"encoding": "bits", "bits": bits, "offset": offset,
                                      "dtype": str(mod.codes.dtype).replace("torch.", "")}
    return out


def encode(t: torch.Tensor, enc: dict) -> torch.Tensor:
    if enc["encoding"] == "binary":  # the 2-bit ternary packing holds only -1 and +1: keep signs
        return pack_bits((unpack_ternary(t, enc["k"]) > 0).to(torch.int32), 1)
    return pack_bits(t.to(torch.int32) + enc["offset"], enc["bits"])


def decode(t: torch.Tensor, enc: dict, like: torch.Tensor) -> torch.Tensor:
    if enc["encoding"] == "binary":
        signs = unpack_bits(t, 1, enc["k"])
        return pack_ternary((signs * 2 - 1).to(torch.int8))
    k = like.shape[1]
    return (unpack_bits(t, enc["bits"], k) - enc["offset"]).to(getattr(torch, enc["dtype"]))


def _shape(s) -> str:
    return "[" + ", ".join(map(str, s)) + "]"


def same_keys(expected, stored, missing, unexpected):
    """The first key of ``expected`` that ``stored`` lacks, else the first of ``stored`` that
    ``expected`` lacks, as a CheckpointError saying missing(key) or unexpected(key)."""
    for k in expected:
        if k not in stored:
            raise CheckpointError(missing(k))
    for k in stored:
        if k not in expected:
            raise CheckpointError(unexpected(k))


def compare(expected: dict, stored: dict, name: str):
    """Both {key: (dtype, shape)}: the first missing, unexpected or different tensor, named."""
    same_keys(expected, stored,
              lambda k: f"{name}: tensor {k!r} is missing (the model its source declares has it)",
              lambda k: f"{name}: unexpected tensor {k!r} (the model its source declares has "
                        "no such field)")
    for k, (dtype, shape) in expected.items():
        sdtype, sshape = stored[k]
        if sdtype != dtype:
            raise CheckpointError(f"{name}: tensor {k!r} is {str(sdtype)[6:]}, expected "
                                  f"{str(dtype)[6:]}")
        if tuple(sshape) != tuple(shape):
            raise CheckpointError(f"{name}: tensor {k!r} has shape {_shape(sshape)}, the model "
                                  f"expects {_shape(shape)}")


def check_declared(cls, infos: dict, kind: str, name: str):
    """Before allocating the model: build it on the meta device (no memory) and compare.
    A trainable file must hold exactly its state; a frozen one is built trainable first, so
    its declared size is bounded by what the file stores."""
    with torch.device("meta"):
        net = cls()
    state = {k: (v.dtype, tuple(v.shape)) for k, v in net.state_dict().items()}
    if kind == "trainable":
        compare(state, infos, name)
        return
    declared = sum(nbytes(i) for i in state.values())
    stored = sum(nbytes(i) for i in infos.values())
    if declared > _GROWTH * stored + _SLACK:
        raise CheckpointError(f"{name}: its tdsl_source declares {declared:,} bytes of weights "
                              f"but the file stores {stored:,}: it does not hold that model")


def decode_all(tensors: dict, state: dict, encs: dict, name: str) -> dict:
    """Stored tensors -> the state dict's forms; an encoded tensor must re-encode to itself
    (no stray padding bits)."""
    out = dict(tensors)
    for k, enc in encs.items():
        if k not in tensors:
            raise CheckpointError(f"{name}: tensor {k!r} is missing (the model its source "
                                  "declares has it)")
        want = encode(state[k], enc)
        compare({k: (want.dtype, tuple(want.shape))},
                {k: (tensors[k].dtype, tuple(tensors[k].shape))}, name)
        out[k] = decode(tensors[k], enc, state[k])
        if not torch.equal(encode(out[k], enc), tensors[k]):
            raise CheckpointError(f"{name}: tensor {k!r} has padding bits set (corrupt)")
    return out


def check_codes(model, tensors: dict, name: str):
    """Every packed ternary code in {0, 1, 2} with padding 1; integer codes in the range their
    precision writes (symmetric b bits: +-(2^(b-1) - 1); asymmetric: +-(2^b - 1))."""
    from ..lang.precision import Int
    from ..runtime.frozen import FrozenLinear
    for mname, mod in model.named_modules():
        if not isinstance(mod, FrozenLinear):
            continue
        pre = mname + "." if mname else ""
        if mod.mode == "ternary":
            key = pre + "packed"
            packed = tensors[key]
            codes = torch.cat([(packed >> (2 * s)) & 3 for s in range(4)], dim=1)
            if (codes == 3).any():
                raise CheckpointError(f"{name}: tensor {key!r} holds the unused 2-bit code 3")
            if not torch.equal(pack_ternary(unpack_ternary(packed, mod.in_features)), packed):
                raise CheckpointError(f"{name}: tensor {key!r} has padding codes that are not "
                                      "zero weights (corrupt)")
        elif mod.mode in ("int8", "int16") and isinstance(mod.precision, Int):
            key, p = pre + "codes", mod.precision
            lim = (1 << (p.bits - 1)) - 1 if p.symmetric else (1 << p.bits) - 1
            c = tensors[key]
            if c.numel() and (c.min() < -lim or c.max() > lim):
                bad = int(c.min()) if c.min() < -lim else int(c.max())
                raise CheckpointError(f"{name}: tensor {key!r} holds code {bad}, outside "
                                      f"[{-lim}, {lim}] of {p.to_source()}")


def fill(model, tensors: dict, meta: dict, fields: dict, name: str, what: str,
         state: dict | None = None):
    """Load a checkpoint's tensors into ``model`` (built, and frozen if the file is): the
    encodings and every tensor's dtype and shape compared with the model's (``what`` names it
    in messages), codes decoded and checked, the state loaded; then eval and, frozen, the CPU
    forms built, so the first forward pass pays for nothing. Returns the model."""
    from ..runtime.frozen import prepare
    state = model.state_dict() if state is None else state
    encs = encodings(model)
    if encs != fields["encodings"]:
        raise CheckpointError(f"{name}: metadata field 'encodings' does not match {what}")
    compare({k: (v.dtype, tuple(v.shape)) for k, v in state.items() if k not in encs},
            {k: (v.dtype, tuple(v.shape)) for k, v in tensors.items() if k not in encs}, name)
    tensors = decode_all(tensors, state, encs, name)
    check_codes(model, tensors, name)
    try:
        model.load_state_dict(tensors, strict=True)
    except (RuntimeError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(f"{name}: tensors do not fit model {meta['model']!r}: "
                              f"{first}") from None
    model.eval()
    if meta["kind"] == "frozen":
        prepare(model)
    model.checkpoint_meta = meta
    return model
