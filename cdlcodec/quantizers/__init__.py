"""Quantizers: float tensors -> integer levels + the parameters the decoder needs.

Encoding side: `uniform.UniformQuantizer` (this module's default), with more methods in sibling
modules. Decoding side: `dequantize(levels, quant, shape, dtype)` understands every scheme a
container may carry; it is the decoder's only use of quantization parameters.

Schemes (the `quant` object of a tensor in the container index; typed as params.py's classes):
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

import numpy as np

from ..dtypes import from_float64, storage_dtype
from ..errors import CdlFormatError
from .base import Quantizer, make, register  # noqa: F401  (the registry: quantizers.make(name, **params))
from .params import IntegerParams, QuantParams, from_json


def check_quant(quant: dict | None, shape: tuple[int, ...], dtype: str, name: str = "") -> QuantParams:
    """Validate the quant object of a coded tensor of this shape and dtype; CdlFormatError if unusable."""
    return from_json(quant, shape, dtype, name)


# Elements converted at a time: the float64 products exist for one block (in one buffer, reused, small
# enough to stay in cache), never for a whole tensor, so decoding holds little beyond the levels and
# the values (Limits.max_decoded_bytes).
DEQUANTIZE_BLOCK = 1 << 16


def dequantize(levels: np.ndarray, quant: dict | None, shape: tuple[int, ...], dtype: str, name: str = "") -> np.ndarray:
    """Levels (integers, flat) -> storage array of `dtype` and `shape`; the product is formed in float64."""
    plan = from_json(quant, shape, dtype, name)
    if isinstance(plan, IntegerParams):
        lo, hi = (0, 1) if dtype == "bool" else (np.iinfo(storage_dtype(dtype)).min, np.iinfo(storage_dtype(dtype)).max)
        if levels.size and (levels.min() < lo or levels.max() > hi):
            raise CdlFormatError(f"tensor {name!r}: integer levels outside the range of {dtype} ({lo}..{hi})")
        return levels.astype(storage_dtype(dtype)).reshape(shape)
    if plan.scheme == "dependent":
        from .trellis import dequantize_dependent

        levels = dequantize_dependent(levels, plan.states)  # integer multiples of the step(s)
    flat = levels.reshape(-1)
    out = np.empty(flat.size, storage_dtype(dtype))
    steps = np.atleast_1d(np.asarray(plan.step_array(), dtype=np.float64))
    # Rows of `inner` elements share one step (row r: steps[r % len(steps)]), so a block of whole rows
    # is multiplied by a column of steps; a row longer than a block goes in pieces with its one step.
    # (Per-element step indices, (i // inner) % n, cost four passes of int64 arithmetic a block.)
    inner = flat.size if plan.axis is None else math.prod(shape[plan.axis + 1:])
    if not flat.size:
        return out.reshape(shape)
    buf = np.empty(min(DEQUANTIZE_BLOCK, flat.size), np.float64)
    with np.errstate(over="ignore"):  # past the dtype's range is ±inf (module docstring)
        if inner >= DEQUANTIZE_BLOCK:
            for row_start in range(0, flat.size, inner):
                step = steps[row_start // inner % steps.size]
                for start in range(row_start, row_start + inner, DEQUANTIZE_BLOCK):
                    stop = min(start + DEQUANTIZE_BLOCK, row_start + inner)
                    _store(out[start:stop], np.multiply(flat[start:stop], step, out=buf[:stop - start]), dtype)
        else:
            rows, per_block = flat.size // inner, DEQUANTIZE_BLOCK // inner
            for first in range(0, rows, per_block):
                last = min(first + per_block, rows)
                block = flat[first * inner:last * inner].reshape(last - first, inner)
                column = steps[np.arange(first, last) % steps.size][:, None]
                products = np.multiply(block, column, out=buf[:block.size].reshape(block.shape))
                _store(out[first * inner:last * inner], products.reshape(-1), dtype)
    return out.reshape(shape)


def _store(out: np.ndarray, products: np.ndarray, dtype: str) -> None:
    """float64 products rounded into `out`, the storage array of `dtype` (assignment casts as astype)."""
    if dtype in ("float32", "float16", "float64"):
        out[...] = products
    else:
        out[...] = from_float64(products, dtype)
