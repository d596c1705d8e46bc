"""torch kernels for the CDL quantizers: the same computations as cdl/_kernels.py, on any device.

Each element's CPMF (eq. 12/13) lives on K levels: the whole alphabet, or a window of K levels
around the nearest one, moved inward at the alphabet edges (`_place` in _kernels.py). Work is
done on [elements, K] blocks of at most `BLOCK` entries, so memory stays bounded for any tensor.

Logits are taken relative to the nearest level n (the most probable one, so the max logit costs
nothing): with w = θ/q - n, offset o = l - n and A = αq²,

    z_l - z_n = -α[(θ - lq)² - (θ - nq)²] = A·o·(2w - o)  ≤ 0,

so every exp is at most 1 and the nearest level's is exactly 1. Moments are central and in level
units (L = E[l], V = Var[l], M3 = E[(l - L)³]); the backward needs only them for Qd (Lemma 1), so
the forward keeps three numbers per element instead of the [elements, K] CPMF, and the MPMF
backward recomputes the CPMF block by block.
"""
from __future__ import annotations

import torch

BLOCK = 1 << 22          # [elements, K] entries per block


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float16/bfloat16 inputs are computed in float32; float32/float64 as they are."""
    return torch.promote_types(dtype, torch.float32)


def accumulate_dtype(device: torch.device) -> torch.dtype:
    """MPMF sums over many elements accumulate in float64 except where a device lacks it (MPS)."""
    return torch.float32 if device.type == "mps" else torch.float64


def _block_cpmf(t, q, A, lo, hi, k, windowed):
    """(unnormalised probabilities e [n, K] with max 1, offsets o [n, K], first level [n] or int, nearest [n])."""
    r = torch.round(t / q)
    nearest = r.clamp(lo, hi)
    w = t / q - nearest
    steps = torch.arange(k, device=t.device, dtype=t.dtype)
    if windowed:
        half = k // 2
        first = r.clamp(lo + half, hi - (k - 1 - half)) - half
        o = (first - nearest).unsqueeze(-1) + steps
    else:
        first = lo
        o = (steps + lo) - nearest.unsqueeze(-1)
    e = torch.exp(A * o * (2 * w.unsqueeze(-1) - o))
    return e, o, first, nearest


def _moments(e, o):
    """(P [n, K], central offsets c = o - u, u = E[o], Var, third central moment)."""
    p = e / e.sum(-1, keepdim=True)
    u = (p * o).sum(-1)
    c = o - u.unsqueeze(-1)
    pc2 = p * c * c
    return p, c, u, pc2.sum(-1), (pc2 * c).sum(-1)


def _bins(first, k, lo, device):
    steps = torch.arange(k, device=device, dtype=torch.int64)
    if isinstance(first, int):
        return None
    return (first.to(torch.int64) - lo).unsqueeze(-1) + steps


def forward(theta, q, a, lo, hi, k, windowed, uniforms=None, want_sums=False):
    """One pass over flat `theta`: (y, stats [3, N] = level mean L, Var, M3 in level units, sums or None).

    y is Qd = q·L, or, when `uniforms` is given, the level picked by inverse CDF at each uniform
    (a Qp sample, eq. 7). `sums[l]` = Σ_i P(l | θ_i) (eq. 25 before dividing by the count).
    q and a are 0-dim tensors on theta's device (no host synchronisation).
    """
    dtype = compute_dtype(theta.dtype)
    t_all = theta.to(dtype)
    q = q.detach().to(dtype)
    A = a.detach().to(dtype) * q * q
    n_all = t_all.numel()
    y = torch.empty(n_all, dtype=theta.dtype, device=theta.device)
    stats = torch.empty(3, n_all, dtype=dtype, device=theta.device)
    size = hi - lo + 1
    sums = torch.zeros(size, dtype=accumulate_dtype(theta.device), device=theta.device) if want_sums else None
    per = max(1, BLOCK // k)
    for start in range(0, n_all, per):
        stop = min(n_all, start + per)
        t = t_all[start:stop]
        e, o, first, nearest = _block_cpmf(t, q, A, lo, hi, k, windowed)
        p, _, u, var, m3 = _moments(e, o)
        level_mean = nearest + u
        stats[0, start:stop] = level_mean
        stats[1, start:stop] = var
        stats[2, start:stop] = m3
        if uniforms is None:
            y[start:stop] = q * level_mean
        else:
            cum = e.cumsum(-1)
            target = uniforms[start:stop].to(dtype) * cum[:, -1]
            pick = (cum < target.unsqueeze(-1)).sum(-1).clamp_max(k - 1).to(dtype)
            y[start:stop] = (first + pick) * q
        if want_sums:
            bins = _bins(first, k, lo, theta.device)
            if bins is None:
                sums += p.sum(0).to(sums.dtype)
            else:
                sums.index_add_(0, bins.reshape(-1), p.reshape(-1).to(sums.dtype))
    return y, stats, sums


def backward(theta, q, a, lo, hi, k, windowed, stats, grad_y=None, grad_sums=None):
    """Gradients (θ [N], q, α) of Σ grad_y·y + Σ grad_sums·sums, y = Qd (Lemma 1) and sums the MPMF.

    With B1 = G·q·V + Cov(g, l), B2 = G·q·M3 + Cov(g, (l - L)²) per element (G = grad_y, g the
    MPMF gradient of each level, both covariances under the CPMF; level units):
        ∂/∂θ = 2αq·B1,  ∂/∂q = G·L + 2α((θ - 2qL)·B1 - q·B2),  ∂/∂α = 2q(θ - qL)·B1 - q²·B2.
    """
    dtype = stats.dtype
    t_all = theta.detach().to(dtype)
    qv = q.detach().to(dtype)
    av = a.detach().to(dtype)
    A = av * qv * qv
    n_all = t_all.numel()
    g_theta = torch.empty(n_all, dtype=dtype, device=theta.device)
    g_q = torch.zeros((), dtype=accumulate_dtype(theta.device), device=theta.device)
    g_a = torch.zeros_like(g_q)
    gs = None if grad_sums is None else grad_sums.detach().to(dtype)
    gy_all = None if grad_y is None else grad_y.detach().reshape(-1).to(dtype)
    per = max(1, BLOCK // k)
    for start in range(0, n_all, per):
        stop = min(n_all, start + per)
        t = t_all[start:stop]
        level_mean, var, m3 = stats[0, start:stop], stats[1, start:stop], stats[2, start:stop]
        if gy_all is not None:
            G = gy_all[start:stop]
            b1 = G * qv * var
            b2 = G * qv * m3
        else:
            G = None
            b1 = torch.zeros_like(t)
            b2 = torch.zeros_like(t)
        if gs is not None:
            e, o, first, _ = _block_cpmf(t, qv, A, lo, hi, k, windowed)
            p, c, _, _, _ = _moments(e, o)
            bins = _bins(first, k, lo, theta.device)
            g = gs[bins] if bins is not None else gs.unsqueeze(0)
            pg = p * (g - (p * g).sum(-1, keepdim=True))
            b1 = b1 + (pg * c).sum(-1)
            b2 = b2 + (pg * c * c).sum(-1)
        mean = qv * level_mean
        g_theta[start:stop] = 2 * av * qv * b1
        gq = 2 * av * ((t - 2 * mean) * b1 - qv * b2)
        if G is not None:
            gq = gq + G * level_mean
        g_q += gq.sum(dtype=g_q.dtype)
        g_a += (2 * qv * (t - mean) * b1 - qv * qv * b2).sum(dtype=g_a.dtype)
    return g_theta, g_q, g_a
