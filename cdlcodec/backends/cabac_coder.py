"""Integer binary range coder and adaptive probability estimators for the `cabac` backend.

Everything here is integer arithmetic on int64 values, so the coded bytes are identical on every
platform (container-robustness note 6: no float ever decides a coded bit).

Range coder
-----------
A 32-bit binary range coder in the LZMA style: `range` is kept in [2**24, 2**32), `low` has one
extra bit for the carry, and carries ripple into bytes already produced through the usual
"cache byte + run of pending 0xFF bytes" scheme. A bin with probability p (of the value 1, 15 bits)
splits the range at `bound = (range >> 15) * p`; value 1 takes the lower part. Bypass bins split
the range in equal halves (up to 8 at a time). The first byte such an encoder produces is always
0 and is not stored.

Termination: the encoder picks, among the values inside the final interval, the one with the
fewest significant bytes, writes it out and strips trailing zero bytes. The decoder reads zeros
past the end of its buffer (it never reads outside it) and, at the end, insists that it consumed
every byte it was given. Because the final value is the shortest one in the interval, cutting any
byte off the end moves the value out of the interval, which the check bins after the last level
(see cabac_binarization) turn into an error.

Probability estimation (the dual-rate estimator of the NNC reference, with a counting warm-up)
----------------------------------------------------------------------------------------------
Each context holds two 16-bit estimates of P(bin = 1), adapted with shifts `fast` and `slow`
(p += ((bin << 16) - p) >> shift), and a small use count. The coder uses their mean. While a
context is young its shift is capped at bitlength(count + 1), so the first updates behave like a
frequency count (rate 1/2, 1/3, 1/4, ...) and a context learns in a handful of bins instead of ~2**slow;
this is what keeps the cost of resetting contexts at every chunk small.

Decoder speed (none of this changes a coded byte)
-------------------------------------------------
Each context also caches the clamped probability the coder uses (CTX_PROB), recomputed when the
context adapts, so the next bin with that context starts with one load instead of two loads, an
add, a shift and a clamp on its critical path. The bin decision and the first renormalisation byte
are branch-free (a bin value is a coin toss the branch predictor loses); the decoder reads its
input position as a value, not through the state array, and its buffer extends at least one byte
past the last chunk so that a byte can be loaded unconditionally and masked to zero past the end.
Array indices on the hot path are unsigned, which spares numba's negative-index fix-up.
"""
from __future__ import annotations

import numpy as np
from ..jit import njit

# --- coder state layout: one small int64 array per coder -------------------------------------
LOW, RANGE, CACHE, CACHE_SIZE, POS, END, SKIP, CODE, ERR, COST = range(10)
STATE_SIZE = 10

TOP = 1 << 24
MASK32 = (1 << 32) - 1
PROB_BITS = 15                      # precision of the probability used to split the range
STATE_BITS = 16                     # precision of each of the two estimators

# Error codes a decode kernel reports through state[ERR] (0 = fine).
(ERR_NONE, ERR_BAD_START, ERR_BYPASS, ERR_PREFIX, ERR_LEVEL, ERR_CHECK, ERR_TRAILING, ERR_OVERFLOW,
 ERR_UNPADDED) = range(9)
ERROR_TEXT = {
    ERR_BAD_START: "range-coder stream starts with an impossible value",
    ERR_BYPASS: "bypass bins out of range (corrupt stream)",
    ERR_PREFIX: "Exp-Golomb prefix longer than any valid level",
    ERR_LEVEL: "decoded level exceeds the maximum magnitude",
    ERR_CHECK: "end-of-chunk check bins do not match (stream truncated or corrupt)",
    ERR_TRAILING: "chunk has bytes the decoder never needed (corrupt lengths)",
    ERR_OVERFLOW: "encoder output buffer full",
    ERR_UNPADDED: "internal: decoder buffer does not extend past the last chunk",
}

# Context table layout: ctx[i] = (fast estimate, slow estimate, use count, clamped P(1) in 15 bits).
CTX_FAST, CTX_SLOW, CTX_COUNT, CTX_PROB = 0, 1, 2, 3
CTX_FIELDS = 4
MAX_COUNT = 1023

# The most bins one bit of stream can hold. A bin costs at least -log2(r) bits, r being the largest
# share of the range a bin can keep: the probability is clamped to [1, 2**15 - 1] / 2**15, so the
# more probable value keeps at most range - floor(range / 2**15) of a range >= TOP = 2**24, i.e.
# r <= 1 - 2**-15 + 2**-24 * (1 - 2**-15), and 1 / -log2(r) = 22757.15... Every level codes at least
# one bin (its significance flag), so this also bounds levels per bit (cabac.max_chunk_levels).
MAX_BINS_PER_BIT = 22758

