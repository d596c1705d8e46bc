"""Kernels of the exact float coder (`float_exact`): byte planes and a static 4-way interleaved rANS.

Written once in the subset of Python that numba compiles (cdlcodec.jit): without numba the same
functions run as plain Python, so both produce the same bytes by construction.

rANS (range asymmetric numeral systems) parameters: 12-bit probabilities (frequencies sum to
SCALE = 4096), 32-bit states kept in [2**16, 2**32), 16-bit renormalisation words. Element j of a
chunk uses state j % 4, so four independent dependency chains keep the CPU's pipelines busy.
"""
from __future__ import annotations

import numpy as np

from ..jit import njit

SCALE_BITS = 12
SCALE = 1 << SCALE_BITS
LOW = 1 << 16          # states live in [LOW, 2**32)
N_STATES = 4
STATE_BYTES = 4 * N_STATES

# decode_rans status codes (negative: the stream is corrupt)
OK = 0
ERR_OVERRUN = -1       # the stream ends before its symbols do
ERR_BAD_STATE = -2     # an initial state outside [LOW, 2**32)
ERR_BAD_END = -3       # words left over, or the final states are not the encoder's starting states
MESSAGES = {ERR_OVERRUN: "stream ends before its symbols do", ERR_BAD_STATE: "initial state out of range",
            ERR_BAD_END: "stream does not end where its symbols do"}


@njit(cache=True, nogil=True)
def histogram(plane):
    """Counts (int64) of the 256 byte values in `plane`."""
    counts = np.zeros(256, np.int64)
    for v in plane:
        counts[v] += 1
    return counts


@njit(cache=True, nogil=True)
def normalize_counts(counts):
    """Frequencies (int64, summing to SCALE) for byte counts with at least two non-zero entries:
    round(c * SCALE / n), at least 1 for every present symbol; the rounding surplus or deficit is
    settled on the largest frequencies (ties: lowest symbol). Integers only, so deterministic."""
    n = 0
    for s in range(256):
        n += counts[s]
    freq = np.zeros(256, np.int64)
    total = 0
    for s in range(256):
        if counts[s] > 0:
            f = (2 * counts[s] * SCALE + n) // (2 * n)
            if f < 1:
                f = 1
            freq[s] = f
            total += f
    while total != SCALE:
        best = -1
        for s in range(256):
            if freq[s] > 1 or (total < SCALE and freq[s] > 0):
                if best < 0 or freq[s] > freq[best]:
                    best = s
        if total < SCALE:
            freq[best] += SCALE - total
            total = SCALE
        else:
            take = min(total - SCALE, freq[best] - 1)
            freq[best] -= take
            total -= take
    return freq


