"""How a frozen layer's matmul runs, and the one cache of what it prepared (a convolution's
own ways, chosen by FrozenConv2d._way, keep their runners and choices in the same slot).

On CUDA tensors, and on the CPU under TRITON_INTERPRET=1, a layer runs its form's generic path
(the Triton kernels). On the CPU the exact ways to run it are:

* "prepacked": a CPU kernel from kernels/cpu_paths.py (the native kernel at 2 bits or int8, its
  grouped variant, or torch's int8 GEMM), built once from the stored codes; the stored buffer
  is then released, so the layer keeps one resident copy of its weight;
* "dense": an fp32 matmul on the weight dequantized once (codes times scales are exact in
  fp32); a candidate only for weights of at most DENSE_MAX elements, so a large layer never
  holds an fp32 copy;
* "generic": the form's own path, for forms no CPU kernel takes (16-bit weights).

Which one runs is chosen per batch bucket: by measurement (runtime/tuning.py) when more than
one is a candidate, else, with TRITON_DSL_TUNE=0, by the size rule of dense_below. The choices
and the runners they need live in the layer's ``prepared`` slot, keyed by (device, activation
mode); moving, loading or copying the layer empties it (FrozenLinear.restore_buffers).
"""
from __future__ import annotations

import torch

from ..kernels import cpu_paths
from ..kernels.common import HAS_TRITON, interpreting, m_bucket
from . import tuning
from .runners import BUILD_LOCK, Dense, Generic, Prepacked, stored

DENSE_MAX = 1 << 20  # weights (4 MiB in fp32): above this no dense copy is ever made


def dense_below(path: str, act: str) -> int:
    """Without measuring: CPU layers with at most this many weights run dense. 2^18 (1 MiB in
    fp32) in front of the int8 GEMM, 2^14 in front of the native kernels, and none with int8
    activations there (measured on the 2-core EPYC: the native kernel wins from 256 x 256 up,
    and the dense path pays for fake-quantizing int8 activations)."""
    if path in ("native", "grouped"):
        return 1 << 14 if act == "none" else 0
    return 1 << 18


def on_cpu_paths(device: torch.device) -> bool:
    """Whether tensors on ``device`` run the CPU paths (a CPU outside Triton's interpreter)."""
    return device.type == "cpu" and not (HAS_TRITON and interpreting())


class Prepared:
    """A layer's runners by name and its choice per batch bucket, for one (device, act)."""

    def __init__(self, key):
        self.key, self.runners, self.picks = key, {}, {}
        self.by_rows = {}  # rows -> runner: the per-call lookup, filled as rows are met

    @property
    def nbytes(self) -> int:
        return sum(r.nbytes for r in self.runners.values())

    def prepacked(self):
        return self.runners.get("prepacked")

    def forget(self, name: str):
        """Drop a runner no choice uses any more (a dense copy that lost a measurement)."""
        run = self.runners.pop(name, None)
        self.by_rows = {r: v for r, v in self.by_rows.items() if v is not run}


def candidates(mod, device: torch.device, act: str) -> dict:
    """{name: how to build the runner} for the exact ways ``mod`` can run here."""
    if not on_cpu_paths(device):
        return {"generic": Generic}
    spec = mod.form.cpu_spec(mod)
    if spec is None:
        return {"generic": Generic}
    out = {}
    path = cpu_paths.choose(spec, act)
    if path is not None:
        out["prepacked"] = lambda m: Prepacked(m, path, stored(m, lambda: m.form.cpu_parts(m)))
    if path is None or mod.in_features * mod.out_features <= DENSE_MAX:
        out["dense"] = Dense
    return out


def _heuristic(mod, names, act) -> str:
    if "prepacked" not in names:
        return next(iter(names))
    path = cpu_paths.choose(mod.form.cpu_spec(mod), act)
    small = mod.in_features * mod.out_features <= dense_below(path.name, act)
    return "dense" if small and "dense" in names else "prepacked"


def build(mod, prep: Prepared, name: str, make):
    """The runner ``name`` of the slot, made by make(mod) the first time (once, under
    BUILD_LOCK, however many threads ask)."""
    run = prep.runners.get(name)
    if run is None:
        with BUILD_LOCK:  # two threads' first calls: one builds, the other finds it built
            run = prep.runners.get(name)
            if run is None:
                run = make(mod)
                if isinstance(run, Prepacked):  # the prepacked form holds the codes: release
                    buf = getattr(mod, mod.form.stored)
                    setattr(mod, mod.form.stored, torch.empty(0, dtype=buf.dtype))
                prep.runners[name] = run
    return run


