"""Per-output-channel steps: one step per index along axis 0 (the output channel of Linear/Conv weights).

Each channel's step follows the same rule as `UniformQuantizer` (rel_step x std of that channel,
an absolute step, or max|w|/(2^(B-1)-1) for B bits) applied to that channel's values alone, and is
stored compactly as {"scheme": "uniform", "axis": 0, "steps": [...]} (one float per channel).
Nearest rounding k = rint(w / step_c), ties to even, exactly as the per-tensor quantizer.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import CdlInputError
from .base import DEFAULT_REL_STEP, Quantizer
from .params import ChannelParams
from .uniform import UniformQuantizer

MAX_LEVEL = 2**31 - 1


def channel_steps(rule: UniformQuantizer, w32: np.ndarray, axis: int = 0) -> np.ndarray:
    """float64 array of one step per index along `axis`, each from `rule` on that slice."""
    moved = np.moveaxis(w32, axis, 0).reshape(w32.shape[axis], -1)
    return np.array([rule.step_for(row) for row in moved], dtype=np.float64)


def broadcast_steps(steps: np.ndarray, shape: tuple[int, ...], axis: int = 0) -> np.ndarray:
    """Steps shaped to broadcast against a tensor of `shape` (size 1 on every other axis)."""
    bshape = [1] * len(shape)
    bshape[axis] = shape[axis]
    return np.asarray(steps, dtype=np.float64).reshape(bshape)


def level_limit(rule: UniformQuantizer) -> int:
    """Largest level magnitude the rule allows (B bits: 2^(B-1)-1)."""
    return 2 ** (rule.bits - 1) - 1 if rule.bits is not None else MAX_LEVEL


def nearest_levels(values64: np.ndarray, step, limit: int) -> np.ndarray:
    """rint(values / step) as int64, clipped to ±limit; an error when a step is too small."""
    scaled = np.rint(values64 / step)
    if scaled.size and np.max(np.abs(scaled)) > MAX_LEVEL:
        raise CdlInputError(f"step is too small for this tensor: levels exceed ±{MAX_LEVEL}")
    levels = scaled.astype(np.int64)
    if limit < MAX_LEVEL:
        np.clip(levels, -limit, limit, out=levels)
    return levels


@dataclass(frozen=True)
class ChannelQuantizer(Quantizer):
    """Nearest rounding with one step per output channel (axis 0)."""

    uses_step_rule = True

    rel_step: float | None = DEFAULT_REL_STEP
    step: float | None = None
    bits: int | None = None
    axis: int = 0

    def __post_init__(self):
        self.rule  # validates the step options

    @property
    def rule(self) -> UniformQuantizer:
        return UniformQuantizer(rel_step=self.rel_step if self.step is None and self.bits is None else None,
                                step=self.step, bits=self.bits)

    def describe(self) -> str:
        return self.rule.describe() + " per-channel"

    def quantize(self, values64: np.ndarray, w32: np.ndarray) -> tuple[np.ndarray, dict]:
        if not np.all(np.isfinite(w32)):
            raise CdlInputError("tensor holds NaN or infinite values; keep it lossless with --keep")
        if w32.ndim < 1 or w32.shape[self.axis] == 0:
            return self.rule.quantize(values64, w32)
        steps = channel_steps(self.rule, w32, self.axis)
        levels = nearest_levels(values64, broadcast_steps(steps, w32.shape, self.axis), level_limit(self.rule))
        return levels.ravel(), ChannelParams(self.axis, tuple(float(s) for s in steps)).to_json()
