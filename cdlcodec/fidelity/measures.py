"""Output fidelity of a decoded model against the original, and the target an encode must meet.

All measures compare two lists of output arrays per sample (the original model's and the decoded
model's on the same inputs; the encoder and the scorer pass the pieces of a concatenated output as
outputs of their own, pieces.py):
- cosine: per sample, each output flattened; the mean over outputs and samples (1 = identical);
  outputs holding one number per sample are compared as one vector across samples;
- agreement: the fraction of samples whose top-1 class (argmax of the first output) is unchanged;
- rel_mse: per output, the sum of squared differences over the sum of squared original values;
  the mean over outputs.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from ..errors import CdlInputError

MEASURES = ("cosine", "agreement", "rel_mse")


def _flat(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float64).ravel()


def _cos(r: np.ndarray, d: np.ndarray) -> float:
    nr, nd = float(np.linalg.norm(r)), float(np.linalg.norm(d))
    if nr == 0.0 and nd == 0.0:
        return 1.0
    if nr == 0.0 or nd == 0.0 or not (math.isfinite(nr) and math.isfinite(nd)):
        return 0.0
    return float(np.dot(r, d)) / (nr * nd)


def cosine(reference: list[list[np.ndarray]], decoded: list[list[np.ndarray]]) -> float:
    """Mean cosine similarity over outputs and samples (two all-zero outputs count as identical).

    An output with a single value per sample (a probability, a score) has a per-sample cosine of
    ±1 whatever its error, so it is compared as one vector across the samples instead.
    """
    if not reference:
        return 1.0
    per_output = []
    for j in range(len(reference[0])):
        refs = [_flat(s[j]) for s in reference]
        decs = [_flat(s[j]) for s in decoded]
        if all(r.size == 1 for r in refs):
            per_output.append(_cos(np.concatenate(refs), np.concatenate(decs)))
        else:
            per_output.append(float(np.mean([_cos(r, d) for r, d in zip(refs, decs)])))
    return float(np.mean(per_output))


def agreement(reference: list[list[np.ndarray]], decoded: list[list[np.ndarray]]) -> float:
    """Fraction of samples with the same argmax in the first output."""
    same = [int(np.argmax(_flat(r[0]))) == int(np.argmax(_flat(d[0]))) for r, d in zip(reference, decoded)]
    return float(np.mean(same)) if same else 1.0


def rel_mse(reference: list[list[np.ndarray]], decoded: list[list[np.ndarray]]) -> float:
    """Relative squared error of each output (sum over samples), averaged over outputs, so a small
    output (a probability next to a recurrent state) weighs as much as a large one."""
    if not reference:
        return 0.0
    values = []
    for j in range(len(reference[0])):
        num = den = 0.0
        for r_s, d_s in zip(reference, decoded):
            r, d = _flat(r_s[j]), _flat(d_s[j])
            diff = d - r
            num += float(np.dot(diff, diff)) if np.all(np.isfinite(diff)) else math.inf
            den += float(np.dot(r, r))
        values.append((0.0 if num == 0.0 else math.inf) if den == 0.0 else num / den)
    return float(np.mean(values))


def score(measure: str, reference, decoded) -> float:
    """The named measure of `decoded` against `reference` (see the module docstring)."""
    functions = {"cosine": cosine, "agreement": agreement, "rel_mse": rel_mse}
    if measure not in functions:
        raise CdlInputError(f"unknown fidelity measure {measure!r} (known: {', '.join(MEASURES)})")
    return functions[measure](reference, decoded)


def higher_is_better(measure: str) -> bool:
    return measure != "rel_mse"


@dataclass(frozen=True)
class Target:
    """What the decoded model must achieve: measure >= value (cosine, agreement) or <= value (rel_mse)."""

    measure: str
    value: float

    def __post_init__(self):
        if self.measure not in MEASURES:
            raise CdlInputError(f"unknown fidelity measure {self.measure!r} (known: {', '.join(MEASURES)})")
        if not math.isfinite(self.value):
            raise CdlInputError(f"the {self.measure} target must be a finite number")
        if self.measure in ("cosine", "agreement") and not 0.0 < self.value <= 1.0:
            raise CdlInputError(f"the {self.measure} target must lie in (0, 1], got {self.value}")
        if self.measure == "rel_mse" and not self.value > 0.0:
            raise CdlInputError(f"the relative output-MSE target must be positive, got {self.value}")

    def score(self, reference, decoded) -> float:
        return score(self.measure, reference, decoded)

    def met(self, achieved: float) -> bool:
        return achieved >= self.value if higher_is_better(self.measure) else achieved <= self.value

    def describe(self) -> str:
        sign = "<=" if self.measure == "rel_mse" else ">="
        return f"{self.measure} {sign} {self.value:g}"