# Rate pairs (fast shift, slow shift) a stream may choose from; the index is stored in the params.
# Changing this table changes the format: append only.
RATE_PAIRS = np.array([(4, 7), (5, 8), (5, 9), (6, 10), (7, 10), (4, 9)], dtype=np.int64)

# Shift cap while a context is young: bitlength(count + 1).
WARM_SHIFT = np.array([int(c + 1).bit_length() for c in range(MAX_COUNT + 1)], dtype=np.int64)

# Cost in 1/65536 bit of coding a bin whose probability (15 bits) is p: COST_TABLE[p] ~ -log2(p/2**15).
# Only estimates use it, never the coded bytes, so floating point is harmless here.
COST_FRAC_BITS = 16
_p = np.arange(1 << PROB_BITS, dtype=np.float64)
_p[0] = 0.5
COST_TABLE = np.round(-np.log2(_p / (1 << PROB_BITS)) * (1 << COST_FRAC_BITS)).astype(np.int64)
del _p


# --- probability model ------------------------------------------------------------------------

@njit(cache=True, _nrt=False, nogil=True)
def reset_contexts(ctx):
    """Every estimate back to probability 1/2, every use count to 0."""
    for i in range(ctx.shape[0]):
        ctx[i, CTX_FAST] = 1 << (STATE_BITS - 1)
        ctx[i, CTX_SLOW] = 1 << (STATE_BITS - 1)
        ctx[i, CTX_COUNT] = 0
        ctx[i, CTX_PROB] = 1 << (PROB_BITS - 1)


@njit(cache=True, nogil=True)
def new_contexts(n: int) -> np.ndarray:
    """n fresh contexts, every estimate at probability 1/2."""
    ctx = np.empty((n, CTX_FIELDS), dtype=np.int64)
    reset_contexts(ctx)
    return ctx


@njit(cache=True, inline="always")
def ctx_prob(ctx, ci):
    """P(bin = 1) of context ci in 15 bits, clamped to [1, 2**15 - 1] (cached by ctx_update)."""
    return ctx[np.uint64(ci), CTX_PROB]


@njit(cache=True, inline="always")
def _clamped_prob(pf, ps):
    """The mean of the two estimates in 15 bits, clamped to [1, 2**15 - 1]."""
    p = (pf + ps) >> (STATE_BITS + 1 - PROB_BITS)  # estimates stay below 2**16: p < 2**15
    return max(p, 1)


@njit(cache=True, inline="always")
def ctx_update(ctx, ci, bit, fast, slow, warm):
    """Move both estimates of context ci towards `bit`: p += ((bit << 16) - p) >> shift.
    Branch-free (the bin value is unpredictable); the arithmetic shift rounds towards -inf,
    so an estimate stays in [0, 2**16 - 1] and the clamp keeps the coder's p valid."""
    ci = np.uint64(ci)  # an index only: numba skips the negative-index fix-up for unsigned ones
    c = ctx[ci, CTX_COUNT]
    cap = warm[np.uint64(c)]
    sf = min(fast, cap)
    ss = min(slow, cap)
    ctx[ci, CTX_COUNT] = c + (c < MAX_COUNT)
    target = bit << STATE_BITS
    pf = ctx[ci, CTX_FAST]
    ps = ctx[ci, CTX_SLOW]
    pf += (target - pf) >> sf
    ps += (target - ps) >> ss
    ctx[ci, CTX_FAST] = pf
    ctx[ci, CTX_SLOW] = ps
    ctx[ci, CTX_PROB] = _clamped_prob(pf, ps)


@njit(cache=True, inline="always")
def bin_cost(p, bit, cost_table):
    """Cost (1/65536 bit) of a bin with P(1) = p coded as `bit`."""
    return cost_table[p if bit else (1 << PROB_BITS) - p]


# --- encoder ----------------------------------------------------------------------------------

@njit(cache=True, _nrt=False, nogil=True)
def enc_init(st, start, end):
    """Start an encoder writing into buf[start:end]."""
    st[LOW] = 0
    st[RANGE] = MASK32
    st[CACHE] = 0
    st[CACHE_SIZE] = 1
    st[POS] = start
    st[END] = end
    st[SKIP] = 1          # the first byte is always 0: not stored
    st[ERR] = ERR_NONE
    st[COST] = 0


@njit(cache=True, _nrt=False, nogil=True)
def _emit(st, buf, byte):
    if st[SKIP]:
        st[SKIP] = 0
        return
    pos = st[POS]
    if pos >= st[END]:
        st[ERR] = ERR_OVERFLOW
        return
    buf[pos] = byte
    st[POS] = pos + 1


