"""numba kernels for the CDL quantizers on CPU: one pass per element instead of ~20 tensor operations.

The same computations as cdl/_torch_kernels.py (which documents the formulation: logits relative
to the nearest level, central moments in level units, the B1/B2 form of the backward), written as
loops: each element's CPMF is walked level by level in a K-entry scratch array, so no
[elements, levels] array is ever allocated. `_place` picks the levels: the whole alphabet, or
a window of K levels around the nearest one, moved inward at the edges (Section VI-B-1). Tests
check both implementations and the torch reference (quantizer.cpmf) agree. Windows of exactly 5
levels (activations; weights at the default sharpness) have branch-free kernels of their own that
LLVM vectorises (`forward5` / `backward5`, below; chosen by quantizer._five). Floating point here
only shapes training gradients, never coded bytes.
"""
from __future__ import annotations

import types as pytypes

import numpy as np

from ..optional import require

# Plain Python would take hours per epoch here, so unlike the coders' kernels these need numba.
require("numba", "CDL training")
from llvmlite import ir  # noqa: E402
from numba import get_num_threads, njit, prange, types  # noqa: E402
from numba.extending import intrinsic, overload  # noqa: E402


# The 5-level kernels compute in θ's float type: float32 tensors in float32 (twice the lanes per
# vector, about 1.5x faster loops; what the torch kernels do too), float64 in float64. A Python float
# literal is a float64 in numba and would promote float32 arithmetic, so constants are written
# `_as(x, c)`: c as a float of x's type (x a float or an array of floats).
def _as(like, value):
    raise NotImplementedError("numba-only: _as(like, value) is value in like's float type")


@overload(_as, inline="always")
def _as_impl(like, value):
    kind = like.dtype if isinstance(like, types.Array) else like
    if kind == types.float32:
        return lambda like, value: np.float32(value)
    return lambda like, value: np.float64(value)


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
# The 5-level loops have no such bound: each level gets its own exp (`_exps5`).


@njit(cache=True, parallel=True)
def exp_args(theta, q, a, lo, hi, k, windowed, x):
    """x[i] = 2A·w_i, whose exp E_i the caller takes (torch's vectorised exp: a scalar exp per
    element here would cost more than all the rest of a kernel)."""
    A = a * q * q
    for i in prange(theta.size):
        _, _, w = _place(theta[i], q, lo, hi, k, windowed)
        x[i] = 2.0 * A * w if abs(w) <= 0.5 else 0.0


_SQUARED_OFFSETS: dict[int, np.ndarray] = {}


def level_constants(q: float, a: float, k: int) -> np.ndarray:
    """c[o + k - 1] = exp(-A·o²) for offsets o = -(k-1) … k-1 (one per quantizer call: o² kept per k)."""
    squares = _SQUARED_OFFSETS.get(k)
    if squares is None:
        squares = _SQUARED_OFFSETS[k] = np.arange(-(k - 1), k, dtype=np.float64) ** 2
    return np.exp(-(a * q * q) * squares)


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
    inv_s0 = _as(s0, 1.0) / s0    # one division per element: divisions dominated the loop
    u = s1 * inv_s0
    m2 = s2 * inv_s0
    var = max(m2 - u * u, _as(s0, 0.0))
    m3 = s3 * inv_s0 - _as(s0, 3.0) * u * m2 + _as(s0, 2.0) * u * u * u
    return n + u, var, m3, inv_s0


@njit(cache=True)
def entropy_bits_of_sums(sums, count, scale, min_p, factor):
    """scale · H(sums / count) in bits (eq. 26 / 28, zero-probability bins contribute 0: p clamped
    at min_p inside the log, as entropy.entropy_bits), in float64; fills factor[l] =
    ∂(scale·H)/∂sums[l] = -scale·(log max(p_l, min_p) + [p_l ≥ min_p]) / (count·ln 2)."""
    ln2 = np.log(2.0)
    total = 0.0
    c = -scale / (ln2 * count)
    for j in range(sums.size):
        p = sums[j] / count
        logp = np.log(p if p >= min_p else min_p)
        total += p * logp
        factor[j] = (logp + (1.0 if p >= min_p else 0.0)) * c
    return scale * (-total / ln2)


@njit(cache=True, error_model="numpy")
def _sum_rows(partial):
    """Σ of a [chunks, size] array's rows, row after row: the per-chunk partial sums in a fixed order.
    (numpy's sum inside a parallel kernel becomes a parallel reduction, whose order, and so whose last
    bits, would depend on numba's thread count.)"""
    out = np.zeros(partial.shape[1])
    for c in range(partial.shape[0]):
        for j in range(partial.shape[1]):
            out[j] += partial[c, j]
    return out


@njit(cache=True, error_model="numpy")
def _sum_in_order(values):
    """Σ values, first to last (as _sum_rows)."""
    total = 0.0
    for i in range(values.size):
        total += values[i]
    return total


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
    sums = _sum_rows(partial)
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
    return _sum_in_order(partial[0]), _sum_in_order(partial[1])


# ---------------------------------------------------------------------------------------------------
# Windows of 5 levels (every activation quantizer, Section VI-B-1, and weights at 20/3 ≤ αq² < 20,
# the default sharpness; float32 weights from αq² = 4, see quantizer._NEGLIGIBLE_LOGIT_FLOAT32): the
# values of `forward` / `backward`, written branch-free so that LLVM vectorises the loop over
# elements (the K-level walk with a scratch array cost ~15-20 ns per element; these loops ~3-6 ns
# in float64, exp included). They compute in θ's float type (`_as`): float32 tensors get sixteen
# lanes per vector, so every array a loop touches is 32-bit then (indices kb as int32 too; one
# 64-bit array halved the vector width). What kept loops scalar, measured: indices that might
# be negative (numba's wraparound), hence loops over block slices from 0; gathers (grad_sums[k0 + j])
# inside the arithmetic loop, hence `_window_grads`; an exp inside it, hence `_exps5`. Elements the
# products do not cover (NaN, ±inf) are redone by `_cpmf` (float64) after each block;
# MPMF sums are scattered in a scalar loop after it.
# Nothing per element passes from forward to backward but θ: the backward recomputes each element's
# CPMF and moments with the forward's own code (the same values bit for bit). Keeping them instead
# (three moments, and with the MPMF the window's five probabilities: 32 bytes an element in float32,
# written once and read once) made a training step slower: the exps cost less than that memory
# traffic (R-CDL with the entropy terms, LeNet-5: 0.94-0.96 of the step with them kept, measured
# in one process on the same model; without the entropy terms no difference).

