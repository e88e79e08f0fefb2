"""Training (QAT when the model has quantized layers), evaluation and latency, from Python.

    hist = train(net, data, epochs=10, seed=0)     # data: triton_dsl.data.Dataset, fitted
    acc = evaluate(net, data)                      # on the test split

Runs under torchrun too: when torch.distributed is initialised the model is wrapped in
DistributedDataParallel and each rank trains on its shard of every epoch.
"""
from __future__ import annotations

import math
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
    from ..runtime.quantizers import uncalibrated_passthrough
    with torch.no_grad(), uncalibrated_passthrough(model):  # training calibrates them
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


def latency(model: nn.Module, input_shape, batch: int = 1, repeat: int = 30) -> float:
    """Median forward time in ms on the CPU for a batch of random inputs, measured as a
    deployment runs: eval mode, under torch.inference_mode(). A token model gets its
    example_input (token ids) instead."""
    model.eval()
    x = model.example_input(batch) if getattr(model, "vocab_size", None) else \
        torch.randn(batch, *input_shape)
    with torch.inference_mode():
        for _ in range(3):
            model(x)
        ts = []
        for _ in range(repeat):
            t = time.perf_counter()
            model(x)
            ts.append(time.perf_counter() - t)
    return statistics.median(ts) * 1e3


OPTIMIZERS = ("adam", "adamw", "sgd")
SCHEDULES = ("cosine", "none")