def prepare(mod, device: torch.device, act: str, cpu: bool | None = None) -> Prepared:
    """The layer's Prepared slot for (device, act), emptied and rebuilt when that changed;
    ``cpu``: on_cpu_paths(device) if the caller has it."""
    key = (device, act, on_cpu_paths(device) if cpu is None else cpu)
    if mod.prepared is None or mod.prepared.key != key:
        mod.restore_buffers()
        mod.prepared = Prepared(key)
    return mod.prepared


def runner(mod, x: torch.Tensor, act: str):
    """How ``mod`` (a FrozenLinear) runs ``x``: chosen once per batch bucket, built once. The
    common case, a row count met before on the same device, is two comparisons and a lookup."""
    rows = x.numel() // max(x.shape[-1], 1)
    prep = mod.prepared
    if prep is not None and prep.key[0] == x.device and prep.key[1] == act \
            and prep.key[2] == on_cpu_paths(x.device):
        run = prep.by_rows.get(rows)
        if run is not None:
            return run
    prep = prepare(mod, x.device, act)
    run = prep.by_rows[rows] = _pick(mod, prep, x, act, rows)
    return run


def _pick(mod, prep: Prepared, x: torch.Tensor, act: str, rows: int):
    bucket = m_bucket(rows)
    name = prep.picks.get(bucket)
    if name is None:
        makers = candidates(mod, x.device, act)
        if tuning.enabled() and len(makers) > 1:
            trials = {n: (lambda n=n, m=m: build(mod, prep, n, m)(mod, x, act))
                      for n, m in sorted(makers.items(), key=lambda kv: kv[0] != "dense")}
            key = (f"linear|{mod.out_features}x{mod.in_features}|{mod.form.name}|{act}"
                   f"|rows={bucket}")
            name = tuning.choose(key, trials)
        else:
            name = _heuristic(mod, makers, act)
        prep.picks[bucket] = name
        run = build(mod, prep, name, makers[name])
        if not mod.in_conv:  # a convolution tidies its slot once it has chosen its own way
            release_unused(mod)
        return run
    if name not in prep.runners:  # chosen before, freed since (a convolution went another way)
        return build(mod, prep, name, candidates(mod, x.device, act)[name])
    return prep.runners[name]


# what each convolution way needs of its FrozenLinear's runners (im2col: the matmul's picks)
_CONV_NEEDS = {"conv": "dense", "qconv": "qconv", "int16": "int16"}


def release_unused(mod):
    """Free the runners no choice of the layer uses (candidates that lost a measurement): a
    dense fp32 copy goes; a prepacked form that lost puts the stored codes back and goes.
    A convolution's choices are kept in the same slot, keyed ("conv", bucket, shape)."""
    with BUILD_LOCK:  # it puts the stored codes back: not while another thread builds
        prep = mod.prepared
        convs = [v for k, v in prep.picks.items() if isinstance(k, tuple)]
        used = {_CONV_NEEDS[v] for v in convs if v in _CONV_NEEDS}
        if not mod.in_conv or "im2col" in convs:  # the matmul's own picks count
            used |= {v for k, v in prep.picks.items() if not isinstance(k, tuple)}
        for name in [n for n in prep.runners if n not in used]:
            if name == "prepacked":
                mod.form.rebuild(mod, prep.prepacked().codes())  # keep the small stored codes
            prep.forget(name)
        mod.fast = None


def build_default(mod, device: torch.device, act: str):
    """At freeze and load: the prepacked form where one fits (the native library build and
    the layout conversion happen now, not in the first forward pass)."""
    prep = prepare(mod, device, act)
    make = candidates(mod, device, act).get("prepacked")
    if make is not None:
        build(mod, prep, "prepacked", make)


def dense(mod) -> Dense:
    """The Dense runner kept in the layer's slot (for convolutions that run F.conv2d on its
    weight and bias)."""
    prep = mod.prepared or prepare(mod, next(mod.buffers()).device, "none")
    return build(mod, prep, "dense", Dense)