_BLOCK5 = 512


@intrinsic
def _float_from_bits(typingctx, bits):
    """The float64 whose IEEE bits are the int64 `bits` (an LLVM bitcast, so loops stay vectorisable)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.DoubleType())
    return types.float64(types.int64), codegen


_LOG2E = 1.4426950408889634
_LN2_HI = 0.693147180369123816490   # Cody-Waite split of ln 2: k·_LN2_HI is exact for |k| < 2^20
_LN2_LO = 1.90821492927058770002e-10


@njit(cache=True, inline="always", error_model="numpy")
def _exp(x):
    """exp(x) for |x| ≤ 700 without a libm call (numba has no vectorised exp without SVML; a scalar
    exp per element cost more than the rest of the kernel): x = k·ln2 + r, |r| ≤ ln2/2, a degree-13
    Taylor polynomial for e^r (truncation < 1e-17 relative), times 2^k built from its bits. Within
    2 ulp of libm's exp. Each step is one fused multiply-add (`_fma`): numba contracts nothing by
    itself, and a multiply plus an add per step cost the exps a fifth more time (measured)."""
    k = np.rint(x * _LOG2E)
    r = _fma(-k, _LN2_LO, _fma(-k, _LN2_HI, x))
    p = 1.0 / 6227020800.0
    p = _fma(p, r, 1.0 / 479001600.0)
    p = _fma(p, r, 1.0 / 39916800.0)
    p = _fma(p, r, 1.0 / 3628800.0)
    p = _fma(p, r, 1.0 / 362880.0)
    p = _fma(p, r, 1.0 / 40320.0)
    p = _fma(p, r, 1.0 / 5040.0)
    p = _fma(p, r, 1.0 / 720.0)
    p = _fma(p, r, 1.0 / 120.0)
    p = _fma(p, r, 1.0 / 24.0)
    p = _fma(p, r, 1.0 / 6.0)
    p = _fma(p, r, 0.5)
    p = _fma(p, r, 1.0)
    p = _fma(p, r, 1.0)
    return p * _float_from_bits((np.int64(k) + 1023) << 52)


@intrinsic
def _float32_from_bits(typingctx, bits):
    """The float32 whose IEEE bits are the int32 `bits` (as _float_from_bits)."""
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())
    return types.float32(types.int32), codegen


@intrinsic
def _fma(typingctx, x, y, z):
    """x·y + z with one rounding (llvm.fma: one vector instruction on CPUs with FMA)."""
    def codegen(context, builder, signature, args):
        fn = builder.module.declare_intrinsic("llvm.fma", [args[0].type] * 3)
        return builder.call(fn, args)
    return x(x, y, z), codegen


_F32 = np.float32
_LOG2E_32 = _F32(1.4426950408889634)
_LN2_HI_32 = _F32(0.693359375)          # 9 significant bits: k·_LN2_HI_32 is exact for |k| < 2^15
_LN2_LO_32 = _F32(-2.12194440e-4)


@njit(cache=True, inline="always", error_model="numpy")
def _exp32(x):
    """`_exp` in float32 for |x| ≤ 80 (callers clamp): a degree-7 Taylor polynomial on |r| ≤ ln2/2
    (truncation < 6e-9 relative, under half a float32 ulp), 2^k from its bits."""
    k = np.rint(x * _LOG2E_32)
    r = _fma(-k, _LN2_LO_32, _fma(-k, _LN2_HI_32, x))
    p = _F32(1.0 / 5040.0)
    p = _fma(p, r, _F32(1.0 / 720.0))
    p = _fma(p, r, _F32(1.0 / 120.0))
    p = _fma(p, r, _F32(1.0 / 24.0))
    p = _fma(p, r, _F32(1.0 / 6.0))
    p = _fma(p, r, _F32(0.5))
    p = _fma(p, r, _F32(1.0))
    p = _fma(p, r, _F32(1.0))
    return p * _float32_from_bits((np.int32(k) + np.int32(127)) << np.int32(23))


# The exps' arguments in `_exps5` are clamped to ± this (float64, float32). Every argument of a finite
# element is ≤ 0, so the floor is what matters: each relative probability is at least e^-bound. In
# float32 that is e^-50 (2e-22, far below float32's resolution next to the nearest level's 1), which
# keeps every product of the forward and backward loops a normal number: subnormal operands and
# results cost a quarter of the forward loop's time (measured on conv1's activations at A = 9).
_EXP_BOUND = {types.float64: 700.0, types.float32: 50.0}


def _exp_of(x):
    raise NotImplementedError("numba-only: exp(x) in x's float type, x clamped to _EXP_BOUND")


@overload(_exp_of, inline="always")
def _exp_of_impl(x):
    if x == types.float32:
        return lambda x: _exp32(x)
    return lambda x: _exp(x)


def _exp_bound(x):
    raise NotImplementedError("numba-only: _EXP_BOUND of x's float type")


@overload(_exp_bound, inline="always")
def _exp_bound_impl(x):
    if x == types.float32:
        bound32 = np.float32(_EXP_BOUND[types.float32])
        return lambda x: bound32
    bound64 = np.float64(_EXP_BOUND[types.float64])
    return lambda x: bound64


@njit(cache=True, inline="always", error_model="numpy")
def _window5(t, q, lo, hi):
    """(k0, j0, n, ratio) of one element for a 5-level window, in θ's float type: the window's first
    level k0, the nearest level n, its index j0 = n - k0 in the window (as `_place`; NaN goes to lo)."""
    first = _as(t, lo + 2)
    last = _as(t, hi - 2)
    ratio = t / q
    r = np.rint(ratio)
    n = r if r >= _as(t, lo) else _as(t, lo)
    n = n if n <= _as(t, hi) else _as(t, hi)
    c = r if r >= first else first
    c = c if c <= last else last
    k0 = c - _as(t, 2.0)
    return k0, n - k0, n, ratio


@njit(cache=True, inline="always", error_model="numpy")
def _cpmf5(t, q, lo, hi, x0, x1, x2, x3, x4):
    """`_cpmf` for K = 5, windowed, from the window's relative probabilities x_j (`_exps5`): (x0..x4,
    k0, j0, n, w, s0, s1, s2, s3), k0 and j0 (nearest level's index) as floats, all in θ's float type."""
    one = _as(t, 1.0)
    two = _as(t, 2.0)
    k0, j0, n, ratio = _window5(t, q, lo, hi)
    w = ratio - n
    o0 = -j0
    o1 = one - j0
    o2 = two - j0
    o3 = _as(t, 3.0) - j0
    o4 = _as(t, 4.0) - j0
    # Sums in the order of _cpmf (j = 0 … 4).
    s0 = x0 + x1 + x2 + x3 + x4
    y0 = x0 * o0
    y1 = x1 * o1
    y2 = x2 * o2
    y3 = x3 * o3
    y4 = x4 * o4
    s1 = y0 + y1 + y2 + y3 + y4
    s2 = y0 * o0 + y1 * o1 + y2 * o2 + y3 * o3 + y4 * o4
    s3 = y0 * o0 * o0 + y1 * o1 * o1 + y2 * o2 * o2 + y3 * o3 * o3 + y4 * o4 * o4
    return x0, x1, x2, x3, x4, k0, j0, n, w, s0, s1, s2, s3


@njit(cache=True, inline="always", error_model="numpy")
def _level_exp(A, w2, o, bound):
    """exp(A·o·(2w - o)) = P(level n + o) / P(nearest level n), its argument clamped to ±bound. For
    |o| = 1, 2w ∓ 1 is exact where it matters (Sterbenz, |w| ≥ 1/4); for |o| ≥ 2 there is no
    cancellation: one rounding or two per argument."""
    x = A * (o * (w2 - o))
    x = x if x >= -bound else -bound      # NaN too; its element is redone by _cpmf
    x = x if x <= bound else bound
    return _exp_of(x)


@njit(cache=True, error_model="numpy")
def _exps5(th, q, A, lo, hi, xb):
    """xb[j, i] = exp(A·o·(2w - o)), o = j - j0, for the five levels of each element's window (the
    nearest one's is exp(0) = 1 exactly), in a loop of their own (inside the arithmetic loop the exps
    cost four times as much). Each level has its own exp rather than products of powers of one: no
    product can overflow or go subnormal, whatever A (`_EXP_BOUND`). Clipped values (|w| > 1/2) are
    covered too: their arguments are ≤ 0 as well. In θ's float type (q and A share it)."""
    inv_q = _as(A, 1.0) / q
    bound = _exp_bound(A)
    one = _as(A, 1.0)
    two = _as(A, 2.0)
    for i in range(th.size):
        t = th[i]
        _, j0, n, _ = _window5(t, q, lo, hi)
        # w = θ/q - n as (θ - n·q)/q, θ - n·q with one rounding: in float32 θ/q itself is off by up to
        # half an ulp of θ/q (1e-5 levels at level 200), which the exps would turn into 2e-4 relative.
        w = _fma(-n, q, t) * inv_q
        w2 = w + w
        xb[0, i] = _level_exp(A, w2, -j0, bound)
        xb[1, i] = _level_exp(A, w2, one - j0, bound)
        xb[2, i] = _level_exp(A, w2, two - j0, bound)
        xb[3, i] = _level_exp(A, w2, _as(A, 3.0) - j0, bound)
        xb[4, i] = _level_exp(A, w2, _as(A, 4.0) - j0, bound)


