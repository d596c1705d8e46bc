"""Tensor dtypes as cdlcodec sees them, and exact conversions between them without torch.

numpy has no bfloat16, so bfloat16 tensors travel as their uint16 bit patterns ("storage" arrays)
alongside the dtype name. Rounding to a narrower float is IEEE round-to-nearest-even throughout:
float64 -> float32 by numpy, float32 -> bfloat16 by the bit arithmetic below (the same result as
torch's conversion), so a decoder without torch produces the same bytes.
"""
from __future__ import annotations

import numpy as np

from .errors import CdlInputError

STORAGE = {
    "float64": np.dtype("<f8"), "float32": np.dtype("<f4"), "float16": np.dtype("<f2"),
    "bfloat16": np.dtype("<u2"), "int64": np.dtype("<i8"), "int32": np.dtype("<i4"),
    "int16": np.dtype("<i2"), "int8": np.dtype("i1"), "uint8": np.dtype("u1"), "bool": np.dtype("?"),
}
FLOATS = ("float64", "float32", "float16", "bfloat16")
INTEGERS = ("int64", "int32", "int16", "int8", "uint8", "bool")


def storage_dtype(dtype: str) -> np.dtype:
    try:
        return STORAGE[dtype]
    except KeyError:
        raise CdlInputError(f"unsupported dtype {dtype!r} (supported: {', '.join(STORAGE)})") from None


def dtype_name_of_numpy(arr: np.ndarray) -> str:
    for name, dt in STORAGE.items():
        if name != "bfloat16" and arr.dtype == dt:
            return name
    raise CdlInputError(f"unsupported numpy dtype {arr.dtype}")


def bf16_to_float32(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32)


def float32_to_bf16(values: np.ndarray) -> np.ndarray:
    """Round float32 to bfloat16 bit patterns, nearest-even; NaN stays a (quiet) NaN."""
    bits = np.ascontiguousarray(values, dtype=np.float32).view(np.uint32)
    rounded = ((bits + np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1))) >> 16).astype(np.uint16)
    nan = np.isnan(values)
    if nan.any():
        rounded[nan] = ((bits[nan] >> 16) | np.uint32(0x40)).astype(np.uint16)
    return rounded


def to_float64(storage: np.ndarray, dtype: str) -> np.ndarray:
    """Exact float64 values of a float tensor given in storage form."""
    if dtype == "bfloat16":
        return bf16_to_float32(storage).astype(np.float64)
    return storage.astype(np.float64)


def to_float32(storage: np.ndarray, dtype: str) -> np.ndarray:
    if dtype == "bfloat16":
        return bf16_to_float32(storage)
    return storage.astype(np.float32)


def from_float64(values: np.ndarray, dtype: str) -> np.ndarray:
    """Round float64 values to `dtype`'s storage form (bfloat16 via float32, both nearest-even)."""
    if dtype == "float64":
        return values.astype(np.float64)
    if dtype == "bfloat16":
        return float32_to_bf16(values.astype(np.float32))
    return values.astype(STORAGE[dtype])
