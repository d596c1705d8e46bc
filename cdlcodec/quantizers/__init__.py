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
"""
from __future__ import annotations

import math

import numpy as np

from ..dtypes import from_float64, storage_dtype
from ..errors import CdlFormatError


def _finite_positive(value, what: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise CdlFormatError(f"{what} must be a finite positive number, got {value!r}")
    return float(value)


def dequantize(levels: np.ndarray, quant: dict | None, shape: tuple[int, ...], dtype: str, name: str = "") -> np.ndarray:
    """Levels (int64, flat) -> storage array of `dtype` and `shape`; the product is formed in float64."""
    scheme = (quant or {}).get("scheme")
    what = f"tensor {name!r}"
    if scheme == "integer":
        info = np.iinfo(storage_dtype(dtype)) if dtype != "bool" else None
        if info is not None and levels.size and (levels.min() < info.min or levels.max() > info.max):
            raise CdlFormatError(f"{what}: integer levels outside the range of {dtype}")
        return levels.astype(storage_dtype(dtype)).reshape(shape)
    if scheme == "dependent":
        states = quant.get("states")
        if type(states) is not int:
            raise CdlFormatError(f"{what}: dependent quantization needs an integer 'states'")
        from .trellis import dequantize_dependent

        levels = dequantize_dependent(levels, states)  # integer multiples of the step(s)
    elif scheme != "uniform":
        raise CdlFormatError(f"{what}: unknown quantization scheme {scheme!r}")
    if dtype not in ("float64", "float32", "float16", "bfloat16"):
        raise CdlFormatError(f"{what}: {scheme} quantization of a {dtype} tensor")
    if "steps" in quant:
        axis, steps = quant.get("axis"), quant.get("steps")
        if type(axis) is not int or not 0 <= axis < len(shape) or not isinstance(steps, list) or len(steps) != shape[axis]:
            raise CdlFormatError(f"{what}: per-channel steps do not match the shape {shape}")
        step = np.array([_finite_positive(s, f"{what} step") for s in steps], dtype=np.float64)
        bshape = [1] * len(shape)
        bshape[axis] = shape[axis]
        values = levels.reshape(shape).astype(np.float64) * step.reshape(bshape)
    else:
        step = _finite_positive(quant.get("step"), f"{what} step")
        values = levels.reshape(shape).astype(np.float64) * step
    return from_float64(values, dtype)