@njit(cache=True, error_model="numpy")
def _zero_cpmf5(like, q, A, lo, hi):
    """`_cpmf5` of θ = 0 (like's float type) as the 5-level loops compute it, its exps from `_exps5`:
    the fused-ReLU kernels give their zeros exactly what an unfused zero gets."""
    z = np.zeros(1, dtype=like.dtype)
    xb = np.empty((5, 1), dtype=like.dtype)
    _exps5(z, q, A, lo, hi, xb)
    return _cpmf5(z[0], q, lo, hi, xb[0, 0], xb[1, 0], xb[2, 0], xb[3, 0], xb[4, 0])


@njit(cache=True, error_model="numpy")
def _relu_mask(th, g):
    """g[i] = 0 where relu(th[i]) <= 0: the ReLU's gradient (torch's threshold_backward on its output)."""
    for i in range(th.size):
        g[i] = 0.0 if th[i] <= 0.0 else g[i]


@njit(cache=True, error_model="numpy")
def _forward5_block(th, eb, u, y, p0, p1, p2, p3, p4, kb, q, A, lo, hi, sample, want_sums):
    """The vectorised loop of `forward5` over one block (arrays sliced to it: indices from 0, so
    no negative-index wraparound keeps LLVM from vectorising): y, and with `want_sums` the CPMFs
    p_j and first levels kb the MPMF scatter reads (block-sized scratch); returns how many elements
    it left for `_cpmf` (|w| > 1/2 or NaN)."""
    _exps5(th, q, A, lo, hi, eb)
    bad = 0
    for i in range(th.size):
        x0, x1, x2, x3, x4, k0, j0, n, w, s0, s1, s2, s3 = _cpmf5(th[i], q, lo, hi, eb[0, i], eb[1, i], eb[2, i],
                                                                  eb[3, i], eb[4, i])
        level_mean, _, _, inv_s0 = _moments(n, s0, s1, s2, s3)
        if sample:
            # _pick without branches: the first j whose cumulative sum reaches the target is the
            # number of partial sums (j < 4) below it, the sums being nondecreasing.
            target = u[i] * s0
            a0 = x0
            a1 = a0 + x1
            a2 = a1 + x2
            a3 = a2 + x3
            one = _as(s0, 1.0)
            zero = _as(s0, 0.0)
            pick = ((one if a0 < target else zero) + (one if a1 < target else zero)
                    + (one if a2 < target else zero) + (one if a3 < target else zero))
            y[i] = (k0 + pick) * q
        else:
            y[i] = q * level_mean
        if want_sums:
            p0[i] = x0 * inv_s0
            p1[i] = x1 * inv_s0
            p2[i] = x2 * inv_s0
            p3[i] = x3 * inv_s0
            p4[i] = x4 * inv_s0
            kb[i] = np.int32(k0 - _as(k0, lo))     # 32-bit like float32 θ: one vector width
        bad += 0 if abs(w) < np.inf else 1     # NaN / inf: `_cpmf`
    return bad


