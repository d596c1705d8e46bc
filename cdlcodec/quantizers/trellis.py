"""Dependent (trellis-coded) quantization, as in the NNC standard and VVC.

Two scalar quantizers share the step Δ:  Q0 reconstructs level k as 2kΔ (even multiples), Q1 as
(2k - sgn(k))Δ (zero and odd multiples). Which one applies to a weight is decided by a state machine
driven by the parity of the previous levels (scan order = row-major order of the tensor):

    value_i = (2 k_i - sgn(k_i) · Q(state_i)) · Δ,   state_{i+1} = NEXT[state_i][k_i & 1],   state_0 = 0

so the union of both quantizers is the integer grid at Δ while each level only has to distinguish
points 2Δ apart. The encoder chooses the levels with a Viterbi search over the trellis minimising
F_i (w_i - value_i)² / Δ² + λ · R(k_i), with R from the cabac backend's rate model (its contexts
frozen within a block of the scan and adapted to the decided levels between blocks, neighbours
taken from each survivor path). The decoder needs only Δ, the state machine and the levels:
{"scheme": "dependent", "step": Δ, "states": 4 | 8} (formats/SPEC.md section 3).

State machines: 4 states is the VVC/NNC machine (Q = state >> 1). The 8-state machine extends it
the same way (Q = state >> 2, NEXT[s] = (s//2, s//2 + 4) with the parity order swapped on odd
states); on Laplacian data it gives slightly lower distortion than 4 states at equal rate, and
both about 0.7 dB below uniform quantization at ~3 bits (benchmarks/results/rd.md).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..backends import EncodeHint, get as get_backend
from ..backends.cabac_binarization import N_CONTEXTS, rate_cost, rate_update
from ..backends.cabac_coder import COST_FRAC_BITS, STATE_SIZE, new_contexts
from ..errors import CdlInputError
from ..jit import njit
from .base import DEFAULT_REL_STEP, Quantizer, parameter_error
from .channel import level_limit
from .params import STATE_MACHINES, state_machine
from .uniform import UniformQuantizer

DEFAULT_STATES = 8
BLOCK = 1024          # scan positions per Viterbi block (contexts adapt between blocks)
_INF = 1e300


@njit(cache=True)
def reconstruction_integers(levels, next_state, qid, s):
    """2k - sgn(k)·Q(state) along the scan from state `s`: the integer multiple of Δ each level
    stands for, and the state after the last level."""
    n = levels.shape[0]
    out = np.empty(n, dtype=np.int64)
    for i in range(n):
        k = levels[i]
        sg = 1 if k > 0 else (-1 if k < 0 else 0)
        out[i] = 2 * k - sg * qid[s]
        s = next_state[s, k & 1]
    return out, s


def dequantize_dependent(levels: np.ndarray, states: int, state: int = 0, *, with_state: bool = False):
    """Levels -> integer reconstruction multiples (int64) for the "dependent" scheme; a tensor's
    levels may come in consecutive blocks, each started from the state the previous one ended in
    (with_state=True: (multiples, that state))."""
    next_state, qid = state_machine(states)
    out, end = reconstruction_integers(np.ascontiguousarray(levels, dtype=np.int64), next_state, qid, np.int64(state))
    return (out, int(end)) if with_state else out


@njit(cache=True, inline="always")
def recon_multiple(k, q):
    sg = 1 if k > 0 else (-1 if k < 0 else 0)
    return 2 * k - sg * q


@njit(cache=True)
def level_candidates(x, q, cand):
    """The levels of quantizer q whose points lie around x (= w/Δ), and zero: Q0's points are the
    even integers 2k, Q1's zero and the odd integers 2k - sgn(k)."""
    if q == 0:
        kf = np.int64(math.floor(x / 2.0))
        cand[0] = kf
        cand[1] = kf + 1
    else:
        mag = np.int64(math.floor((abs(x) + 1.0) / 2.0))
        sg = -1 if x < 0 else 1
        cand[0] = sg * mag
        cand[1] = sg * (mag + 1)
    cand[2] = 0


