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
    values = Dequantizer(quant, shape, dtype, name)
    values.add(levels)
    return values.result()


class Dequantizer:
    """`dequantize` of levels that come in consecutive blocks (flat order), each stored straight into
    the output array, so that a decoder never holds a big tensor's levels at once; the values do not
    depend on the blocks."""

    def __init__(self, quant: dict | None, shape: tuple[int, ...], dtype: str, name: str = ""):
        self.plan = from_json(quant, shape, dtype, name)
        self.shape, self.dtype, self.name = tuple(shape), dtype, name
        self.out = np.empty(math.prod(self.shape), storage_dtype(dtype))
        self.filled = 0
        self.state = 0  # dependent scheme: the trellis state at the next level
        if not isinstance(self.plan, IntegerParams):
            self.steps = np.atleast_1d(np.asarray(self.plan.step_array(), dtype=np.float64))
            # rows of `inner` elements share one step (row r: steps[r % len(steps)])
            axis = self.plan.axis
            self.inner = self.out.size if axis is None else math.prod(self.shape[axis + 1:])
            self.buf = np.empty(min(DEQUANTIZE_BLOCK, self.out.size), np.float64)

    def add(self, levels: np.ndarray) -> None:
        """The next levels (integers, any shape: taken flat)."""
        flat, start = levels.reshape(-1), self.filled
        if start + flat.size > self.out.size:
            raise CdlFormatError(f"tensor {self.name!r}: more levels than its {self.out.size:,} elements")
        self.filled += flat.size
        if isinstance(self.plan, IntegerParams):
            lo, hi = (0, 1) if self.dtype == "bool" else (np.iinfo(self.out.dtype).min, np.iinfo(self.out.dtype).max)
            if flat.size and (flat.min() < lo or flat.max() > hi):
                raise CdlFormatError(f"tensor {self.name!r}: integer levels outside the range of {self.dtype} ({lo}..{hi})")
            self.out[start:start + flat.size] = flat
            return
        if self.plan.scheme == "dependent":
            from .trellis import dequantize_dependent

            # integer multiples of the step(s), the trellis state carried from block to block
            flat, self.state = dequantize_dependent(flat, self.plan.states, self.state, with_state=True)
        with np.errstate(over="ignore"):  # past the dtype's range is ±inf (module docstring)
            self._products(flat, start)

    def _products(self, flat: np.ndarray, start: int) -> None:
        """out[start + i] = flat[i] x its row's step: a block of whole rows times a column of steps, a
        part of a row (a long row in pieces, a row cut by the block's ends) times its one step.
        (Per-element step indices, (i // inner) % n, cost four passes of int64 arithmetic a block.)"""
        inner, steps, out, buf, dtype = self.inner, self.steps, self.out, self.buf, self.dtype
        i, n = 0, flat.size
        while i < n:
            pos = start + i
            offset = pos % inner
            if offset or inner >= DEQUANTIZE_BLOCK or n - i < inner:
                stop = min(n, i + inner - offset, i + buf.size)
                step = steps[pos // inner % steps.size]
                _store(out[pos:start + stop], np.multiply(flat[i:stop], step, out=buf[:stop - i]), dtype)
                i = stop
            else:
                rows = min((n - i) // inner, buf.size // inner)
                first = pos // inner
                block = flat[i:i + rows * inner].reshape(rows, inner)
                column = steps[np.arange(first, first + rows) % steps.size][:, None]
                products = np.multiply(block, column, out=buf[:block.size].reshape(block.shape))
                _store(out[pos:pos + rows * inner], products.reshape(-1), dtype)
                i += rows * inner

    def result(self) -> np.ndarray:
        if self.filled != self.out.size:
            raise CdlFormatError(f"tensor {self.name!r}: {self.filled:,} levels for {self.out.size:,} elements")
        return self.out.reshape(self.shape)


def _store(out: np.ndarray, products: np.ndarray, dtype: str) -> None:
    """float64 products rounded into `out`, the storage array of `dtype` (assignment casts as astype)."""
    if dtype in ("float32", "float16", "float64"):
        out[...] = products
    else:
        out[...] = from_float64(products, dtype)