@njit(cache=True, error_model="numpy", inline="always")
def _sum8(b, n):
    """Σ b[:n] in eight interleaved partial sums (element j into sum j mod 8, combined pairwise at the
    end): a fixed order, so the result does not depend on the machine, and no longer one chain of
    dependent adds per element (that chain cost ~4 cycles per element)."""
    s0 = s1 = s2 = s3 = s4 = s5 = s6 = s7 = 0.0
    n8 = n - n % 8
    for j in range(0, n8, 8):
        s0 += b[j]
        s1 += b[j + 1]
        s2 += b[j + 2]
        s3 += b[j + 3]
        s4 += b[j + 4]
        s5 += b[j + 5]
        s6 += b[j + 6]
        s7 += b[j + 7]
    for j in range(n8, n):
        s0 += b[j]
    return ((s0 + s1) + (s2 + s3)) + ((s4 + s5) + (s6 + s7))


@njit(cache=True, error_model="numpy")
def _pair_sums(bq, ba, n):
    """(Σ bq[:n], Σ ba[:n]), each in `_sum8`'s fixed order: the 5-level backward kernels' ∂/∂q, ∂/∂α sums."""
    return _sum8(bq, n), _sum8(ba, n)


@njit(cache=True, error_model="numpy")
def _hist5(hist, kb, p0, p1, p2, p3, p4):
    """The MPMF scatter of one block: hist[j & 3][kb[j] + o] += p_o[j] (four histograms in turn)."""
    for j in range(kb.size):
        h = hist[j & 3]
        kk = np.uint64(kb[j])      # unsigned: no negative-index wraparound select per add
        h[kk] += p0[j]
        h[kk + np.uint64(1)] += p1[j]
        h[kk + np.uint64(2)] += p2[j]
        h[kk + np.uint64(3)] += p3[j]
        h[kk + np.uint64(4)] += p4[j]


@njit(cache=True, inline="always", error_model="numpy")
def _typed_scalars(theta, q, a):
    """(q, α, A = αq²) in θ's float type: what the 5-level loops compute with."""
    qt = _as(theta, q)
    at = _as(theta, a)
    return qt, at, at * qt * qt


@njit(cache=True, parallel=True, error_model="numpy")
def forward5(theta, q, a, lo, hi, consts, uniforms, sample, want_sums, chunks, y):
    """`forward` for windowed K = 5 (consts from level_constants(q, a, 5)): y, and the MPMF sums
    (with `want_sums`; zeros without). Nothing per element is kept for the backward: `backward5`
    recomputes the CPMFs from θ (see the section's comment)."""
    size = hi - lo + 1
    partial = np.zeros((chunks, size))
    n_all = theta.size
    per = (n_all + chunks - 1) // chunks
    A = a * q * q
    qt, _, At = _typed_scalars(theta, q, a)
    for c in prange(chunks):
        # Four histograms taken in turn: consecutive elements often share bins (half are zeros), and
        # one histogram made every add wait for the previous one's store.
        hist = np.zeros((4, size))
        e = np.empty(5)
        eb = np.empty((5, _BLOCK5), dtype=theta.dtype)
        pb = np.empty((5, _BLOCK5), dtype=theta.dtype)
        kb = np.empty(_BLOCK5, dtype=np.int32)
        stop = min(n_all, (c + 1) * per)
        for b0 in range(c * per, stop, _BLOCK5):
            b1 = min(stop, b0 + _BLOCK5)
            m = b1 - b0
            bad = _forward5_block(theta[b0:b1], eb, uniforms[b0:b1] if sample else uniforms, y[b0:b1],
                                  pb[0, :m], pb[1, :m], pb[2, :m], pb[3, :m], pb[4, :m], kb[:m], qt, At, lo, hi,
                                  sample, want_sums)
            if bad > 0:
                for i in range(b0, b1):
                    t = theta[i]
                    _, _, w = _place(t, q, lo, hi, 5, True)
                    if abs(w) < np.inf:
                        continue
                    k0i, n, s0, s1, s2, s3 = _cpmf(t, q, A, lo, hi, 5, True, 1.0, consts, e)  # E unused
                    level_mean, _, _, inv_s0 = _moments(n, s0, s1, s2, s3)
                    y[i] = (k0i + _pick(e, 5, uniforms[i] * s0)) * q if sample else q * level_mean
                    if want_sums:
                        for jj in range(5):
                            pb[jj, i - b0] = e[jj] * inv_s0
                        kb[i - b0] = k0i - lo
            if want_sums:
                _hist5(hist, kb[:m], pb[0, :m], pb[1, :m], pb[2, :m], pb[3, :m], pb[4, :m])
        for j in range(size):
            partial[c, j] = (hist[0, j] + hist[1, j]) + (hist[2, j] + hist[3, j])
    return _sum_rows(partial)