@njit(cache=True, nogil=True)
def encode_rans(symbols, freq, out):
    """Code `symbols` (uint8) with frequencies `freq` into `out` (at least 16 + 4 * len + 16 bytes).
    Returns the stream length: 4 states (u32 LE), then the 16-bit words (LE) the decoder reads."""
    cum = np.zeros(257, np.int64)
    for s in range(256):
        cum[s + 1] = cum[s] + freq[s]
    n = symbols.size
    words = np.empty(n + N_STATES, np.uint16)  # at most one word per symbol
    nw = 0
    x0 = np.int64(LOW)
    x1 = np.int64(LOW)
    x2 = np.int64(LOW)
    x3 = np.int64(LOW)
    for j in range(n - 1, -1, -1):
        s = symbols[j]
        f = freq[s]
        k = j & 3
        x = x0 if k == 0 else (x1 if k == 1 else (x2 if k == 2 else x3))
        if x >= (f << (32 - SCALE_BITS)):
            words[nw] = x & 0xFFFF
            nw += 1
            x >>= 16
        x = ((x // f) << SCALE_BITS) + (x % f) + cum[s]
        if k == 0:
            x0 = x
        elif k == 1:
            x1 = x
        elif k == 2:
            x2 = x
        else:
            x3 = x
    pos = 0
    for x in (x0, x1, x2, x3):
        for b in range(4):
            out[pos] = (x >> (8 * b)) & 0xFF
            pos += 1
    for i in range(nw - 1, -1, -1):
        out[pos] = words[i] & 0xFF
        out[pos + 1] = words[i] >> 8
        pos += 2
    return pos


@njit(cache=True, nogil=True)
def decode_table(freq):
    """One int64 per slot: symbol | frequency << 8 | (slot - cumulative frequency) << 24, so that a
    decoding step costs a single table load."""
    table = np.empty(SCALE, np.int64)
    c = 0
    for s in range(256):
        for i in range(freq[s]):
            table[c + i] = s | (freq[s] << 8) | (i << 24)
        c += freq[s]
    return table


@njit(cache=True, nogil=True)
def decode_rans(data, start, length, n, table, out):
    """Decode n symbols from data[start:start+length] into out[0:n]. Never reads outside that
    range; returns OK or a negative status."""
    if length < STATE_BYTES or (length - STATE_BYTES) % 2:
        return ERR_OVERRUN
    st = np.zeros(N_STATES, np.int64)
    for k in range(N_STATES):
        x = np.int64(0)
        for b in range(4):
            x |= np.int64(data[start + 4 * k + b]) << (8 * b)
        if x < LOW:
            return ERR_BAD_STATE
        st[k] = x
    x0, x1, x2, x3 = st[0], st[1], st[2], st[3]
    pos = start + STATE_BYTES
    end = start + length
    mask = SCALE - 1
    j = 0
    while j + 4 <= n:  # the four states unrolled: four independent dependency chains
        for k in range(4):
            x = x0 if k == 0 else (x1 if k == 1 else (x2 if k == 2 else x3))
            e = table[x & mask]
            x = ((e >> 8) & 0xFFFF) * (x >> SCALE_BITS) + (e >> 24)
            if x < LOW:
                if pos + 2 > end:
                    return ERR_OVERRUN
                x = (x << 16) | np.int64(data[pos]) | (np.int64(data[pos + 1]) << 8)
                pos += 2
            out[j + k] = e & 0xFF
            if k == 0:
                x0 = x
            elif k == 1:
                x1 = x
            elif k == 2:
                x2 = x
            else:
                x3 = x
        j += 4
    st[0], st[1], st[2], st[3] = x0, x1, x2, x3
    while j < n:
        x = st[j & 3]
        e = table[x & mask]
        x = ((e >> 8) & 0xFFFF) * (x >> SCALE_BITS) + (e >> 24)
        if x < LOW:
            if pos + 2 > end:
                return ERR_OVERRUN
            x = (x << 16) | np.int64(data[pos]) | (np.int64(data[pos + 1]) << 8)
            pos += 2
        st[j & 3] = x
        out[j] = e & 0xFF
        j += 1
    if pos != end:
        return ERR_BAD_END
    for k in range(N_STATES):
        if st[k] != LOW:
            return ERR_BAD_END
    return OK


@njit(cache=True, nogil=True)
def _assemble(data, raw, n, j, exponent, wide):
    """Element j's bit pattern from its plane-0 symbol and its verbatim planes at data[raw:] (each
    n bytes long): 3 of them for float32 (`wide`), 1 for the 16-bit types (merge32 / merge16)."""
    r = np.int64(data[raw + j])
    if wide:
        return ((r & 0x80) << 24) | (exponent << 23) | ((r & 0x7F) << 16) | (np.int64(data[raw + n + j]) << 8) \
            | np.int64(data[raw + 2 * n + j])
    return ((r & 0x80) << 8) | (exponent << 7) | (r & 0x7F)


@njit(cache=True, nogil=True)
def decode_fused(data, start, length, n, table, raw, wide, out, out_start):
    """The common case in one pass: plane 0 rANS-coded in data[start:start+length], the other planes
    verbatim from data[raw], merged straight into out[out_start:out_start+n] (the result of
    decode_rans + merge16/merge32, without intermediate planes). Returns OK or a negative status."""
    if length < STATE_BYTES or (length - STATE_BYTES) % 2:
        return ERR_OVERRUN
    x0, x1, x2, x3 = np.int64(0), np.int64(0), np.int64(0), np.int64(0)
    for b in range(4):
        x0 |= np.int64(data[start + b]) << (8 * b)
        x1 |= np.int64(data[start + 4 + b]) << (8 * b)
        x2 |= np.int64(data[start + 8 + b]) << (8 * b)
        x3 |= np.int64(data[start + 12 + b]) << (8 * b)
    if min(x0, x1, x2, x3) < LOW:
        return ERR_BAD_STATE
    pos = start + STATE_BYTES
    end = start + length
    mask = SCALE - 1
    j = 0
    while j + 4 <= n:  # written out four times: numba compiles helper calls here poorly
        e = table[x0 & mask]
        x0 = ((e >> 8) & 0xFFFF) * (x0 >> SCALE_BITS) + (e >> 24)
        if x0 < LOW:
            if pos + 2 > end:
                return ERR_OVERRUN
            x0 = (x0 << 16) | np.int64(data[pos]) | (np.int64(data[pos + 1]) << 8)
            pos += 2
        out[out_start + j + 0] = _assemble(data, raw, n, j + 0, e & 0xFF, wide)
        e = table[x1 & mask]
        x1 = ((e >> 8) & 0xFFFF) * (x1 >> SCALE_BITS) + (e >> 24)
        if x1 < LOW:
            if pos + 2 > end:
                return ERR_OVERRUN
            x1 = (x1 << 16) | np.int64(data[pos]) | (np.int64(data[pos + 1]) << 8)
            pos += 2
        out[out_start + j + 1] = _assemble(data, raw, n, j + 1, e & 0xFF, wide)
        e = table[x2 & mask]
        x2 = ((e >> 8) & 0xFFFF) * (x2 >> SCALE_BITS) + (e >> 24)
        if x2 < LOW:
            if pos + 2 > end:
                return ERR_OVERRUN
            x2 = (x2 << 16) | np.int64(data[pos]) | (np.int64(data[pos + 1]) << 8)
            pos += 2
        out[out_start + j + 2] = _assemble(data, raw, n, j + 2, e & 0xFF, wide)
        e = table[x3 & mask]
        x3 = ((e >> 8) & 0xFFFF) * (x3 >> SCALE_BITS) + (e >> 24)
        if x3 < LOW:
            if pos + 2 > end:
                return ERR_OVERRUN
            x3 = (x3 << 16) | np.int64(data[pos]) | (np.int64(data[pos + 1]) << 8)
            pos += 2
        out[out_start + j + 3] = _assemble(data, raw, n, j + 3, e & 0xFF, wide)
        j += 4
    st = np.array([x0, x1, x2, x3])
    while j < n:
        x = st[j & 3]
        e = table[x & mask]
        x = ((e >> 8) & 0xFFFF) * (x >> SCALE_BITS) + (e >> 24)
        if x < LOW:
            if pos + 2 > end:
                return ERR_OVERRUN
            x = (x << 16) | np.int64(data[pos]) | (np.int64(data[pos + 1]) << 8)
            pos += 2
        st[j & 3] = x
        out[out_start + j] = _assemble(data, raw, n, j, e & 0xFF, wide)
        j += 1
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
