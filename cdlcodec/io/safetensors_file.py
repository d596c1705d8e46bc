"""The .safetensors adapter: a small, pickle-free reader and writer for the format.

`read_safetensors` / `write_safetensors` are the model-file adapter (ModelFile in and out, as every
adapter in cdlcodec.io); `read_safetensors_tensors` / `write_safetensors_tensors` work on plain
(name, storage array, dtype name) triples.

Layout (the public safetensors convention): u64 little-endian header length N, N bytes of UTF-8
JSON mapping tensor name -> {dtype, shape, data_offsets [begin, end)} (plus an optional
"__metadata__" string map), then the data buffer. We validate the header the way the reference
implementation does: bounded header size, offsets inside the buffer, contiguous and non-overlapping,
byte counts that match dtype x shape.
"""
from __future__ import annotations

import json
import math
import os
import struct
from functools import partial
from typing import Iterator

import numpy as np

from cdlcodec.atomic import atomic_open
from cdlcodec.errors import CdlInputError
from cdlcodec.io.lazy import LazyTensorRecord, mapped_array
from cdlcodec.records import ModelFile, TensorRecord

MAX_HEADER = 100_000_000
MAX_NDIM = 64  # numpy's limit on dimensions
_CODES = {  # safetensors dtype code <-> cdlcodec dtype name
    "F64": "float64", "F32": "float32", "F16": "float16", "BF16": "bfloat16",
    "I64": "int64", "I32": "int32", "I16": "int16", "I8": "int8", "U8": "uint8", "BOOL": "bool",
}
_NAMES = {v: k for k, v in _CODES.items()}
_STORAGE = {"float64": "<f8", "float32": "<f4", "float16": "<f2", "bfloat16": "<u2", "int64": "<i8",
            "int32": "<i4", "int16": "<i2", "int8": "i1", "uint8": "u1", "bool": "?"}


def _bad(path: str, msg: str) -> CdlInputError:
    return CdlInputError(f"{path}: not a valid .safetensors file ({msg})")


def _brief(shape: list[int]) -> str:
    text = str(shape)
    return text if len(text) <= 80 else text[:77] + "..."


def _index(path: str) -> tuple[int, list[tuple[int, int, str, list[int], str]]]:
    """(data start, [(begin, end, name, shape, dtype)] in offset order) of a validated file."""
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise _bad(path, "shorter than its 8-byte header length")
        (n,) = struct.unpack("<Q", head)
        if n > MAX_HEADER or 8 + n > size:
            raise _bad(path, f"header length {n} is larger than the file or the limit")
        try:
            header = json.loads(fh.read(n).decode("utf-8"))
        except RecursionError:
            raise _bad(path, "header nests arrays or objects too deeply") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise _bad(path, f"header is not JSON: {exc}") from None
        except ValueError:  # Python refuses to convert integers of more than 4,300 digits
            raise _bad(path, "header holds a number with too many digits") from None
    if not isinstance(header, dict):
        raise _bad(path, "header is not an object")
    header.pop("__metadata__", None)
    entries = []
    for name, info in header.items():
        if not isinstance(info, dict):
            raise _bad(path, f"entry {name!r} is not an object")
        code, shape, offs = info.get("dtype"), info.get("shape"), info.get("data_offsets")
        if code not in _CODES:
            raise CdlInputError(f"{path}: tensor {name!r} has unsupported dtype {code!r}")
        if (not isinstance(shape, list) or not all(type(d) is int and d >= 0 for d in shape)
                or not isinstance(offs, list) or len(offs) != 2 or not all(type(o) is int for o in offs)):
            raise _bad(path, f"entry {name!r} has a malformed shape or offsets")
        dtype = _CODES[code]
        itemsize = np.dtype(_STORAGE[dtype]).itemsize
        # numpy refuses even an empty array whose other dimensions overflow its index type,
        # such as [0, 2**70]: bound the product of the non-zero dimensions too
        if len(shape) > MAX_NDIM or math.prod(max(d, 1) for d in shape) * itemsize > np.iinfo(np.intp).max:
            raise _bad(path, f"entry {name!r} has a shape no array can have: {_brief(shape)}")
        nbytes = math.prod(shape) * itemsize
        if offs[0] < 0 or offs[1] - offs[0] != nbytes or 8 + n + offs[1] > size:
            raise _bad(path, f"entry {name!r} has offsets that do not fit its shape or the file")
        entries.append((offs[0], offs[1], name, shape, dtype))
    entries.sort()
    position = 0
    for begin, end, name, _, _ in entries:
        if begin != position:
            raise _bad(path, f"data of {name!r} overlaps or leaves a gap")
        position = end
    return 8 + n, entries


def _mapped(path: str, offset: int, shape: list[int], dtype: str) -> np.ndarray:
    return mapped_array(path, offset, shape, _STORAGE[dtype])


def read_safetensors_tensors(path: str) -> Iterator[tuple[str, np.ndarray, str]]:
    """Yield (name, storage array, dtype name) in offset order; arrays are read-only memory-mapped views."""
    start, entries = _index(path)
    for begin, _, name, shape, dtype in entries:
        yield name, _mapped(path, start + begin, shape, dtype), dtype


