"""Rates reported for a trained model: Huffman-coded bits per weight / activation (eq. 41).

b_wl and b_xl are the Huffman code lengths of a layer's hard levels divided by its element count;
the model averages weight them by element count (eq. 41a, 41b). The activations are those of a
mini-batch of training images (Section VI-A).
"""
from __future__ import annotations

import heapq

import numpy as np
from ..optional import require
require("torch", "CDL training")
import torch
from torch import nn

from ..cdl_format import hard_levels
from .convert import activation_quantizers, weight_quantizers
from .entropy import entropy_bits


def huffman_code_bits(levels: np.ndarray) -> float:
    """Σ count·code length of an optimal (Huffman) prefix code for the level histogram.

    A lone symbol gets a 1-bit code (a prefix code has no shorter codeword); no table overhead.
    """
    _, counts = np.unique(np.asarray(levels).reshape(-1), return_counts=True)
    if counts.size == 0:
        return 0.0
    if counts.size == 1:
        return float(counts[0])
    # Σ over merges of the merged weight = Σ count·depth (the classic Huffman cost identity).
    heap = [int(c) for c in counts]
    heapq.heapify(heap)
    total = 0
    while len(heap) > 1:
        merged = heapq.heappop(heap) + heapq.heappop(heap)
        total += merged
        heapq.heappush(heap, merged)
    return float(total)


def coded_bits(levels: np.ndarray) -> tuple[float, str]:
    """(bits, source): the project's Huffman backend estimate when it is installed, else our own."""
    levels = np.ascontiguousarray(np.asarray(levels, dtype=np.int64).reshape(-1))
    try:
        from ..backends import get
        return float(get("huffman").estimate_bits(levels)), "backend"
    except Exception:  # backend absent or not yet usable: fall back to the code length itself
        return huffman_code_bits(levels), "local"


def weight_levels(model: nn.Module) -> dict[str, np.ndarray]:
    """Hard (eval-mode) levels of every quantized weight, by module path."""
    out = {}
    for name, m in weight_quantizers(model):
        out[name] = hard_levels(m.weight.detach().cpu().numpy(), float(m.q.detach()), int(m.bits))
    return out


@torch.no_grad()
def activation_levels(model: nn.Module, batch: torch.Tensor) -> dict[str, np.ndarray]:
    """Hard levels of every activation quantizer's output for `batch`, in eval mode."""
    captured: dict[str, np.ndarray] = {}
    hooks = []
    for name, a in activation_quantizers(model):
        def hook(module, inputs, output, name=name):
            captured[name] = hard_levels(torch.relu(inputs[0]).cpu().numpy(), float(module.s.detach()),
                                         int(module.bits), signed=False)
        hooks.append(a.register_forward_hook(hook))
    was_training = model.training
    model.eval()
    try:
        model(batch)
    finally:
        for h in hooks:
            h.remove()
        model.train(was_training)
    return captured


def average_bits(levels_by_layer: dict[str, np.ndarray]) -> tuple[float | None, str]:
    """Σ_l |v_l|·b_l / Σ_l |v_l| (eq. 41) with b_l the coded bits per element of layer l."""
    total_bits, total_count, source = 0.0, 0, "local"
    for levels in levels_by_layer.values():
        bits, source = coded_bits(levels)
        total_bits += bits
        total_count += levels.size
    return (total_bits / total_count if total_count else None), source


@torch.no_grad()
def entropy_bits_per_weight(model: nn.Module) -> float | None:
    """H(w) / |w| from the learned MPMFs (eq. 25-27)."""
    total, count = 0.0, 0
    for _, m in weight_quantizers(model):
        total += float(m.weight_entropy_bits())
        count += m.weight.numel()
    return total / count if count else None


def empirical_entropy_bits(levels: np.ndarray) -> float:
    """Entropy in bits of the histogram of `levels` (what an ideal order-0 coder would spend)."""
    _, counts = np.unique(np.asarray(levels).reshape(-1), return_counts=True)
    p = torch.tensor(counts / counts.sum(), dtype=torch.float64)
    return float(entropy_bits(p))
