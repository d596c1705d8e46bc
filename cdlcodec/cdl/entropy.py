"""Entropy terms of CDL: the marginal PMF of quantized values and its entropy (eq. 25-29).

The MPMF of a layer is the average of the CPMFs of its elements (eq. 25); H(w_l) = |w_l| · H(MPMF)
bits (eq. 26) and H(w) = Σ_l H(w_l) (eq. 27). Activations likewise over a mini-batch (eq. 28-29),
where the CPMF is restricted to a window of levels (Section VI-B-1) and scattered into the
alphabet's bins. Everything is differentiable with respect to the values, the step and the
sharpness through ordinary autograd.
"""
from __future__ import annotations

import math

from ..optional import require
require("torch", "CDL training")
import torch

from .quantizer import cpmf, quantize_with_mpmf

_LOG2 = math.log(2.0)


def mpmf(theta: torch.Tensor, step: torch.Tensor, sharpness: torch.Tensor, lo: int, hi: int,
         window: int | None = None) -> torch.Tensor:
    """P(k) = mean_i P(k | θ_i) over the alphabet lo..hi (eq. 25), shape [hi - lo + 1].

    Differentiable in θ, step and sharpness (the covariance form of quantizer.QuantizeFunction's
    backward); `quantizer.quantize_with_mpmf` gives the quantized values from the same pass."""
    _, pmf = quantize_with_mpmf(theta, step, sharpness, lo, hi, window)
    return pmf


def reference_mpmf(theta: torch.Tensor, step: torch.Tensor, sharpness: torch.Tensor, lo: int, hi: int,
                   window: int | None = None) -> torch.Tensor:
    """eq. 25 with plain torch operations (materialises [elements, K]); for tests."""
    prob, idx = cpmf(theta.reshape(-1), step, sharpness, lo, hi, window)
    size = hi - lo + 1
    if prob.shape[-1] == size and window is None:
        return prob.mean(0)
    bins = (idx.detach() - lo).to(torch.int64).reshape(-1)
    total = torch.zeros(size, dtype=prob.dtype, device=prob.device)
    return total.index_add(0, bins, prob.reshape(-1)) / prob.shape[0]


def entropy_bits(pmf: torch.Tensor) -> torch.Tensor:
    """Shannon entropy in bits of a PMF (zero-probability bins contribute 0)."""
    p = pmf.clamp_min(1e-30)
    return -(pmf * torch.log(p)).sum() / _LOG2
