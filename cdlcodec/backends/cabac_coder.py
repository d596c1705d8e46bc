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
add, a shift and a clamp on its critical path. The decoder (see "decoder" below) keeps its code
value scaled by the bits it has read ahead, so renormalising is a leading-zero count and two
shifts with no byte read, and bytes come in two at a time about once every 16 bins; the bin
decision is branch-free (a bin value is a coin toss the branch predictor loses). It has contexts
of its own (flat, with the warm-up count replaced by an index into a table of the shift pair),
which evolve exactly as the encoder's. Array indices on the hot path are unsigned, which spares
numba's negative-index fix-up.
"""
from __future__ import annotations

import numpy as np
from ..jit import HAVE_NUMBA, njit

if HAVE_NUMBA:
    try:
        from numba.cpython.unsafe.numbers import leading_zeros as _leading_zeros
    except ImportError:  # pragma: no cover - an older or newer numba without this intrinsic
        _leading_zeros = None
else:
    _leading_zeros = None

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
# The decoder keeps its code value scaled: v = code * 2**e + the next e bits of the stream, e a
# multiple of 8 in [16, 32) between bins, so that
#     code < bound  <=>  v < bound << e,
# and renormalising `range` by s bits only lowers e (s <= 16: a bin leaves range >= 2**9): no byte
# is read then. Bytes come in two at a time when e drops below 16 (every 2 to 6 bins). The
# input position travels with (v, range, e) as a value; the bytes consumed are pos - e / 8.
# `buf` must extend at least one byte past `end` (the last chunk's end): bytes at or past `end`
# read as zero (the careful read near a chunk's end is branch-free, the bulk one plain).
#
# The decoder's contexts are its own: a flat int64 array, DEC_FIELDS values per context
# (P(1) as the coder uses it, the two estimates, and a warm-up state that indexes a table of the
# two shifts and the next state, dec_shift_table), so a bin's probability is one load and its
# update loads one table entry. They evolve exactly as the encoder's (ctx_update).

DEC_PROB, DEC_FAST, DEC_SLOW, DEC_STATE = 0, 1, 2, 3
DEC_FIELDS = 4
DEC_FILL = 16                       # refill when fewer extra bits than this are left


@njit(cache=True, inline="always")
def _read_byte(buf, pos, end):
    return np.int64(buf[np.uint64(min(pos, end))]) & -np.int64(pos < end)


@njit(cache=True, _nrt=False, nogil=True)
def dec_shift_table(tab, fast, slow, warm):
    """tab[c] = shift of the fast estimate | slow one << 8 | next warm-up state << 16, for the rate
    pair (fast, slow): the shifts ctx_update uses at use count c. The state stops counting where
    both shifts stop growing (the encoder's count goes on to MAX_COUNT with the same shifts)."""
    for c in range(tab.shape[0]):
        cap = warm[c]
        nxt = c + 1 if cap < max(fast, slow) and c + 1 < tab.shape[0] else c
        tab[c] = min(fast, cap) | (min(slow, cap) << 8) | (nxt << 16)


@njit(cache=True, _nrt=False, nogil=True)
def dec_reset_contexts(ctx):
    """Every decoder context (flat, DEC_FIELDS values each) back to probability 1/2, state 0."""
    for k in range(0, ctx.shape[0], DEC_FIELDS):
        ctx[k + DEC_PROB] = 1 << (PROB_BITS - 1)
        ctx[k + DEC_FAST] = 1 << (STATE_BITS - 1)
        ctx[k + DEC_SLOW] = 1 << (STATE_BITS - 1)
        ctx[k + DEC_STATE] = 0


@njit(cache=True, inline="always")
def dec_fill(buf, v, e, pos, end):
    """Two more bytes into v when fewer than DEC_FILL extra bits are left; returns (v, e, pos).
    (About one bin in 16 to 20 needs them: a branch costs less than loading and masking always.)"""
    if e < DEC_FILL:
        if pos + 1 < end:
            w = (np.int64(buf[np.uint64(pos)]) << 8) | np.int64(buf[np.uint64(pos + 1)])
        else:
            w = (_read_byte(buf, pos, end) << 8) | _read_byte(buf, pos + 1, end)
        v = (v << 16) | w
        e += 16
        pos += 2
    return v, e, pos


@njit(cache=True, inline="always")
def dec_init(buf, start, end):
    """Start a decoder on buf[start:end] (the caller checked end < len(buf)).
    Returns (error, v, range, e, pos)."""
    code = 0
    pos = start
    for _ in range(4):
        code = (code << 8) | _read_byte(buf, pos, end)
        pos += 1
    err = ERR_BAD_START if code >= MASK32 else ERR_NONE
    v, e, pos = dec_fill(buf, np.int64(code), np.int64(0), pos, end)
    return err, v, np.int64(MASK32), e, pos


if _leading_zeros is not None:
    @njit(cache=True, inline="always")
    def _renorm_shift(rng):
        """Bits to shift range in [2**9, 2**32) by to bring it back to [2**24, 2**32): 0, 8 or 16,
        from its leading zeros as a 32-bit value (one lzcnt and a mask)."""
        return np.int64(_leading_zeros(np.uint32(rng))) & 24
else:
    @njit(cache=True, inline="always")
    def _renorm_shift(rng):
        """Bits to shift range in [2**9, 2**32) by to bring it back to [2**24, 2**32): 0, 8 or 16."""
        return (np.int64(rng < TOP) + np.int64(rng < (1 << 16))) << 3


@njit(cache=True, inline="always")
def _dec_renormalise(rng, e):
    """Bring range back to [2**24, 2**32) (one or two bytes' worth of shift); returns (range, e)."""
    s = _renorm_shift(rng)
    return rng << s, e - s


@njit(cache=True, inline="always")
def dec_adapt(ctx, k, tab, toff, bit):
    """Adapt the decoder context at flat offset k of ctx to `bit` exactly as ctx_update does; its
    warm-up table is tab[toff:] (tab may be ctx itself, the table stored after the contexts).
    Returns the new P(1)."""
    t = tab[np.uint64(toff + ctx[np.uint64(k + DEC_STATE)])]
    target = bit << STATE_BITS
    pf = ctx[np.uint64(k + DEC_FAST)]
    ps = ctx[np.uint64(k + DEC_SLOW)]
    pf += (target - pf) >> (t & 63)
    ps += (target - ps) >> ((t >> 8) & 63)
    ctx[np.uint64(k + DEC_FAST)] = pf
    ctx[np.uint64(k + DEC_SLOW)] = ps
    ctx[np.uint64(k + DEC_STATE)] = t >> 16
    p = _clamped_prob(pf, ps)
    ctx[np.uint64(k + DEC_PROB)] = p
    return p


@njit(cache=True, inline="always")
def dec_update(ctx, tab, k, bit):
    """Adapt the decoder context at flat offset k to `bit` exactly as ctx_update does."""
    dec_adapt(ctx, k, tab, 0, bit)


@njit(cache=True, inline="always")
def dec_bin_at(buf, end, ctx, k, tab, toff, v, rng, e, pos):
    """Decode one regular bin with the decoder context at flat offset k of ctx (warm-up table
    tab[toff:], see dec_adapt) and adapt it; returns (bit, v, range, e, pos)."""
    bound = (rng >> PROB_BITS) * ctx[np.uint64(k + DEC_PROB)]
    bit = np.int64((v >> e) < bound)               # code < bound (v >> e is ready before bound)
    v = v if bit else v - (bound << e)              # selects, not a branch: LLVM emits cmov
    rng = bound if bit else rng - bound
    rng, e = _dec_renormalise(rng, e)
    v, e, pos = dec_fill(buf, v, e, pos, end)
    dec_adapt(ctx, k, tab, toff, bit)
    return bit, v, rng, e, pos


@njit(cache=True, inline="always")
def dec_bin(buf, end, ctx, tab, ci, v, rng, e, pos):
    """Decode one regular bin with decoder context ci and adapt it; returns (bit, v, range, e, pos)."""
    return dec_bin_at(buf, end, ctx, ci * DEC_FIELDS, tab, 0, v, rng, e, pos)


@njit(cache=True, inline="always")
def dec_bypass(buf, end, v, rng, e, pos, nbits):
    """Decode nbits (1..8) equiprobable bins; returns (value, v, range, e, pos), value -1 for an
    impossible one (a corrupt stream)."""
    rng >>= nbits
    scaled = rng << e
    value = v // scaled
    if value >= (1 << nbits):
        return np.int64(-1), v, rng, e, pos
    v -= value * scaled
    rng, e = _dec_renormalise(rng, e)
    v, e, pos = dec_fill(buf, v, e, pos, end)
    return value, v, rng, e, pos


@njit(cache=True, inline="always")
def dec_consumed(e, pos):
    """Bytes of the stream the decoder has needed so far (the rest of v is read ahead)."""
    return pos - (e >> 3)
