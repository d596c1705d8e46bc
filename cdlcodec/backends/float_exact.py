"""`float` coder: exact (bit-for-bit) compression of bfloat16, float16 and float32 tensors.

Used by the container's `exact` encoding (formats/SPEC.md). Every element's bit pattern is split
into byte planes; the plane that holds the exponent is skewed (trained weights use a few exponents)
and is entropy-coded, the mantissa planes are close to uniform and are stored verbatim unless
coding them pays (e.g. float32 upcast from bfloat16, whose low planes are all zero). NaN payloads,
infinities, signed zeros and subnormals are just bit patterns: they round-trip like any other.

Byte layout (version 1; a second implementation needs only this docstring)
--------------------------------------------------------------------------
planes of an element with bit pattern u:
  bfloat16, float16 (u: 16 bits)  P0 = bits 14..7 (bfloat16: the exponent; float16: the exponent and
                                  the top 3 mantissa bits), P1 = bit 15 << 7 | bits 6..0
  float32 (u: 32 bits)            P0 = bits 30..23 (the exponent), P1 = bit 31 << 7 | bits 22..16,
                                  P2 = bits 15..8, P3 = bits 7..0
params  = version:u8 (1) || chunk_log2:u8 (10..24) || dtype:u8 (0 bfloat16, 1 float16, 2 float32)
          || one plane descriptor per plane, in plane order; no trailing bytes.
  plane descriptor: mode:u8, then
    0 VERBATIM  nothing
    1 CONSTANT  value:u8 (every element's plane byte is this value)
    2 RANS      a 32-byte bitmap of the symbols present (bit s % 8 of byte s // 8), then for each
                present symbol in ascending order uvarint(frequency); at least two symbols, every
                frequency >= 1, frequencies summing to 4096.
payload = directory || chunk 0 || chunk 1 || ...
  The elements are cut into chunks of 2**chunk_log2 (the last one shorter); an empty tensor has no
  chunks. directory: for each chunk, for each RANS plane in plane order, the byte length of that
  plane's stream in that chunk as u32 LE. A chunk of n elements holds its planes in plane order:
  VERBATIM n bytes, RANS its stream, CONSTANT nothing. The payload ends exactly after the last chunk.
  rANS stream of n symbols (static, 12-bit frequencies f_s with cumulative c_s, 4 interleaved
  32-bit states): 4 initial states x_0..x_3 as u32 LE, each in [2**16, 2**32), then 16-bit words
  LE. Symbol j (j = 0..n-1) is decoded from state k = j mod 4: slot = x_k mod 4096, s = the symbol
  with c_s <= slot < c_s + f_s, x_k = f_s * (x_k >> 12) + slot - c_s, and if then x_k < 2**16 the
  next word w is read: x_k = x_k << 16 | w. After the last symbol every word has been read and
  every state equals 2**16 (anything else is a corrupt stream).

Version 2 (bfloat16 and float16 only; the encoder writes it where it is smaller than version 1)
-------------------------------------------------------------------------------------------------
Element u (16 bits) is cut into a 10-bit symbol S = bits 14..5 (bfloat16: the exponent and the top
2 mantissa bits, which depend on the exponent in trained weights) and 6 raw bits R = bit 15 << 5 |
bits 4..0. Each chunk carries its own frequency table (a tensor's statistics drift along it, e.g.
an embedding's rows; a table costs ~0.1 % of a 2**18-element chunk).
params  = version:u8 (2) || chunk_log2:u8 (10..24) || dtype:u8 (0 bfloat16, 1 float16)
          || scale_bits:u8 (12..15); no trailing bytes.
payload = directory || chunk 0 || chunk 1 || ...; directory: for each chunk, u32 LE, the byte
  length of its table and rANS stream together. A chunk of n elements: table || rANS stream || R
  plane.
  table: uvarint(number of symbols present), then for each present symbol s in ascending order
    uvarint(s - previous present symbol - 1; the first: s) || uvarint(f_s), f_s >= 1, s <= 1023;
    the frequencies sum to 2**scale_bits (absent symbols: 0).
  rANS stream: as in version 1 with 2**scale_bits in place of 4096 (slot = x mod 2**scale_bits,
    x = f_s * (x >> scale_bits) + slot - c_s), n symbols S.
  R plane: ceil(6n / 8) bytes; element i's R in bits 6i..6i+5 of the plane read as one
    little-endian integer (bit b of the plane is bit b % 8 of byte b // 8); the bits after the last
    element are zero.
  The payload ends exactly after the last chunk.

Version 3 (any of the three types; for tensors of repeated values, e.g. a DFT basis, that a
dictionary coder matches and a per-element coder cannot)
---------------------------------------------------------------------------------------------
params  = version:u8 (3) || dtype:u8 (0, 1, 2 as above) || dict_log2:u8 (12..26)
payload = an .xz stream (no integrity check; the container's CRC covers the payload) of the
  elements' little-endian bytes, one LZMA2 filter whose dictionary is at most 2**dict_log2 bytes.
  It decompresses to exactly count x element-size bytes and ends there.

Chunks are independent (in version 1 they share only the tables), so they can be decoded in
parallel.
"""
from __future__ import annotations

