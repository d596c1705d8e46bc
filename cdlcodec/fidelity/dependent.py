"""Trellis-coded (dependent) quantization for the fidelity search, usable inside GPTQ's row loop.

The container's "dependent" scheme (formats/SPEC.md section 3, quantizers/trellis.py) reconstructs
level k in trellis state s as (2k - sgn(k)·Q(s))·Δ, the state moving with the parity of each level
along the scan. quantizers/trellis.py chooses levels for a whole tensor with the cabac backend's
adaptive rate model; the search needs something else: levels for one stretch of the scan at a time
(a GPTQ row, whose rounding error is compensated before the next row is seen), starting from the
state the previous stretch ended in, fast enough to be tried on every candidate step. So here the
rate term is a static table, -log2 of each level's frequency under plain trellis rounding at the
same step: F = Σ (x - recon)² + λ·bits(k), x = w/Δ.
"""
from __future__ import annotations


import numpy as np

from ..jit import njit
from ..quantizers.params import DependentParams, state_machine
from ..quantizers.trellis import level_candidates, recon_multiple

STATES = 8      # the 8-state machine: slightly lower distortion than 4 states at equal rate
LAM = 0.3       # rate weight per Δ² (MiniLM's tables: 5-6 % fewer bits than rounding at equal MSE; 0.15: 4.7-5.1 %)
BLOCK = 4096    # scan positions decided together (the survivor memory is BLOCK × states)
_INF = 1e300


@njit(cache=True)
def trellis_stretch(x, start, lam, cost_lo, cost, next_state, qid, levels, recon):
    """Levels for x (= w/Δ) from trellis state `start`; writes levels and their reconstruction
    multiples, returns the end state. Decided in blocks of BLOCK (the best survivor at each block's
    end continues), so memory stays bounded for any length."""
    n = x.shape[0]
    ns = qid.shape[0]
    big = cost.max() + 2.0
    J = np.empty(ns)
    J2 = np.empty(ns)
    rows = min(BLOCK, n)  # a GPTQ row is a few hundred values: no 2 x 256 KB of survivors per call
    back = np.empty((rows, ns), dtype=np.int64)
    lev = np.empty((rows, ns), dtype=np.int64)
    cand = np.empty(3, dtype=np.int64)
    state = start
    s0 = 0
    while s0 < n:
        e0 = min(n, s0 + BLOCK)
        for s in range(ns):
            J[s] = _INF
        J[state] = 0.0
        for i in range(s0, e0):
            xi = x[i]
            for s in range(ns):
                J2[s] = _INF
            for s in range(ns):
                if J[s] >= _INF:
                    continue
                q = qid[s]
                level_candidates(xi, q, cand)
                for c in range(3):
                    k = cand[c]
                    if c == 2 and (cand[0] == 0 or cand[1] == 0):
                        continue
                    d = xi - recon_multiple(k, q)
                    j = k - cost_lo
                    price = cost[j] if 0 <= j < cost.shape[0] else big
                    total = J[s] + d * d + lam * price
                    t = next_state[s, k & 1]
                    if total < J2[t]:
                        J2[t] = total
                        back[i - s0, t] = s
                        lev[i - s0, t] = k
            for s in range(ns):
                J[s] = J2[s]
        best = 0
        for s in range(1, ns):
            if J[s] < J[best]:
                best = s
        s = best
        for i in range(e0 - 1, s0 - 1, -1):
            levels[i] = lev[i - s0, s]
            s = back[i - s0, s]
        # replay forward: reconstruction multiples, and the state the next block starts in
        s = state
        for i in range(s0, e0):
            k = levels[i]
            recon[i] = recon_multiple(k, qid[s])
            s = next_state[s, k & 1]
        state = s
        s0 = e0
    return state


class RowTrellis:
    """Dependent quantization of a tensor stretch by stretch along its scan, at one step Δ."""

    def __init__(self, sample: np.ndarray, step: float, lam: float = LAM):
        self.step = float(step)
        self.lam = float(lam)
        self.next_state, self.qid = state_machine(STATES)
        self.state = 0
        # the rate table: level frequencies of plain (λ = 0) trellis rounding of a sample
        flat = np.ascontiguousarray(np.asarray(sample, dtype=np.float64).ravel() / self.step)
        lv, _ = self._run(flat, 0, 0.0, 0, np.zeros(1))
        lo = int(lv.min()) if lv.size else 0
        counts = np.bincount(lv - lo) + 0.5 if lv.size else np.ones(1)
        self.cost_lo = lo
        self.cost = -np.log2(counts / counts.sum())

    def _run(self, x, start, lam, cost_lo, cost):
        levels = np.empty(x.size, dtype=np.int64)
        recon = np.empty(x.size, dtype=np.int64)
        trellis_stretch(x, np.int64(start), float(lam), np.int64(cost_lo), cost, self.next_state, self.qid,
                        levels, recon)
        return levels, recon

    def next(self, values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(levels, reconstructed values) of the next stretch of the scan."""
        x = np.ascontiguousarray(np.asarray(values, dtype=np.float64).ravel() / self.step)
        levels = np.empty(x.size, dtype=np.int64)
        recon = np.empty(x.size, dtype=np.int64)
        self.state = int(trellis_stretch(x, np.int64(self.state), self.lam, np.int64(self.cost_lo), self.cost,
                                         self.next_state, self.qid, levels, recon))
        return levels, recon * self.step

    def quant(self) -> dict:
        return DependentParams(STATES, self.step).to_json()


TABLE_SAMPLE = 1 << 18  # elements the rate table is estimated from
STRETCHES = 16          # a sample is this many stretches of the scan, evenly spread


def spread_stretches(flat: np.ndarray, total: int) -> list[np.ndarray]:
    """About `total` elements of `flat` as STRETCHES contiguous stretches evenly spread over it (all of
    it when small): a sample in which every part of the tensor (every channel's scale) is present."""
    if flat.size <= total:
        return [flat]
    length = max(1, total // STRETCHES)
    starts = np.linspace(0, flat.size - length, STRETCHES).round().astype(np.int64)
    return [flat[s:s + length] for s in starts]


def table_sample(w: np.ndarray) -> np.ndarray:
    return np.concatenate(spread_stretches(np.asarray(w).ravel(), TABLE_SAMPLE))


def dependent_levels(w: np.ndarray, step: float) -> tuple[np.ndarray, dict, np.ndarray]:
    """Levels, quant parameters and reconstruction of a whole tensor (row-major scan) at step Δ."""
    trellis = RowTrellis(table_sample(w), step)
    levels, values = trellis.next(w)
    return levels, trellis.quant(), values.reshape(np.shape(w))
