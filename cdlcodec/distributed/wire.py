"""Byte framing of what travels between workers: a tiny fixed header, integer code tables, payload.

Every frame is validated before anything is allocated or decoded: magic and version first, then
every length against the bytes actually present (no trailing bytes), element counts against what
the receiver expects, and a CRC32 over header + body (container-robustness notes 1-7). A bad frame
raises CdlDecodeError naming the problem and the peer; nothing here can hang or read out of bounds.

Gradient frame (CO3), little-endian, 32-byte header:

    magic "CO3G" | version u8 | format u8 | flags u8 | source u8 | numel u64 | unit f32 bits |
    lengths_size u16 | constant_code u16 | payload_size u32 | crc32 u32
    then lengths (5 bits per fp code, packed LSB first) and the Huffman payload.

Tensor frame (encode_tensor), little-endian:

    magic "CDLT" | version u8 | dtype u8 | ndim u8 | name_len u8 | numel u64 | step f32 bits |
    lo i32 | hi i32 | params_size u32 | payload_size u32 | shape (ndim x u64) | backend name |
    params | payload | crc32 u32 over everything before it.
"""
from __future__ import annotations

import struct
import zlib
from dataclasses import dataclass

import numpy as np

from ..errors import CdlDecodeError

GRAD_MAGIC = b"CO3G"
GRAD_VERSION = 1
_GRAD_HEADER = struct.Struct("<4sBBBBQIHHI")  # without the trailing crc32
GRAD_HEADER_SIZE = _GRAD_HEADER.size + 4

FLAG_NONFINITE = 1  # the bucket held inf/NaN: no payload, receivers reproduce NaN
FLAG_CONSTANT = 2  # every element has code `constant_code`: no lengths, no payload
_KNOWN_FLAGS = FLAG_NONFINITE | FLAG_CONSTANT

SOURCE_HISTOGRAM = 0
SOURCE_GENNORM = 1

LENGTH_BITS = 5  # Huffman code lengths are < 32
MAX_CODE_LENGTH = 24


def pack_lengths(lengths: np.ndarray) -> bytes:
    """5-bit code lengths, LSB first (integers on the wire: the receiver rebuilds the exact code)."""
    lengths = np.asarray(lengths, dtype=np.uint8)
    if lengths.size and int(lengths.max()) >= (1 << LENGTH_BITS):
        raise ValueError("code length does not fit 5 bits")
    bits = ((lengths[:, None] >> np.arange(LENGTH_BITS, dtype=np.uint8)) & 1).astype(np.uint8).ravel()
    return np.packbits(bits, bitorder="little").tobytes()


def unpack_lengths(data: bytes, count: int) -> np.ndarray:
    need = (count * LENGTH_BITS + 7) // 8
    if len(data) != need:
        raise CdlDecodeError(f"code-length table has {len(data)} bytes, expected {need}")
    bits = np.unpackbits(np.frombuffer(data, dtype=np.uint8), bitorder="little")[: count * LENGTH_BITS]
    weights = (1 << np.arange(LENGTH_BITS)).astype(np.uint8)
    return (bits.reshape(count, LENGTH_BITS) * weights).sum(axis=1).astype(np.uint8)


def check_prefix_code(lengths: np.ndarray, what: str) -> None:
    """Kraft inequality in integers: the lengths must describe a decodable prefix code."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if lengths.size and int(lengths.max()) > MAX_CODE_LENGTH:
        raise CdlDecodeError(f"{what}: code length {int(lengths.max())} exceeds {MAX_CODE_LENGTH}")
    used = lengths[lengths > 0]
    if used.size == 0:
        raise CdlDecodeError(f"{what}: code table is empty")
    kraft = int(np.sum(np.left_shift(1, MAX_CODE_LENGTH - used)))
    if kraft > (1 << MAX_CODE_LENGTH):
        raise CdlDecodeError(f"{what}: code lengths violate the Kraft inequality")


@dataclass(frozen=True)
class GradientFrame:
    format_id: int
    flags: int
    source: int
    numel: int
    unit_bits: int  # float32 bits of the unit (fpconv)
    lengths: bytes
    constant_code: int
    payload: bytes

    @property
    def unit(self) -> np.float32:
        return np.array([self.unit_bits], dtype=np.uint32).view(np.float32)[0]

    def to_bytes(self) -> bytes:
        head = _GRAD_HEADER.pack(
            GRAD_MAGIC, GRAD_VERSION, self.format_id, self.flags, self.source, self.numel,
            self.unit_bits, len(self.lengths), self.constant_code, len(self.payload),
        )
        body = self.lengths + self.payload
        crc = zlib.crc32(body, zlib.crc32(head))
        return head + struct.pack("<I", crc) + body

    @staticmethod
    def parse(data: bytes, expected_numel: int, peer: str = "peer") -> "GradientFrame":
        """Validate and split one frame; `expected_numel` is the receiver's own bucket size."""
        data = bytes(data)
        if len(data) < GRAD_HEADER_SIZE:
            raise CdlDecodeError(f"gradient frame from {peer} is truncated: {len(data)} bytes, header needs {GRAD_HEADER_SIZE}")
        (magic, version, format_id, flags, source, numel, unit_bits, lengths_size, constant_code,
         payload_size) = _GRAD_HEADER.unpack_from(data, 0)
        if magic != GRAD_MAGIC:
            raise CdlDecodeError(f"gradient frame from {peer} has bad magic {magic!r} (expected {GRAD_MAGIC!r})")
        if version != GRAD_VERSION:
            raise CdlDecodeError(f"gradient frame from {peer} has unsupported version {version}")
        if flags & ~_KNOWN_FLAGS:
            raise CdlDecodeError(f"gradient frame from {peer} has unknown flags 0x{flags:02x}")
        if numel != expected_numel:
            raise CdlDecodeError(
                f"gradient frame from {peer} holds {numel} elements but this bucket has {expected_numel}"
                " (workers disagree on the model's buckets, or the frame is corrupt)")
        declared = GRAD_HEADER_SIZE + lengths_size + payload_size
        if declared != len(data):
            raise CdlDecodeError(
                f"gradient frame from {peer} declares {declared} bytes but {len(data)} arrived"
                f" ({'truncated' if declared > len(data) else 'trailing bytes'})")
        (crc,) = struct.unpack_from("<I", data, _GRAD_HEADER.size)
        body = data[GRAD_HEADER_SIZE:]
        if zlib.crc32(body, zlib.crc32(data[: _GRAD_HEADER.size])) != crc:
            raise CdlDecodeError(f"gradient frame from {peer} fails its CRC32 check (corrupt in transit?)")
        return GradientFrame(
            format_id, flags, source, numel, unit_bits, body[:lengths_size], constant_code, body[lengths_size:]
        )


