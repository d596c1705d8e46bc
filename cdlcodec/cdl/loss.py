"""The CDL objective: cross-entropy + γ·H(x) + λ·H(w) (eq. 30 for CDL, eq. 40 for R-CDL)."""
from __future__ import annotations

from dataclasses import dataclass

from ..optional import require
require("torch", "CDL training")
import torch
import torch.nn.functional as F
from torch import nn

from .convert import activation_quantizers, weight_quantizers
from .layers import set_plain_attribute


@dataclass
class LossParts:
    """The terms of one evaluation of the objective; H totals in bits, also per element."""

    total: torch.Tensor
    cross_entropy: float
    weight_bits: float | None          # H(w), eq. 27 (None when not computed: λ = 0)
    weight_bits_per_element: float | None
    activation_bits: float | None      # H(x) per sample, eq. 29 (None when γ = 0)
    activation_bits_per_element: float | None


def weight_entropy_bits(model: nn.Module) -> tuple[torch.Tensor, int]:
    """(H(w) = Σ_l |w_l|·H(MPMF_l) in bits, Σ_l |w_l|), eq. 26-27; differentiable. A layer tracking
    its entropy gives the value of its last training forward (taken once), others compute it."""
    layers = weight_quantizers(model)
    if not layers:
        return torch.zeros(()), 0
    total = sum(_take_tracked(m) for _, m in layers)
    return total, sum(m.weight.numel() for _, m in layers)


def _take_tracked(layer: nn.Module) -> torch.Tensor:
    bits = layer.last_entropy_bits
    set_plain_attribute(layer, "last_entropy_bits", None)
    return bits if bits is not None else layer.weight_entropy_bits()


def activation_entropy_bits(model: nn.Module) -> tuple[torch.Tensor, int]:
    """(H(x) = Σ_l |x_l|·H(MPMF_l) per sample, Σ_l |x_l|), eq. 28-29, from the last training forward
    (requires `set_entropy_tracking(model, True)`)."""
    acts = [a for _, a in activation_quantizers(model) if a.last_entropy_bits is not None]
    if not acts:
        return torch.zeros(()), 0
    return sum(a.last_entropy_bits for a in acts), sum(a.numel_per_sample for a in acts)


def cdl_loss(model: nn.Module, logits: torch.Tensor, targets: torch.Tensor, *,
             lam: float = 0.0, gamma: float = 0.0, task_loss=None) -> LossParts:
    """CE + γ·H(x) + λ·H(w) (eq. 30/40). H(w) is total bits of the model, H(x) total bits of one
    sample's activations, so λ and γ are prices per bit against the mean per-sample cross-entropy.
    `task_loss(logits, targets)` replaces the cross-entropy (cdlcodec.cdl.finetune: your own loss);
    its value is then what `LossParts.cross_entropy` holds."""
    ce = (task_loss or F.cross_entropy)(logits, targets)
    total = ce
    hw = hw_per = hx = hx_per = None
    if lam > 0:
        bits, count = weight_entropy_bits(model)
        total = total + lam * bits
        hw = float(bits.detach())
        hw_per = hw / max(count, 1)
    if gamma > 0:
        bits, count = activation_entropy_bits(model)
        total = total + gamma * bits
        hx = float(bits.detach())
        hx_per = hx / max(count, 1)
    return LossParts(total, float(ce.detach()), hw, hw_per, hx, hx_per)