@njit(cache=True, inline="always")
def _viterbi(r, weight, lam, limit, next_state, qid, chunk_size, n_gt, mode, fast, slow, block, out, rated):
    """Trellis search (see module docstring). r = w/Δ; levels written to `out`. `rated` is a constant:
    without the rate term numba drops the rate model's calls, so they are not compiled either."""
    n = r.shape[0]
    ns = qid.shape[0]
    scale = 1.0 / float(1 << COST_FRAC_BITS)
    st = np.zeros(STATE_SIZE, dtype=np.int64)
    J = np.empty(ns)
    J2 = np.empty(ns)
    pa = np.zeros(ns, dtype=np.int64)   # survivor's previous level (context neighbour a)
    pb = np.zeros(ns, dtype=np.int64)   # and the one before (b)
    pa2 = np.zeros(ns, dtype=np.int64)
    pb2 = np.zeros(ns, dtype=np.int64)
    back = np.zeros((block, ns), dtype=np.int64)
    lev = np.zeros((block, ns), dtype=np.int64)
    cand = np.zeros(3, dtype=np.int64)
    no_row = np.int64(0)  # no row neighbour u here; int64s, not literals: rate_cost/rate_update compile once
    start_state = 0
    chunk_start = 0
    ctx = new_contexts(N_CONTEXTS)
    s0 = np.int64(0)  # not a literal 0: the rate_update below would compile for it too
    while s0 < n:
        if s0 >= chunk_start + chunk_size:
            chunk_start += chunk_size
            ctx = new_contexts(N_CONTEXTS)
        e0 = min(n, s0 + block, chunk_start + chunk_size)
        for s in range(ns):
            J[s] = _INF
        J[start_state] = 0.0
        a0 = out[s0 - 1] if s0 - 1 >= chunk_start else 0
        b0 = out[s0 - 2] if s0 - 2 >= chunk_start else 0
        for s in range(ns):
            pa[s] = a0
            pb[s] = b0
        for i in range(s0, e0):
            x = r[i]
            for s in range(ns):
                J2[s] = _INF
            for s in range(ns):
                if J[s] >= _INF:
                    continue
                q = qid[s]
                level_candidates(x, q, cand)
                for c in range(3):
                    k = cand[c]
                    if k > limit or k < -limit:
                        continue
                    if c == 2 and (cand[0] == 0 or cand[1] == 0):
                        continue
                    d = x - recon_multiple(k, q)
                    cost = J[s] + weight[i] * d * d
                    if rated:
                        cost += lam * scale * rate_cost(ctx, st, k, pa[s], pb[s], no_row, mode, n_gt, fast, slow)
                    t = next_state[s, k & 1]
                    if cost < J2[t]:
                        J2[t] = cost
                        back[i - s0, t] = s
                        lev[i - s0, t] = k
                        pa2[t] = k
                        pb2[t] = pa[s]
            for s in range(ns):
                J[s] = J2[s]
                pa[s] = pa2[s]
                pb[s] = pb2[s]
        best = 0
        for s in range(1, ns):
            if J[s] < J[best]:
                best = s
        start_state = best
        s = best
        for i in range(e0 - 1, s0 - 1, -1):
            out[i] = lev[i - s0, s]
            s = back[i - s0, s]
        if rated:  # adapt the contexts to the decided levels, as the encoder will
            rate_update(ctx, st, out, chunk_start, s0, e0, no_row, mode, n_gt, fast, slow)
        s0 = e0
    return out


@njit(cache=True)
def viterbi_scan(r, weight, lam, limit, next_state, qid, chunk_size, n_gt, mode, fast, slow, block, out):
    """The trellis search with the rate term λ·R (λ > 0), R from the cabac rate model."""
    return _viterbi(r, weight, lam, limit, next_state, qid, chunk_size, n_gt, mode, fast, slow, block, out, True)


