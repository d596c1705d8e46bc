"""numba kernels for the CDL quantizers on CPU: one pass per element instead of ~20 tensor operations.

The same computations as cdl/_torch_kernels.py (which documents the formulation: logits relative
to the nearest level, central moments in level units, the B1/B2 form of the backward), written as
loops: each element's CPMF is walked level by level in a K-entry scratch array, so no
[elements, levels] array is ever allocated. `_place` picks the levels: the whole alphabet, or
a window of K levels around the nearest one, moved inward at the edges (Section VI-B-1). Tests
check both implementations and the torch reference (quantizer.cpmf) agree. Floating point here only
shapes training gradients, never coded bytes.
"""
from __future__ import annotations

import numpy as np

from ..optional import require

# Plain Python would take hours per epoch here, so unlike the coders' kernels these need numba.
require("numba", "CDL training")
from numba import njit, prange  # noqa: E402


@njit(cache=True, inline="always")
def _place(t, q, lo, hi, k, windowed):
    """(first level k0 of the window, nearest level n, w = θ/q - n) of one element."""
    ratio = t / q
    r = np.rint(ratio)
    n = r
    if not (n >= lo):            # also catches NaN
        n = float(lo)
    if n > hi:
        n = float(hi)
    if not windowed:
        return lo, n, ratio - n
    half = k // 2
    c = r
    if not (c >= lo + half):
        c = float(lo + half)
    if c > hi - (k - 1 - half):
        c = float(hi - (k - 1 - half))
    return int(c) - half, n, ratio - n


# Above this A·(K-1) (A = αq²) the products below could overflow: every exp is taken directly.
_PRODUCT_LIMIT = 600.0


@njit(cache=True, parallel=True)
def exp_args(theta, q, a, lo, hi, k, windowed, x):
    """x[i] = 2A·w_i, whose exp E_i the caller takes (torch's vectorised exp: a scalar exp per
    element here would cost more than all the rest of a kernel)."""
    A = a * q * q
    for i in prange(theta.size):
        _, _, w = _place(theta[i], q, lo, hi, k, windowed)
        x[i] = 2.0 * A * w if abs(w) <= 0.5 else 0.0


def level_constants(q: float, a: float, k: int) -> np.ndarray:
    """c[o + k - 1] = exp(-A·o²) for offsets o = -(k-1) … k-1."""
    o = np.arange(-(k - 1), k, dtype=np.float64)
    return np.exp(-(a * q * q) * o * o)


@njit(cache=True, inline="always")
def _cpmf(t, q, A, lo, hi, k, windowed, E, consts, e):
    """Fill e[j] = exp(z_{k0+j} - z_nearest) = exp(A·o·(2w - o)) (o = k0 + j - n, at most 1);
    returns (k0, n, Σe, Σe·o, Σe·o², Σe·o³). Inside the alphabet e = E^o·exp(-A·o²) with
    E = exp(2Aw): one exp per element, taken by the caller; outside (clipped values) or when A is
    large, each exp directly. Offsets from the nearest level keep the raw moments free of
    cancellation (the nearest level is the most probable, so E[o]² never approaches E[o²])."""
    k0, n, w = _place(t, q, lo, hi, k, windowed)
    j0 = int(n) - k0                 # the nearest level's index in the window
    s0 = 0.0
    s1 = 0.0
    s2 = 0.0
    s3 = 0.0
    if abs(w) <= 0.5 and A * (k - 1) <= _PRODUCT_LIMIT:
        # p runs through E^(j - j0), from E^(-j0) (an integer power: no data-dependent loop).
        p = (1.0 / E) ** j0
        for j in range(k):
            o = float(j - j0)
            x = p * consts[j - j0 + k - 1]
            e[j] = x
            s0 += x
            xo = x * o
            s1 += xo
            s2 += xo * o
            s3 += xo * o * o
            p *= E
    else:
        w2 = 2.0 * w
        for j in range(k):
            o = float(j - j0)
            x = np.exp(A * o * (w2 - o))
            e[j] = x
            s0 += x
            xo = x * o
            s1 += xo
            s2 += xo * o
            s3 += xo * o * o
    return k0, n, s0, s1, s2, s3


@njit(cache=True, inline="always")
def _moments(n, s0, s1, s2, s3):
    """(level mean L, variance, third central moment, 1/Σe) from the raw sums of `_cpmf`."""
    inv_s0 = 1.0 / s0            # one division per element: divisions dominated the loop
    u = s1 * inv_s0
    m2 = s2 * inv_s0
    var = max(m2 - u * u, 0.0)
    m3 = s3 * inv_s0 - 3.0 * u * m2 + 2.0 * u * u * u
    return n + u, var, m3, inv_s0


