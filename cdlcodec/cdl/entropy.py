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

from .quantizer import MIN_P, QuantizeFunction, cpmf, quantize_with_mpmf

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


_MIN_P = MIN_P   # entropy_bits' clamp


class _SumsEntropyBits(torch.autograd.Function):
    """scale · H(sums / count) in bits as one autograd node: the values of
    `scale * entropy_bits(sums / count)` (the same operations in the same order), and the gradient
    of that chain in closed form, ∂/∂sums_k = -scale·(log max(p_k, 1e-30) + [p_k ≥ 1e-30]) / (count·ln 2),
    instead of the six small autograd nodes of the chain (a training step runs one per quantizer)."""

    @staticmethod
    def forward(ctx, sums, count, scale):
        pmf = sums / count
        logp = torch.log(pmf.clamp_min(_MIN_P))
        ctx.save_for_backward(pmf, logp)
        ctx.count, ctx.scale = count, scale
        return scale * (-(pmf * logp).sum() / _LOG2)

    @staticmethod
    def backward(ctx, grad):
        pmf, logp = ctx.saved_tensors
        inside = (pmf >= _MIN_P).to(pmf.dtype)       # clamp_min passes the gradient where p ≥ its bound
        return (logp + inside) * (grad * (-ctx.scale / (_LOG2 * ctx.count))), None, None


def quantize_with_entropy_bits(theta: torch.Tensor, step: torch.Tensor, sharpness: torch.Tensor, lo: int, hi: int,
                               window: int | None, scale: float, *, sample: bool = False,
                               generator: torch.Generator | None = None,
                               relu: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """(Qd(θ) or a Qp sample, scale · H(MPMF) in bits): `quantize_with_mpmf` followed by
    `scale * entropy_bits(pmf)` (eq. 26 / 28 with scale = |w_l| or |x_l|), the same values, from one
    autograd node (QuantizeFunction with `entropy_scale`: _SumsEntropyBits' operations forward, its
    closed-form gradient backward). With `relu` the values quantized are relu(θ) (QuantizeFunction)."""
    return QuantizeFunction.apply(theta, step, sharpness, lo, hi, window, sample, generator, True, scale, relu)
