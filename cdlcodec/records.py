"""The one record every reader yields and every writer consumes."""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .dtypes import FLOATS


@dataclass
class TensorRecord:
    """A named tensor in storage form: `array` has numpy's dtype for `dtype` (uint16 bits for bfloat16)."""

    name: str
    array: np.ndarray
    dtype: str

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOATS

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def numel(self) -> int:
        return int(self.array.size)