TENSOR_MAGIC = b"CDLT"
TENSOR_VERSION = 1
_TENSOR_HEADER = struct.Struct("<4sBBBBQIiiII")
MAX_NDIM = 16
# Decompression-bomb guard: a frame may not declare more elements than this unless the caller allows it.
DEFAULT_MAX_NUMEL = 1 << 31


@dataclass(frozen=True)
class TensorFrame:
    dtype_code: int
    shape: tuple[int, ...]
    step_bits: int
    lo: int
    hi: int
    backend: str
    params: bytes
    payload: bytes

    @property
    def numel(self) -> int:
        n = 1
        for d in self.shape:
            n *= d
        return n

    @property
    def step(self) -> np.float32:
        return np.array([self.step_bits], dtype=np.uint32).view(np.float32)[0]

    def to_bytes(self) -> bytes:
        name = self.backend.encode("ascii")
        head = _TENSOR_HEADER.pack(
            TENSOR_MAGIC, TENSOR_VERSION, self.dtype_code, len(self.shape), len(name), self.numel,
            self.step_bits, self.lo, self.hi, len(self.params), len(self.payload),
        )
        body = head + struct.pack(f"<{len(self.shape)}Q", *self.shape) + name + self.params + self.payload
        return body + struct.pack("<I", zlib.crc32(body))

    @staticmethod
    def parse(data: bytes, max_numel: int = DEFAULT_MAX_NUMEL) -> "TensorFrame":
        data = bytes(data)
        if len(data) < _TENSOR_HEADER.size + 4:
            raise CdlDecodeError(f"tensor payload is truncated: {len(data)} bytes")
        (magic, version, dtype_code, ndim, name_len, numel, step_bits, lo, hi, params_size,
         payload_size) = _TENSOR_HEADER.unpack_from(data, 0)
        if magic != TENSOR_MAGIC:
            raise CdlDecodeError(f"not a cdlcodec tensor payload (magic {magic!r})")
        if version != TENSOR_VERSION:
            raise CdlDecodeError(f"tensor payload has unsupported version {version}")
        if ndim > MAX_NDIM:
            raise CdlDecodeError(f"tensor payload declares {ndim} dimensions (at most {MAX_NDIM})")
        declared = _TENSOR_HEADER.size + 8 * ndim + name_len + params_size + payload_size + 4
        if declared != len(data):
            raise CdlDecodeError(
                f"tensor payload declares {declared} bytes but has {len(data)}"
                f" ({'truncated' if declared > len(data) else 'trailing bytes'})")
        (crc,) = struct.unpack_from("<I", data, len(data) - 4)
        if zlib.crc32(data[:-4]) != crc:
            raise CdlDecodeError("tensor payload fails its CRC32 check (corrupt in transit?)")
        pos = _TENSOR_HEADER.size
        shape = struct.unpack_from(f"<{ndim}Q", data, pos)
        pos += 8 * ndim
        n = 1
        for d in shape:
            n *= d  # Python ints: no overflow
        if n != numel:
            raise CdlDecodeError(f"tensor payload shape {shape} does not hold the declared {numel} elements")
        if numel > max_numel:
            raise CdlDecodeError(f"tensor payload declares {numel} elements, above the limit {max_numel}")
        if lo > hi:
            raise CdlDecodeError(f"tensor payload has an empty level range [{lo}, {hi}]")
        try:
            backend = data[pos:pos + name_len].decode("ascii")
        except UnicodeDecodeError:
            raise CdlDecodeError("tensor payload names its backend in non-ASCII bytes") from None
        pos += name_len
        params = data[pos:pos + params_size]
        pos += params_size
        payload = data[pos:pos + payload_size]
        return TensorFrame(dtype_code, tuple(int(d) for d in shape), step_bits, lo, hi, backend, params, payload)
