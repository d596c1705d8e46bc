"""Records whose values are produced when asked for, so that a model bigger than memory can be encoded
or decoded tensor by tensor.

A `LazyTensorRecord` knows its name, dtype and shape up front (from a file header or a container
index); its `array` is produced on each access (a fresh memory map of the input file, or a decode of
the container payload) and is freed as soon as the caller drops it. Nothing is cached: a list of lazy
records costs a few hundred bytes per tensor however big the model is. Code that needs the values
several times takes `record.array` once and keeps that (as `codec.encode_records` does).
"""
from __future__ import annotations

import math
from typing import Callable

import numpy as np

from ..records import TensorRecord


class LazyTensorRecord(TensorRecord):
    """A TensorRecord whose `array` comes from `load()` on every access (never cached)."""

    def __init__(self, name: str, dtype: str, shape, load: Callable[[], np.ndarray], *,
                 levels: np.ndarray | None = None, quant: dict | None = None):
        self.name, self.dtype, self._shape, self._load = name, dtype, tuple(int(d) for d in shape), load
        self.levels, self.quant = levels, quant

    @property
    def array(self) -> np.ndarray:
        return self._load()

    @property
    def shape(self) -> tuple[int, ...]:
        return self._shape

    @property
    def numel(self) -> int:
        return math.prod(self._shape)

    def __repr__(self) -> str:
        return f"LazyTensorRecord({self.name!r}, {self.dtype}, {self._shape})"


def materialized(record: TensorRecord) -> TensorRecord:
    """`record` with its array loaded once (the record itself when it is not lazy)."""
    if isinstance(record, LazyTensorRecord):
        return TensorRecord(record.name, record.array, record.dtype, record.levels, record.quant)
    return record