import lzma
import zlib

import numpy as np

from ..errors import CdlDecodeError, CdlInputError
from . import float_kernels as fk
from .varint import write_uvarint

NAME = "float"
VERSION = 1
PACKED_VERSION = 2
CHUNK_LOG2 = 18
V1_SCALE_BITS = 12
PACKED_SCALE_BITS = 12
PACKED_SYMBOLS = 1024
DICTIONARY_VERSION = 3
# The dictionary coder (lzma, slow) is tried only where zlib's fastest level, on a sample of the
# tensor, already beats the other versions' bytes per element, i.e. where values repeat; trained
# weights never get there (and the probe costs them a few percent of the encoding time).
_DICTIONARY_PROBE_LEVEL = 1
_DICTIONARY_PROBE_ELEMENTS = 1 << 14
DTYPES = {"bfloat16": (0, np.dtype("<u2")), "float16": (1, np.dtype("<u2")), "float32": (2, np.dtype("<u4"))}
N_PLANES = {"bfloat16": 2, "float16": 2, "float32": 4}
VERBATIM, CONSTANT, RANS = 0, 1, 2
# A mantissa plane (1..3) is rANS-coded only when that saves at least 1/16 of its bytes (half a bit
# per element, e.g. the zero low planes of upcast weights): trained weights' mantissas are nearly
# uniform and coding them for a fraction of a percent would halve the decoding speed.
MANTISSA_MIN_SAVING = 1 / 16
_MIN_RANS_CHUNK_BYTES = 4 + fk.STATE_BYTES  # its directory entry and its states


def supports(dtype: str) -> bool:
    return dtype in DTYPES


# --- encoding --------------------------------------------------------------------------------------

def _split(bits: np.ndarray, dtype: str) -> np.ndarray:
    planes = np.empty((N_PLANES[dtype], bits.size), np.uint8)
    (fk.split32 if dtype == "float32" else fk.split16)(bits, planes)
    return planes


def _rans_table(freq: np.ndarray) -> bytes:
    present = freq > 0
    bitmap = np.packbits(present, bitorder="little").tobytes()
    return bytes([RANS]) + bitmap + b"".join(write_uvarint(int(f)) for f in freq[present])


def _entropy_bits(counts: np.ndarray) -> float:
    """Order-0 entropy in bits per symbol."""
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log2(p)).sum())


def _plan_plane(plane: np.ndarray, chunk: int, min_saving: float) -> tuple[bytes, list[bytes] | None]:
    """(descriptor, per-chunk rANS streams or None): constant where it is, rANS where that saves at
    least `min_saving` of the plane's bytes, verbatim otherwise."""
    counts = fk.histogram(plane)
    used = np.flatnonzero(counts)
    if used.size == 1:
        return bytes([CONSTANT, int(used[0])]), None
    if used.size == 0:  # an empty tensor
        return bytes([VERBATIM]), None
    if min_saving > 0 and _entropy_bits(counts) > 8 * (1 - min_saving) + 0.25:
        # rANS spends at least the entropy: this plane cannot save min_saving. (The float estimate
        # only skips planes far above the limit; the choice near it is made on exact byte counts.)
        return bytes([VERBATIM]), None
    freq = fk.normalize_counts(counts, V1_SCALE_BITS)
    streams = []
    buf = np.empty(min(plane.size, chunk) * 2 + 64, np.uint8)
    for start in range(0, plane.size, chunk):
        n = fk.encode_rans(np.ascontiguousarray(plane[start:start + chunk]), freq, V1_SCALE_BITS, buf)
        streams.append(buf[:n].tobytes())
    descriptor = _rans_table(freq)
    if len(descriptor) + sum(len(s) + 4 for s in streams) >= plane.size * (1 - min_saving):
        return bytes([VERBATIM]), None
    return descriptor, streams


