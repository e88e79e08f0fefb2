"""Data sets for training, calibration and evaluation. Nothing is downloaded.

    digits            scikit-learn's bundled 8x8 handwritten digits (1797 images), the default
    mnist:DIR         the standard MNIST IDX files in DIR (gzipped or not)
    PATH.pt / .npz    tensors: x and y (and optionally x_test and y_test)
    stdlib, text:PATH bytes for language models: text_data.py (pipeline.load_data picks)

Each data set has three splits: train, val (a seeded tenth held out of the training data, for
choosing epochs and settings) and test (a fixed seeded fifth, or the file's own x_test/y_test;
only reported, never used to choose anything). Images are scaled to [0, 1], then standardised
with the training split's mean and standard deviation, or with the (mean, std) a checkpoint
stores (``norm=``, so evaluation and calibration see inputs as training did), and fitted to the
model's input shape: reshaped when the sizes agree, resized (bilinear) when only the height and
width differ (8x8 digits become 28x28 for an MNIST model).
"""
from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass

import torch
import torch.nn.functional as F


class DataError(Exception):
    """A data set is missing, corrupt or does not fit the model; the message says which."""


@dataclass
class Dataset:
    name: str
    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor
    mean: float = 0.0  # the standardisation applied (x - mean) / std
    std: float = 1.0
    x_val: torch.Tensor | None = None  # held out of the training data
    y_val: torch.Tensor | None = None

    @property
    def classes(self) -> int:
        ys = [y for y in (self.y_train, self.y_val, self.y_test) if y is not None and len(y)]
        return int(max(y.max() for y in ys)) + 1

    def _map(self, f, mean=None, std=None) -> "Dataset":
        return Dataset(self.name, f(self.x_train), self.y_train, f(self.x_test), self.y_test,
                       self.mean if mean is None else mean, self.std if std is None else std,
                       None if self.x_val is None else f(self.x_val), self.y_val)

    def fitted(self, input_shape) -> "Dataset":
        return self._map(lambda x: fit(x, input_shape, self.name))

    def standardized(self, norm: tuple[float, float] | None = None) -> "Dataset":
        """(x - mean) / std with the training split's statistics, or with ``norm``."""
        if norm is None:
            mean, std = self.x_train.mean().item(), self.x_train.std().item() or 1.0
        else:
            mean, std = norm
        return self._map(lambda x: (x - mean) / std, mean, std)

    def with_validation(self, fraction: float) -> "Dataset":
        """A seeded ``fraction`` of the training split held out as the val split."""
        n_val = int(len(self.x_train) * fraction) if len(self.x_train) > 1 else 0
        order = torch.randperm(len(self.x_train), generator=torch.Generator().manual_seed(4321))
        va, tr = order[:n_val], order[n_val:]
        return Dataset(self.name, self.x_train[tr], self.y_train[tr], self.x_test, self.y_test,
                       self.mean, self.std, self.x_train[va], self.y_train[va])

    def batches(self, split: str, batch_size: int, shuffle: bool = False, seed: int = 0,
                rank: int = 0, world: int = 1):
        """Yield (x, y) batches; with world > 1 each rank sees its own shard of every epoch."""
        x, y = {"train": (self.x_train, self.y_train), "val": (self.x_val, self.y_val),
                "test": (self.x_test, self.y_test)}[split]
        if x is None:
            raise DataError(f"{self.name} has no {split} split")
        order = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)) \
            if shuffle else torch.arange(len(x))
        if world > 1:
            order = order[: len(order) // world * world][rank::world]
        for i in range(0, len(order), batch_size):
            idx = order[i: i + batch_size]
            yield x[idx], y[idx]


def fit(x: torch.Tensor, shape, name: str = "data") -> torch.Tensor:
    """Samples [n, ...] reshaped or resized to [n, *shape]."""
    shape = tuple(shape)
    sample = tuple(x.shape[1:])
    if sample == shape:
        return x
    if x[0].numel() == torch.Size(shape).numel():
        return x.reshape(len(x), *shape)
    img = x.reshape(len(x), 1, *sample) if len(sample) == 2 else x
    if img.dim() == 4 and len(shape) == 3 and img.shape[1] == shape[0]:
        return F.interpolate(img.float(), size=shape[1:], mode="bilinear", align_corners=False)
    if img.dim() == 4 and len(shape) == 1 and img.shape[1] == 1:
        side = int(round(shape[0] ** 0.5))
        if side * side == shape[0]:
            return F.interpolate(img.float(), size=(side, side), mode="bilinear",
                                 align_corners=False).reshape(len(x), -1)
    raise DataError(f"{name}: samples of shape {list(sample)} do not fit the model's input "
                    f"{list(shape)}")


def load(spec: str, input_shape=None, test_fraction: float = 0.2, val_fraction: float = 0.1,
         norm: tuple[float, float] | None = None) -> Dataset:
    """A data set by name: 'digits', 'mnist:DIR', or a .pt / .npz file; split into train, val
    and test, standardised (with ``norm`` = (mean, std) when given, else the training split's
    statistics), and fitted to ``input_shape`` when given."""
    if spec == "digits":
        ds = _digits(test_fraction)
    elif spec.startswith("mnist:"):
        ds = load_mnist(spec[len("mnist:"):])
    elif spec.endswith((".pt", ".pth", ".npz")):
        ds = _tensor_file(spec, test_fraction)
    else:
        raise DataError(f"unknown data set {spec!r}: use digits, mnist:DIR, a .pt or .npz file, "
                        "or for a language model stdlib or text:PATH")
    ds = ds.with_validation(val_fraction).standardized(norm)
    return ds.fitted(input_shape) if input_shape is not None else ds


def _split(name, x, y, test_fraction):
    """A fixed, seeded split: the same test set on every run and machine."""
    order = torch.randperm(len(x), generator=torch.Generator().manual_seed(1234))
    n_test = max(1, int(len(x) * test_fraction))
    te, tr = order[:n_test], order[n_test:]
    return Dataset(name, x[tr], y[tr], x[te], y[te])


def _digits(test_fraction):
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:
        raise DataError("the digits data set needs scikit-learn: pip install "
                        "'triton-dsl[data]'") from e
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32) / 16.0
    return _split("digits", x, torch.tensor(d.target, dtype=torch.long), test_fraction)


