"""What a precision section does to an existing model: one entry per selectable module, and the
size report (`triton-dsl plan`, ``triton_dsl.plan``). No torch here.

Bytes are counted as `triton-dsl summary` counts them (summary.weight_bytes: what the packed
deploy form stores); a module the rules keep as it is counts its weight and bias at their
current width, and every other parameter and buffer of the model (norms, embeddings, modules no
rule can select) counts as it is now (``other_bytes``, read by the runtime).
"""
from __future__ import annotations

import json
from dataclasses import dataclass

from .precision import Precision, learned_params
from .summary import _size, table, weight_bytes


@dataclass(frozen=True)
class Entry:
    name: str
    kind: str  # the module's class name
    weight: tuple  # (N outputs, K inputs each)
    bias: bool
    precision: Precision | None  # None: kept as it is (`skip`, or no rule selects it)
    bits_now: int = 32  # the weight's width as it is

    @property
    def params(self) -> int:
        n, k = self.weight
        extra = learned_params(self.precision, n) if self.precision is not None else 0
        return n * k + n * self.bias + extra

    @property
    def original_bytes(self) -> int:
        n, k = self.weight
        return self.bits_now // 8 * (n * k + n * self.bias)

    @property
    def bytes(self) -> int:
        if self.precision is None:
            return self.original_bytes
        return weight_bytes(self.precision, *self.weight, self.bias)


@dataclass(frozen=True)
class Plan:
    rules: str  # the rules file's path, or <rules> for text
    model: str  # the model's class name
    entries: list
    other_bytes: int = 0

    def __getitem__(self, name: str) -> Precision | None:
        """The precision a module gets (None: kept as it is)."""
        for e in self.entries:
            if e.name == name:
                return e.precision
        raise KeyError(name)

    @property
    def quantized(self) -> list:
        return [e for e in self.entries if e.precision is not None]

    def to_dict(self) -> dict:
        total = sum(e.bytes for e in self.entries) + self.other_bytes
        original = sum(e.original_bytes for e in self.entries) + self.other_bytes
        return {"model": self.model, "rules": self.rules,
                "modules": [{"name": e.name, "kind": e.kind, "weight": list(e.weight),
                             "precision": e.precision.to_source() if e.precision else "skip",
                             "bits": e.precision.bits if e.precision else e.bits_now,
                             "params": e.params, "bytes": e.bytes} for e in self.entries],
                "quantized": len(self.quantized), "other_bytes": self.other_bytes,
                "total_bytes": total, "original_bytes": original,
                "compression": round(original / total, 3) if total else 1.0}

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def render(self) -> str:
        d = self.to_dict()
        head = ("module", "kind", "precision", "weight", "params", "bits", "bytes")
        body = [(m["name"], m["kind"], m["precision"], "[" + ", ".join(map(str, m["weight"]))
                 + "]", f"{m['params']:,}", str(m["bits"]), f"{m['bytes']:,}")
                for m in d["modules"]]
        title = (f"{d['model']} with {d['rules']}: {d['quantized']} of {len(self.entries)} "
                 "modules quantized")
        out = table(title, head, body, first_right=4)
        out += [f"other parameters and buffers, as they are: {d['other_bytes']:,} bytes",
                f"packed size:   {d['total_bytes']:,} bytes ({_size(d['total_bytes'])})",
                f"original size: {d['original_bytes']:,} bytes ({_size(d['original_bytes'])})",
                f"compression:   {d['compression']:.2f}x"]
        return "\n".join(out)


__all__ = ["Entry", "Plan"]