@njit(cache=True, _nrt=False, nogil=True)
def _shift_low(st, buf, low):
    """Move the top byte of low out (through the carry cache); returns the new low."""
    if low < 0xFF000000 or low > MASK32:
        carry = low >> 32
        temp = st[CACHE]
        n = st[CACHE_SIZE]
        while n > 0:
            _emit(st, buf, (temp + carry) & 0xFF)
            temp = 0xFF
            n -= 1
        st[CACHE_SIZE] = 0
        st[CACHE] = (low >> 24) & 0xFF
    st[CACHE_SIZE] += 1
    return (low & 0x00FFFFFF) << 8


# The hot state (low, range) of the encoder and (code, range) of the decoder travels through the
# bin functions as values, so that numba keeps it in registers; the rest lives in `st`.

@njit(cache=True, inline="always")
def enc_bin(st, buf, low, rng, p, bit):
    """Encode one regular bin with P(1) = p (15 bits); returns (low, range)."""
    bound = (rng >> PROB_BITS) * p
    if bit:
        rng = bound
    else:
        low += bound
        rng -= bound
    while rng < TOP:
        rng <<= 8
        low = _shift_low(st, buf, low)
    return low, rng


@njit(cache=True, inline="always")
def enc_bypass(st, buf, low, rng, value, nbits):
    """Encode the nbits (1..8) low bits of value as equiprobable bins; returns (low, range)."""
    rng >>= nbits
    low += value * rng
    while rng < TOP:
        rng <<= 8
        low = _shift_low(st, buf, low)
    return low, rng


@njit(cache=True, _nrt=False, nogil=True)
def enc_finish(st, buf, start, low, rng):
    """Write the shortest value inside the final interval; returns the end position of the stream."""
    for nbytes in range(5):
        gran = 1 << (32 - 8 * nbytes)
        value = (low + gran - 1) & ~(gran - 1)
        if value < low + rng:
            break
    for _ in range(5):
        value = _shift_low(st, buf, value)
    pos = st[POS]
    while pos > start and buf[pos - 1] == 0:  # the decoder reads zeros past the end
        pos -= 1
    st[POS] = pos
    return pos


# --- decoder ----------------------------------------------------------------------------------

# The decoder's input position travels with (code, range) as a value. `buf` must extend at least
# one byte past `end` (the last chunk's end): bytes at or past `end` read as zero without a branch.

@njit(cache=True, inline="always")
def _read_byte(buf, pos, end):
    return np.int64(buf[np.uint64(min(pos, end))]) & -np.int64(pos < end)


@njit(cache=True, _nrt=False, nogil=True)
def dec_init(st, buf, start, end):
    """Start a decoder on buf[start:end] (the caller checked end < len(buf)); returns the position
    after the first four bytes (code and range are in st)."""
    st[END] = end
    st[RANGE] = MASK32
    st[ERR] = ERR_NONE
    st[COST] = 0
    code = 0
    pos = start
    for _ in range(4):
        code = (code << 8) | _read_byte(buf, pos, end)
        pos += 1
    st[CODE] = code
    st[POS] = pos
    if code >= MASK32:
        st[ERR] = ERR_BAD_START
    return pos


@njit(cache=True, inline="always")
def _renormalise(buf, code, rng, pos, end):
    """Bring range back to [2**24, 2**32): the first byte without a branch, a rare second one with."""
    need = np.int64(rng < TOP)
    shift = need << 3
    code = (code << shift) | (_read_byte(buf, pos, end) & -need)
    rng <<= shift
    pos += need
    while rng < TOP:
        rng <<= 8
        code = (code << 8) | _read_byte(buf, pos, end)
        pos += 1
    return code, rng, pos


@njit(cache=True, inline="always")
def dec_bin(st, buf, code, rng, pos, p):
    """Decode one regular bin with P(1) = p (15 bits); returns (bit, code, range, pos)."""
    bound = (rng >> PROB_BITS) * p
    bit = np.int64(code < bound)
    code = code if bit else code - bound            # selects, not a branch: LLVM emits cmov
    rng = bound if bit else rng - bound
    code, rng, pos = _renormalise(buf, code, rng, pos, st[END])
    return bit, code, rng, pos


@njit(cache=True, inline="always")
def dec_bypass(st, buf, code, rng, pos, nbits):
    """Decode nbits (1..8) equiprobable bins; flags ERR_BYPASS on an impossible value.
    Returns (value, code, range, pos)."""
    rng >>= nbits
    value = code // rng
    if value >= (1 << nbits):
        st[ERR] = ERR_BYPASS
        value = 0
    code -= value * rng
    code, rng, pos = _renormalise(buf, code, rng, pos, st[END])
    return value, code, rng, pos


@njit(cache=True, _nrt=False, nogil=True)
def dec_finish(st, pos):
    """After the last bin: every byte of the chunk must have been needed."""
    st[POS] = pos
    if st[ERR] == ERR_NONE and st[END] > pos:
        st[ERR] = ERR_TRAILING
