"""Per-tensor steps by equal rate-distortion slope, with distortion measured at the model output.

For every quantizable tensor i and every candidate step rule c (a relative step r × std, per tensor
or per output channel) the allocator knows
- R_i(c): bits, from the order-0 entropy of the nearest levels (on a row sample of big tensors) plus
  the cost of storing per-channel steps;
- D_i(c) = s_i · mse_i(c): the output distortion (relative output MSE), with mse_i the mean squared
  weight error of c and s_i the tensor's sensitivity, measured once by running the model with only
  that tensor quantized.
Distortions of independent rounding errors add, so for a budget B the plan minimising Σ R_i subject
to Σ D_i <= B is found by picking, for one slope μ, argmin_c R_i(c) + μ·D_i(c) in every tensor, and
bisecting μ (Everett's Lagrangian method, as in the bit allocation of Shoham & Gersho 1988).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

# Ratio ≈ 1.12: fine enough for the budget search to land near its target; coarser than 1.5 × std
# leaves the range where output distortion grows linearly with weight MSE.
REL_GRID = tuple(float(x) for x in np.geomspace(0.004, 1.5, 53))
SAMPLE_ELEMENTS = 1 << 18
STEP_BITS = 64         # a per-channel step costs about this much index space (a JSON float)
REF_REL = 0.25         # relative step at which sensitivities are measured
DEPENDENT_MIN = 1 << 16   # tensors at least this big also get dependent-quantization candidates
DEPENDENT_SAMPLE = 1 << 14  # elements the trellis runs on per candidate (~5 M values/s)


@dataclass(frozen=True)
class Candidate:
    rel: float                # 0: the tensor is stored exactly (the finest plan always meets a target)
    channel_axis: int | None  # None: one step for the tensor
    dependent: bool = False   # trellis-coded (dependent) quantization at this step instead of rounding

    @property
    def exact(self) -> bool:
        return self.rel == 0.0


EXACT = Candidate(0.0, None)


@dataclass
class TensorCurve:
    """Rate and weight-MSE of every candidate for one tensor, and its measured sensitivity."""

    name: str
    numel: int
    candidates: list[Candidate]
    bits: np.ndarray
    mse: np.ndarray
    sensitivity: float = 0.0            # output distortion per unit weight MSE, rounding candidates
    sensitivity_dependent: float = 0.0  # the same for trellis-coded candidates (measured apart)

    def distortion(self) -> np.ndarray:
        key = (self.sensitivity, self.sensitivity_dependent)
        if getattr(self, "_distortion_key", None) != key:  # the allocator asks thousands of times
            dependent = np.array([c.dependent for c in self.candidates], dtype=bool)
            self._distortion = np.where(dependent, self.sensitivity_dependent, self.sensitivity) * self.mse
            self._distortion_key = key
        return self._distortion


def unit_steps(w: np.ndarray, channel_axis: int | None) -> np.ndarray:
    """The step of relative size 1: std(w), or per channel the std of each channel (broadcastable);
    never zero or non-finite, so a constant tensor or channel still gets a positive step."""
    std = float(np.std(w))
    if not (std > 0 and math.isfinite(std)):
        std = 1.0
    if channel_axis is None:
        return np.float64(std)
    moved = np.moveaxis(w, channel_axis, 0).reshape(w.shape[channel_axis], -1)
    shape = [1] * w.ndim
    shape[channel_axis] = w.shape[channel_axis]
    return np.maximum(moved.std(axis=1), std * 1e-3).reshape(shape)


def steps_for(w: np.ndarray, cand: Candidate) -> np.ndarray:
    return cand.rel * unit_steps(w, cand.channel_axis)


def _sample_rows(w: np.ndarray) -> np.ndarray | None:
    """Indices of evenly spread slices along axis 0 holding about SAMPLE_ELEMENTS values (None: all)."""
    if w.size <= SAMPLE_ELEMENTS or w.ndim == 0:
        return None
    rows = max(1, SAMPLE_ELEMENTS // max(1, w.size // w.shape[0]))
    return np.unique(np.linspace(0, w.shape[0] - 1, rows).round().astype(np.int64))


def entropy_bits(levels: np.ndarray) -> float:
    if levels.size == 0:
        return 0.0
    lo = int(levels.min())
    counts = np.bincount((levels - lo).ravel())
    counts = counts[counts > 0]
    p = counts / levels.size
    return float(-(counts * np.log2(p)).sum())


def tensor_curve(name: str, w: np.ndarray, channel_axis: int | None, bits_per_value: int = 32,
                 dependent: bool = False) -> TensorCurve:
    """Rate and MSE of every candidate (per tensor, and per channel along `channel_axis` if given),
    measured on a sample of rows for big tensors, plus storing the tensor exactly; with `dependent`,
    also trellis-coded quantization per tensor (for tensors rounded without error compensation)."""
    axes: list[int | None] = [None]
    if channel_axis is not None and w.ndim >= 2 and 1 < w.shape[channel_axis] <= w.size // 8:
        axes.append(channel_axis)
    rows = _sample_rows(w)
    sample = w if rows is None else w[rows]
    scale = w.size / max(sample.size, 1)
    cands, bits, mse = [], [], []
    for axis in axes:
        unit = unit_steps(w, axis)
        if rows is not None and axis == 0:
            unit = unit[rows]
        extra = STEP_BITS * (w.shape[axis] if axis is not None else 1)
        for rel in REL_GRID:
            steps = rel * unit
            levels = np.rint(sample / steps)
            err = sample - levels * steps
            cands.append(Candidate(rel, axis))
            mse.append(float(np.mean(err * err)) if err.size else 0.0)
            bits.append(entropy_bits(levels.astype(np.int64)) * scale + extra)
    if dependent and w.size >= DEPENDENT_MIN:
        _dependent_candidates(w, cands, bits, mse)
    cands.append(EXACT)
    bits.append(float(bits_per_value) * w.size)
    mse.append(0.0)
    return TensorCurve(name, int(w.size), cands, np.array(bits), np.array(mse))


@dataclass
class Plan:
    choice: dict[str, Candidate] = field(default_factory=dict)
    bits: float = 0.0
    distortion: float = 0.0


def plan_for_slope(curves: list[TensorCurve], mu: float) -> Plan:
    plan = Plan()
    for c in curves:
        d = c.distortion()
        j = int(np.argmin(c.bits + mu * d))
        plan.choice[c.name] = c.candidates[j]
        plan.bits += float(c.bits[j])
        plan.distortion += float(d[j])
    return plan


def plan_for_budget(curves: list[TensorCurve], budget: float) -> Plan:
    """The lowest-rate plan whose predicted output distortion stays within `budget`."""
    lo, hi = 1e-6, 1e16  # slopes: bits per unit of relative output MSE
    best = plan_for_slope(curves, hi)
    if best.distortion > budget:
        return best  # even the finest candidates exceed the budget: the caller verifies and reports
    for _ in range(80):
        mid = math.sqrt(lo * hi)
        plan = plan_for_slope(curves, mid)
        if plan.distortion <= budget:
            best, hi = plan, mid
        else:
            lo = mid
        if hi / lo < 1.0001:
            break
    return best



def _dependent_candidates(w: np.ndarray, cands: list, bits: list, mse: list) -> None:
    """Trellis-coded quantization beats rounding by ~0.7 dB at equal rate (the NNC standard's dependent
    quantization); its rate and MSE are measured on stretches of the scan spread over the tensor (the
    trellis runs along each; channels of very different scale are all represented), scaled to it."""
    from .dependent import dependent_levels

    from .dependent import spread_stretches

    stretches = spread_stretches(np.asarray(w, dtype=np.float64).ravel(), DEPENDENT_SAMPLE)
    scale = w.size / sum(x.size for x in stretches)
    std = float(np.std(w)) or 1.0
    for rel in REL_GRID:  # the full grid: a big table's step decides a fifth of a bit per parameter per grid step
        runs = [dependent_levels(x, rel * std) for x in stretches]
        err = np.concatenate([x - values for x, (_, _, values) in zip(stretches, runs)])
        cands.append(Candidate(rel, None, True))
        mse.append(float(np.mean(err * err)))
        bits.append(entropy_bits(np.concatenate([levels for levels, _, _ in runs])) * scale + STEP_BITS)


class DeployGrid:
    """Candidates for `encode --deploy int8|int4`: one step per channel along the deploy axis of each
    tensor (output channels, the features of a Gather table: fidelity/deploy.channel_axes), never
    finer than the grid allows (deploy_min_steps: every level fits the grid), rounded to the
    tensor's float type (QDQ stores the scale in it), levels clamped to the grid."""

    def __init__(self, grid: str, stripped_graph):
        from .deploy import GRIDS, channel_axes, level_bound

        self.bits = GRIDS[grid]
        self.bound = level_bound(self.bits)
        self.axes = channel_axes(stripped_graph)
        self._floor: dict[str, tuple[np.ndarray, np.ndarray]] = {}  # name -> (grid floor, unit steps)

    def axis(self, name: str, w: np.ndarray) -> int:
        return self.axes.get(name, 0) % w.ndim

    def steps(self, name: str, w: np.ndarray, rel: float, dtype: str) -> np.ndarray:
        """Per-channel steps (broadcastable to w) for relative step `rel`."""
        from .deploy import deploy_min_steps, representable_steps

        axis = self.axis(name, w)
        if name not in self._floor:  # per tensor, once: the curve and the rounder ask for every step
            self._floor[name] = (deploy_min_steps(w, axis, self.bits), np.asarray(unit_steps(w, axis)).ravel())
        floor, unit = self._floor[name]
        shape = [1] * w.ndim
        shape[axis] = w.shape[axis]
        return representable_steps(np.maximum(rel * unit, floor), dtype).reshape(shape)

    def curve(self, name: str, w: np.ndarray, dtype: str, bits_per_value: int) -> TensorCurve:
        axis = self.axis(name, w)
        rows = _sample_rows(w) if axis != 0 else None  # keep every channel's step when sampling rows
        sample = w if rows is None else w[rows]
        scale = w.size / max(sample.size, 1)
        cands, bits, mse, seen = [], [], [], set()
        for rel in REL_GRID:
            steps = self.steps(name, w, rel, dtype)
            key = steps.tobytes()
            if key in seen:  # below the grid's floor every channel: the same plan
                continue
            seen.add(key)
            levels = np.clip(np.rint(sample / steps), -self.bound, self.bound)
            err = sample - levels * steps
            cands.append(Candidate(rel, axis))
            mse.append(float(np.mean(err * err)) if err.size else 0.0)
            bits.append(entropy_bits(levels.astype(np.int64)) * scale + STEP_BITS * w.shape[axis])
        cands.append(EXACT)
        bits.append(float(bits_per_value) * w.size)
        mse.append(0.0)
        return TensorCurve(name, int(w.size), cands, np.array(bits), np.array(mse))
