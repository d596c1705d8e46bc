"""`raw` backend: every level as a fixed-width unsigned offset from the tensor minimum, bit-packed.

Byte layout (version 1; a second implementation needs only this docstring)
--------------------------------------------------------------------------
params  = width:u8 || svarint(base)
    width  number of bits per level, 0..32: the bit length of (max - min), i.e. the smallest width
           that holds the tensor's range (0 for a constant tensor; 0 with base 0 for an empty one).
    base   the tensor minimum as an svarint (zigzag + LEB128, defined in `varint`). No trailing bytes.
payload = the values u_i = level_i - base (0 <= u_i < 2**width), packed LSB-first:
    bit b of u_i is stream bit i*width + b, and stream bit j is bit (j mod 8) of byte floor(j/8).
    The payload is exactly ceil(count*width/8) bytes and unused high bits of the last byte are 0.
    For width 8, 16 and 32 this is exactly a little-endian uint8/uint16/uint32 array.

Compact integers (uvarint, svarint) are defined once for every backend in `cdlcodec.backends.varint`.

Decoding checks every field: width <= 32, exact payload length, zero padding bits, and that every
decoded level lies within ±(2**31 - 1); anything else raises CdlDecodeError.
"""
from __future__ import annotations

import numpy as np

from ..errors import CdlDecodeError
from ..jit import njit
from .base import MAX_ABS_LEVEL, EncodeHint, gathered
from .stats import COUNT_BLOCK, as_coded_levels, int64_blocks
from .varint import read_svarint, write_svarint

MAX_WIDTH = 32


# --- bit packing kernels -----------------------------------------------------------------------

@njit(cache=True, nogil=True)
def _pack_kernel(levels, base, width, out):
    """Pack (levels - base) at `width` bits each, LSB-first, into `out` (pre-zeroed, exact size)."""
    acc = 0  # pending bits, right-aligned; never more than 39 of them
    nacc = 0
    pos = 0
    for i in range(levels.size):
        acc |= (levels[i] - base) << nacc
        nacc += width
        while nacc >= 8:
            out[pos] = acc & 0xFF
            pos += 1
            acc >>= 8
            nacc -= 8
    if nacc > 0:
        out[pos] = acc & 0xFF


@njit(cache=True, nogil=True)
def _unpack_kernel(data, count, width, base, out):
    """Inverse of _pack_kernel. `data` holds the payload plus 8 zero bytes. Returns the largest offset."""
    mask = (1 << width) - 1
    biggest = 0
    for i in range(count):
        bit = i * width
        byte = bit >> 3
        shift = bit & 7
        # width + shift <= 39 bits: five bytes always suffice
        word = (np.int64(data[byte]) | (np.int64(data[byte + 1]) << 8) | (np.int64(data[byte + 2]) << 16)
                | (np.int64(data[byte + 3]) << 24) | (np.int64(data[byte + 4]) << 32))
        u = (word >> shift) & mask
        if u > biggest:
            biggest = u
        out[i] = base + u
    return biggest


def _width_for(span: int) -> int:
    """Bits needed for offsets 0..span."""
    return int(span).bit_length()