@njit(cache=True, error_model="numpy")
def _window_grads(th, q, lo, hi, kb, gb, grad_sums):
    """gb[j, i] = grad_sums[k0_i + j - lo]: the window's level gradients, gathered in a loop of their
    own (gathers inside the arithmetic loop kept LLVM from vectorising it, and its selects then
    became mispredicted branches)."""
    first = _as(q, lo + 2)
    last = _as(q, hi - 2)
    for i in range(th.size):
        r = np.rint(th[i] / q)
        c = r if r >= first else first
        c = c if c <= last else last
        kb[i] = np.int32(c - first)
    for i in range(th.size):
        base = np.uint64(kb[i])      # unsigned: no negative-index wraparound select per load
        gb[0, i] = grad_sums[base]
        gb[1, i] = grad_sums[base + np.uint64(1)]
        gb[2, i] = grad_sums[base + np.uint64(2)]
        gb[3, i] = grad_sums[base + np.uint64(3)]
        gb[4, i] = grad_sums[base + np.uint64(4)]


@njit(cache=True, error_model="numpy")
def _backward5_block(th, eb, gy, has_grad_y, grad_sums, has_grad_sums, gt, bq, ba, q, a, lo, hi, kb, gb):
    """The vectorised loop of `backward5` over one block (sliced arrays, as `_forward5_block`): the
    CPMF and its moments recomputed from θ exactly as the forward computed them (the same `_exps5`,
    `_cpmf5` and `_moments`), then gt and the per-element ∂/∂q, ∂/∂α terms bq, ba. The MPMF part
    (`has_grad_sums`): Cov(g, l) = Σ_j p_j (g_j - E[g]) d_j and Cov(g, (l - L)²) likewise with d_j²,
    p_j the CPMF, g_j the level's gradient, d_j the level minus the mean. Returns the count of
    elements left for `_cpmf` (NaN, ±inf)."""
    if has_grad_sums:
        _window_grads(th, q, lo, hi, kb, gb, grad_sums)
    _exps5(th, q, a * q * q, lo, hi, eb)
    bad = 0
    one = _as(q, 1.0)
    two = _as(q, 2.0)
    for i in range(th.size):
        t = th[i]
        x0, x1, x2, x3, x4, k0, j0, n, w, s0, s1, s2, s3 = _cpmf5(t, q, lo, hi, eb[0, i], eb[1, i], eb[2, i],
                                                                  eb[3, i], eb[4, i])
        level_mean, var, m3, inv_s0 = _moments(n, s0, s1, s2, s3)
        G = gy[i] if has_grad_y else _as(q, 0.0)
        v1 = G * q * var
        v2 = G * q * m3
        if has_grad_sums:
            p0 = x0 * inv_s0
            p1 = x1 * inv_s0
            p2 = x2 * inv_s0
            p3 = x3 * inv_s0
            p4 = x4 * inv_s0
            g0 = gb[0, i]
            g1 = gb[1, i]
            g2 = gb[2, i]
            g3 = gb[3, i]
            g4 = gb[4, i]
            eg = p0 * g0 + p1 * g1 + p2 * g2 + p3 * g3 + p4 * g4
            d0 = k0 - level_mean
            d1 = d0 + one
            d2 = d0 + two
            d3 = d0 + _as(q, 3.0)
            d4 = d0 + _as(q, 4.0)
            r0 = p0 * (g0 - eg)
            r1 = p1 * (g1 - eg)
            r2 = p2 * (g2 - eg)
            r3 = p3 * (g3 - eg)
            r4 = p4 * (g4 - eg)
            v1 += r0 * d0 + r1 * d1 + r2 * d2 + r3 * d3 + r4 * d4
            v2 += r0 * d0 * d0 + r1 * d1 * d1 + r2 * d2 * d2 + r3 * d3 * d3 + r4 * d4 * d4
        bad += 0 if abs(w) < np.inf else 1     # NaN / inf: `_cpmf`
        mean = q * level_mean
        gt[i] = two * a * q * v1
        bq[i] = G * level_mean + two * a * ((t - two * mean) * v1 - q * v2)
        ba[i] = two * q * (t - mean) * v1 - q * q * v2
    return bad


@njit(cache=True, error_model="numpy")
def _backward5_general(t, G, q, a, lo, hi, consts, e, st, grad_sums, has_grad_sums):
    """(∂/∂θ, ∂/∂q term, ∂/∂α term) of one element `_backward5_block` leaves (NaN, ±inf), from `_cpmf`
    (float64) like the forward's fallback; its moments rounded to θ's type through `st` (a 3-array of
    it), as the 5-level loops hold them."""
    A = a * q * q
    k0i, n, s0, s1, s2, s3 = _cpmf(t, q, A, lo, hi, 5, True, 1.0, consts, e)  # E unused
    st[0], st[1], st[2], _ = _moments(n, s0, s1, s2, s3)
    level_mean = float(st[0])
    cv1 = 0.0
    cv2 = 0.0
    if has_grad_sums:
        cv1, cv2 = _mpmf_covariances(e, 5, k0i, 1.0 / s0, level_mean, grad_sums, lo)
    v1 = G * q * float(st[1]) + cv1
    v2 = G * q * float(st[2]) + cv2
    mean = q * level_mean
    return (2.0 * a * q * v1, G * level_mean + 2.0 * a * ((t - 2.0 * mean) * v1 - q * v2),
            2.0 * q * (t - mean) * v1 - q * q * v2)


