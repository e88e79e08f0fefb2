"""Byte-level text for language models (vocabulary 256: a token is a byte). Nothing is
downloaded.

    stdlib        the default corpus: STDLIB_FILES, sources of the running interpreter's own
                  standard library, which every Python installation has offline
    text:PATH     a text file, or every file under a folder (sorted by path; files with NUL
                  bytes, i.e. binary ones, are skipped)

Each file is split by position: its first 80% goes to train, the next 10% to val, the last 10%
to test, so every split sees every file and no window crosses from one split into another.
Batches are windows of seq_len + 1 bytes (inputs and next-byte targets); the metric is bits
per byte: the mean cross-entropy of the next byte, in bits.
"""
from __future__ import annotations

import math
import os
import sysconfig
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .data import DataError

# Plain modules (not packages) present from Python 3.10 through 3.13, about 0.8 MB of code,
# docstrings and comments together: English and Python, the kind of text a byte model learns
# quickly. Their contents change a little between Python versions, so results name the version.
STDLIB_FILES = ("argparse.py", "ast.py", "dataclasses.py", "difflib.py", "functools.py",
                "inspect.py", "shutil.py", "tarfile.py", "textwrap.py", "typing.py")
MAX_BYTES = 256 << 20  # text:FOLDER reads at most this much
SPLITS = (0.8, 0.1, 0.1)


@dataclass
class TextData:
    name: str
    train: torch.Tensor  # uint8 bytes
    val: torch.Tensor
    test: torch.Tensor
    seq_len: int

    def meta(self) -> dict:
        """What a checkpoint records about its data."""
        return {"name": self.name, "kind": "text", "seq_len": self.seq_len}

    def windows(self, split: str) -> int:
        return max((len(getattr(self, split)) - 1) // self.seq_len, 0)

    def batches(self, split: str, batch_size: int, shuffle: bool = False, seed: int = 0,
                rank: int = 0, world: int = 1):
        """Yield (x, y) [batch, seq_len] int64: y is x shifted by one byte. Without shuffle
        the windows tile the split from its start; with it they start at a seeded offset, in a
        seeded order; with world > 1 each rank takes its own share."""
        data = getattr(self, split)
        g = torch.Generator().manual_seed(seed)
        offset = int(torch.randint(0, self.seq_len, (1,), generator=g)) if shuffle else 0
        n = (len(data) - 1 - offset) // self.seq_len
        if n < 1:
            raise DataError(f"{self.name}: the {split} split ({len(data)} bytes) is shorter "
                            f"than one window of {self.seq_len + 1} bytes")
        starts = offset + self.seq_len * (torch.randperm(n, generator=g) if shuffle
                                          else torch.arange(n))
        if world > 1:
            starts = starts[: len(starts) // world * world][rank::world]
        span = torch.arange(self.seq_len + 1)
        for i in range(0, len(starts), batch_size):
            w = data[starts[i:i + batch_size, None] + span].long()
            yield w[:, :-1], w[:, 1:]


def load_text(spec: str, seq_len: int) -> TextData:
    """'stdlib' or 'text:PATH', split by position, in windows of seq_len."""
    if spec == "stdlib":
        root = sysconfig.get_paths()["stdlib"]
        paths = [os.path.join(root, f) for f in STDLIB_FILES]
        missing = [p for p in paths if not os.path.isfile(p)]
        if missing:
            raise DataError(f"stdlib: this Python has no {missing[0]} (the default corpus reads "
                            "the interpreter's own standard-library sources)")
        name = f"stdlib (Python {sysconfig.get_python_version()})"
    else:
        path = spec[len("text:"):]
        if os.path.isdir(path):
            paths = sorted(os.path.join(d, f) for d, _, fs in os.walk(path) for f in fs)
        elif os.path.isfile(path):
            paths = [path]
        else:
            raise DataError(f"{spec}: no such file or folder")
        name = os.path.basename(os.path.normpath(path))
    parts = {s: [] for s in ("train", "val", "test")}
    total = 0
    for p in paths:
        raw = _read(p)
        if raw is None:
            continue
        total += len(raw)
        if total > MAX_BYTES:
            raise DataError(f"{spec}: more than {MAX_BYTES >> 20} MiB of text")
        a, b = int(len(raw) * SPLITS[0]), int(len(raw) * (SPLITS[0] + SPLITS[1]))
        for split, chunk in zip(parts, (raw[:a], raw[a:b], raw[b:])):
            parts[split].append(chunk)
    if total == 0:
        raise DataError(f"{spec}: no text found")
    splits = {k: _tensor(b"".join(v)) for k, v in parts.items()}
    return TextData(name, splits["train"], splits["val"], splits["test"], seq_len)


def _tensor(raw: bytes) -> torch.Tensor:
    if not raw:
        return torch.zeros(0, dtype=torch.uint8)
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8)


def _read(path: str) -> bytes | None:
    try:
        with open(path, "rb") as f:
            raw = f.read(MAX_BYTES + 1)
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror})") from None
    return None if b"\0" in raw else raw


@torch.no_grad()
def bits_per_byte(model, data: TextData, split: str = "test", batch_size: int = 32) -> float:
    """Mean next-byte cross-entropy over the split's windows, in bits."""
    model.eval()
    total = count = 0.0
    for x, y in data.batches(split, batch_size):
        logits = model(x)
        total += F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), y.reshape(-1),
                                 reduction="sum").item()
        count += y.numel()
    return total / max(count, 1) / math.log(2)