class RawBackend:
    """Fixed-width bit-packed levels (see module docstring for the byte layout)."""

    name = "raw"
    narrow_levels = True  # encode takes int8/16/32 levels as they are (stats.as_coded_levels)

    def encode(self, levels, hint: EncodeHint | None = None) -> tuple[bytes, bytes]:
        arr = as_coded_levels(levels)
        if arr.size == 0:
            return b"", bytes([0]) + write_svarint(0)
        base = int(arr.min())
        width = _width_for(int(arr.max()) - base)
        params = bytes([width]) + write_svarint(base)
        if width == 0:
            return b"", params
        # block by block (no int64 copy of the whole tensor); a block of a multiple of 8 levels ends on a byte
        block = max(8, COUNT_BLOCK // 8 * 8)
        if width in (8, 16, 32):  # byte-aligned: a plain little-endian array
            out = np.empty(arr.size, dtype=f"<u{width // 8}")
            for start, values in int64_blocks(arr, block):
                out[start:start + values.size] = values - base
            return out.tobytes(), params
        out = np.zeros((arr.size * width + 7) // 8, dtype=np.uint8)
        for start, values in int64_blocks(arr, block):
            first = start * width // 8
            _pack_kernel(values, np.int64(base), np.int64(width), out[first:first + (values.size * width + 7) // 8])
        return out.tobytes(), params

    @staticmethod
    def _read_params(params: bytes) -> tuple[int, int]:
        """(width, base) of valid params; CdlDecodeError otherwise."""
        if len(params) < 2:
            raise CdlDecodeError("raw: backend parameters are truncated")
        width = params[0]
        if width > MAX_WIDTH:
            raise CdlDecodeError(f"raw: width {width} bits exceeds {MAX_WIDTH}")
        base, end = read_svarint(params, 1)
        if end != len(params):
            raise CdlDecodeError("raw: trailing bytes after the backend parameters")
        if abs(base) > MAX_ABS_LEVEL:
            raise CdlDecodeError(f"raw: base {base} outside ±{MAX_ABS_LEVEL}")
        return width, base

    def max_count(self, payload_len: int, params: bytes) -> int | None:
        """`width` bits per level; width 0 is a constant tensor with an empty payload (no bound)."""
        width, _ = self._read_params(bytes(params))
        if width == 0:
            return None if payload_len == 0 else 0
        return 8 * payload_len // width

    def decode(self, payload: bytes, params: bytes, count: int, shape=None) -> np.ndarray:
        return gathered(self.decode_blocks(payload, params, count, shape), int(count))

    def decode_blocks(self, payload: bytes, params: bytes, count: int, shape=None, block: int | None = None):
        params = bytes(params)
        count = int(count)
        if count < 0:
            raise CdlDecodeError(f"raw: negative element count {count}")
        width, base = self._read_params(params)  # the exact payload length below bounds count
        nbits = count * width
        expected = (nbits + 7) // 8
        if len(payload) != expected:
            raise CdlDecodeError(
                f"raw: payload is {len(payload)} bytes, expected {expected} for {count} levels of {width} bits"
            )
        if nbits % 8 and payload[-1] >> (nbits % 8):
            raise CdlDecodeError("raw: non-zero padding bits at the end of the payload")
        # a multiple of 8 levels: every block starts on a byte
        block = count if block is None else max(8, block // 8 * 8)
        for start in range(0, count, max(block, 1)):
            n = min(block, count - start)
            if width == 0:
                yield np.full(n, base, dtype=np.int64)
                continue
            first = start * width // 8
            if width in (8, 16, 32):
                out = np.frombuffer(payload, dtype=f"<u{width // 8}", count=n, offset=first).astype(np.int64)
                out += base
                biggest = int(out.max()) - base
            else:
                nbytes = (n * width + 7) // 8
                data = np.zeros(nbytes + 8, dtype=np.uint8)
                data[:nbytes] = np.frombuffer(payload, dtype=np.uint8, count=nbytes, offset=first)
                out = np.empty(n, dtype=np.int64)
                biggest = int(_unpack_kernel(data, np.int64(n), np.int64(width), np.int64(base), out))
            if base + biggest > MAX_ABS_LEVEL:
                raise CdlDecodeError(f"raw: decoded level {base + biggest} exceeds {MAX_ABS_LEVEL}")
            yield out

    def estimate_bits(self, levels, hint: EncodeHint | None = None) -> float:
        """Exact size of encode's output (payload + params) in bits."""
        arr = as_coded_levels(levels)
        if arr.size == 0:
            return 16.0
        base = int(arr.min())
        width = _width_for(int(arr.max()) - base)
        params_len = 1 + len(write_svarint(base))
        return float(8 * (params_len + (arr.size * width + 7) // 8))


__all__ = ["RawBackend"]