@njit(cache=True)
def viterbi_scan_distortion(r, weight, limit, next_state, qid, chunk_size, block, out):
    """The trellis search without a rate term (λ = 0): the trellis levels nearest the weights."""
    unused = np.int64(0)
    return _viterbi(r, weight, 0.0, limit, next_state, qid, chunk_size, unused, unused, unused, unused, block, out,
                    False)


@dataclass(frozen=True)
class TrellisQuantizer(Quantizer):
    """Dependent quantization with `states` (4 or 8) states; `lam` = λ per Δ² as in RDQuantizer.

    The step rule is UniformQuantizer's; Δ is the spacing of the union of both quantizers.
    """

    lam: float = 0.0
    rel_step: float | None = DEFAULT_REL_STEP
    step: float | None = None
    bits: int | None = None
    granularity: str = "tensor"
    states: int = DEFAULT_STATES
    fisher: dict | None = field(default=None, compare=False, hash=False)

    uses_step_rule = True

    def __post_init__(self):
        from .rd import check_lam_granularity

        check_lam_granularity(self.lam, self.granularity)
        if self.states not in STATE_MACHINES:
            raise parameter_error("states must be 4 or 8 (trellis)", "states")
        self.rule

    @property
    def rule(self) -> UniformQuantizer:
        rel = self.rel_step if self.step is None and self.bits is None else None
        return UniformQuantizer(rel_step=rel, step=self.step, bits=self.bits)

    def describe(self) -> str:
        text = f"trellis states={self.states} lambda={self.lam:g} {self.rule.describe()}"
        return text + (" per-channel" if self.granularity == "channel" else "")

    def quantize(self, values64, w32):
        return self.quantize_tensor(values64, w32, None)

    def quantize_record(self, record, values64, w32, backend: str):
        fisher = None if self.fisher is None else self.fisher.get(record.name)
        levels, quant = self.quantize_tensor(values64, w32, fisher)
        return levels, quant, EncodeHint(shape=record.shape)

    def quantize_tensor(self, values64, w32, fisher):
        if not np.all(np.isfinite(w32)):
            raise CdlInputError("tensor holds NaN or infinite values; keep it lossless with --keep")
        from .rd import cabac_settings, normalised_weights, step_plan

        rule = self.rule
        step, quant = step_plan(rule, self.granularity, w32)
        quant = dict(quant, scheme="dependent", states=self.states)  # DependentParams.to_json's order
        # With B bits the reconstruction |2k - 1| <= 2^(B-1) - 1 must hold: |k| <= 2^(B-2).
        limit = level_limit(rule) if rule.bits is None else max(1, 2 ** (rule.bits - 2))
        r = np.ascontiguousarray((values64 / step).ravel(), dtype=np.float64)
        if r.size and np.max(np.abs(r)) > 2.0 * (2**31 - 2):
            raise CdlInputError("step is too small for this tensor: levels exceed ±(2^31-1)")
        weight = normalised_weights(fisher, r.size)
        next_state, qid = state_machine(self.states)
        out = np.zeros(r.size, dtype=np.int64)
        if r.size == 0:
            return out, quant
        if self.lam > 0:
            nearest = np.rint(r / 2).astype(np.int64)
            chunk, n_gt, mode, _row, fast, slow = cabac_settings(nearest, tuple(w32.shape))
            viterbi_scan(r, weight, float(self.lam), np.int64(limit), next_state, qid, chunk, n_gt, mode,
                         fast, slow, BLOCK, out)
        else:  # no rate model to set up (nor compile); blocks still end at the cabac chunks, as above
            viterbi_scan_distortion(r, weight, np.int64(limit), next_state, qid, get_backend("cabac").chunk_size,
                                    BLOCK, out)
        return out, quant
