"""Compact integers in backend parameters: one definition for every backend (raw, huffman, cabac).

    uvarint  LEB128: 7 bits per byte, least significant group first, high bit = "more follows";
             at most 9 bytes (63 bits) and no redundant trailing zero group.
    svarint  uvarint of the zigzag map z = 2v for v >= 0, z = -2v - 1 for v < 0.

The rules live in the kernels `put_uvarint` / `get_uvarint` (compiled with numba where it is
installed, cdlcodec.jit), which the huffman table kernels call directly; `write_*` / `read_*` are
the same kernels for Python callers, the readers raising CdlDecodeError for a malformed varint.
"""
from __future__ import annotations

import numpy as np

from ..errors import CdlDecodeError
from ..jit import njit

MAX_VARINT_BYTES = 9
ERR_TRUNCATED = -1   # the buffer ends inside the varint
ERR_MALFORMED = -2   # longer than MAX_VARINT_BYTES, or a redundant trailing zero group
_MESSAGES = {ERR_TRUNCATED: "truncated varint in backend parameters",
             ERR_MALFORMED: f"malformed varint in backend parameters (non-minimal, or longer than "
                            f"{MAX_VARINT_BYTES} bytes)"}


@njit(cache=True, nogil=True)
def put_uvarint(out, pos, value):
    """Write `value` (0 <= value < 2**63) at out[pos:]; returns the position after it."""
    while value >= 0x80:
        out[pos] = (value & 0x7F) | 0x80
        value >>= 7
        pos += 1
    out[pos] = value
    return pos + 1


@njit(cache=True, nogil=True)
def zigzag(v):
    """2v for v >= 0, -2v - 1 for v < 0 (v within int64)."""
    return (v << 1) ^ (v >> 63)


@njit(cache=True, nogil=True)
def unzigzag(z):
    return (z >> 1) ^ -(z & 1)


@njit(cache=True, nogil=True)
def get_uvarint(buf, pos):
    """(value, next position) of the uvarint at buf[pos:]; next position < 0 is ERR_TRUNCATED or
    ERR_MALFORMED."""
    value = 0
    for i in range(MAX_VARINT_BYTES):
        if pos + i >= buf.size:
            return 0, ERR_TRUNCATED
        byte = np.int64(buf[pos + i])
        value |= (byte & 0x7F) << (7 * i)
        if byte < 0x80:
            if byte == 0 and i > 0:
                return 0, ERR_MALFORMED
            return value, pos + i + 1
    return 0, ERR_MALFORMED


@njit(cache=True, nogil=True)
def get_svarint(buf, pos):
    z, pos = get_uvarint(buf, pos)
    return unzigzag(z), pos


def write_uvarint(value: int) -> bytes:
    """LEB128 bytes of a non-negative integer below 2**63."""
    value = int(value)
    if value < 0 or value >= 1 << 63:
        raise ValueError(f"uvarint out of range: {value}")
    out = np.zeros(MAX_VARINT_BYTES, np.uint8)
    return out[:put_uvarint(out, 0, np.int64(value))].tobytes()


def write_svarint(value: int) -> bytes:
    value = int(value)
    if not -(1 << 62) <= value < 1 << 62:
        raise ValueError(f"svarint out of range: {value}")
    return write_uvarint(int(zigzag(np.int64(value))))


def read_uvarint(buf: bytes, pos: int) -> tuple[int, int]:
    """(value, next position) of the uvarint at `pos`; CdlDecodeError if truncated or malformed."""
    value, end = get_uvarint(np.frombuffer(bytes(buf), np.uint8), np.int64(pos))
    if end < 0:
        raise CdlDecodeError(_MESSAGES[int(end)])
    return int(value), int(end)


def read_svarint(buf: bytes, pos: int) -> tuple[int, int]:
    value, end = get_svarint(np.frombuffer(bytes(buf), np.uint8), np.int64(pos))
    if end < 0:
        raise CdlDecodeError(_MESSAGES[int(end)])
    return int(value), int(end)


__all__ = ["MAX_VARINT_BYTES", "ERR_TRUNCATED", "ERR_MALFORMED", "put_uvarint", "get_uvarint", "get_svarint",
           "zigzag", "unzigzag", "write_uvarint", "write_svarint", "read_uvarint", "read_svarint"]