@njit(cache=True, parallel=True, error_model="numpy")
def backward5(theta, q, a, lo, hi, consts, grad_y, has_grad_y, grad_sums, has_grad_sums, chunks, grad_theta):
    """`backward` for windowed K = 5, from θ alone (the CPMFs recomputed, see the section's comment);
    per chunk the same sums in the same order."""
    n_all = theta.size
    per = (n_all + chunks - 1) // chunks
    qt, at, _ = _typed_scalars(theta, q, a)
    partial = np.zeros((2, chunks))
    for c in prange(chunks):
        e = np.empty(5)
        st = np.empty(3, dtype=theta.dtype)
        eb = np.empty((5, _BLOCK5), dtype=theta.dtype)
        bq = np.empty(_BLOCK5, dtype=theta.dtype)
        ba = np.empty(_BLOCK5, dtype=theta.dtype)
        kb = np.empty(_BLOCK5, dtype=np.int32)
        gb = np.empty((5, _BLOCK5), dtype=theta.dtype)
        cq = 0.0
        ca = 0.0
        stop = min(n_all, (c + 1) * per)
        for b0 in range(c * per, stop, _BLOCK5):
            b1 = min(stop, b0 + _BLOCK5)
            m = b1 - b0
            bad = _backward5_block(theta[b0:b1], eb, grad_y[b0:b1] if has_grad_y else grad_y, has_grad_y,
                                   grad_sums, has_grad_sums, grad_theta[b0:b1], bq[:m], ba[:m], qt, at, lo, hi,
                                   kb, gb)
            if bad > 0:
                for i in range(b0, b1):
                    t = theta[i]
                    _, _, w = _place(t, q, lo, hi, 5, True)
                    if abs(w) < np.inf:
                        continue
                    grad_theta[i], bq[i - b0], ba[i - b0] = _backward5_general(
                        t, grad_y[i] if has_grad_y else 0.0, q, a, lo, hi, consts, e, st, grad_sums, has_grad_sums)
            sq, sa = _pair_sums(bq, ba, m)
            cq += sq
            ca += sa
        partial[0, c] = cq
        partial[1, c] = ca
    return _sum_in_order(partial[0]), _sum_in_order(partial[1])


# ---------------------------------------------------------------------------------------------------
# An activation quantizer after a ReLU, fused (QuantizeFunction's `relu`): the values quantized are
# relu(θ), and every θ ≤ 0 gives the same CPMF (that of 0). Those elements, often most of a ReLU's
# output, are left out of the vectorised loops: each block is compacted to its non-zero elements
# (`_compact_relu`, into block-sized scratch with their offsets in the block); a zero element's
# output is written directly, its MPMF share added once per call. `backward5_relu` compacts each
# block again the same way (the same decision per block, from θ): ∂/∂θ is 0 at the zeros (the
# ReLU's gradient) and their share of ∂/∂q and ∂/∂α, linear in the incoming gradient, is taken from
# its sum over them.


@njit(cache=True, error_model="numpy")
def _count_nonzero_relu(th):
    """How many elements of th have relu(θ) ≠ 0 (θ > 0 or NaN): an integer sum, vectorised, so whole
    blocks (dense or all zeros) skip the compaction loop."""
    cnt = 0
    for i in range(th.size):
        cnt += 0 if th[i] <= 0.0 else 1
    return cnt


@njit(cache=True, error_model="numpy")
def _compact_relu(th, tb, ib):
    """tb[:count] = the elements of th with relu(θ) ≠ 0 (θ > 0 or NaN), ib[:count] their offsets;
    returns count. Branch-free: each element is written, the cursor moves only past non-zeros."""
    cnt = 0
    for i in range(th.size):
        v = th[i]
        tb[cnt] = v
        ib[cnt] = i
        cnt += 0 if v <= 0.0 else 1
    return cnt


# The compacted non-zeros of a block go through the vectorised loops padded with zeros to a multiple of
# this (at most the block's size): a loop's tail of fewer than one vector's worth of elements runs in
# narrower vectors and scalars at several times the cost per element (measured: 170 elements 15 %
# slower per element than 176). The padding's results go to block-sized scratch and are not read.
_PAD5 = 16


@njit(cache=True, inline="always", error_model="numpy")
def _padded(cnt, m):
    """cnt rounded up to a multiple of _PAD5, at most m."""
    cp = (cnt + (_PAD5 - 1)) // _PAD5 * _PAD5
    return cp if cp <= m else m


# A block with more than this share of non-zero values runs whole through the vectorised loops: the
# compaction's gathers and scatters would cost more than the zeros they leave out.
_DENSE_SHARE = 0.625


@njit(cache=True, error_model="numpy")
def _relu_values(th, out):
    """out[i] = relu(th[i]) as torch.relu gives it (0 below zero; -0.0 and NaN unchanged)."""
    for i in range(th.size):
        v = th[i]
        out[i] = 0.0 if v < 0.0 else v


@njit(cache=True, error_model="numpy")
def _zero_outputs(u, yv, sample, yz, t0, t1, t2, t3, k0z, s0z, q):
    """The output of every element of a block as if it were a zero (the non-zeros are written over):
    q·L(0), or the Qp sample of the zero CPMF at u[i] (`_forward5_block`'s pick with its partial sums)."""
    if sample:
        one = _as(q, 1.0)
        zero = _as(q, 0.0)
        for i in range(yv.size):
            target = u[i] * s0z
            pick = ((one if t0 < target else zero) + (one if t1 < target else zero)
                    + (one if t2 < target else zero) + (one if t3 < target else zero))
            yv[i] = (k0z + pick) * q
    else:
        for i in range(yv.size):
            yv[i] = yz


@njit(cache=True, error_model="numpy")
def _relu_block(th, tb, ib):
    """(count, padded count, dense) of one block of a ReLU's input, and its values as the 5-level loop
    sees them in tb[:padded count]: relu(θ) whole (dense, both counts = the block's size), or the
    non-zeros compacted with their offsets in ib and zeros after them up to `_padded(count, size)`.
    forward5_relu and backward5_relu both call it: the same decision and layout for every block."""
    m = th.size
    cnt = _count_nonzero_relu(th)
    if cnt > _DENSE_SHARE * m:
        _relu_values(th, tb[:m])
        return m, m, True
    cp = _padded(cnt, m)
    if cnt > 0:
        _compact_relu(th, tb[:m], ib[:m])
        _zero_fill(tb[cnt:cp])     # the padding: zeros (finite; its results are not read)
    return cnt, cp, False