def encode(array: np.ndarray, dtype: str) -> tuple[bytes, bytes]:
    """(payload, params) coding the storage array of a bfloat16/float16/float32 tensor exactly: the
    smaller of version 1 and (16-bit types) version 2, version 1 on a tie."""
    if dtype not in DTYPES:
        raise CdlInputError(f"the exact float coder handles {', '.join(DTYPES)}, not {dtype}")
    bits = np.ascontiguousarray(array).view(DTYPES[dtype][1]).ravel()
    best = _encode_planes(bits, dtype)
    if dtype != "float32" and bits.size:
        packed = _encode_packed(bits, dtype)
        if len(packed[0]) + len(packed[1]) < len(best[0]) + len(best[1]):
            best = packed
    probe = _probe_sample(bits)
    probe_bytes = len(zlib.compress(probe.tobytes(), _DICTIONARY_PROBE_LEVEL)) if probe.size else 0
    if probe.size and probe_bytes * bits.size < len(best[0]) * probe.size:
        dictionary = _encode_dictionary(bits, dtype)
        if len(dictionary[0]) + len(dictionary[1]) < len(best[0]) + len(best[1]):
            best = dictionary
    return best


def _probe_sample(bits: np.ndarray) -> np.ndarray:
    """16 blocks of 1,024 elements spread over the tensor (all of a smaller one): a prefix can
    mislead, e.g. an embedding's first rows are unused tokens of near-identical values."""
    if bits.size <= _DICTIONARY_PROBE_ELEMENTS:
        return bits
    starts = np.linspace(0, bits.size - 1024, 16).astype(np.int64)
    return np.concatenate([bits[s:s + 1024] for s in starts])


def _encode_dictionary(bits: np.ndarray, dtype: str) -> tuple[bytes, bytes]:
    """Version 3: the elements' bytes as an .xz stream (LZMA2 at preset 9, dictionary no larger than
    the tensor, so that decoding needs no more memory than that)."""
    raw = bits.astype(DTYPES[dtype][1], copy=False).tobytes()
    dict_log2 = max(12, min(26, (len(raw) - 1).bit_length()))
    payload = lzma.compress(raw, format=lzma.FORMAT_XZ, check=lzma.CHECK_NONE,
                            filters=[{"id": lzma.FILTER_LZMA2, "preset": 9, "dict_size": 1 << dict_log2}])
    return payload, bytes([DICTIONARY_VERSION, DTYPES[dtype][0], dict_log2])


def _encode_packed(bits: np.ndarray, dtype: str) -> tuple[bytes, bytes]:
    """Version 2: per chunk a table, the rANS stream of the 10-bit symbols and the packed 6-bit rest."""
    chunk = 1 << CHUNK_LOG2
    directory, body = bytearray(), []
    buf = np.empty(min(bits.size, chunk) * 2 + 64, np.uint8)
    for start in range(0, bits.size, chunk):  # split chunk by chunk: no whole-tensor temporaries
        wide = bits[start:start + chunk].astype(np.uint32)
        sym = ((wide >> 5) & 0x3FF).astype(np.uint16)
        freq = fk.normalize_counts(np.bincount(sym, minlength=PACKED_SYMBOLS).astype(np.int64), PACKED_SCALE_BITS)
        used = np.flatnonzero(freq)
        gaps = np.diff(used, prepend=-1) - 1
        table = write_uvarint(used.size) + b"".join(write_uvarint(int(g)) + write_uvarint(int(freq[s]))
                                                    for g, s in zip(gaps, used))
        stream = buf[:fk.encode_rans(sym, freq, PACKED_SCALE_BITS, buf)].tobytes()
        directory += (len(table) + len(stream)).to_bytes(4, "little")
        body += [table, stream, _pack6(((wide >> 10) & 0x20) | (wide & 0x1F))]
    params = bytes([PACKED_VERSION, CHUNK_LOG2, DTYPES[dtype][0], PACKED_SCALE_BITS])
    return bytes(directory) + b"".join(body), params


