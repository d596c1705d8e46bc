"""dequantize gives the values of its definition, value = float64(level) x step of the element's
channel, rounded once to the storage dtype, whatever its blocking (rows of one step, pieces of a
long row): decoded bytes must never depend on how the work is cut up."""
from __future__ import annotations

import math

import numpy as np
import pytest

import cdlcodec.quantizers as quantizers
from cdlcodec.dtypes import from_float64
from cdlcodec.quantizers import dequantize


def by_definition(levels, quant, shape, dtype):
    """Element by element: position i lies at index (i // inner) % shape[axis] along the axis."""
    values = levels.reshape(-1).astype(np.float64)
    if "steps" in quant:
        steps = np.asarray(quant["steps"], np.float64)
        inner = math.prod(shape[quant["axis"] + 1:])
        values = values * steps[np.arange(values.size) // inner % shape[quant["axis"]]]
    else:
        values = values * quant["step"]
    with np.errstate(over="ignore"):
        return from_float64(values, dtype).reshape(shape)


SHAPES_AXES = [((37,), None), ((6, 50), None), ((6, 50), 0), ((6, 50), 1), ((3, 4, 5, 7), 0),
               ((3, 4, 5, 7), 1), ((3, 4, 5, 7), 3), ((1, 300), 0), ((300, 1), 0), ((0, 5), 0), ((4, 0), 1)]


@pytest.mark.parametrize("block", [1 << 16, 7, 64, 1])
@pytest.mark.parametrize("shape,axis", SHAPES_AXES)
@pytest.mark.parametrize("dtype", ["float32", "float16", "bfloat16", "float64"])
def test_blocks_of_rows_give_the_values_of_the_definition(monkeypatch, block, shape, axis, dtype):
    monkeypatch.setattr(quantizers, "DEQUANTIZE_BLOCK", block)
    rng = np.random.default_rng(len(shape) * 100 + (axis or 0))
    n = math.prod(shape)
    if axis is None:
        quant = {"scheme": "uniform", "step": 0.0137}
    else:
        quant = {"scheme": "uniform", "axis": axis, "steps": list(rng.uniform(1e-3, 0.5, shape[axis]))}
    for level_dtype in (np.int64, np.int8, np.int32):
        levels = rng.integers(-100, 100, n).astype(level_dtype)
        got = dequantize(levels, quant, shape, dtype)
        want = by_definition(levels, quant, shape, dtype)
        assert got.shape == want.shape and got.dtype == want.dtype
        assert got.tobytes() == want.tobytes()


def test_products_past_float16_become_infinite(monkeypatch):
    monkeypatch.setattr(quantizers, "DEQUANTIZE_BLOCK", 3)
    levels = np.array([1, -1, 70000, -70000, 2, 65504], np.int64)
    quant = {"scheme": "uniform", "axis": 0, "steps": [1.0, 2.0]}
    got = dequantize(levels, quant, (2, 3), "float16")
    assert got.tolist() == [[1.0, -1.0, np.inf], [-np.inf, 4.0, np.inf]]