@njit(cache=True, error_model="numpy")
def _gather_padded(dst, src, b0, ib, cnt, cp, pad):
    """dst[j] = src[b0 + ib[j]] for the block's cnt compacted elements, then `pad` up to cp: a per-element
    input of the compacted loop (Qp's uniforms, the incoming gradient) in `_relu_block`'s layout."""
    for j in range(cnt):
        dst[j] = src[b0 + ib[j]]
    for j in range(cnt, cp):
        dst[j] = pad


@njit(cache=True, parallel=True, error_model="numpy")
def forward5_relu(theta, q, a, lo, hi, consts, uniforms, sample, want_sums, chunks, y):
    """`forward5` of relu(θ) (θ the ReLU's input), the zeros left out of the vectorised loop (see above):
    y as forward5's, bit for bit; MPMF sums equal to rounding (the zeros' share added once). A block
    more than _DENSE_SHARE non-zero runs whole (relu(θ) through the loop, zeros included)."""
    size = hi - lo + 1
    partial = np.zeros((chunks, size))
    zeros = np.zeros(chunks, dtype=np.int64)
    n_all = theta.size
    per = (n_all + chunks - 1) // chunks
    A = a * q * q
    qt, _, At = _typed_scalars(theta, q, a)
    x0z, x1z, x2z, x3z, x4z, k0z, _, nz, _, s0z, s1z, s2z, s3z = _zero_cpmf5(theta, qt, At, lo, hi)
    Lz, _, _, inv_sz = _moments(nz, s0z, s1z, s2z, s3z)
    yz = qt * Lz
    t0 = x0z
    t1 = t0 + x1z
    t2 = t1 + x2z
    t3 = t2 + x3z
    for c in prange(chunks):
        hist = np.zeros((4, size))
        e = np.empty(5)
        eb = np.empty((5, _BLOCK5), dtype=theta.dtype)
        pb = np.empty((5, _BLOCK5), dtype=theta.dtype)
        kb = np.empty(_BLOCK5, dtype=np.int32)
        tb = np.empty(_BLOCK5, dtype=theta.dtype)
        ib = np.empty(_BLOCK5, dtype=np.int32)
        ub = np.empty(_BLOCK5)
        yb = np.empty(_BLOCK5, dtype=y.dtype)
        zc = 0
        stop = min(n_all, (c + 1) * per)
        for b0 in range(c * per, stop, _BLOCK5):
            b1 = min(stop, b0 + _BLOCK5)
            m = b1 - b0
            cnt, cp, dense = _relu_block(theta[b0:b1], tb, ib)
            zc += m - cnt
            if cnt == 0:
                _zero_outputs(uniforms[b0:b1] if sample else uniforms, y[b0:b1], sample, yz, t0, t1, t2, t3, k0z,
                              s0z, qt)
                continue
            if dense:
                yv = y[b0:b1]
                uv = uniforms[b0:b1] if sample else uniforms
            else:
                _zero_outputs(uniforms[b0:b1] if sample else uniforms, y[b0:b1], sample, yz, t0, t1, t2, t3, k0z,
                              s0z, qt)
                if sample:
                    _gather_padded(ub, uniforms, b0, ib, cnt, cp, 0.5)
                yv = yb[:cp]
                uv = ub[:cp]
            th = tb[:cp]
            p0 = pb[0, :cp]
            p1 = pb[1, :cp]
            p2 = pb[2, :cp]
            p3 = pb[3, :cp]
            p4 = pb[4, :cp]
            bad = _forward5_block(th, eb, uv, yv, p0, p1, p2, p3, p4, kb[:cp], qt, At, lo, hi, sample, want_sums)
            if bad > 0:
                for j in range(cnt):
                    t = th[j]
                    _, _, w = _place(t, q, lo, hi, 5, True)
                    if abs(w) < np.inf:
                        continue
                    k0i, n, s0, s1, s2, s3 = _cpmf(t, q, A, lo, hi, 5, True, 1.0, consts, e)  # E unused
                    level_mean, _, _, inv_s0 = _moments(n, s0, s1, s2, s3)
                    yv[j] = (k0i + _pick(e, 5, uv[j] * s0)) * q if sample else q * level_mean
                    if want_sums:
                        for jj in range(5):
                            pb[jj, j] = e[jj] * inv_s0
                        kb[j] = k0i - lo
            if not dense:
                for j in range(cnt):
                    y[b0 + ib[j]] = yb[j]
            if want_sums:
                _hist5(hist, kb[:cnt], p0[:cnt], p1[:cnt], p2[:cnt], p3[:cnt], p4[:cnt])
        for j in range(size):
            partial[c, j] = (hist[0, j] + hist[1, j]) + (hist[2, j] + hist[3, j])
        zeros[c] = zc
    sums = _sum_rows(partial)
    if want_sums:
        count = zeros.sum()
        kz = int(k0z) - lo
        sums[kz] += count * (x0z * inv_sz)
        sums[kz + 1] += count * (x1z * inv_sz)
        sums[kz + 2] += count * (x2z * inv_sz)
        sums[kz + 3] += count * (x3z * inv_sz)
        sums[kz + 4] += count * (x4z * inv_sz)
    return sums


@njit(cache=True, error_model="numpy")
def _zero_fill(gt):
    for i in range(gt.size):
        gt[i] = 0.0


@njit(cache=True, error_model="numpy", fastmath={"reassoc", "nsz"})
def _zero_grad_sum(th, gy):
    """Σ gy[i] over the block's zeros (θ ≤ 0). Reassociated (vectorised partial sums; the same
    order at every call of the compiled kernel)."""
    total = 0.0
    for i in range(th.size):
        total += gy[i] if th[i] <= 0.0 else 0.0
    return total


