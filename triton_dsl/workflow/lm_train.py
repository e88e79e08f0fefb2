"""Training a language model (a token model): next-byte cross-entropy on windows of text,
bits per byte on the validation split each epoch; the weights of the best epoch are kept.

The same loop as train.train (train.run_epochs: optimizers, schedule, DDP sharding, record
keeping), with windows of text in place of labelled samples.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .text_data import TextData, bits_per_byte
from .train import check_options, rank_and_world, run_epochs


def lm_loss(net, x, y):
    logits = net(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


def train_lm(model: nn.Module, data: TextData, epochs: int = 10, lr: float = 1e-3,
             batch_size: int = 32, seed: int = 0, progress: bool = True, log=None,
             optimizer: str = "adamw", weight_decay: float = 0.0, schedule: str = "cosine",
             start_epoch: int = 0, best: dict | None = None,
             steps: int | None = None) -> list[dict]:
    """One record per epoch: {epoch, loss, train_bpb, val_bpb, lr, seconds}. ``steps`` caps the
    batches per epoch (default: every window of the training split once)."""
    check_options(epochs, lr, weight_decay, batch_size, optimizer, schedule)
    world = rank_and_world()[1]
    per_epoch = -(-data.windows("train") // (batch_size * world))
    if steps is not None:
        per_epoch = min(per_epoch, steps)
    return run_epochs(model, NextByte(data), per_epoch, epochs, lr, batch_size, seed, optimizer,
                      weight_decay, schedule, start_epoch, best, progress, log)


class NextByte:
    """Training a language model, for train.run_epochs: statistics (loss sum over batches,
    batches), bits per byte on the validation split."""
    width = 2

    def __init__(self, data: TextData):
        self.data = data
        self.has_val = data.windows("val") > 0

    def batches(self, *args, **kwargs):
        return self.data.batches("train", *args, **kwargs)

    def step(self, net, x, y):
        loss = lm_loss(net, x, y)
        return loss, torch.tensor([loss.item(), 1.0])

    def record(self, epoch: int, stats: torch.Tensor, model) -> dict:
        mean = stats[0].item() / max(stats[1].item(), 1)
        return {"epoch": epoch, "loss": round(mean, 5), "train_bpb": round(mean / math.log(2), 4),
                "val_bpb": round(bits_per_byte(model, self.data, "val"), 4) if self.has_val
                else None}

    def line(self, rec: dict) -> str:
        val = f"  val {rec['val_bpb']:.4f} bits/byte" if self.has_val else ""
        return f"loss {rec['loss']:.4f}  train {rec['train_bpb']:.4f} bits/byte{val}"
