"""Records whose values are produced when asked for, so that a model bigger than memory can be encoded
or decoded tensor by tensor.

A `LazyTensorRecord` knows its name, dtype and shape up front (from a file header or a container
index); its `array` is produced on each access (a fresh memory map of the input file, or a decode of
the container payload) and is freed as soon as the caller drops it. Nothing is cached: a list of lazy
records costs a few hundred bytes per tensor however big the model is. Code that needs the values
several times takes `record.array` once and keeps that (as `codec.encode_records` does).
"""
from __future__ import annotations

import ctypes
import math
import mmap
from typing import Callable, Iterator

import numpy as np

from ..records import TensorRecord


class LazyTensorRecord(TensorRecord):
    """A TensorRecord whose `array` comes from `load()` on every access (never cached)."""

    def __init__(self, name: str, dtype: str, shape, load: Callable[[], np.ndarray], *,
                 levels: np.ndarray | None = None, quant: dict | None = None,
                 release: Callable[[], None] | None = None):
        self.name, self.dtype, self._shape, self._load = name, dtype, tuple(int(d) for d in shape), load
        self.levels, self.quant, self._release = levels, quant, release

    def release(self) -> None:
        """Called once the values are no longer needed (the encoder has written the tensor): a reader
        whose arrays share one memory map of the file lets go of this tensor's pages here."""
        if self._release is not None:
            self._release()

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


class LazyLevels:
    """A coded tensor's levels known by their range: size, min() and max() answer without the levels
    (as an array's would); blocks() decodes them again on every call, block by block (integer blocks
    within the range), and read(dtype) gathers those into one array of that type. Nothing is kept, so
    a writer that decides types for the whole model first (ONNX QDQ) holds one block of levels."""

    def __init__(self, size: int, lo: int, hi: int, blocks: Callable[[], Iterator[np.ndarray]]):
        self.size, self.lo, self.hi, self.blocks = int(size), int(lo), int(hi), blocks

    def min(self) -> int:
        return self.lo

    def max(self) -> int:
        return self.hi

    @property
    def dtype(self) -> np.dtype:
        """The narrowest signed integer type that holds them (what read() gives by default)."""
        return next(np.dtype(k) for k in (np.int8, np.int16, np.int32, np.int64)
                    if np.iinfo(k).min <= self.lo and self.hi <= np.iinfo(k).max)

    def read(self, dtype=None) -> np.ndarray:
        dtype = np.dtype(dtype) if dtype is not None else self.dtype
        info = np.iinfo(dtype)
        if self.lo < info.min or self.hi > info.max:
            raise ValueError(f"levels {self.lo}..{self.hi} do not fit {dtype}")  # a caller's bug, never input
        out, filled = np.empty(self.size, dtype), 0
        for block in self.blocks():
            if filled + block.size > self.size:
                raise ValueError("more levels than announced")
            out[filled:filled + block.size] = block
            filled += block.size
        if filled != self.size:
            raise ValueError("fewer levels than announced")
        return out

    def __repr__(self) -> str:
        return f"LazyLevels({self.size}, {self.lo}..{self.hi})"


def level_array(levels, dtype=None) -> np.ndarray:
    """The levels of a record (an array or LazyLevels) as an array, in `dtype` if given (no copy when an
    array already is)."""
    if isinstance(levels, LazyLevels):
        return levels.read(dtype)
    return levels if dtype is None else np.ascontiguousarray(levels, dtype=dtype)


def mapped_array(path: str, offset: int, shape, dtype) -> np.ndarray:
    """A read-only memory map of one tensor's bytes at `offset` in `path`: its pages are read as they
    are used and leave the process's memory when the array is dropped (one map per tensor, not one
    for the whole file)."""
    shape = tuple(int(d) for d in shape)
    if not math.prod(shape):
        return np.zeros(shape, dtype=dtype)  # mmap refuses empty ranges
    return np.memmap(path, dtype=dtype, mode="r", offset=offset, shape=shape)


def release(record: TensorRecord) -> None:
    if isinstance(record, LazyTensorRecord):
        record.release()


def drop_pages(array: np.ndarray) -> None:
    """Let the kernel drop the resident pages of `array`, a read-only view of a private file mapping
    (torch.load(mmap=True)): they leave this process's memory and are read again from the file if
    touched. Pages only partly inside the array are kept. No-op where madvise is unavailable."""
    global _LIBC
    if _LIBC is None:
        try:
            _LIBC = ctypes.CDLL(None, use_errno=True)
            _LIBC.madvise.argtypes = (ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int)
        except (OSError, AttributeError):
            _LIBC = False
    if not _LIBC or not array.nbytes:
        return
    start = array.__array_interface__["data"][0]
    first, last = -(-start // mmap.PAGESIZE) * mmap.PAGESIZE, (start + array.nbytes) // mmap.PAGESIZE * mmap.PAGESIZE
    if last > first:
        _LIBC.madvise(first, last - first, MADV_DONTNEED)


MADV_DONTNEED = 4  # Linux
_LIBC = None


def materialized(record: TensorRecord) -> TensorRecord:
    """`record` with its array loaded once (the record itself when it is not lazy)."""
    if isinstance(record, LazyTensorRecord):
        return TensorRecord(record.name, record.array, record.dtype, record.levels, record.quant)
    return record
