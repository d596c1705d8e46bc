"""The probabilistic quantizer Qp and its soft deterministic approximation Qd (CDL paper, Section IV).

A value θ is quantized to a level k·q of a uniform alphabet with the CPMF of eq. 4 / 12 / 13

    P(k | θ) = softmax_k( -α (θ - k q)² ),   k ∈ A = {-2^(b-1) … 2^(b-1)-1} (weights, eq. 10a)
                                            k ∈ B = {0 … 2^b - 1}          (activations, eq. 10b)

Qp draws one level from that CPMF (eq. 7); Qd is its mean (eq. 8). `QuantizeFunction` implements
both with one backward: the analytic derivatives of Qd (Lemma 1, eq. 9a for θ, eq. 9b for the
step) plus the derivative with respect to the sharpness α:

    ∂Qd/∂α = Σ_k kq ∂P_k/∂α = Σ_k kq P_k (d_k - E[d]),  d_k = -(θ - kq)²
           = -Cov(X, (θ - X)²),   X ~ P(· | θ).

CDL uses the sample in the forward pass and Qd's derivatives backward (eq. 16-24); R-CDL uses Qd
forward and backward (eq. 40). Eval mode uses `hard_quantize`: the most probable level, which for
this CPMF is the alphabet point nearest to θ.

Window: the CPMF may be restricted to the `window` levels nearest to θ (Section VI-B-1, five for
activations), renormalised. The window is a piecewise-constant function of θ, so the same moment
formulas give the exact derivatives of the windowed quantizer. Only an `[elements, window]` tensor
is ever built, never `[elements, 2^b]`.
"""
from __future__ import annotations

import numpy as np
from ..optional import require
require("torch", "CDL training")
import torch


def alphabet_bounds(bits: int, signed: bool) -> tuple[int, int]:
    """Smallest and largest index of A (eq. 10a, signed) or B (eq. 10b, unsigned)."""
    if signed:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def _window_indices(theta: torch.Tensor, step: torch.Tensor, lo: int, hi: int, window: int | None):
    """Integer indices [..., K] of the levels the CPMF is spread over (full alphabet or a window)."""
    size = hi - lo + 1
    if window is None or window >= size:
        base = torch.arange(lo, hi + 1, device=theta.device, dtype=theta.dtype)
        return base.expand(*theta.shape, size)
    half = window // 2
    # The nearest level, moved inward so the whole window stays inside the alphabet.
    centre = torch.round(theta.detach() / step.detach()).clamp(lo + half, hi - (window - 1 - half))
    offsets = torch.arange(-half, window - half, device=theta.device, dtype=theta.dtype)
    return centre.unsqueeze(-1) + offsets


def cpmf(theta: torch.Tensor, step: torch.Tensor, sharpness: torch.Tensor, lo: int, hi: int,
         window: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities [..., K], level indices [..., K]) of eq. 12/13; differentiable (autograd)."""
    idx = _window_indices(theta, step, lo, hi, window)
    logits = -sharpness * (theta.unsqueeze(-1) - idx * step) ** 2
    return torch.softmax(logits, dim=-1), idx


def _kernel_args(theta, step, sharpness, lo, hi, window):
    """Flat contiguous numpy view of θ plus the scalar arguments the numba kernels take."""
    flat = theta.detach().contiguous().reshape(-1).cpu().numpy()
    size = hi - lo + 1
    windowed = window is not None and window < size
    k = window if windowed else size
    return flat, float(step.detach()), float(sharpness.detach()), int(lo), int(hi), int(k), windowed


class QuantizeFunction(torch.autograd.Function):
    """y = Qd(θ) (sample=False) or y ~ Qp(θ) (sample=True); backward is always Qd's (Lemma 1).

    Arguments: theta (any shape), step (0-dim, q or s), sharpness (0-dim, α or β), lo, hi (alphabet
    indices), window (None = full alphabet), sample (bool), generator (torch.Generator or None).
    Forward and backward run one numba pass over the elements (cdl/_kernels.py).
    """

    @staticmethod
    def forward(ctx, theta, step, sharpness, lo, hi, window, sample, generator):
        from . import _kernels

        flat, q, a, lo_, hi_, k, windowed = _kernel_args(theta, step, sharpness, lo, hi, window)
        out = np.empty_like(flat)
        if sample:
            # One uniform per element drawn from `generator`: reproducible Qp samples (eq. 7).
            u = torch.rand(flat.shape, generator=generator, dtype=torch.float64).numpy()
        else:
            u = np.zeros(1)
        _kernels.qd_forward(flat, q, a, lo_, hi_, k, windowed, u, bool(sample), out)
        ctx.save_for_backward(theta, step, sharpness)
        ctx.config = (lo, hi, window)
        return torch.from_numpy(out).reshape(theta.shape)

    @staticmethod
    def backward(ctx, grad):
        from . import _kernels

        theta, step, sharpness = ctx.saved_tensors
        lo, hi, window = ctx.config
        flat, q, a, lo_, hi_, k, windowed = _kernel_args(theta, step, sharpness, lo, hi, window)
        g = grad.detach().contiguous().reshape(-1).to(theta.dtype).numpy()
        g_theta = np.empty_like(flat)
        g_q, g_a = _kernels.qd_backward(flat, g, q, a, lo_, hi_, k, windowed, g_theta)
        return (torch.from_numpy(g_theta).reshape(theta.shape),
                torch.tensor(g_q, dtype=step.dtype).reshape(step.shape) if ctx.needs_input_grad[1] else None,
                torch.tensor(g_a, dtype=sharpness.dtype).reshape(sharpness.shape) if ctx.needs_input_grad[2] else None,
                None, None, None, None, None)


def reference_soft_quantize(theta, step, sharpness, lo, hi, window=None):
    """Qd(θ) = Σ_k P(k|θ)·kq written with plain torch operations (autograd differentiates it);
    the closed form the analytic backward is tested against."""
    prob, idx = cpmf(theta, step, sharpness, lo, hi, window)
    return (prob * idx * step).sum(-1)


def soft_quantize(theta, step, sharpness, lo, hi, window=None):
    """Qd(θ), eq. 8 / 15, with the analytic backward of Lemma 1."""
    return QuantizeFunction.apply(theta, step, sharpness, lo, hi, window, False, None)


def sample_quantize(theta, step, sharpness, lo, hi, window=None, generator=None):
    """A sample of Qp(θ) (eq. 7) whose backward is Qd's (the proxy of eq. 18-24)."""
    return QuantizeFunction.apply(theta, step, sharpness, lo, hi, window, True, generator)


def hard_levels(theta: torch.Tensor, step: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """argmax_k P(k | θ): the nearest alphabet point, clip(round_half_even(θ / q), lo, hi), int64.

    Computed in float32 exactly like `cdlcodec.cdl_format.hard_levels` (numpy), so encoder and
    eval mode agree level for level. (Exact midpoints are ties of the argmax; both break them to even.)
    """
    ratio = theta.detach().float() / step.detach().float()
    return torch.round(ratio).clamp(lo, hi).to(torch.int64)


def hard_quantize(theta: torch.Tensor, step: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Eval-mode quantizer: float32(k) * float32(q), the value a decoder reproduces bit-exactly."""
    return hard_levels(theta, step, lo, hi).float() * step.detach().float()