# --- MNIST IDX files -------------------------------------------------------------------------

_IDX_TYPES = {0x08: (torch.uint8, 1), 0x09: (torch.int8, 1), 0x0B: (torch.int16, 2),
              0x0C: (torch.int32, 4), 0x0D: (torch.float32, 4), 0x0E: (torch.float64, 8)}


def read_idx(path: str) -> torch.Tensor:
    """One IDX file (optionally .gz): magic 0 0 TYPE NDIM, NDIM big-endian sizes, the data."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if raw[:2] == b"\x1f\x8b":
            raw = gzip.decompress(raw)
    except FileNotFoundError:
        raise DataError(f"{path}: no such file") from None
    except (OSError, EOFError, gzip.BadGzipFile) as e:
        raise DataError(f"{path}: cannot read ({e})") from None
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_TYPES:
        raise DataError(f"{path}: not an IDX file (bad magic number)")
    dtype, width = _IDX_TYPES[raw[2]]
    ndim = raw[3]
    if len(raw) < 4 + 4 * ndim:
        raise DataError(f"{path}: truncated IDX header")
    dims = struct.unpack(f">{ndim}I", raw[4: 4 + 4 * ndim])
    count = 1
    for d in dims:
        count *= d
    body = raw[4 + 4 * ndim:]
    if len(body) != count * width:
        raise DataError(f"{path}: header says {list(dims)} ({count * width} bytes of data) but "
                        f"the file holds {len(body)}: truncated or corrupt")
    t = torch.frombuffer(bytearray(body), dtype=torch.uint8)
    if width > 1:  # IDX is big-endian
        t = t.view(-1, width).flip(1).reshape(-1)
    return t.view(dtype).reshape(dims)


def _find(folder, stem):
    for name in (stem, stem + ".gz", stem.replace("-idx", ".idx"), stem.replace("-idx", ".idx") + ".gz"):
        p = os.path.join(folder, name)
        if os.path.exists(p):
            return p
    raise DataError(f"{folder}: no {stem}[.gz] (expected the four standard MNIST IDX files)")


def load_mnist(folder: str) -> Dataset:
    if not os.path.isdir(folder):
        raise DataError(f"mnist:{folder}: not a directory")
    parts = {}
    for key, stem in (("xtr", "train-images-idx3-ubyte"), ("ytr", "train-labels-idx1-ubyte"),
                      ("xte", "t10k-images-idx3-ubyte"), ("yte", "t10k-labels-idx1-ubyte")):
        parts[key] = read_idx(_find(folder, stem))
    for x, y in (("xtr", "ytr"), ("xte", "yte")):
        if len(parts[x]) != len(parts[y]) or parts[x].dim() != 3:
            raise DataError(f"mnist:{folder}: {len(parts[x])} images but {len(parts[y])} labels")
    return Dataset("mnist", parts["xtr"].float() / 255, parts["ytr"].long(),
                   parts["xte"].float() / 255, parts["yte"].long())


def _tensor_file(path, test_fraction):
    if not os.path.isfile(path):
        raise DataError(f"{path}: no such file")
    try:
        if path.endswith(".npz"):
            import numpy as np
            with np.load(path) as z:
                d = {k: torch.from_numpy(z[k]) for k in z.files}
        else:
            d = torch.load(path, map_location="cpu", weights_only=True)
            if isinstance(d, (tuple, list)) and len(d) == 2:
                d = {"x": d[0], "y": d[1]}
    except Exception as e:
        raise DataError(f"{path}: cannot read ({type(e).__name__}: {e})") from None
    if not isinstance(d, dict) or "x" not in d or "y" not in d:
        raise DataError(f"{path}: expected tensors named x and y (and optionally x_test, y_test)")
    x, y = d["x"].float(), d["y"].long()
    if len(x) != len(y):
        raise DataError(f"{path}: x has {len(x)} samples but y has {len(y)}")
    if "x_test" in d and "y_test" in d:
        return Dataset(os.path.basename(path), x, y, d["x_test"].float(), d["y_test"].long())
    return _split(os.path.basename(path), x, y, test_fraction)
