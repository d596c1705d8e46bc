"""Plain supervised training and evaluation loops for the built-in classification tasks.

Deliberately small: full-batch tensors in memory (the bundled data sets are a few MB), Adam,
fixed seeds, CPU. CDL training (cdlcodec.cdl) reuses `evaluate` and `batches`.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np
from .optional import require
require("torch", "training")
import torch
from torch import nn

from .progress import Progress


def seed_everything(seed: int) -> torch.Generator:
    torch.manual_seed(seed)
    np.random.seed(seed)
    return torch.Generator().manual_seed(seed)


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, generator: torch.Generator | None = None):
    """Mini-batches in a random order drawn from `generator` (or in order when it is None)."""
    n = len(y)
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        yield x[idx], y[idx]


@torch.no_grad()
def evaluate(model: nn.Module, x, y, batch_size: int = 500) -> float:
    """Top-1 accuracy in [0, 1]."""
    x = torch.as_tensor(x)
    y = torch.as_tensor(y)
    was_training = model.training
    model.eval()
    correct = 0
    for xb, yb in batches(x, y, batch_size):
        correct += int((model(xb).argmax(dim=1) == yb).sum())
    model.train(was_training)
    return correct / max(len(y), 1)


class EpochMeter:
    """Accuracy on the training batches as they were seen, and samples per second, of one epoch:
    what `train` reports after each epoch (no extra pass over the data)."""

    def __init__(self):
        self.start = time.perf_counter()
        self.seen = 0
        self.correct = 0

    def add(self, logits: torch.Tensor, labels: torch.Tensor) -> None:
        self.seen += len(labels)
        self.correct += int((logits.detach().argmax(1) == labels).sum())

    def summary(self, epoch: int, epochs: int, extra: str = "") -> str:
        seconds = max(time.perf_counter() - self.start, 1e-9)
        return (f"epoch {epoch}/{epochs}: train accuracy {100 * self.correct / max(self.seen, 1):.1f} %, "
                f"{extra + ', ' if extra else ''}{self.seen / seconds:,.0f} samples/s, {seconds:.1f} s")


def train_classifier(
    model: nn.Module,
    x_train,
    y_train,
    *,
    epochs: int = 3,
    lr: float = 2e-3,
    batch_size: int = 64,
    seed: int = 0,
    quiet: bool = False,
    extra_loss: Callable[[nn.Module], torch.Tensor] | None = None,
    optimizer: torch.optim.Optimizer | None = None,
) -> nn.Module:
    """Train with cross-entropy (+ `extra_loss(model)` if given) and Adam; returns the model."""
    gen = seed_everything(seed)
    x = torch.as_tensor(x_train)
    y = torch.as_tensor(y_train)
    opt = optimizer or torch.optim.Adam(model.parameters(), lr=lr)
    loss_fn = nn.CrossEntropyLoss()
    steps = epochs * ((len(y) + batch_size - 1) // batch_size)
    model.train()
    with Progress(steps, "training", quiet=quiet) as bar:
        for epoch in range(epochs):
            meter = EpochMeter()
            for xb, yb in batches(x, y, batch_size, gen):
                logits = model(xb)
                loss = loss_fn(logits, yb)
                if extra_loss is not None:
                    loss = loss + extra_loss(model)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
                meter.add(logits, yb)
                bar.update(1, note=f"epoch {epoch + 1}/{epochs} loss {loss.item():.3f}")
            bar.log(meter.summary(epoch + 1, epochs, f"loss {loss.item():.3f}"))
    model.eval()
    return model
