"""Diagonal Fisher information as sensitivity weights F_i for RD quantization (DeepCABAC eq. 10-11).

F_i = E[(∂ log p(y|x) / ∂w_i)²], estimated on a few calibration batches with the empirical labels
(the "empirical Fisher": mean of squared per-batch gradients of the loss). Weights whose change
moves the output distribution most get the largest F_i and are quantized most faithfully. Use
through the Python API:

    fisher = diagonal_fisher(model, [(x1, y1), (x2, y2)])
    quantizer = RDQuantizer(lam=0.1, rel_step=0.1, fisher=fisher)
"""
from __future__ import annotations

from typing import Callable, Iterable

import numpy as np


def diagonal_fisher(model, batches: Iterable, loss_fn: Callable | None = None,
                    per_sample: bool = False) -> dict[str, np.ndarray]:
    """{parameter name: F as a float64 array of the parameter's shape}.

    batches: (inputs, targets) pairs; loss_fn(output, target) defaults to cross-entropy.
    per_sample=True averages squared per-sample gradients (closer to the true Fisher, slower);
    otherwise squared mini-batch gradients scaled by the batch size.
    """
    import torch

    loss_fn = loss_fn or torch.nn.functional.cross_entropy
    params = {n: p for n, p in model.named_parameters() if p.requires_grad}
    acc = {n: torch.zeros_like(p, dtype=torch.float64) for n, p in params.items()}
    count = 0
    was_training = model.training
    model.eval()
    try:
        for x, y in batches:
            x, y = torch.as_tensor(x), torch.as_tensor(y)
            groups = [(x[i:i + 1], y[i:i + 1]) for i in range(len(y))] if per_sample else [(x, y)]
            for xb, yb in groups:
                model.zero_grad(set_to_none=True)
                loss_fn(model(xb), yb).backward()
                scale = 1.0 if per_sample else float(len(yb))
                for n, p in params.items():
                    if p.grad is not None:
                        acc[n] += scale * p.grad.detach().double() ** 2
                count += 1
    finally:
        model.zero_grad(set_to_none=True)
        model.train(was_training)
    return {n: (a / max(count, 1)).numpy() for n, a in acc.items()}
