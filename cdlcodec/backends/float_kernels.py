"""Kernels of the exact float coder (`float_exact`): byte planes and a static 4-way interleaved rANS.

Written once in the subset of Python that numba compiles (cdlcodec.jit): without numba the same
functions run as plain Python, so both produce the same bytes by construction.

rANS (range asymmetric numeral systems) parameters: frequencies summing to 2**scale_bits (12 for
the byte planes of version 1, 12..15 for version 2's 10-bit symbols), 32-bit states kept in
[2**16, 2**32), 16-bit renormalisation words. Element j of a chunk uses state j % 4, so four
independent dependency chains keep the CPU's pipelines busy.
"""
from __future__ import annotations

import numpy as np

from ..jit import njit
from .varint import get_uvarint

LOW = 1 << 16          # states live in [LOW, 2**32)
N_STATES = 4
STATE_BYTES = 4 * N_STATES
U1, U2, U3 = np.uint64(1), np.uint64(2), np.uint64(3)
W = np.uint64(0xFFFF)
ULOW = np.uint64(LOW)
# decode_chunk layouts: how a coded symbol and an element's raw bits make its bit pattern
NONE, BYTE16, BYTE32, PACKED6 = 0, 1, 2, 3

# decode_rans status codes (negative: the stream is corrupt)
OK = 0
ERR_OVERRUN = -1       # the stream ends before its symbols do
ERR_BAD_STATE = -2     # an initial state outside [LOW, 2**32)
ERR_BAD_END = -3       # words left over, or the final states are not the encoder's starting states
ERR_TABLE = -4         # a version 2 table names a symbol past 1023, or a frequency of 0 or > 2**15
ERR_TABLE_SUM = -5     # a version 2 table's frequencies do not sum to 2**scale_bits
ERR_PADDING = -6       # version 2: bits after a chunk's last raw element are not zero
MESSAGES = {ERR_OVERRUN: "stream ends before its symbols do", ERR_BAD_STATE: "initial state out of range",
            ERR_BAD_END: "stream does not end where its symbols do",
            ERR_TABLE: "table is truncated or malformed", ERR_TABLE_SUM: "table frequencies do not sum to 2**scale_bits",
            ERR_PADDING: "padding bits after the last element are not zero"}
MAX_FREQUENCY = 1 << 15  # the largest scale (version 2: 12..15 bits)
PACKED_SYMBOLS = 1024


@njit(cache=True, nogil=True)
def histogram(plane):
    """Counts (int64) of the 256 byte values in `plane`."""
    counts = np.zeros(256, np.int64)
    for v in plane:
        counts[v] += 1
    return counts


@njit(cache=True, nogil=True)
def normalize_counts(counts, scale_bits):
    """Frequencies (int64, summing to 2**scale_bits) for counts with at least one non-zero entry:
    round(c * 2**scale_bits / n), at least 1 for every present symbol; the rounding surplus or
    deficit is settled on the largest frequencies (ties: lowest symbol). Integers only, so
    deterministic."""
    scale = 1 << scale_bits
    n = 0
    for s in range(counts.size):
        n += counts[s]
    freq = np.zeros(counts.size, np.int64)
    total = 0
    for s in range(counts.size):
        if counts[s] > 0:
            f = (2 * counts[s] * scale + n) // (2 * n)
            if f < 1:
                f = 1
            freq[s] = f
            total += f
    while total != scale:
        best = -1
        for s in range(counts.size):
            if freq[s] > 1 or (total < scale and freq[s] > 0):
                if best < 0 or freq[s] > freq[best]:
                    best = s
        if total < scale:
            freq[best] += scale - total
            total = scale
        else:
            take = min(total - scale, freq[best] - 1)
            freq[best] -= take
            total -= take
    return freq