@njit(cache=True, parallel=True, error_model="numpy")
def backward5_relu(theta, q, a, lo, hi, consts, grad_y, has_grad_y, grad_sums, has_grad_sums, chunks, grad_theta):
    """`backward5` for `forward5_relu` (θ the ReLU's input; each block compacted again as the forward
    did): ∂/∂θ equal to F.relu followed by backward5 (0 at the zeros); ∂/∂q, ∂/∂α equal to rounding
    (the zeros' share from Σ grad_y over them)."""
    n_all = theta.size
    per = (n_all + chunks - 1) // chunks
    A = a * q * q
    qt, at, At = _typed_scalars(theta, q, a)
    # The zero element: its stats as the 5-level loop computes them (θ's type), its MPMF covariances
    # (float64, from `_cpmf`).
    _, _, _, _, _, _, _, nz, _, s0z, s1z, s2z, s3z = _zero_cpmf5(theta, qt, At, lo, hi)
    Lz, Vz, Mz, _ = _moments(nz, s0z, s1z, s2z, s3z)
    Lz = float(Lz)
    Vz = float(Vz)
    Mz = float(Mz)
    ez = np.empty(5)
    k0z, _, sz, _, _, _ = _cpmf(0.0, q, A, lo, hi, 5, True, 1.0, consts, ez)
    inv_sz = 1.0 / sz
    c1z = 0.0
    c2z = 0.0
    if has_grad_sums:
        c1z, c2z = _mpmf_covariances(ez, 5, k0z, inv_sz, Lz, grad_sums, lo)
    mean_z = q * Lz
    # A zero's ∂/∂q and ∂/∂α terms are G·(…1) + (…0) (backward5's formulas at θ = 0).
    aq1 = Lz + 2.0 * a * ((-2.0 * mean_z) * (q * Vz) - q * (q * Mz))
    aq0 = 2.0 * a * ((-2.0 * mean_z) * c1z - q * c2z)
    aa1 = 2.0 * q * (-mean_z) * (q * Vz) - q * q * (q * Mz)
    aa0 = 2.0 * q * (-mean_z) * c1z - q * q * c2z
    partial = np.zeros((2, chunks))
    for c in prange(chunks):
        e = np.empty(5)
        st = np.empty(3, dtype=theta.dtype)
        eb = np.empty((5, _BLOCK5), dtype=theta.dtype)
        bq = np.empty(_BLOCK5, dtype=theta.dtype)
        ba = np.empty(_BLOCK5, dtype=theta.dtype)
        kb = np.empty(_BLOCK5, dtype=np.int32)
        gb = np.empty((5, _BLOCK5), dtype=theta.dtype)
        tb = np.empty(_BLOCK5, dtype=theta.dtype)
        ib = np.empty(_BLOCK5, dtype=np.int32)
        gyb = np.empty(_BLOCK5, dtype=grad_y.dtype)
        gtb = np.empty(_BLOCK5, dtype=grad_theta.dtype)
        cq = 0.0
        ca = 0.0
        stop = min(n_all, (c + 1) * per)
        for b0 in range(c * per, stop, _BLOCK5):
            b1 = min(stop, b0 + _BLOCK5)
            m = b1 - b0
            cnt, cp, dense = _relu_block(theta[b0:b1], tb, ib)
            if dense:    # the whole block: no offsets, the ReLU's mask after
                gyv = grad_y[b0:b1] if has_grad_y else grad_y
                gtv = grad_theta[b0:b1]
            else:
                _zero_fill(grad_theta[b0:b1])
                nzc = m - cnt
                gz = _zero_grad_sum(theta[b0:b1], grad_y[b0:b1]) if has_grad_y else 0.0
                cq += gz * aq1 + nzc * aq0
                ca += gz * aa1 + nzc * aa0
                if cnt == 0:
                    continue
                if has_grad_y:
                    _gather_padded(gyb, grad_y, b0, ib, cnt, cp, 0.0)
                gyv = gyb[:cp]
                gtv = gtb[:cp]
            th = tb[:cp]
            bad = _backward5_block(th, eb, gyv, has_grad_y, grad_sums, has_grad_sums, gtv, bq[:cp], ba[:cp], qt, at,
                                   lo, hi, kb, gb)
            if bad > 0:
                for j in range(cnt):
                    t = th[j]
                    _, _, w = _place(t, q, lo, hi, 5, True)
                    if abs(w) < np.inf:
                        continue
                    gtv[j], bq[j], ba[j] = _backward5_general(t, gyv[j] if has_grad_y else 0.0, q, a, lo, hi, consts,
                                                              e, st, grad_sums, has_grad_sums)
            if dense:
                _relu_mask(theta[b0:b1], gtv)
            else:
                for j in range(cnt):
                    grad_theta[b0 + ib[j]] = gtb[j]
            sq, sa = _pair_sums(bq, ba, cnt)
            cq += sq
            ca += sa
        partial[0, c] = cq
        partial[1, c] = ca
    return _sum_in_order(partial[0]), _sum_in_order(partial[1])


# ---------------------------------------------------------------------------------------------------
# Serial twins of the 5-level kernels: the same code compiled without parallel=True (prange runs as
# range: the same chunks, loops and sums, so the same results bit for bit), for calls that would run
# on one thread anyway. Launching the parallel region costs ~4 µs a call even then (measured on
# LeNet-5's small layers), and a training step makes ~20 calls.

def _serial_twin(kernel):
    f = kernel.py_func
    twin = pytypes.FunctionType(f.__code__, f.__globals__, f.__name__ + "_serial", f.__defaults__, f.__closure__)
    twin.__qualname__ = twin.__name__      # its own entry in numba's cache, apart from the parallel one
    twin.__doc__ = f"`{f.__name__}` without parallel=True (see above)."
    return njit(cache=True, error_model="numpy")(twin)


forward5_serial = _serial_twin(forward5)
forward5_relu_serial = _serial_twin(forward5_relu)
backward5_serial = _serial_twin(backward5)
backward5_relu_serial = _serial_twin(backward5_relu)


_SERIAL = {forward5: forward5_serial, forward5_relu: forward5_relu_serial, backward5: backward5_serial,
           backward5_relu: backward5_relu_serial}


def for_chunks(kernel, chunks: int):
    """`kernel` (a 5-level kernel) or its serial twin for a call over `chunks` chunks: the twin for one
    chunk, or with numba set to one thread."""
    return _SERIAL[kernel] if chunks == 1 or get_num_threads() == 1 else kernel
