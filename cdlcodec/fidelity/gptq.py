"""Error-compensating rounding for weights that multiply an activation (MatMul, Gemm).

GPTQ / OPTQ (Frantar et al., "GPTQ: Accurate Post-Training Quantization for Generative Pre-trained
Transformers", ICLR 2023, building on Optimal Brain Surgeon / OBQ): the input rows of W ([in, out],
y = x·W) are rounded one after another, and the rounding error of each row is spread over the rows
not yet rounded with the inverse of H = XᵀX (X: calibration activations entering the layer), which
minimises the growth of ||X·W - X·Q||². The blocked formulation with the Cholesky factor of H⁻¹ is
the one of the paper; here each decision may also pay for bits (rate term, as in DeepCABAC eq. 11):
the level k minimising (w - k·Δ)²/Δ² + λ·bits(k) among the two integers around w/Δ.
"""
from __future__ import annotations

import numpy as np

from ..jit import HAVE_NUMBA, njit
from .dependent import trellis_stretch

DAMP = 0.1      # relative dampening of H's diagonal: the paper's 0.01 overfits the few thousand activation rows of a calibration set (MiniLM: 1.6 % more bits at equal held-apart cosine)
BLOCK = 128     # rows rounded between two lazy updates of the rest


def inverse_cholesky(h: np.ndarray, damp: float = DAMP) -> np.ndarray:
    """Upper Cholesky factor U of (H + damp·mean(diag H)·I)⁻¹ (so H⁻¹ = UᵀU). Inputs never active in
    the calibration data (zero diagonal) get a unit diagonal: they are rounded without compensation."""
    h = np.array(h, dtype=np.float64, copy=True)
    diag = np.diag(h).copy()
    dead = diag <= 0
    h[dead, :] = 0.0
    h[:, dead] = 0.0
    h[dead, dead] = 1.0
    mean = float(np.mean(np.diag(h))) or 1.0
    # With J the reversal, cholesky(J·H·J) = L gives H⁻¹ = UᵀU for U = J·L⁻¹·J (upper triangular):
    # one factorisation and one inverse, where factoring H⁻¹ itself takes two and a product.
    flipped = h[::-1, ::-1]
    for attempt in range(6):  # raise the dampening until H is numerically positive definite
        try:
            lower = np.linalg.cholesky(flipped + (damp * 10 ** attempt) * mean * np.eye(h.shape[0]))
            break
        except np.linalg.LinAlgError:
            continue
    else:
        return np.eye(h.shape[0])
    return np.ascontiguousarray(np.triu(np.linalg.inv(lower)[::-1, ::-1]))


def gptq_levels(w: np.ndarray, u: np.ndarray, steps: np.ndarray, limit: int = 2**31 - 1,
                lam: float = 0.0, bits: tuple[int, np.ndarray] | None = None, trellis=None) -> np.ndarray:
    """Levels for W ([in, out], float64) given U from `inverse_cholesky` and steps (scalar or [out]).

    `bits` = (lowest level, cost in bits of each level from it) prices the rate term λ·bits(k);
    without it (or with λ = 0) each row is rounded to nearest after compensation. With `trellis`
    (a dependent.RowTrellis at the tensor's step, W's rows being consecutive stretches of the scan)
    each compensated row is trellis-coded instead, and its reconstruction error is what is spread.
    """
    w = np.array(w, dtype=np.float64, copy=True)
    n_in = w.shape[0]
    steps = np.ascontiguousarray(np.broadcast_to(np.asarray(steps, dtype=np.float64), (w.shape[1],)))
    levels = np.empty(w.shape, dtype=np.int64)
    compiled = HAVE_NUMBA and (lam <= 0 or bits is None)  # the row loop compiled (rate-priced rounding is not)
    if compiled and trellis is not None:
        x, row_levels, row_recon = (np.empty(w.shape[1]), np.empty(w.shape[1], np.int64),
                                    np.empty(w.shape[1], np.int64))
    for b0 in range(0, n_in, BLOCK):
        b1 = min(b0 + BLOCK, n_in)
        block = w[b0:b1]
        errs = np.empty_like(block)
        ub = u[b0:b1, b0:b1]
        if compiled and trellis is None:
            _nearest_block(block, np.ascontiguousarray(ub), steps, float(limit), levels[b0:b1], errs)
        elif compiled:
            trellis.state = int(_trellis_block(block, np.ascontiguousarray(ub), trellis.step, np.int64(trellis.state),
                                               trellis.lam, np.int64(trellis.cost_lo), trellis.cost,
                                               trellis.next_state, trellis.qid, levels[b0:b1], errs, x, row_levels,
                                               row_recon))
        else:
            for i in range(b1 - b0):
                row = block[i]
                if trellis is not None:
                    k, recon = trellis.next(row)
                else:
                    k = _round(row / steps, limit, lam, bits)
                    recon = k * steps
                levels[b0 + i] = k
                err = (row - recon) / ub[i, i]
                block[i + 1:] -= np.outer(ub[i, i + 1:], err)
                errs[i] = err
        if b1 < n_in:
            w[b1:] -= u[b0:b1, b1:].T @ errs
    return levels


# The rows of one block, compiled: the same arithmetic as the Python loop in gptq_levels (round, error
# over U's diagonal, subtract U[i, j] x error from each later row of the block), without a temporary
# outer product per row.
@njit(cache=True)
def _nearest_block(block, ub, steps, limit, levels, errs):
    n, m = block.shape
    for i in range(n):
        d = ub[i, i]
        for c in range(m):
            k = min(max(np.rint(block[i, c] / steps[c]), -limit), limit)
            levels[i, c] = np.int64(k)
            errs[i, c] = (block[i, c] - k * steps[c]) / d
        for j in range(i + 1, n):
            f = ub[i, j]
            for c in range(m):
                block[j, c] -= f * errs[i, c]


@njit(cache=True)
def _trellis_block(block, ub, step, state, lam, cost_lo, cost, next_state, qid, levels, errs, x, row_levels, row_recon):
    """As _nearest_block with each row trellis-coded from the state the previous row ended in
    (dependent.RowTrellis.next); returns the state after the block."""
    n, m = block.shape
    for i in range(n):
        d = ub[i, i]
        for c in range(m):
            x[c] = block[i, c] / step
        state = trellis_stretch(x, state, lam, cost_lo, cost, next_state, qid, row_levels, row_recon)
        for c in range(m):
            levels[i, c] = row_levels[c]
            errs[i, c] = (block[i, c] - row_recon[c] * step) / d
        for j in range(i + 1, n):
            f = ub[i, j]
            for c in range(m):
                block[j, c] -= f * errs[i, c]
    return state


def _round(r: np.ndarray, limit: int, lam: float, bits) -> np.ndarray:
    nearest = np.clip(np.rint(r), -limit, limit)
    if lam <= 0 or bits is None:
        return nearest.astype(np.int64)
    lo, cost = bits
    other = np.clip(np.where(r >= nearest, nearest + 1, nearest - 1), -limit, limit)

    def price(k):
        idx = (k - lo).astype(np.int64)
        inside = (idx >= 0) & (idx < cost.size)
        out = np.full(k.shape, float(cost.max()) + 2.0)
        out[inside] = cost[idx[inside]]
        return out

    j_near = (r - nearest) ** 2 + lam * price(nearest)
    j_other = (r - other) ** 2 + lam * price(other)
    return np.where(j_other < j_near, other, nearest).astype(np.int64)
