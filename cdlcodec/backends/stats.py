"""Histogram and order-0 entropy helpers for integer levels, shared by backends, quantizers and benchmarks.

The order-0 (memoryless) entropy of a tensor with symbol counts n_s out of N levels is

    H0 = sum_s n_s * log2(N / n_s)   bits in total,

the lower bound for any code that assigns each symbol a fixed code word (Huffman reaches it within
less than one bit per symbol). Entropy values are floats: they are reported and compared, never used
to decide coded bytes.
"""
from __future__ import annotations

import numpy as np

from ..errors import CdlInputError
from .base import MAX_ABS_LEVEL

# A value range at most this wide (or at most twice the element count) is histogrammed with a dense
# bincount; wider, sparse ranges go through a sort instead, so memory stays proportional to the tensor.
DENSE_RANGE_LIMIT = 1 << 20


def as_levels(levels, what: str = "levels") -> np.ndarray:
    """Validate `levels` and return them as a C-contiguous 1-D int64 array: the one level validator
    of every backend (raw, huffman, cabac), so that all refuse the same inputs.

    Raises CdlInputError for non-integer dtypes, more than one dimension, or values outside
    ±MAX_ABS_LEVEL (2**31 - 1).
    """
    arr = np.asarray(levels)
    if arr.ndim != 1:
        raise CdlInputError(f"{what} must be a 1-D array, got shape {arr.shape}")
    if arr.dtype.kind not in "iu" and not (arr.dtype.kind == "b"):
        if arr.size == 0 and arr.dtype.kind == "f":
            arr = arr.astype(np.int64)
        else:
            raise CdlInputError(f"{what} must be integers, got dtype {arr.dtype}")
    if arr.dtype.kind == "u" and arr.dtype.itemsize == 8 and arr.size and int(arr.max()) > MAX_ABS_LEVEL:
        raise CdlInputError(f"{what} exceed the supported range ±{MAX_ABS_LEVEL}")
    arr = np.ascontiguousarray(arr, dtype=np.int64)
    if arr.size:
        lo, hi = int(arr.min()), int(arr.max())
        if lo < -MAX_ABS_LEVEL or hi > MAX_ABS_LEVEL:
            raise CdlInputError(
                f"{what} range [{lo}, {hi}] exceeds the supported range ±{MAX_ABS_LEVEL}"
            )
    return arr


# Levels histogrammed at a time: `levels - min` exists for one block, never for a whole tensor (a
# 131 M-parameter tensor's int64 copy is 1 GB).
COUNT_BLOCK = 1 << 20


def dense_counts(arr: np.ndarray, lo: int, span: int) -> np.ndarray:
    """How often each of lo .. lo + span - 1 occurs in `arr` (int64 counts, np.bincount's)."""
    counts = np.zeros(span, np.int64)
    for _, block in int64_blocks(arr):
        counts += np.bincount(block - lo, minlength=span)
    return counts


NARROW_LEVELS = (np.dtype(np.int8), np.dtype(np.int16), np.dtype(np.int32))


def as_coded_levels(levels, what: str = "levels") -> np.ndarray:
    """`as_levels` for an encoder, except that int8 / int16 / int32 levels stay as they are (a big
    tensor's levels are held narrow: an int64 copy of 131 M levels is 1 GB); the encoder reads
    them in int64 blocks (int64_blocks)."""
    arr = np.asarray(levels)
    if arr.ndim == 1 and arr.dtype in NARROW_LEVELS:
        if arr.size and int(arr.min()) < -MAX_ABS_LEVEL:  # int32's -2**31
            raise CdlInputError(f"{what} range [{int(arr.min())}, {int(arr.max())}] exceeds the supported range "
                                f"±{MAX_ABS_LEVEL}")
        return np.ascontiguousarray(arr)
    return as_levels(arr, what)


def int64_blocks(arr: np.ndarray, block: int | None = None):
    """(start, arr[start:start + block] as int64) over `arr`, blocks of COUNT_BLOCK by default."""
    block = block or COUNT_BLOCK
    for start in range(0, arr.size, block):
        yield start, np.asarray(arr[start:start + block], dtype=np.int64)


def histogram(levels) -> tuple[np.ndarray, np.ndarray]:
    """Distinct values (ascending, int64) and how often each occurs (int64) in `levels`."""
    arr = as_levels(levels)
    if arr.size == 0:
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    lo, hi = int(arr.min()), int(arr.max())
    span = hi - lo + 1
    if span <= max(DENSE_RANGE_LIMIT, 2 * arr.size):
        counts = dense_counts(arr, lo, span)
        present = np.flatnonzero(counts)
        return present.astype(np.int64) + lo, counts[present].astype(np.int64)
    values, counts = np.unique(arr, return_counts=True)
    return values.astype(np.int64), counts.astype(np.int64)


def entropy_bits_from_counts(counts) -> float:
    """Total order-0 entropy in bits of a source with these symbol counts (zeros are ignored)."""
    c = np.asarray(counts, dtype=np.float64)
    c = c[c > 0]
    if c.size == 0:
        return 0.0
    total = c.sum()
    return float(np.sum(c * (np.log2(total) - np.log2(c))))


def order0_entropy_bits(levels) -> float:
    """Total order-0 entropy of `levels` in bits (H0 above); 0.0 for empty or constant tensors."""
    _, counts = histogram(levels)
    return entropy_bits_from_counts(counts)


__all__ = [
    "as_levels",
    "as_coded_levels",
    "int64_blocks",
    "histogram",
    "entropy_bits_from_counts",
    "order0_entropy_bits",
]
