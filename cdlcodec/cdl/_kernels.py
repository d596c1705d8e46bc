"""numba kernels for the CDL quantizers: one pass per element instead of ~20 tensor operations.

Every kernel walks the CPMF of one element (eq. 12/13) level by level without storing it, so no
[elements, levels] array is ever allocated. `first_level` picks the levels: the whole alphabet, or
a window of K levels around the nearest one, moved inward at the edges (Section VI-B-1). The
torch reference implementation lives in quantizer.cpmf; tests check both agree. Floating point
here only shapes training gradients, never coded bytes.
"""
from __future__ import annotations

import numpy as np

from ..optional import require

# Plain Python would take hours per epoch here, so unlike the coders' kernels these need numba.
require("numba", "CDL training")
from numba import njit, prange  # noqa: E402


@njit(cache=True, inline="always")
def first_level(t, q, lo, hi, k, windowed):
    if not windowed:
        return lo
    half = k // 2
    c = np.rint(t / q)
    cmin = lo + half
    cmax = hi - (k - 1 - half)
    if not (c >= cmin):          # also catches NaN
        c = cmin
    if c > cmax:
        c = cmax
    return int(c) - half


@njit(cache=True, inline="always")
def _max_logit(t, q, a, k0, k):
    m = -np.inf
    for j in range(k):
        d = t - (k0 + j) * q
        z = -a * d * d
        if z > m:
            m = z
    return m


@njit(cache=True, parallel=True)
def qd_forward(theta, q, a, lo, hi, k, windowed, uniforms, sample, out):
    """out[i] = Qd(theta[i]) (eq. 8) or, when `sample`, the level picked by inverse CDF at uniforms[i]."""
    for i in prange(theta.size):
        t = theta[i]
        k0 = first_level(t, q, lo, hi, k, windowed)
        m = _max_logit(t, q, a, k0, k)
        s0 = 0.0
        s1 = 0.0
        for j in range(k):
            x = (k0 + j) * q
            d = t - x
            e = np.exp(-a * d * d - m)
            s0 += e
            s1 += e * x
        if not sample:
            out[i] = s1 / s0
        else:
            target = uniforms[i] * s0
            acc = 0.0
            pick = k - 1
            for j in range(k):
                d = t - (k0 + j) * q
                acc += np.exp(-a * d * d - m)
                if acc >= target:
                    pick = j
                    break
            out[i] = (k0 + pick) * q


@njit(cache=True, parallel=True)
def qd_backward(theta, grad, q, a, lo, hi, k, windowed, grad_theta):
    """Lemma 1: grad_theta[i] = g·2a·Var (9a); returns (Σ g·∂Qd/∂q (9b), Σ g·∂Qd/∂a = -Σ g·Cov(X,(θ-X)²))."""
    g_q = 0.0
    g_a = 0.0
    for i in prange(theta.size):
        t = theta[i]
        g = grad[i]
        k0 = first_level(t, q, lo, hi, k, windowed)
        m = _max_logit(t, q, a, k0, k)
        s0 = 0.0
        s1 = 0.0
        s2 = 0.0
        s3 = 0.0
        sd = 0.0
        sxd = 0.0
        for j in range(k):
            x = (k0 + j) * q
            d = t - x
            d2 = d * d
            e = np.exp(-a * d2 - m)
            s0 += e
            s1 += e * x
            s2 += e * x * x
            s3 += e * x * x * x
            sd += e * d2
            sxd += e * x * d2
        mean = s1 / s0
        second = s2 / s0
        var = second - mean * mean
        if var < 0.0:
            var = 0.0
        skew_u = s3 / s0 - mean * second
        grad_theta[i] = g * 2.0 * a * var
        g_q += g * (mean + 2.0 * a * t * var - 2.0 * a * skew_u) / q
        g_a += g * -(sxd / s0 - mean * sd / s0)
    return g_q, g_a


@njit(cache=True, parallel=True)
def mpmf_forward(theta, q, a, lo, hi, k, windowed, chunks):
    """Σ_i P(level | theta[i]) per alphabet level (eq. 25 before dividing by the count)."""
    size = hi - lo + 1
    partial = np.zeros((chunks, size))
    n = theta.size
    per = (n + chunks - 1) // chunks
    for c in prange(chunks):
        for i in range(c * per, min(n, (c + 1) * per)):
            t = theta[i]
            k0 = first_level(t, q, lo, hi, k, windowed)
            m = _max_logit(t, q, a, k0, k)
            s0 = 0.0
            for j in range(k):
                d = t - (k0 + j) * q
                s0 += np.exp(-a * d * d - m)
            for j in range(k):
                d = t - (k0 + j) * q
                partial[c, k0 + j - lo] += np.exp(-a * d * d - m) / s0
    return partial.sum(axis=0)


@njit(cache=True, parallel=True)
def mpmf_backward(theta, gpmf, q, a, lo, hi, k, windowed, grad_theta):
    """Backward of S[l] = Σ_i P(l | θ_i) given gpmf[l] = ∂L/∂S[l].

    With logits z_l = -a(θ - lq)², ∂P_l/∂φ = P_l (∂z_l/∂φ - E_P[∂z/∂φ]), so each derivative is a
    covariance under P of g and ∂z/∂φ: θ: -2a(θ-lq); q: 2a·l(θ-lq); a: -(θ-lq)².
    Returns (∂L/∂q, ∂L/∂a); fills grad_theta.
    """
    g_q = 0.0
    g_a = 0.0
    for i in prange(theta.size):
        t = theta[i]
        k0 = first_level(t, q, lo, hi, k, windowed)
        m = _max_logit(t, q, a, k0, k)
        s0 = 0.0
        sg = 0.0
        ct = 0.0
        gct = 0.0
        cq = 0.0
        gcq = 0.0
        ca = 0.0
        gca = 0.0
        for j in range(k):
            lev = k0 + j
            d = t - lev * q
            e = np.exp(-a * d * d - m)
            g = gpmf[lev - lo]
            s0 += e
            sg += e * g
            dt = -2.0 * a * d
            dq = 2.0 * a * lev * d
            da = -d * d
            ct += e * dt
            gct += e * g * dt
            cq += e * dq
            gcq += e * g * dq
            ca += e * da
            gca += e * g * da
        eg = sg / s0
        grad_theta[i] = gct / s0 - eg * ct / s0
        g_q += gcq / s0 - eg * cq / s0
        g_a += gca / s0 - eg * ca / s0
    return g_q, g_a
