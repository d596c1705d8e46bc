"""The one record every reader yields and every writer consumes."""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .dtypes import FLOATS


@dataclass
class TensorRecord:
    """A named tensor in storage form: `array` has numpy's dtype for `dtype` (uint16 bits for bfloat16)."""

    name: str
    array: np.ndarray
    dtype: str
    # Set by the decoder for coded tensors: the integer levels (flat int64) and the quantization
    # parameters they were decoded with, so writers such as ONNX QDQ can keep integers.
    levels: np.ndarray | None = None
    quant: dict | None = None

    @property
    def is_float(self) -> bool:
        return self.dtype in FLOATS

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.array.shape)

    @property
    def numel(self) -> int:
        return int(self.array.size)


@dataclass
class ModelFile:
    """What a reader produces and a writer consumes: tensors plus anything else the file carries.

    sections: (name, kind, bytes) blobs stored beside the tensors, e.g. the model graph with its
    weights stripped (kinds are listed in formats/SPEC.md). metadata: string -> string.
    """

    records: list[TensorRecord]
    sections: list[tuple[str, str, bytes]] = field(default_factory=list)
    metadata: dict[str, str] = field(default_factory=dict)