def check_options(epochs, lr, weight_decay, batch_size, optimizer, schedule):
    """ValueError naming the first option out of range (the CLI checks them at parse time)."""
    if type(epochs) is not int or epochs < 1:
        raise ValueError(f"epochs must be a whole number of at least 1, got {epochs!r}")
    if not (isinstance(lr, (int, float)) and math.isfinite(lr) and lr > 0):
        raise ValueError(f"lr must be a positive number, got {lr!r}")
    if not (isinstance(weight_decay, (int, float)) and math.isfinite(weight_decay)
            and weight_decay >= 0):
        raise ValueError(f"weight_decay must be a number >= 0, got {weight_decay!r}")
    if type(batch_size) is not int or batch_size < 1:
        raise ValueError(f"batch_size must be a whole number of at least 1, got {batch_size!r}")
    if optimizer not in OPTIMIZERS:
        raise ValueError(f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {optimizer!r}")
    if schedule not in SCHEDULES:
        raise ValueError(f"schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")


def make_optimizer(params, name: str, lr: float, weight_decay: float):
    if name == "sgd":
        return torch.optim.SGD(params, lr=lr, momentum=0.9, weight_decay=weight_decay)
    cls = torch.optim.AdamW if name == "adamw" else torch.optim.Adam
    return cls(params, lr=lr, weight_decay=weight_decay)


def best_record(history: list[dict]) -> dict | None:
    """The epoch with the highest validation accuracy, or for a language model the lowest
    validation bits per byte (the earliest among equals)."""
    scored = [r for r in history if r.get("val_bpb") is not None]
    if scored:
        return min(scored, key=lambda r: (r["val_bpb"], r["epoch"]))
    scored = [r for r in history if r.get("val_acc") is not None]
    return max(scored, key=lambda r: (r["val_acc"], -r["epoch"])) if scored else None


def train(model: nn.Module, data: Dataset, epochs: int = 10, lr: float = 1e-3,
          batch_size: int = 64, seed: int = 0, progress: bool = True, log=None,
          on_epoch=None, optimizer: str = "adam", weight_decay: float = 0.0,
          schedule: str = "cosine", start_epoch: int = 0, best: dict | None = None
          ) -> list[dict]:
    """Cross-entropy with ``optimizer`` (adam, adamw, sgd with momentum 0.9) and a cosine or
    constant learning rate. Returns one record per epoch: {epoch, loss, train_acc, val_acc,
    lr, seconds}; on_epoch(record, model) may add to it. The model ends with the weights of
    the epoch best on the validation split (the test split is never looked at); ``best``, the
    record of the weights the model starts with (resuming), competes too. Epochs are numbered
    from start_epoch + 1."""
    check_options(epochs, lr, weight_decay, batch_size, optimizer, schedule)
    check_classes(model, data)
    world = rank_and_world()[1]
    per_epoch = -(-len(data.x_train) // (batch_size * world))  # batches per rank and epoch
    return run_epochs(model, Classify(data), per_epoch, epochs, lr, batch_size, seed, optimizer,
                      weight_decay, schedule, start_epoch, best, progress, log, on_epoch)


class Classify:
    """Training a classifier, for run_epochs: the per-batch step, its statistics (loss sum,
    correct, count), the epoch's record and log line."""
    width = 3

    def __init__(self, data: Dataset):
        self.data = data
        self.has_val = data.x_val is not None and len(data.x_val) > 0

    def batches(self, *args, **kwargs):
        return self.data.batches("train", *args, **kwargs)

    def step(self, net, x, y):
        out = net(x)
        loss = F.cross_entropy(out, y)
        return loss, torch.tensor([loss.item() * len(y), (out.argmax(1) == y).sum().item(),
                                   len(y)])

    def record(self, epoch: int, stats: torch.Tensor, model) -> dict:
        return {"epoch": epoch, "loss": round(stats[0].item() / stats[2].item(), 5),
                "train_acc": round(100 * stats[1].item() / stats[2].item(), 3),
                "val_acc": round(evaluate(model, self.data, "val"), 3) if self.has_val else None}

    def line(self, rec: dict) -> str:
        val = f"  val {rec['val_acc']:6.2f}%" if self.has_val else ""
        return f"loss {rec['loss']:.4f}  train {rec['train_acc']:6.2f}%{val}"


def run_epochs(model, task, per_epoch: int, epochs: int, lr: float, batch_size: int, seed: int,
               optimizer: str, weight_decay: float, schedule: str, start_epoch: int,
               best: dict | None, progress: bool, log, on_epoch=None) -> list[dict]:
    """The epoch loop of every trainer (train, lm_train.train_lm): DDP wrapping and sharding,
    the optimizer and schedule, at most ``per_epoch`` batches an epoch, statistics summed over
    ranks, one record an epoch (``task``'s metrics, then lr and seconds), and the weights of
    the best epoch on the validation split kept. ``task`` (Classify, lm_train.NextByte) gives
    width, has_val, batches(batch_size, shuffle, seed, rank, world), step(net, x, y) ->
    (loss, the batch's statistics), record(epoch, stats, model), line(rec)."""
    rank, world = rank_and_world()
    log = log or (lambda s: print(s, file=sys.stderr))
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = make_optimizer(model.parameters(), optimizer, lr, weight_decay)
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs * per_epoch, 1))
             if schedule == "cosine" else None)
    best_state = _copy_state(model) if best is not None and task.has_val else None
    history = []
    last = start_epoch + epochs
    for epoch in range(start_epoch + 1, last + 1):
        t0 = time.perf_counter()
        net.train()
        stats = torch.zeros(task.width)
        batches = task.batches(batch_size, shuffle=True, seed=seed * 1000 + epoch, rank=rank,
                               world=world)
        bar = _bar(batches, per_epoch, f"epoch {epoch}/{last}", progress and rank == 0)
        for i, (x, y) in enumerate(bar):
            if i >= per_epoch:
                break
            opt.zero_grad(set_to_none=True)
            loss, batch_stats = task.step(net, x, y)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            stats += batch_stats
        if world > 1:
            torch.distributed.all_reduce(stats)
        rec = task.record(epoch, stats, model)
        rec.update(lr=float(f"{opt.param_groups[0]['lr']:.4g}"),
                   seconds=round(time.perf_counter() - t0, 3))
        if on_epoch is not None:
            on_epoch(rec, model)
        history.append(rec)
        if task.has_val and best_record(([best] if best else []) + history) is rec:
            best_state = _copy_state(model)
        if rank == 0:
            log(f"epoch {epoch:>3}/{last}  {task.line(rec)}  ({rec['seconds']:.1f} s)")
    if best_state is not None:  # every rank holds the same weights and picks the same epoch
        model.load_state_dict(best_state)
    return history


def _copy_state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _bar(it, total, desc, enabled):
    if not enabled:
        return it
    try:
        from tqdm import tqdm
    except ImportError:
        return it
    return tqdm(it, total=total, desc=desc, leave=False, file=sys.stderr, dynamic_ncols=True)
