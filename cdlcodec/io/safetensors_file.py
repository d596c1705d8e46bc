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
from typing import Iterator

import numpy as np

from cdlcodec.atomic import atomic_open
from cdlcodec.errors import CdlInputError
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


def read_safetensors_tensors(path: str) -> Iterator[tuple[str, np.ndarray, str]]:
    """Yield (name, storage array, dtype name) in offset order; arrays are read-only memory-mapped views."""
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
    # A read-only memory map: tensors are views, paged in as the encoder reaches them, so a large
    # model is never held in memory twice.
    mapped = np.memmap(path, dtype=np.uint8, mode="r") if size else np.zeros(0, np.uint8)
    for begin, end, name, shape, dtype in entries:
        yield name, mapped[8 + n + begin: 8 + n + end].view(_STORAGE[dtype]).reshape(shape), dtype


def write_safetensors_tensors(path: str, tensors: list[tuple[str, np.ndarray, str]], metadata: dict[str, str] | None = None) -> None:
    """Write (name, storage array, dtype name) triples atomically (temporary file, then rename)."""
    header: dict = {}
    if metadata:
        header["__metadata__"] = {str(k): str(v) for k, v in metadata.items()}
    offset = 0
    for name, arr, dtype in tensors:
        nbytes = arr.size * np.dtype(_STORAGE[dtype]).itemsize
        header[name] = {"dtype": _NAMES[dtype], "shape": list(arr.shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode("utf-8")
    blob += b" " * (-len(blob) % 8)  # the reference pads the header to 8-byte alignment
    with atomic_open(path) as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for _, arr, dtype in tensors:
            fh.write(np.ascontiguousarray(arr, dtype=_STORAGE[dtype]).tobytes())


def read_safetensors(path: str) -> ModelFile:
    """Every tensor of a .safetensors file as records, in offset order."""
    records = [TensorRecord(n, a, d) for n, a, d in read_safetensors_tensors(path)]
    if not records:
        raise CdlInputError(f"{path}: contains no tensors")
    return ModelFile(records, [], {"source.kind": "safetensors"})


def write_safetensors(path: str, model: ModelFile) -> None:
    """The decoded tensors as a .safetensors file, atomically (sections have no place in it)."""
    write_safetensors_tensors(path, [(r.name, r.array, r.dtype) for r in model.records])
