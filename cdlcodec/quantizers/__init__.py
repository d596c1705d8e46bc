"""Quantizers: float tensors -> integer levels + the parameters the decoder needs.

Encoding side: `uniform.UniformQuantizer` (this module's default), with more methods in sibling
modules. Decoding side: `dequantize(levels, quant, shape, dtype)` understands every scheme a
container may carry; it is the decoder's only use of quantization parameters.

Schemes (the `quant` object of a tensor in the container index):
- {"scheme": "uniform", "step": s}                value = level * s
- {"scheme": "uniform", "axis": a, "steps": [..]} value = level * steps[i] along axis a
- {"scheme": "integer"}                            value = level (integer tensors kept exactly)
- {"scheme": "dependent", "step": s, "states": n} (or "axis"/"steps") dependent (trellis-coded)
  quantization: value = (2k - sgn(k)·Q(state)) * s with the n-state machine of trellis.py
Extra fields (e.g. "bits", "source") are informational and ignored by `dequantize`.
`check_quant` validates a quant object without any levels (used by `cdlcodec verify --quick`).

A product beyond the range of the tensor's dtype becomes ±inf, as IEEE round-to-nearest gives
(a coarse step on a float16 tensor can legitimately reconstruct past 65504); it is never an error.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

from ..dtypes import FLOATS, INTEGERS, from_float64, storage_dtype
from ..errors import CdlFormatError


class QuantPlan(NamedTuple):
    """A validated quant object: the scheme and what its values need."""

    scheme: str                    # "uniform", "integer" or "dependent"
    step: float | np.ndarray | None  # one step, per-index steps (float64) along `axis`, or None
    axis: int | None
    states: int | None             # dependent quantization's state count


def _finite_positive(value, what: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise CdlFormatError(f"{what} must be a finite positive number, got {value!r}")
    try:
        number = float(value)
    except OverflowError:  # an int beyond binary64
        number = math.inf
    if not math.isfinite(number) or number <= 0:
        raise CdlFormatError(f"{what} must be a finite positive number, got {value!r}")
    return number


def check_quant(quant: dict | None, shape: tuple[int, ...], dtype: str, name: str = "") -> QuantPlan:
    """Validate the quant object of a coded tensor of this shape and dtype; CdlFormatError if unusable."""
    what = f"tensor {name!r}"
    if not isinstance(quant, dict):
        raise CdlFormatError(f"{what}: a coded tensor needs a quant object, got {quant!r}")
    scheme = quant.get("scheme")
    if scheme == "integer":
        if dtype not in INTEGERS:
            raise CdlFormatError(f"{what}: the integer scheme needs an integer or bool dtype, not {dtype}")
        return QuantPlan("integer", None, None, None)
    if scheme not in ("uniform", "dependent"):
        raise CdlFormatError(f"{what}: unknown quantization scheme {scheme!r}")
    if dtype not in FLOATS:
        raise CdlFormatError(f"{what}: {scheme} quantization of a {dtype} tensor")
    states = None
    if scheme == "dependent":
        states = quant.get("states")
        if type(states) is not int:
            raise CdlFormatError(f"{what}: dependent quantization needs an integer 'states'")
        from .trellis import state_machine

        state_machine(states)  # 4 or 8, else CdlFormatError
    if "steps" in quant:
        axis, steps = quant.get("axis"), quant.get("steps")
        if type(axis) is not int or not 0 <= axis < len(shape) or not isinstance(steps, list) or len(steps) != shape[axis]:
            raise CdlFormatError(f"{what}: per-channel steps do not match the shape {shape}")
        step = np.array([_finite_positive(s, f"{what} step") for s in steps], dtype=np.float64)
        return QuantPlan(scheme, step, axis, states)
    return QuantPlan(scheme, _finite_positive(quant.get("step"), f"{what} step"), None, states)


# Elements converted at a time: the float64 products never exist for a whole tensor at once, so
# decoding holds little beyond the levels and the values (Limits.max_decoded_bytes).
DEQUANTIZE_BLOCK = 1 << 20


def dequantize(levels: np.ndarray, quant: dict | None, shape: tuple[int, ...], dtype: str, name: str = "") -> np.ndarray:
    """Levels (int64, flat) -> storage array of `dtype` and `shape`; the product is formed in float64."""
    plan = check_quant(quant, shape, dtype, name)
    if plan.scheme == "integer":
        lo, hi = (0, 1) if dtype == "bool" else (np.iinfo(storage_dtype(dtype)).min, np.iinfo(storage_dtype(dtype)).max)
        if levels.size and (levels.min() < lo or levels.max() > hi):
            raise CdlFormatError(f"tensor {name!r}: integer levels outside the range of {dtype} ({lo}..{hi})")
        return levels.astype(storage_dtype(dtype)).reshape(shape)
    if plan.scheme == "dependent":
        from .trellis import dequantize_dependent

        levels = dequantize_dependent(levels, plan.states)  # integer multiples of the step(s)
    flat = levels.reshape(-1)
    out = np.empty(flat.size, storage_dtype(dtype))
    if plan.axis is not None:  # flat position i lies at index (i // inner) % shape[axis] along axis
        inner = math.prod(shape[plan.axis + 1:])
    with np.errstate(over="ignore"):  # past the dtype's range is ±inf (module docstring)
        for start in range(0, flat.size, DEQUANTIZE_BLOCK):
            stop = min(start + DEQUANTIZE_BLOCK, flat.size)
            values = flat[start:stop].astype(np.float64)
            if plan.axis is None:
                values *= plan.step
            else:
                values *= plan.step[np.arange(start, stop) // inner % shape[plan.axis]]
            out[start:stop] = from_float64(values, dtype)
    return out.reshape(shape)