def _pack6(values: np.ndarray) -> bytes:
    """6-bit values, element i in bits 6i..6i+5 of a little-endian bit string (zero-padded)."""
    n = values.size
    quartets = np.zeros(-(-n // 4) * 4, np.uint32)
    quartets[:n] = values
    q = quartets.reshape(-1, 4)
    word = q[:, 0] | (q[:, 1] << 6) | (q[:, 2] << 12) | (q[:, 3] << 18)
    return np.stack([word & 0xFF, (word >> 8) & 0xFF, word >> 16], axis=1).astype(np.uint8).tobytes()[:(6 * n + 7) // 8]


def _encode_planes(bits: np.ndarray, dtype: str) -> tuple[bytes, bytes]:
    """Version 1: byte planes, the exponent plane rANS-coded, the others verbatim where coding them
    does not pay."""
    code = DTYPES[dtype][0]
    planes = _split(bits, dtype)
    chunk = 1 << CHUNK_LOG2
    params = bytearray([VERSION, CHUNK_LOG2, code])
    plans = []
    for p in range(planes.shape[0]):
        descriptor, streams = _plan_plane(planes[p], chunk, 0.0 if p == 0 else MANTISSA_MIN_SAVING)
        params += descriptor
        plans.append((descriptor[0], streams))
    directory, body = bytearray(), []
    for c, start in enumerate(range(0, bits.size, chunk)):
        for p, (mode, streams) in enumerate(plans):
            if mode == RANS:
                directory += len(streams[c]).to_bytes(4, "little")
                body.append(streams[c])
            elif mode == VERBATIM:
                body.append(planes[p, start:start + chunk].tobytes())
    return bytes(directory) + b"".join(body), bytes(params)


# --- decoding --------------------------------------------------------------------------------------

def _parse_params(params: bytes, dtype: str | None):
    """(chunk_log2, dtype, [(mode, value or freq array)] per plane) of version 1, or (chunk_log2,
    dtype, scale_bits) of version 2; CdlDecodeError when malformed."""
    if len(params) < 3:
        raise CdlDecodeError("float: coder parameters are truncated")
    if params[0] == DICTIONARY_VERSION:
        name = _dtype_named(params[1], dtype)
        if len(params) != 3 or not 12 <= params[2] <= 26:
            raise CdlDecodeError("float: version 3 parameters need a dictionary of 2**12..2**26 bytes and nothing after it")
        return None, name, params[2]
    if params[0] not in (VERSION, PACKED_VERSION):
        raise CdlDecodeError(f"float: unknown coder version {params[0]}")
    chunk_log2 = params[1]
    if not 10 <= chunk_log2 <= 24:
        raise CdlDecodeError(f"float: chunk size 2**{chunk_log2} outside 2**10..2**24")
    name = _dtype_named(params[2], dtype)
    if params[0] == PACKED_VERSION:
        if name == "float32":
            raise CdlDecodeError("float: version 2 codes 16-bit types only")
        if len(params) != 4 or not 12 <= params[3] <= 15:
            raise CdlDecodeError("float: version 2 parameters need a scale of 12..15 bits and nothing after it")
        return chunk_log2, name, params[3]
    pos, planes, table_bytes = 3, [], None
    for _ in range(N_PLANES[name]):
        if pos >= len(params):
            raise CdlDecodeError("float: coder parameters are truncated")
        mode = params[pos]
        pos += 1
        if mode == VERBATIM:
            planes.append((VERBATIM, None))
        elif mode == CONSTANT:
            if pos >= len(params):
                raise CdlDecodeError("float: coder parameters are truncated")
            planes.append((CONSTANT, params[pos]))
            pos += 1
        elif mode == RANS:
            if table_bytes is None:
                table_bytes = np.frombuffer(params, np.uint8)
            freq = np.zeros(256, np.int64)
            pos, present = fk.read_plane_table(table_bytes, pos, freq)
            # each frequency within 1..4096 (checked there): no sum of them can wrap around
            if pos < 0 or present < 2 or int(freq.sum()) != 1 << V1_SCALE_BITS:
                raise CdlDecodeError(f"float: a rANS table needs >= 2 symbols with frequencies 1..{1 << V1_SCALE_BITS} "
                                     f"summing to {1 << V1_SCALE_BITS}")
            planes.append((RANS, freq))
        else:
            raise CdlDecodeError(f"float: unknown plane mode {mode}")
    if pos != len(params):
        raise CdlDecodeError("float: trailing bytes after the coder parameters")
    return chunk_log2, name, planes


def _dtype_named(code: int, dtype: str | None) -> str:
    """The dtype of a params' dtype code, which must be `dtype` when that is given."""
    names = [name for name, (c, _) in DTYPES.items() if c == code]
    if not names or (dtype is not None and names[0] != dtype):
        raise CdlDecodeError(f"float: parameters are for dtype code {code}, not {dtype}")
    return names[0]


def max_count(payload_len: int, params: bytes, dtype: str) -> int | None:
    """The most elements a payload can honestly hold (checked before allocating): one byte per
    element with a verbatim plane; with only rANS and constant planes, each chunk needs at least its
    directory entry and states; all-constant planes are a constant tensor (no payload, no bound)."""
    params = bytes(params)
    return _count_bound(payload_len, params[0], _parse_params(params, dtype))


def _count_bound(payload_len: int, version: int, parsed) -> int | None:
    """max_count from already parsed params."""
    if version == PACKED_VERSION:  # every element has 6 raw bits in the payload
        return payload_len * 8 // 6
    if version == DICTIONARY_VERSION:  # LZMA's ratio has no useful bound: the decoded-size limit
        return None
    chunk_log2, _, planes = parsed
    return _bound(payload_len, chunk_log2, [m for m, _ in planes])


def _bound(payload_len: int, chunk_log2: int, modes: list[int]) -> int | None:
    if VERBATIM in modes:
        return payload_len
    if RANS in modes:
        return (payload_len // _MIN_RANS_CHUNK_BYTES) << chunk_log2
    return None if payload_len == 0 else 0


def decode(payload: bytes, params: bytes, count: int, dtype: str) -> np.ndarray:
    """Exactly `count` elements (the storage array of `dtype`, 1-D) or CdlDecodeError."""
    params, count = bytes(params), int(count)
    if dtype not in DTYPES:
        raise CdlDecodeError(f"float: cannot code dtype {dtype}")
    if count < 0:
        raise CdlDecodeError(f"float: negative element count {count}")
    parsed = _parse_params(params, dtype)
    bound = _count_bound(len(payload), params[0], parsed)
    if bound is not None and count > bound:  # before allocating anything proportional to count
        raise CdlDecodeError(f"float: {count:,} elements cannot come from a {len(payload):,}-byte payload")
    if params[0] == PACKED_VERSION:
        return _decode_packed(np.frombuffer(payload, np.uint8), params, count)
    if params[0] == DICTIONARY_VERSION:
        return _decode_dictionary(payload, params, count, dtype)
    chunk_log2, _, planes = parsed
    chunk = 1 << chunk_log2
    n_chunks = -(-count // chunk)
    n_rans = sum(m == RANS for m, _ in planes)
    data = np.frombuffer(payload, np.uint8)
    dir_len = 4 * n_chunks * n_rans
    if dir_len > data.size:
        raise CdlDecodeError("float: payload is shorter than its chunk directory")
    lengths = data[:dir_len].view("<u4").astype(np.int64).reshape(n_chunks, n_rans)
    expected = dir_len + int(lengths.sum()) + count * sum(m == VERBATIM for m, _ in planes)
    if expected != data.size:
        raise CdlDecodeError(f"float: payload is {data.size} bytes, its directory describes {expected}")
    tables = [fk.decode_tables(v, V1_SCALE_BITS) if m == RANS else None for m, v in planes]
    out = np.empty(count, DTYPES[dtype][1])
    # the usual case (trained weights): one pass, no scratch
    fused = [m for m, _ in planes] == [RANS] + [VERBATIM] * (len(planes) - 1)
    scratch = np.empty((len(planes), 0 if fused else min(chunk, count)), np.uint8)
    merge = fk.merge32 if dtype == "float32" else fk.merge16
    pos = dir_len
    for c in range(n_chunks):
        start = c * chunk
        n = min(chunk, count - start)
        if fused:
            length = int(lengths[c, 0])
            if dtype == "float32":
                status = fk.decode_chunk32(data, pos, length, n, *tables[0], V1_SCALE_BITS, pos + length, out, start)
            else:
                status = fk.decode_chunk_byte16(data, pos, length, n, *tables[0], V1_SCALE_BITS, pos + length, out,
                                                start)
            if status != fk.OK:
                raise CdlDecodeError(f"float: chunk {c}, plane 0: {fk.MESSAGES[status]}")
            pos += length + n * (len(planes) - 1)
            continue
        r = 0
        for p, (mode, value) in enumerate(planes):
            if mode == CONSTANT:
                scratch[p, :n] = value
            elif mode == VERBATIM:
                scratch[p, :n] = data[pos:pos + n]
                pos += n
            else:
                length = int(lengths[c, r])
                r += 1
                status = fk.decode_plane(data, pos, length, n, *tables[p], V1_SCALE_BITS, scratch[p])
                if status != fk.OK:
                    raise CdlDecodeError(f"float: chunk {c}, plane {p}: {fk.MESSAGES[status]}")
                pos += length
        merge(scratch, out, start, n)
    return out


def _decode_packed(data: np.ndarray, params: bytes, count: int) -> np.ndarray:
    """Version 2 (see the module docstring); max_count has bounded `count` by the payload."""
    chunk_log2, scale_bits = params[1], params[3]
    chunk = 1 << chunk_log2
    n_chunks = -(-count // chunk)
    dir_len = 4 * n_chunks
    if dir_len > data.size:
        raise CdlDecodeError("float: payload is shorter than its chunk directory")
    lengths = data[:dir_len].view("<u4").astype(np.int64)
    raw_bytes = [(6 * min(chunk, count - c * chunk) + 7) // 8 for c in range(n_chunks)]
    expected = dir_len + int(lengths.sum()) + sum(raw_bytes)
    if expected != data.size:
        raise CdlDecodeError(f"float: payload is {data.size} bytes, its directory describes {expected}")
    out = np.empty(count, np.dtype("<u2"))
    status, c = fk.decode_packed(data, np.int64(dir_len), np.int64(count), np.int64(chunk_log2), np.int64(scale_bits),
                                 out)
    if status != fk.OK:
        message = fk.MESSAGES[status].replace("2**scale_bits", str(1 << scale_bits))
        raise CdlDecodeError(f"float: chunk {c}: {message}")
    return out


def _decode_dictionary(payload: bytes, params: bytes, count: int, dtype: str) -> np.ndarray:
    """Version 3: never more than the tensor's bytes out, nor more than its dictionary in memory."""
    storage = DTYPES[dtype][1]
    size = count * storage.itemsize
    decompressor = lzma.LZMADecompressor(lzma.FORMAT_XZ, memlimit=(1 << params[2]) + (16 << 20))
    try:
        raw = decompressor.decompress(bytes(payload), max_length=size)
        if len(raw) == size and not decompressor.eof:  # the stream's end may follow the last byte
            extra = decompressor.decompress(b"", max_length=1)
            if extra:
                raise CdlDecodeError(f"float: dictionary stream holds more than {count:,} elements")
    except (lzma.LZMAError, EOFError) as exc:
        raise CdlDecodeError(f"float: dictionary stream is corrupt ({exc})") from exc
    if len(raw) != size or not decompressor.eof or decompressor.unused_data:
        raise CdlDecodeError(f"float: dictionary stream does not hold exactly {count:,} elements")
    return np.frombuffer(raw, storage).copy()


def _read_table(data: np.ndarray, pos: int, end: int, scale_bits: int, c: int) -> tuple[np.ndarray, int]:
    """(frequencies of the 1024 symbols, where the rANS stream starts) for a chunk's table."""
    freq = np.zeros(PACKED_SYMBOLS, np.int64)
    pos = fk.read_frequencies(data, pos, end, freq)
    if pos < 0:
        raise CdlDecodeError(f"float: chunk {c}: table is truncated or malformed")
    if int(freq.sum()) != 1 << scale_bits:
        raise CdlDecodeError(f"float: chunk {c}: table frequencies do not sum to {1 << scale_bits}")
    return freq, pos


__all__ = ["NAME", "supports", "encode", "decode", "max_count"]
