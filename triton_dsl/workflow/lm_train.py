"""Training a language model (a token model): next-byte cross-entropy on windows of text,
bits per byte on the validation split each epoch; the weights of the best epoch are kept.

Mirrors train.train (the same optimizers, schedule, DDP sharding and record keeping), with
windows of text in place of labelled samples.
"""
from __future__ import annotations

import math
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from .text_data import TextData, bits_per_byte
from .train import _bar, _copy_state, best_record, check_options, make_optimizer, rank_and_world


def lm_loss(net, x, y):
    logits = net(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def train_lm(model: nn.Module, data: TextData, epochs: int = 10, lr: float = 1e-3,
             batch_size: int = 32, seed: int = 0, progress: bool = True, log=None,
             optimizer: str = "adamw", weight_decay: float = 0.0, schedule: str = "cosine",
             start_epoch: int = 0, best: dict | None = None,
             steps: int | None = None) -> list[dict]:
    """One record per epoch: {epoch, loss, val_bpb, lr, seconds}. ``steps`` caps the batches
    per epoch (default: every window of the training split once)."""
    check_options(epochs, lr, weight_decay, batch_size, optimizer, schedule)
    rank, world = rank_and_world()
    log = log or (lambda s: print(s, file=sys.stderr))
    net = nn.parallel.DistributedDataParallel(model) if world > 1 else model
    opt = make_optimizer(model.parameters(), optimizer, lr, weight_decay)
    per_epoch = -(-data.windows("train") // (batch_size * world))
    if steps is not None:
        per_epoch = min(per_epoch, steps)
    sched = (torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=max(epochs * per_epoch, 1))
             if schedule == "cosine" else None)
    has_val = data.windows("val") > 0
    best_state = _copy_state(model) if best is not None and has_val else None
    history = []
    last = start_epoch + epochs
    for epoch in range(start_epoch + 1, last + 1):
        t0 = time.perf_counter()
        net.train()
        stats = torch.zeros(2)  # loss sum over batches, batches
        batches = data.batches("train", batch_size, shuffle=True, seed=seed * 1000 + epoch,
                               rank=rank, world=world)
        bar = _bar(batches, per_epoch, f"epoch {epoch}/{last}", progress and rank == 0)
        for i, (x, y) in enumerate(bar):
            if i >= per_epoch:
                break
            opt.zero_grad(set_to_none=True)
            loss = lm_loss(net, x, y)
            loss.backward()
            opt.step()
            if sched is not None:
                sched.step()
            stats += torch.tensor([loss.item(), 1.0])
        if world > 1:
            torch.distributed.all_reduce(stats)
        mean = stats[0].item() / max(stats[1].item(), 1)
        rec = {"epoch": epoch, "loss": round(mean, 5), "train_bpb": round(mean / math.log(2), 4),
               "val_bpb": round(bits_per_byte(model, data, "val"), 4) if has_val else None,
               "lr": float(f"{opt.param_groups[0]['lr']:.4g}"),
               "seconds": round(time.perf_counter() - t0, 3)}
        history.append(rec)
        if has_val and best_record(([best] if best else []) + history) is rec:
            best_state = _copy_state(model)
        if rank == 0:
            val = f"  val {rec['val_bpb']:.4f} bits/byte" if has_val else ""
            log(f"epoch {epoch:>3}/{last}  loss {rec['loss']:.4f}  train {rec['train_bpb']:.4f} "
                f"bits/byte{val}  ({rec['seconds']:.1f} s)")
    if best_state is not None:
        model.load_state_dict(best_state)
    return history