def safetensors_records(path: str) -> list[LazyTensorRecord]:
    """Every tensor of a validated .safetensors file as a lazy record, in offset order: each access
    to `array` maps that tensor alone, so encoding holds one tensor at a time, not the file."""
    start, entries = _index(path)
    return [LazyTensorRecord(name, dtype, shape, partial(_mapped, path, start + begin, shape, dtype))
            for begin, _, name, shape, dtype in entries]


def _header_blob(plan: list[tuple[str, str, tuple[int, ...]]], metadata: dict[str, str] | None) -> bytes:
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, dtype, shape in plan:
        nbytes = math.prod(shape) * np.dtype(_STORAGE[dtype]).itemsize
        header[name] = {"dtype": _NAMES[dtype], "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return blob + b" " * (-len(blob) % 8)  # the reference pads the header to 8-byte alignment


WRITEBACK_MIN_BYTES = 1 << 20  # smaller tensors are left to the final fsync


class SafetensorsWriter:
    """A .safetensors file written tensor by tensor, atomically.

    The header comes first in the format, so it is computed from `plan`, the (name, dtype name,
    shape) of every tensor in file order (a container index has them before any payload is
    decoded); `add(record)` then streams each tensor's bytes in that order and `close()` renames the
    finished file into place. Used as a context manager, an exception leaves no file behind.
    """

    def __init__(self, path: str, plan, metadata: dict[str, str] | None = None):
        self._plan = [(name, dtype, tuple(shape)) for name, dtype, shape in plan]
        blob = _header_blob(self._plan, metadata)
        self._next = 0
        self._written = 8 + len(blob)  # bytes handed to the file so far
        self._atomic = atomic_open(path)
        self._fh = self._atomic.__enter__()
        try:
            self._fh.write(struct.pack("<Q", len(blob)))
            self._fh.write(blob)
        except BaseException:
            self.abort()
            raise

    def add(self, record) -> None:
        if self._next >= len(self._plan):
            raise CdlInputError(f"tensor {record.name!r} was not planned for this .safetensors file")
        name, dtype, shape = self._plan[self._next]
        if (record.name, record.dtype, tuple(record.shape)) != (name, dtype, shape):
            raise CdlInputError(f"tensor {record.name!r} ({record.dtype}, {record.shape}) is not the planned "
                                f"{name!r} ({dtype}, {shape})")
        # Raw bytes through a flat uint8 view: memoryview.cast refuses zero-size shapes.
        data = np.ascontiguousarray(record.array, dtype=_STORAGE[dtype]).reshape(-1).view(np.uint8)
        self._fh.write(data)
        self._next += 1
        self._start_writeback(self._written, data.size)
        self._written += data.size

    def _start_writeback(self, offset: int, length: int) -> None:
        """Start writing these bytes to disk now, without waiting (Linux: posix_fadvise DONTNEED starts
        the writeback of dirty pages): the fsync that completes the file then waits for the last
        tensors, not for the whole model after the decoding is done. No-op elsewhere."""
        if length < WRITEBACK_MIN_BYTES or not hasattr(os, "posix_fadvise"):
            return
        self._fh.flush()
        try:
            os.posix_fadvise(self._fh.fileno(), offset, length, os.POSIX_FADV_DONTNEED)
        except OSError:  # a file system that does not take advice: the fsync does it all
            pass

    def close(self) -> None:
        if self._next != len(self._plan):
            missing = self._plan[self._next][0]
            self.abort()
            raise CdlInputError(f".safetensors output is missing tensor {missing!r}")
        atomic, self._atomic = self._atomic, None
        atomic.__exit__(None, None, None)

    def abort(self) -> None:
        """Remove the temporary file; the target path is left untouched."""
        if self._atomic is not None:
            atomic, self._atomic = self._atomic, None
            atomic.__exit__(CdlInputError, CdlInputError("output abandoned"), None)

    def __enter__(self) -> "SafetensorsWriter":
        return self

    def __exit__(self, kind, value, tb) -> None:
        if kind is None:
            self.close()
        else:
            self.abort()


def write_safetensors_tensors(path: str, tensors: list[tuple[str, np.ndarray, str]], metadata: dict[str, str] | None = None) -> None:
    """Write (name, storage array, dtype name) triples atomically (temporary file, then rename)."""
    with SafetensorsWriter(path, [(name, dtype, arr.shape) for name, arr, dtype in tensors], metadata) as writer:
        for name, arr, dtype in tensors:
            writer.add(TensorRecord(name, arr, dtype))


def read_safetensors(path: str) -> ModelFile:
    """Every tensor of a .safetensors file as records, in offset order."""
    records = safetensors_records(path)
    if not records:
        raise CdlInputError(f"{path}: contains no tensors")
    return ModelFile(records, [], {"source.kind": "safetensors"})


def write_safetensors(path: str, model: ModelFile) -> None:
    """The decoded tensors as a .safetensors file, atomically (sections have no place in it)."""
    with SafetensorsWriter(path, [(r.name, r.dtype, r.shape) for r in model.records]) as writer:
        for record in model.records:
            writer.add(record)