@njit(cache=True, nogil=True)
def encode_rans(symbols, freq, scale_bits, out):
    """Code `symbols` (indices into `freq`, whose entries sum to 2**scale_bits) into `out` (at least
    16 + 2 * len bytes). Returns the stream length: 4 states (u32 LE), then the 16-bit words (LE)
    the decoder reads."""
    cum = np.zeros(freq.size + 1, np.int64)
    for s in range(freq.size):
        cum[s + 1] = cum[s] + freq[s]
    n = symbols.size
    words = np.empty(n + N_STATES, np.uint16)  # at most one word per symbol
    nw = 0
    st = np.full(N_STATES, LOW, np.int64)
    for j in range(n - 1, -1, -1):
        s = symbols[j]
        f = freq[s]
        x = st[j & 3]
        if x >= (f << (32 - scale_bits)):
            words[nw] = x & 0xFFFF
            nw += 1
            x >>= 16
        st[j & 3] = ((x // f) << scale_bits) + (x % f) + cum[s]
    pos = 0
    for k in range(N_STATES):
        for b in range(4):
            out[pos] = (st[k] >> (8 * b)) & 0xFF
            pos += 1
    for i in range(nw - 1, -1, -1):
        out[pos] = words[i] & 0xFF
        out[pos + 1] = words[i] >> 8
        pos += 2
    return pos


@njit(cache=True, nogil=True)
def read_frequencies(data, pos, end, freq):
    """A version 2 table at data[pos:end] (uvarint count, then per present symbol in ascending order
    uvarint(gap to the previous present symbol, the first counted from -1, minus 1) and
    uvarint(frequency >= 1)) into freq; returns the position after it, or a negative status: a
    varint error (truncated at `end`, or malformed) or ERR_TABLE."""
    view = data[:end]
    count, pos = get_uvarint(view, pos)
    if pos < 0:
        return pos
    symbol = -1
    for _ in range(count):
        gap, pos = get_uvarint(view, pos)
        if pos < 0:
            return pos
        f, pos = get_uvarint(view, pos)
        if pos < 0:
            return pos
        symbol += gap + 1
        if symbol >= freq.size or f < 1 or f > MAX_FREQUENCY:  # the bound: no int64 sum can wrap around
            return ERR_TABLE
        freq[symbol] = f
    return pos


@njit(cache=True, nogil=True)
def read_plane_table(params, pos, freq):
    """A version 1 RANS plane descriptor after its mode byte, at params[pos:]: a 32-byte bitmap of
    the symbols present, then uvarint(frequency) for each, into freq (256 zeros). Returns (position
    after it, number of symbols present), or (ERR_TABLE, 0) when it is truncated or malformed or
    a frequency lies outside 1..2**12. (One call instead of a Python varint read per symbol: a
    small tensor's decode was mostly this.)"""
    if pos + 32 > params.size:
        return ERR_TABLE, 0
    p = pos + 32
    present = 0
    for s in range(256):
        if (params[pos + (s >> 3)] >> (s & 7)) & 1:
            f, p = get_uvarint(params, p)
            if p < 0 or f < 1 or f > 4096:
                return ERR_TABLE, 0
            freq[s] = f
            present += 1
    return p, present


@njit(cache=True, nogil=True)
def decode_tables(freq, scale_bits):
    """(step, symbol) per slot of 2**scale_bits: step = frequency | (slot - cumulative frequency) << 16
    (uint32) and the symbol (uint16), so that a decoding step costs two independent loads."""
    step = np.empty(1 << scale_bits, np.uint32)
    symbol = np.empty(1 << scale_bits, np.uint16)
    c = 0
    for s in range(freq.size):
        for i in range(freq[s]):
            step[c + i] = freq[s] | (i << 16)
            symbol[c + i] = s
        c += freq[s]
    return step, symbol


@njit(cache=True, nogil=True)
def _start(data, start, length):
    """The four initial states of the stream at data[start:start+length], or a negative status."""
    if length < STATE_BYTES or (length - STATE_BYTES) % 2:
        return ERR_OVERRUN, np.int64(0), np.int64(0), np.int64(0)
    st = np.zeros(N_STATES, np.int64)
    for k in range(N_STATES):
        for b in range(4):
            st[k] |= np.int64(data[start + 4 * k + b]) << (8 * b)
        if st[k] < LOW:
            return ERR_BAD_STATE, np.int64(0), np.int64(0), np.int64(0)
    return st[0], st[1], st[2], st[3]


@njit(cache=True, nogil=True, inline="always")
def _words(data, pos, end):
    """The (up to) four 16-bit words at data[pos:end] as one uint64, word i in bits 16i..16i+15;
    zeros past `end` (a corrupt stream is caught after the loop, when pos has run past end)."""
    if pos + 8 <= end:
        p = np.uint64(pos)  # unsigned indices: no negative-index wraparound; the 8 loads become one
        return (np.uint64(data[p]) | (np.uint64(data[p + U1]) << np.uint64(8))
                | (np.uint64(data[p + U2]) << np.uint64(16)) | (np.uint64(data[p + U3]) << np.uint64(24))
                | (np.uint64(data[p + np.uint64(4)]) << np.uint64(32))
                | (np.uint64(data[p + np.uint64(5)]) << np.uint64(40))
                | (np.uint64(data[p + np.uint64(6)]) << np.uint64(48))
                | (np.uint64(data[p + np.uint64(7)]) << np.uint64(56)))
    q = np.uint64(0)
    for b in range(max(end - pos, 0)):
        q |= np.uint64(data[pos + b]) << np.uint64(8 * b)
    return q


@njit(cache=True, nogil=True)
def _element(symbol, data, raw, n, j, layout):
    """Element j's bit pattern from its coded symbol and its raw bits at data[raw:]:
    BYTE16 one byte per element (sign, bits 6..0; symbol = bits 14..7), BYTE32 three planes of n
    bytes (sign and bits 22..16, 15..8, 7..0; symbol = bits 30..23), PACKED6 6 bits per element,
    little-endian bit order (sign, bits 4..0; symbol = bits 14..5)."""
    if layout == PACKED6:
        b = 6 * j
        r = (np.int64(data[raw + (b >> 3)]) | (np.int64(data[raw + min((b >> 3) + 1, (6 * n - 1) >> 3)]) << 8))
        r = (r >> (b & 7)) & 0x3F
        return ((r & 0x20) << 10) | (symbol << 5) | (r & 0x1F)
    r = np.int64(data[raw + j])
    if layout == BYTE32:
        return ((r & 0x80) << 24) | (symbol << 23) | ((r & 0x7F) << 16) | (np.int64(data[raw + n + j]) << 8) \
            | np.int64(data[raw + 2 * n + j])
    return ((r & 0x80) << 8) | (symbol << 7) | (r & 0x7F)


# Entry points of the decoding loop (_decode), each compiling its own copies with the layout a
# constant (no branch on it inside the loop), and only the copies its output type needs: numba
# compiles a kernel on first use, so fewer copies start faster.

@njit(cache=True, nogil=True, boundscheck=False)
def decode_chunk16(data, start, length, n, step, symbol, scale_bits, packed, raw, out, out_start):
    """A chunk of a 16-bit type into the uint16 `out`: PACKED6 (version 2) or BYTE16 raw bits."""
    if packed:
        return _decode(data, start, length, n, step, symbol, scale_bits, PACKED6, raw, out, out_start)
    return _decode(data, start, length, n, step, symbol, scale_bits, BYTE16, raw, out, out_start)


@njit(cache=True, nogil=True, boundscheck=False)
def decode_chunk_byte16(data, start, length, n, step, symbol, scale_bits, raw, out, out_start):
    """decode_chunk16 with BYTE16 raw bits only (version 1): one compiled copy of the loop, not two
    (version 2 goes through decode_packed)."""
    return _decode(data, start, length, n, step, symbol, scale_bits, BYTE16, raw, out, out_start)


@njit(cache=True, nogil=True, boundscheck=False)
def decode_chunk32(data, start, length, n, step, symbol, scale_bits, raw, out, out_start):
    """A float32 chunk (BYTE32 raw planes) into the uint32 `out`."""
    return _decode(data, start, length, n, step, symbol, scale_bits, BYTE32, raw, out, out_start)


@njit(cache=True, nogil=True, boundscheck=False)
def decode_plane(data, start, length, n, step, symbol, scale_bits, out):
    """A byte plane decoded on its own (the symbols themselves) into the uint8 `out`."""
    return _decode(data, start, length, n, step, symbol, scale_bits, NONE, 0, out, 0)


@njit(cache=True, nogil=True, boundscheck=False)
def decode_packed(data, dir_len, count, chunk_log2, scale_bits, out):
    """Every chunk of a version 2 payload into the uint16 `out` (count elements) in one call: tables,
    padding check and rANS decode, with no Python between chunks (a chunk's table used to be read
    and built by a Python call each). The caller has checked that the directory at data[:dir_len]
    describes exactly data.size bytes. Returns (OK, 0) or (negative status, chunk index)."""
    chunk = np.int64(1) << chunk_log2
    n_chunks = (count + chunk - 1) >> chunk_log2
    scale = np.int64(1) << scale_bits
    freq = np.zeros(PACKED_SYMBOLS, np.int64)
    step = np.empty(scale, np.uint32)
    symbol = np.empty(scale, np.uint16)
    pos = dir_len
    for c in range(n_chunks):
        n = min(chunk, count - c * chunk)
        end = pos + (np.int64(data[4 * c]) | (np.int64(data[4 * c + 1]) << 8) | (np.int64(data[4 * c + 2]) << 16)
                     | (np.int64(data[4 * c + 3]) << 24))
        raw_bytes = (6 * n + 7) >> 3
        freq[:] = 0
        stream = read_frequencies(data, pos, end, freq)
        if stream < 0:
            return ERR_TABLE, c
        total = np.int64(0)
        for s in range(PACKED_SYMBOLS):
            total += freq[s]
        if total != scale:
            return ERR_TABLE_SUM, c
        if n % 4 and np.int64(data[end + raw_bytes - 1]) >> ((6 * n) % 8 or 8):
            return ERR_PADDING, c
        _fill_tables(freq, step, symbol)
        status = _decode(data, stream, end - stream, n, step, symbol, scale_bits, PACKED6, end, out, c * chunk)
        if status != OK:
            return status, c
        pos = end + raw_bytes
    return OK, np.int64(0)


@njit(cache=True, nogil=True, inline="always")
def _fill_tables(freq, step, symbol):
    """decode_tables into given arrays (frequencies summing to their size)."""
    c = 0
    for s in range(freq.size):
        for i in range(freq[s]):
            step[c + i] = freq[s] | (i << 16)
            symbol[c + i] = s
        c += freq[s]


@njit(cache=True, nogil=True, boundscheck=False, inline="always")
def _quartets(data, pos, x0, x1, x2, x3, n, step, symbol, scale_bits, layout, raw, out, out_start):
    """The per-layout quartet loop (_quartets_packed6 and the others: one branch-free copy each, so
    that a kernel compiles only its own layout's loop, not all four)."""
    if layout == PACKED6:
        return _quartets_packed6(data, pos, x0, x1, x2, x3, n, step, symbol, scale_bits, raw, out, out_start)
    if layout == BYTE16:
        return _quartets_byte16(data, pos, x0, x1, x2, x3, n, step, symbol, scale_bits, raw, out, out_start)
    if layout == BYTE32:
        return _quartets_byte32(data, pos, x0, x1, x2, x3, n, step, symbol, scale_bits, raw, out, out_start)
    return _quartets_none(data, pos, x0, x1, x2, x3, n, step, symbol, scale_bits, raw, out, out_start)


@njit(cache=True, nogil=True, boundscheck=False)
def _quartets_packed6(data, pos, x0, x1, x2, x3, n, step, symbol, scale_bits, raw, out, out_start):
    """_decode's main loop: whole quartets of the chunk while the 8 bytes of words at pos lie inside
    `data` (a quartet reads at most 4 words), so no word needs a bounds test. Words past the stream's
    end (the raw bits that follow it) are read only from a corrupt stream, which _decode then rejects
    (pos > end). Returns (j, pos, x0..x3) as int64 for the loops that finish the chunk.

    All in uint64 (no negative-index fix-ups, no sign extensions), renormalisation as selects,
    the output and raw indices as running counters: fewer instructions and spills per symbol
    than one loop that also handles the stream's last words (1.9 -> 1.55 ns per bfloat16 weight)."""
    u0, u1, u2, u3 = np.uint64(x0), np.uint64(x1), np.uint64(x2), np.uint64(x3)
    o = np.uint64(out_start)
    if pos + 8 > data.size or n < 4:
        return np.int64(0), np.int64(pos), x0, x1, x2, x3
    p, limit, mask, sh, o_end = _loop_constants(data, pos, n, scale_bits, out_start)
    r = np.uint64(raw)  # PACKED6: the quartet's 3 raw bytes; BYTE16/BYTE32: its first element's byte
    while o < o_end and p <= limit:
        stop = min(o_end, o + ((limit - p) >> U3) * np.uint64(4) + np.uint64(4))  # quartets with safe words
        while o < stop:
            i0, i1, i2, i3, e0, e1, e2, e3 = _lookup(u0, u1, u2, u3, mask, step)
            g = np.uint64(data[r]) | (np.uint64(data[r + U1]) << np.uint64(8)) \
                | (np.uint64(data[r + U2]) << np.uint64(16))
            out[o] = ((g & np.uint64(0x20)) << np.uint64(10)) | (np.uint64(symbol[i0]) << np.uint64(5)) \
                | (g & np.uint64(0x1F))
            out[o + U1] = ((g & np.uint64(0x800)) << np.uint64(4)) | (np.uint64(symbol[i1]) << np.uint64(5)) \
                | ((g >> np.uint64(6)) & np.uint64(0x1F))
            out[o + U2] = ((g >> U2) & np.uint64(0x8000)) | (np.uint64(symbol[i2]) << np.uint64(5)) \
                | ((g >> np.uint64(12)) & np.uint64(0x1F))
            out[o + U3] = ((g >> np.uint64(8)) & np.uint64(0x8000)) | (np.uint64(symbol[i3]) << np.uint64(5)) \
                | ((g >> np.uint64(18)) & np.uint64(0x1F))
            r += U3
            u0, u1, u2, u3, p = _advance(data, p, u0, u1, u2, u3, e0, e1, e2, e3, sh)
            o += np.uint64(4)
    return np.int64(o) - out_start, np.int64(p), np.int64(u0), np.int64(u1), np.int64(u2), np.int64(u3)


@njit(cache=True, nogil=True, boundscheck=False)
def _quartets_byte16(data, pos, x0, x1, x2, x3, n, step, symbol, scale_bits, raw, out, out_start):
    """_quartets_packed6's loop for another output layout (one loop per layout: the element
    assembly is inlined, no layout test per symbol)."""
    u0, u1, u2, u3 = np.uint64(x0), np.uint64(x1), np.uint64(x2), np.uint64(x3)
    o = np.uint64(out_start)
    if pos + 8 > data.size or n < 4:
        return np.int64(0), np.int64(pos), x0, x1, x2, x3
    p, limit, mask, sh, o_end = _loop_constants(data, pos, n, scale_bits, out_start)
    r = np.uint64(raw)  # PACKED6: the quartet's 3 raw bytes; BYTE16/BYTE32: its first element's byte
    while o < o_end and p <= limit:
        stop = min(o_end, o + ((limit - p) >> U3) * np.uint64(4) + np.uint64(4))  # quartets with safe words
        while o < stop:
            i0, i1, i2, i3, e0, e1, e2, e3 = _lookup(u0, u1, u2, u3, mask, step)
            b = np.uint64(data[r]) | (np.uint64(data[r + U1]) << np.uint64(8)) \
                | (np.uint64(data[r + U2]) << np.uint64(16)) | (np.uint64(data[r + U3]) << np.uint64(24))
            out[o] = ((b & np.uint64(0x80)) << np.uint64(8)) | (np.uint64(symbol[i0]) << np.uint64(7)) \
                | (b & np.uint64(0x7F))
            out[o + U1] = (b & np.uint64(0x8000)) | (np.uint64(symbol[i1]) << np.uint64(7)) \
                | ((b >> np.uint64(8)) & np.uint64(0x7F))
            out[o + U2] = ((b >> np.uint64(8)) & np.uint64(0x8000)) | (np.uint64(symbol[i2]) << np.uint64(7)) \
                | ((b >> np.uint64(16)) & np.uint64(0x7F))
            out[o + U3] = ((b >> np.uint64(16)) & np.uint64(0x8000)) | (np.uint64(symbol[i3]) << np.uint64(7)) \
                | ((b >> np.uint64(24)) & np.uint64(0x7F))
            r += np.uint64(4)
            u0, u1, u2, u3, p = _advance(data, p, u0, u1, u2, u3, e0, e1, e2, e3, sh)
            o += np.uint64(4)
    return np.int64(o) - out_start, np.int64(p), np.int64(u0), np.int64(u1), np.int64(u2), np.int64(u3)


@njit(cache=True, nogil=True, boundscheck=False)
def _quartets_byte32(data, pos, x0, x1, x2, x3, n, step, symbol, scale_bits, raw, out, out_start):
    """_quartets_packed6's loop for another output layout (one loop per layout: the element
    assembly is inlined, no layout test per symbol)."""
    u0, u1, u2, u3 = np.uint64(x0), np.uint64(x1), np.uint64(x2), np.uint64(x3)
    o = np.uint64(out_start)
    if pos + 8 > data.size or n < 4:
        return np.int64(0), np.int64(pos), x0, x1, x2, x3
    p, limit, mask, sh, o_end = _loop_constants(data, pos, n, scale_bits, out_start)
    r = np.uint64(raw)  # PACKED6: the quartet's 3 raw bytes; BYTE16/BYTE32: its first element's byte
    plane = np.uint64(n)  # BYTE32: distance between its raw planes
    while o < o_end and p <= limit:
        stop = min(o_end, o + ((limit - p) >> U3) * np.uint64(4) + np.uint64(4))  # quartets with safe words
        while o < stop:
            i0, i1, i2, i3, e0, e1, e2, e3 = _lookup(u0, u1, u2, u3, mask, step)
            out[o] = _element32(symbol[i0], data, r, plane)
            out[o + U1] = _element32(symbol[i1], data, r + U1, plane)
            out[o + U2] = _element32(symbol[i2], data, r + U2, plane)
            out[o + U3] = _element32(symbol[i3], data, r + U3, plane)
            r += np.uint64(4)
            u0, u1, u2, u3, p = _advance(data, p, u0, u1, u2, u3, e0, e1, e2, e3, sh)
            o += np.uint64(4)
    return np.int64(o) - out_start, np.int64(p), np.int64(u0), np.int64(u1), np.int64(u2), np.int64(u3)


@njit(cache=True, nogil=True, boundscheck=False)
def _quartets_none(data, pos, x0, x1, x2, x3, n, step, symbol, scale_bits, raw, out, out_start):
    """_quartets_packed6's loop for another output layout (one loop per layout: the element
    assembly is inlined, no layout test per symbol)."""
    u0, u1, u2, u3 = np.uint64(x0), np.uint64(x1), np.uint64(x2), np.uint64(x3)
    o = np.uint64(out_start)
    if pos + 8 > data.size or n < 4:
        return np.int64(0), np.int64(pos), x0, x1, x2, x3
    p, limit, mask, sh, o_end = _loop_constants(data, pos, n, scale_bits, out_start)
    while o < o_end and p <= limit:
        stop = min(o_end, o + ((limit - p) >> U3) * np.uint64(4) + np.uint64(4))  # quartets with safe words
        while o < stop:
            i0, i1, i2, i3, e0, e1, e2, e3 = _lookup(u0, u1, u2, u3, mask, step)
            out[o] = symbol[i0]
            out[o + U1] = symbol[i1]
            out[o + U2] = symbol[i2]
            out[o + U3] = symbol[i3]
            u0, u1, u2, u3, p = _advance(data, p, u0, u1, u2, u3, e0, e1, e2, e3, sh)
            o += np.uint64(4)
    return np.int64(o) - out_start, np.int64(p), np.int64(u0), np.int64(u1), np.int64(u2), np.int64(u3)


@njit(cache=True, nogil=True, boundscheck=False, inline="always")
def _loop_constants(data, pos, n, scale_bits, out_start):
    """A quartet loop's (pos, last safe word position, slot mask, scale shift, end of its whole quartets)."""
    return (np.uint64(pos), np.uint64(data.size - 8), np.uint64((1 << scale_bits) - 1), np.uint64(scale_bits),
            np.uint64(out_start + (n & ~3)))


@njit(cache=True, nogil=True, boundscheck=False, inline="always")
def _lookup(u0, u1, u2, u3, mask, step):
    """The four states' slots and their table entries: (i0..i3, e0..e3)."""
    i0, i1, i2, i3 = u0 & mask, u1 & mask, u2 & mask, u3 & mask
    return i0, i1, i2, i3, np.uint64(step[i0]), np.uint64(step[i1]), np.uint64(step[i2]), np.uint64(step[i3])


@njit(cache=True, nogil=True, boundscheck=False, inline="always")
def _advance(data, p, u0, u1, u2, u3, e0, e1, e2, e3, sh):
    """The four rANS states past the symbols whose table entries are e0..e3 (frequency in the low 16
    bits, start above), refilled from the words at p as they need: (u0, u1, u2, u3, p)."""
    u0 = (e0 & W) * (u0 >> sh) + (e0 >> np.uint64(16))
    u1 = (e1 & W) * (u1 >> sh) + (e1 >> np.uint64(16))
    u2 = (e2 & W) * (u2 >> sh) + (e2 >> np.uint64(16))
    u3 = (e3 & W) * (u3 >> sh) + (e3 >> np.uint64(16))
    q = _word8(data, p)
    u0, q, c0 = _renorm(u0, q)
    u1, q, c1 = _renorm(u1, q)
    u2, q, c2 = _renorm(u2, q)
    u3, q, c3 = _renorm(u3, q)
    return u0, u1, u2, u3, p + ((c0 + c1 + c2 + c3) << U1)


@njit(cache=True, nogil=True, boundscheck=False, inline="always")
def _word8(data, p):
    """The 8 bytes at data[p:p+8] as one little-endian uint64 (the caller checked the bound)."""
    return (np.uint64(data[p]) | (np.uint64(data[p + U1]) << np.uint64(8))
            | (np.uint64(data[p + U2]) << np.uint64(16)) | (np.uint64(data[p + U3]) << np.uint64(24))
            | (np.uint64(data[p + np.uint64(4)]) << np.uint64(32))
            | (np.uint64(data[p + np.uint64(5)]) << np.uint64(40))
            | (np.uint64(data[p + np.uint64(6)]) << np.uint64(48))
            | (np.uint64(data[p + np.uint64(7)]) << np.uint64(56)))


@njit(cache=True, nogil=True, boundscheck=False, inline="always")
def _renorm(x, q):
    """(x, q, 1) with x refilled by q's lowest word and q shifted past it when x < LOW, else (x, q, 0):
    selects, no branch."""
    low = x < ULOW
    refilled = (x << np.uint64(16)) | (q & W)
    return (refilled if low else x), ((q >> np.uint64(16)) if low else q), np.uint64(low)


@njit(cache=True, nogil=True, boundscheck=False, inline="always")
def _element32(symbol, data, r, plane):
    """A float32 bit pattern from its symbol (bits 30..23) and its bytes in the three raw planes."""
    b = np.uint64(data[r])
    return ((b & np.uint64(0x80)) << np.uint64(24)) | (np.uint64(symbol) << np.uint64(23)) \
        | ((b & np.uint64(0x7F)) << np.uint64(16)) | (np.uint64(data[r + plane]) << np.uint64(8)) \
        | np.uint64(data[r + plane + plane])


@njit(cache=True, nogil=True, boundscheck=False, inline="always")
def _decode(data, start, length, n, step, symbol, scale_bits, layout, raw, out, out_start):
    """Decode one chunk: n symbols from the rANS stream at data[start:start+length] (tables from
    decode_tables), each merged with its raw bits at data[raw:] (`layout`, see _element) into
    out[out_start:out_start+n]. Never reads outside the stream or the raw planes; returns OK or a
    negative status. layout NONE writes the symbols themselves."""
    x0, x1, x2, x3 = _start(data, start, length)
    if x0 < 0:
        return x0
    end = start + length
    mask = (1 << scale_bits) - 1
    # the bulk of the chunk; the loop below finishes the quartets whose words lie near data's end
    j, pos, x0, x1, x2, x3 = _quartets(data, start + STATE_BYTES, x0, x1, x2, x3, n, step, symbol, scale_bits,
                                       layout, raw, out, out_start)
    st = np.array([x0, x1, x2, x3])
    while j < n:  # what _quartets left (the last n % 4 symbols, those near data's end), one at a time
        x = st[j & 3]
        i = x & mask
        e = np.int64(step[i])
        x = (e & 0xFFFF) * (x >> scale_bits) + (e >> 16)
        if x < LOW:
            q = _words(data, pos, end)
            x = (x << 16) | np.int64(q & W)
            pos += 2
        st[j & 3] = x
        if layout == NONE:
            out[out_start + j] = symbol[i]
        else:
            out[out_start + j] = _element(np.int64(symbol[i]), data, raw, n, j, layout)
        j += 1
    if pos > end:
        return ERR_OVERRUN
    if pos != end:
        return ERR_BAD_END
    for k in range(N_STATES):
        if st[k] != LOW:
            return ERR_BAD_END
    return OK


@njit(cache=True, nogil=True)
def split16(bits, planes):
    """uint16 patterns -> plane 0 = bits 14..7 (bfloat16: the exponent; float16: the exponent and the
    top 3 mantissa bits), plane 1 = sign bit and bits 6..0."""
    for i in range(bits.size):
        u = np.int64(bits[i])
        planes[0, i] = (u >> 7) & 0xFF
        planes[1, i] = ((u >> 8) & 0x80) | (u & 0x7F)


@njit(cache=True, nogil=True)
def merge16(planes, out, start, n):
    for i in range(n):
        e = np.int64(planes[0, i])
        r = np.int64(planes[1, i])
        out[start + i] = ((r & 0x80) << 8) | (e << 7) | (r & 0x7F)


@njit(cache=True, nogil=True)
def split32(bits, planes):
    """uint32 patterns -> plane 0 = exponent, 1 = sign and mantissa bits 22..16, 2 = bits 15..8,
    3 = bits 7..0."""
    for i in range(bits.size):
        u = np.int64(bits[i])
        planes[0, i] = (u >> 23) & 0xFF
        planes[1, i] = ((u >> 24) & 0x80) | ((u >> 16) & 0x7F)
        planes[2, i] = (u >> 8) & 0xFF
        planes[3, i] = u & 0xFF


@njit(cache=True, nogil=True)
def merge32(planes, out, start, n):
    for i in range(n):
        e = np.int64(planes[0, i])
        r = np.int64(planes[1, i])
        out[start + i] = ((r & 0x80) << 24) | (e << 23) | ((r & 0x7F) << 16) | (np.int64(planes[2, i]) << 8) \
            | np.int64(planes[3, i])