def chunk_count(n: int) -> int:
    return max(1, min(64, n // 4096))


@njit(cache=True, inline="always")
def _mpmf_covariances(e, k, k0, inv_s0, level_mean, grad_sums, lo):
    """(Cov(g, l), Cov(g, (l - L)²)) under the CPMF e, g = grad_sums of each level."""
    sg = 0.0
    for j in range(k):
        sg += e[j] * grad_sums[k0 + j - lo]
    eg = sg * inv_s0
    c1 = 0.0
    c2 = 0.0
    for j in range(k):
        d = k0 + j - level_mean
        pg = e[j] * (grad_sums[k0 + j - lo] - eg)
        c1 += pg * d
        c2 += pg * d * d
    return c1 * inv_s0, c2 * inv_s0


@njit(cache=True, inline="always")
def _pick(e, k, target):
    """Inverse CDF: the first j whose cumulative Σe reaches target (a Qp sample, eq. 7)."""
    acc = 0.0
    for j in range(k):
        acc += e[j]
        if acc >= target:
            return j
    return k - 1


# θ = 0 exactly (about half of all ReLU outputs) has one CPMF per call: the kernels compute it once
# (with E = exp(0) = 1, as exp_args gives) and reuse it, bit for bit what the element would get.


@njit(cache=True, parallel=True)
def forward(theta, q, a, lo, hi, k, windowed, E, consts, uniforms, sample, want_sums, chunks, y, stats):
    """From E = exp(`exp_args`): y[i] = Qd(θ_i) (eq. 8) or, when `sample`, the level picked by
    inverse CDF at uniforms[i]; stats[:, i] = (level mean L, Var, M3) in level units; returns
    Σ_i P(l | θ_i) per level when `want_sums` (eq. 25 before dividing by the count), else zeros."""
    size = hi - lo + 1
    partial = np.zeros((chunks if want_sums else 0, size))
    zeros = np.zeros(chunks, dtype=np.int64)
    n_all = theta.size
    per = (n_all + chunks - 1) // chunks
    A = a * q * q
    ez = np.empty(k)
    kz, nz, sz, s1, s2, s3 = _cpmf(0.0, q, A, lo, hi, k, windowed, 1.0, consts, ez)
    Lz, Vz, Mz, inv_sz = _moments(nz, sz, s1, s2, s3)
    for c in prange(chunks):
        e = np.empty(k)
        for i in range(c * per, min(n_all, (c + 1) * per)):
            t = theta[i]
            if t == 0.0:
                stats[0, i] = Lz
                stats[1, i] = Vz
                stats[2, i] = Mz
                y[i] = (kz + _pick(ez, k, uniforms[i] * sz)) * q if sample else q * Lz
                zeros[c] += 1
                continue
            k0, n, s0, s1, s2, s3 = _cpmf(t, q, A, lo, hi, k, windowed, E[i], consts, e)
            level_mean, var, m3, inv_s0 = _moments(n, s0, s1, s2, s3)
            stats[0, i] = level_mean
            stats[1, i] = var
            stats[2, i] = m3
            y[i] = (k0 + _pick(e, k, uniforms[i] * s0)) * q if sample else q * level_mean
            if want_sums:
                for j in range(k):
                    partial[c, k0 + j - lo] += e[j] * inv_s0
    sums = partial.sum(axis=0)
    if want_sums:
        count = zeros.sum()
        for j in range(k):
            sums[kz + j - lo] += count * (ez[j] * inv_sz)
    return sums


@njit(cache=True, parallel=True)
def backward(theta, q, a, lo, hi, k, windowed, stats, E, consts, grad_y, has_grad_y, grad_sums,
             has_grad_sums, chunks, grad_theta):
    """Gradients of Σ grad_y·Qd + Σ grad_sums·MPMF sums; fills grad_theta, returns (∂/∂q, ∂/∂α).
    E (exp of `exp_args`) is read only when `has_grad_sums`.

    Per element, B1 = G·q·V + Cov(g, l), B2 = G·q·M3 + Cov(g, (l - L)²) (G = grad_y[i], g the
    MPMF gradient of each level; _torch_kernels.backward has the derivation):
    ∂/∂θ = 2αq·B1, ∂/∂q = G·L + 2α((θ - 2qL)·B1 - q·B2), ∂/∂α = 2q(θ - qL)·B1 - q²·B2.
    """
    n_all = theta.size
    per = (n_all + chunks - 1) // chunks
    A = a * q * q
    c1z = c2z = 0.0
    if has_grad_sums:
        ez = np.empty(k)
        kz, nz, sz, s1, s2, s3 = _cpmf(0.0, q, A, lo, hi, k, windowed, 1.0, consts, ez)
        Lz, _, _, inv_sz = _moments(nz, sz, s1, s2, s3)
        c1z, c2z = _mpmf_covariances(ez, k, kz, inv_sz, Lz, grad_sums, lo)
    # Per-chunk partial sums, not prange scalar reductions (numba's reduction analysis trips over
    # the inlined CPMF loops).
    partial = np.zeros((2, chunks))
    for c in prange(chunks):
        e = np.empty(k)
        cq = 0.0
        ca = 0.0
        for i in range(c * per, min(n_all, (c + 1) * per)):
            t = theta[i]
            level_mean = stats[0, i]
            G = grad_y[i] if has_grad_y else 0.0
            b1 = G * q * stats[1, i]
            b2 = G * q * stats[2, i]
            if has_grad_sums:
                if t == 0.0:
                    c1, c2 = c1z, c2z
                else:
                    k0, _, s0, _, _, _ = _cpmf(t, q, A, lo, hi, k, windowed, E[i], consts, e)
                    c1, c2 = _mpmf_covariances(e, k, k0, 1.0 / s0, level_mean, grad_sums, lo)
                b1 += c1
                b2 += c2
            mean = q * level_mean
            grad_theta[i] = 2.0 * a * q * b1
            cq += G * level_mean + 2.0 * a * ((t - 2.0 * mean) * b1 - q * b2)
            ca += 2.0 * q * (t - mean) * b1 - q * q * b2
        partial[0, c] = cq
        partial[1, c] = ca
    return partial[0].sum(), partial[1].sum()
