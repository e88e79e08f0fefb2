"""Training (QAT when the model has quantized layers), evaluation and latency, from Python.

    hist = train(net, data, epochs=10, seed=0)     # data: triton_dsl.data.Dataset, fitted
    acc = evaluate(net, data)

Runs under torchrun too: when torch.distributed is initialised the model is wrapped in
DistributedDataParallel and each rank trains on its shard of every epoch.
"""
from __future__ import annotations

import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from .data import DataError, Dataset


def rank_and_world() -> tuple[int, int]:
    """(rank, world size) under torch.distributed, else (0, 1)."""
    d = torch.distributed
    if d.is_available() and d.is_initialized():
        return d.get_rank(), d.get_world_size()
    return 0, 1


def check_classes(model: nn.Module, data: Dataset):
    with torch.no_grad():
        out = model.eval()(data.x_test[:1])
    if out.dim() != 2 or out.shape[1] < data.classes:
        raise DataError(f"{data.name} has {data.classes} classes but the model outputs shape "
                        f"{list(out.shape[1:])}")


@torch.no_grad()
def evaluate(model: nn.Module, data: Dataset, split: str = "test", batch_size: int = 256) -> float:
    """Accuracy in percent."""
    model.eval()
    correct = total = 0
    for x, y in data.batches(split, batch_size):
        correct += (model(x).argmax(dim=1) == y).sum().item()
        total += len(y)
    return 100.0 * correct / max(total, 1)


@torch.no_grad()
def latency(model: nn.Module, input_shape, batch: int = 1, repeat: int = 30) -> float:
    """Median forward time in ms on the CPU for a batch of random inputs."""
    model.eval()
    x = torch.randn(batch, *input_shape)
    for _ in range(3):
        model(x)
    ts = []
    for _ in range(repeat):
        t = time.perf_counter()
        model(x)
        ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


def train(model: nn.Module, data: Dataset, epochs: int = 10, lr: float = 1e-3,
          batch_size: int = 64, seed: int = 0, progress: bool = True, log=None,
          on_epoch=None) -> list[dict]:
    """Adam with a cosine schedule on cross-entropy. Returns one record per epoch:
    {epoch, loss, train_acc, test_acc, seconds}; on_epoch(record, model) may add to it."""
    rank, world = rank_and_world()
    log = log or (lambda s: print(s, file=sys.stderr))
    check_classes(model, data)
    net = model
    if world > 1:
        net = nn.parallel.DistributedDataParallel(model)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    per_epoch = -(-len(data.x_train) // (batch_size * world))  # batches per rank and epoch
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs * per_epoch, 1))
    history = []
    for epoch in range(1, epochs + 1):
        t0 = time.perf_counter()
        net.train()
        stats = torch.zeros(3)  # loss sum, correct, count
        batches = data.batches("train", batch_size, shuffle=True, seed=seed * 1000 + epoch,
                               rank=rank, world=world)
        bar = _bar(batches, per_epoch, f"epoch {epoch}/{epochs}", progress and rank == 0)
        for x, y in bar:
            opt.zero_grad(set_to_none=True)
            out = net(x)
            loss = F.cross_entropy(out, y)
            loss.backward()
            opt.step()
            sched.step()
            stats += torch.tensor([loss.item() * len(y), (out.argmax(1) == y).sum().item(),
                                   len(y)])
        if world > 1:
            torch.distributed.all_reduce(stats)
        rec = {"epoch": epoch, "loss": round(stats[0].item() / stats[2].item(), 5),
               "train_acc": round(100 * stats[1].item() / stats[2].item(), 3),
               "test_acc": round(evaluate(model, data), 3),
               "seconds": round(time.perf_counter() - t0, 3)}
        if on_epoch is not None:
            on_epoch(rec, model)
        history.append(rec)
        if rank == 0:
            log(f"epoch {epoch:>3}/{epochs}  loss {rec['loss']:.4f}  train {rec['train_acc']:6.2f}%"
                f"  test {rec['test_acc']:6.2f}%  ({rec['seconds']:.1f} s)")
    return history


def _bar(it, total, desc, enabled):
    if not enabled:
        return it
    try:
        from tqdm import tqdm
    except ImportError:
        return it
    return tqdm(it, total=total, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True)
