"""Uniform scalar quantization with one step per tensor: k = round(w / step), ties to even.

The step comes from one of three rules (exactly one is used):
- rel_step R: step = R x standard deviation of the tensor (computed in float32, as documented;
  only where float32 overflows, for finite weights near the float32 maximum, in float64 instead);
- step S: an absolute step;
- bits B: symmetric, step = max|w| / (2^(B-1) - 1) so that every level fits in B signed bits.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import CdlInputError
from .base import DEFAULT_REL_STEP, Quantizer, parameter_error
from .params import ChannelParams, UniformParams


@dataclass(frozen=True)
class UniformQuantizer(Quantizer):
    uses_step_rule = True

    rel_step: float | None = DEFAULT_REL_STEP
    step: float | None = None
    bits: int | None = None

    def __post_init__(self):
        if self.step is not None and not (math.isfinite(self.step) and self.step > 0):
            raise parameter_error(f"step must be a finite positive number, got {self.step}", "step")
        if self.rel_step is not None and not (math.isfinite(self.rel_step) and self.rel_step > 0):
            raise parameter_error(f"rel_step must be a finite positive number, got {self.rel_step}", "rel_step")
        if self.bits is not None and not 2 <= self.bits <= 31:
            raise parameter_error(f"bits must be between 2 and 31, got {self.bits}", "bits")

    def describe(self) -> str:
        if self.step is not None:
            return f"uniform step={self.step:g}"
        if self.bits is not None:
            return f"uniform bits={self.bits}"
        return f"uniform rel_step={self.rel_step:g}"

    def step_for(self, w32: np.ndarray) -> float:
        """The step for one tensor (w32: its values in float32). Never zero or non-finite."""
        if self.step is not None:
            step = float(self.step)
        elif self.bits is not None:
            peak = float(np.max(np.abs(w32))) if w32.size else 0.0
            step = peak / (2 ** (self.bits - 1) - 1)
        else:
            step = self._relative_step(w32)
        if not math.isfinite(step) or step <= 0:
            step = 1.0  # constant or empty tensor: any step codes it; 1.0 keeps k = round(w)
        return step

    def _relative_step(self, w32: np.ndarray) -> float:
        """R x std in float32 (these bytes are pinned by golden files). Finite weights near the float32
        maximum overflow that arithmetic; only then are std and product formed in float64."""
        if not w32.size:
            return 0.0
        with np.errstate(over="ignore", invalid="ignore"):
            step = np.float32(self.rel_step) * np.std(w32, dtype=np.float32)
        if not np.isfinite(step):
            step = self.rel_step * np.std(w32, dtype=np.float64)
        return float(step)

    def prepare(self, model, backend: str):
        # One max-abs step per tensor lets a single outlier (a re-parameterised or BN-folded
        # convolution: max/std of 143 measured in silero-vad) round every other weight to zero.
        return OutlierAwareBits(self) if self.bits is not None else self

    def quantize(self, values64: np.ndarray, w32: np.ndarray) -> tuple[np.ndarray, dict]:
        """values64: the tensor in float64 (exact). Returns (int64 levels, quant params)."""
        if not np.all(np.isfinite(w32)):
            raise CdlInputError("tensor holds NaN or infinite values; keep it lossless with --keep")
        step = self.step_for(w32)
        return self.levels_for(values64, step), UniformParams(step).to_json()

    def levels_for(self, values64: np.ndarray, step: float) -> np.ndarray:
        """The int64 levels (flat) of `values64` at `step`: element by element, so a big tensor can be
        quantized in blocks once its step is known (codec)."""
        scaled = np.rint(values64 / step)
        limit = 2**31 - 1
        if scaled.size and np.max(np.abs(scaled)) > limit:
            raise CdlInputError(f"step {step:g} is too small for this tensor: levels exceed ±{limit}")
        levels = scaled.astype(np.int64)
        if self.bits is not None:
            hi = 2 ** (self.bits - 1) - 1
            np.clip(levels, -hi, hi, out=levels)
        return levels.ravel()


OUTLIER_RATIO = 16.0  # max|w| / std above which one max-abs step per tensor wastes the levels


class OutlierAwareBits(Quantizer):
    """`bits` with one step per tensor, except for heavy-tailed tensors (max|w| > OUTLIER_RATIO x std),
    which get one max-abs step per output channel (axis 0) instead; the switch is reported."""

    def __init__(self, rule: UniformQuantizer):
        self.rule = rule
        self.switched: list[str] = []

    def describe(self) -> str:
        return self.rule.describe() + " (per-channel for outlier-heavy tensors)"

    def quantize(self, values64, w32):
        return self.rule.quantize(values64, w32)

    def quantize_record(self, record, values64, w32, backend: str):
        if w32.ndim >= 2 and w32.shape[0] > 1 and np.all(np.isfinite(w32)):
            std = float(np.std(w32, dtype=np.float64))
            if std > 0 and float(np.max(np.abs(w32))) > OUTLIER_RATIO * std:
                self.switched.append(record.name)
                return _per_channel_bits(values64, w32, self.rule) + (None,)
        levels, quant = self.rule.quantize(values64, w32)
        return levels, quant, None

    def finish(self, coded_bits):
        if not self.switched:
            return {}, {}
        note = (f"{len(self.switched)} outlier-heavy tensor(s) got one step per output channel instead of one per "
                f"tensor (max|w| > {OUTLIER_RATIO:g} x std): {', '.join(self.switched[:5])}"
                + (" ..." if len(self.switched) > 5 else ""))
        return {"quantizer.per_channel": ",".join(self.switched)}, {"notes": [note]}


def _per_channel_bits(values64: np.ndarray, w32: np.ndarray, rule: UniformQuantizer) -> tuple[np.ndarray, dict]:
    """The bits rule applied to each output channel (axis 0) on its own."""
    rows = w32.reshape(w32.shape[0], -1)
    steps = np.array([rule.step_for(row) for row in rows], dtype=np.float64)
    hi = 2 ** (rule.bits - 1) - 1
    levels = np.clip(np.rint(values64.reshape(rows.shape) / steps[:, None]), -hi, hi).astype(np.int64)
    return levels.ravel(), ChannelParams(0, tuple(float(x) for x in steps)).to_json()
