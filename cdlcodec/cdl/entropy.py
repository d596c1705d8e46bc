"""Entropy terms of CDL: the marginal PMF of quantized values and its entropy (eq. 25-29).

The MPMF of a layer is the average of the CPMFs of its elements (eq. 25); H(w_l) = |w_l| · H(MPMF)
bits (eq. 26) and H(w) = Σ_l H(w_l) (eq. 27). Activations likewise over a mini-batch (eq. 28-29),
where the CPMF is restricted to a window of levels (Section VI-B-1) and scattered into the
alphabet's bins. Everything is differentiable with respect to the values, the step and the
sharpness through ordinary autograd.
"""
from __future__ import annotations

import math

import numpy as np
from ..optional import require
require("torch", "CDL training")
import torch

from .quantizer import cpmf

_LOG2 = math.log(2.0)


class MpmfFunction(torch.autograd.Function):
    """S[l] = Σ_i P(l | θ_i) over the alphabet (numba, cdl/_kernels.py), differentiable in θ, step, sharpness."""

    @staticmethod
    def forward(ctx, theta, step, sharpness, lo, hi, window):
        from . import _kernels
        from .quantizer import _kernel_args

        flat, q, a, lo_, hi_, k, windowed = _kernel_args(theta, step, sharpness, lo, hi, window)
        chunks = max(1, min(64, flat.size // 4096))
        sums = _kernels.mpmf_forward(flat, q, a, lo_, hi_, k, windowed, chunks)
        ctx.save_for_backward(theta, step, sharpness)
        ctx.config = (lo, hi, window)
        return torch.from_numpy(sums).to(theta.dtype)

    @staticmethod
    def backward(ctx, grad):
        from . import _kernels
        from .quantizer import _kernel_args

        theta, step, sharpness = ctx.saved_tensors
        lo, hi, window = ctx.config
        flat, q, a, lo_, hi_, k, windowed = _kernel_args(theta, step, sharpness, lo, hi, window)
        g_theta = np.empty_like(flat)
        gpmf = grad.detach().to(torch.float64).contiguous().numpy()
        g_q, g_a = _kernels.mpmf_backward(flat, gpmf, q, a, lo_, hi_, k, windowed, g_theta)
        return (torch.from_numpy(g_theta).reshape(theta.shape),
                torch.tensor(g_q, dtype=step.dtype).reshape(step.shape),
                torch.tensor(g_a, dtype=sharpness.dtype).reshape(sharpness.shape), None, None, None)


def mpmf(theta: torch.Tensor, step: torch.Tensor, sharpness: torch.Tensor, lo: int, hi: int,
         window: int | None = None) -> torch.Tensor:
    """P(k) = mean_i P(k | θ_i) over the alphabet lo..hi (eq. 25), shape [hi - lo + 1]."""
    return MpmfFunction.apply(theta, step, sharpness, lo, hi, window) / max(theta.numel(), 1)


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
