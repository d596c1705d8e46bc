"""Binarization and context selection of the `cabac` backend (DeepCABAC, Section III-B), shared by
the encoder, the decoder, the bit-cost estimator and the rate model for RD quantization.

Binarization of one level k (scan order = row-major order of the tensor):

    sig      k != 0                       context: neighbourhood (below)
    sign     k < 0                        context: sign of the previous level (+ one more neighbour)
    gt_j     |k| > j + 1, j = 0 .. n-1    context: j, sign of k, magnitude class of the neighbourhood
    prefix   Exp-Golomb-0 unary prefix of x = |k| - n   one context per prefix position
    suffix   low bits of x                bypass bins

e.g. n = 1: 1 -> sig 1, sign 0, gt_0 0;  -4 -> 1,1,1 then x = 3 -> prefix 1,0, suffix 1.
(The paper's Fig. 7 example codes the same information.)

Neighbourhood of position i (only levels of the same chunk are used, so chunks decode alone):
a = level i-1, b = level i-2, u = level i-row_len (the co-located level in the previous row of
the matrix form of the tensor, when the stream has a row length). Context designs (`mode`):

    0  "prev"       sig and sign by the class of a (zero / negative / positive); gt by j and sign.
                    This is the DeepCABAC/NNC baseline.
    1  "prev2"      sig by (class of a, min(|a| + |b|, 7)); sign by (class of a, class of b);
                    gt additionally by a 4-way magnitude class of |a| + |b|.
    2  "prev2+row"  as 1 with u added to the magnitude sum and u's class replacing b's for sign.

One walk, `code_level`, goes through these bins on the encoder side. Its first argument `op` says
what a bin does: OP_ENCODE (write it), OP_COST (add its cost and adapt the context, as the
encoder would) or OP_PEEK (add its cost only). The walk is inlined into one encoder-side kernel
whose run-time op also serves the cost estimates of the settings search and the rate model's
updates (compiling an inlined copy is what a first encode waits for: numba's inliner copies the
callee's IR block by block, seconds per copy). The decoder reads the same bins in a walk of its
own (`_decode_chunk`: its bins carry a different coder state, see cabac_coder's decoder, and
its gt flags run as a loop over context indices), and streams of design 0 ("prev") in a table
walk without a branch on any bin's value (`_decode_chunk_prev`, chosen by `chunk_decoders`);
every round-trip test pins the walks to the encoder's, and a test pins the two decoder walks to
each other. The context choice, `neighbourhood_classes`, exists once for every use. The rate
model's peek (`rate_cost`) sums the same bins' costs in a small kernel of its own, tested equal
to the walk.

Rate model API for an RD quantizer (DeepCABAC eq. 11, L_ik = rate of level k at weight i), all
numba functions that can be called from other njit code while scanning a tensor:

    ctx = new_contexts(N_CONTEXTS)                       # fresh state for a tensor / chunk
    st = np.zeros(STATE_SIZE, np.int64)                  # scratch
    a, b, u = neighbours(levels, i, chunk_start, row_len)
    bits_q16 = rate_cost(ctx, st, k, a, b, u, mode, n_gt, fast, slow)     # cost of k, 1/65536 bit
    levels[i] = k                                                         # after choosing k:
    rate_update(ctx, st, levels, chunk_start, i, i + 1, row_len, mode, n_gt, fast, slow)

with (fast, slow) = RATE_PAIRS[rate_idx]. rate_cost does not change ctx; rate_update adapts it to
levels s..e-1 (the levels before s from chunk_start on being their neighbours) exactly as the
encoder will, so a quantizer that calls it for the chosen levels sees the rates the real encoder
will spend (up to the range coder's rounding, a fraction of a percent). rate_update runs the
encoder's own chunk kernel (nothing more to compile); rate_cost, called for every candidate of
every level, is a small kernel of its own that sums the bins' costs directly (an inlined
code_level would cost a first RD encode seconds of compiling; tests pin it to code_level).
"""
from __future__ import annotations

import numpy as np
from ..jit import njit, prange

from .base import MAX_ABS_LEVEL
from .cabac_coder import (
    COST_FRAC_BITS, COST_TABLE, DEC_FAST, DEC_FIELDS, DEC_PROB, DEC_SLOW, DEC_STATE, ERR, ERR_BYPASS, ERR_CHECK,
    ERR_LEVEL, ERR_NONE, ERR_PREFIX, ERR_TRAILING, ERR_UNPADDED, LOW, MAX_COUNT, PROB_BITS, RANGE, STATE_BITS,
    STATE_SIZE, WARM_SHIFT, bin_cost, ctx_prob, ctx_update, dec_bin, dec_bin_at, dec_bypass, dec_consumed, dec_init,
    dec_reset_contexts, dec_shift_table, enc_bin, enc_bypass, enc_finish, enc_init, new_contexts, reset_contexts,
)

OP_ENCODE, OP_DECODE, OP_COST, OP_PEEK = 0, 1, 2, 3   # OP_DECODE: the decoder has its own walk now

MODE_PREV, MODE_PREV2, MODE_PREV2_ROW = 0, 1, 2
MODE_NAMES = {MODE_PREV: "prev", MODE_PREV2: "prev2", MODE_PREV2_ROW: "prev2+row"}

MAX_GT = 32            # most greater-than flags a stream may ask for
MAX_PREFIX = 31        # Exp-Golomb prefix length that already exceeds MAX_ABS_LEVEL
N_SIG_MAG = 8
SIG_BASE = 0
SIGN_BASE = SIG_BASE + 3 * N_SIG_MAG
GT_BASE = SIGN_BASE + 9
N_GT_CLASS = 4
EG_BASE = GT_BASE + 2 * MAX_GT * N_GT_CLASS
N_CONTEXTS = EG_BASE + MAX_PREFIX

# 16 bypass bins after the last level of every chunk: a cut or corrupt stream fails this check
# (chance of a miss about 2**-16).
CHECK_BITS = 16
CHECK_VALUE = 0xB5E3


# The encoder side's hot state travels as three values (x, rng, pos): x is `low` when encoding and
# the cost accumulator when estimating; pos is passed through unchanged.
#
# The walk (code_level) and the bypass loop are built by _side on the encoder side's bin
# functions (numba inlines a callee's whole IR before it can prune branches, so the decoder's
# bins are kept out of it: they would cost a first encode compile time). `op` may be a run-time
# value (OP_ENCODE or OP_COST), which lets one compiled kernel serve the encoder and its cost
# estimates (_code_chunk: a first encode compiles it once, not once per op).

@njit(inline="always")
def _enc_side_bin(op, x, rng, pos, st, buf, ctx, ci, bit, fast, slow):
    """One context-coded bin on the encoder side: write it (OP_ENCODE) or add its cost (OP_COST,
    OP_PEEK); the context adapts except for OP_PEEK. Returns (bit, x, rng, pos)."""
    p = ctx_prob(ctx, ci)
    if op == OP_ENCODE:
        x, rng = enc_bin(st, buf, x, rng, p, bit)
    else:
        x += bin_cost(p, bit, COST_TABLE)
    if op != OP_PEEK:
        ctx_update(ctx, ci, bit, fast, slow, WARM_SHIFT)
    return bit, x, rng, pos


@njit(inline="always")
def _enc_side_bypass(op, x, rng, pos, st, buf, part, m):
    """m (1..8) equiprobable bins holding `part`, written or costed; returns (part, x, rng, pos)."""
    if op == OP_ENCODE:
        x, rng = enc_bypass(st, buf, x, rng, part, m)
    else:
        x += m << COST_FRAC_BITS
    return part, x, rng, pos


@njit(cache=True, inline="always")
def _sign_class(v):
    if v == 0:
        return 0
    return 1 if v < 0 else 2


@njit(cache=True, inline="always")
def neighbourhood_classes(a, b, u, mode):
    """(sa, s2, m, g) of neighbours a, b, u under context design `mode`: sa and s2 pick the sig and
    sign contexts' sign classes, m the sig context's magnitude, g the gt contexts' magnitude class.
    The one place the context choice is made (code_level, _decode_chunk and rate_cost use it)."""
    sa = _sign_class(a)
    if mode == MODE_PREV:
        m = 0
        g = 0
        s2 = 0
    else:
        s = abs(a) + abs(b)
        if mode == MODE_PREV2_ROW:
            s += abs(u)
            s2 = _sign_class(u)
        else:
            s2 = _sign_class(b)
        m = s if s < 2 else 2
        g = 0 if s == 0 else (1 if s <= 2 else 2)
    return sa, s2, m, g


def _side(bin_, bypass_bins):
    """(bypass, code_level) built on the encoder side's bin functions."""

    def bypass(op, x, rng, pos, st, buf, value, nbits):
        """nbits (0..31) equiprobable bins, most significant first; returns (value, x, rng, pos)."""
        result = 0
        while nbits > 0:
            m = nbits if nbits < 8 else 8
            nbits -= m
            part = (value >> nbits) & ((1 << m) - 1)
            part, x, rng, pos = bypass_bins(op, x, rng, pos, st, buf, part, m)
            result = (result << m) | part
        return result, x, rng, pos

    bypass = njit(inline="always")(bypass)

    def code_level(op, x, rng, pos, k, a, b, u, mode, n_gt, ctx, st, buf, fast, slow):
        """Walk the bins of level k (see module docstring); returns (level, x, rng, pos) where level is k.
        A level past the Exp-Golomb prefix limit sets st[ERR] (level 0)."""
        sa, s2, m, g = neighbourhood_classes(a, b, u, mode)
        mag = abs(k)

        sig, x, rng, pos = bin_(op, x, rng, pos, st, buf, ctx, SIG_BASE + sa * N_SIG_MAG + m, 1 if k != 0 else 0,
                                fast, slow)
        if sig == 0:
            return 0, x, rng, pos
        neg, x, rng, pos = bin_(op, x, rng, pos, st, buf, ctx, SIGN_BASE + sa * 3 + s2, 1 if k < 0 else 0,
                                fast, slow)

        gbase = GT_BASE + neg * (MAX_GT * N_GT_CLASS) + g
        val = 1
        for j in range(n_gt):
            gt, x, rng, pos = bin_(op, x, rng, pos, st, buf, ctx, gbase + j * N_GT_CLASS, 1 if mag > val else 0,
                                   fast, slow)
            if gt == 0:
                return (-val if neg else val), x, rng, pos
            val += 1

        # Remainder |k| - n - 1 as Exp-Golomb order 0 of v = |k| - n >= 1.
        v = mag - n_gt
        nb = 0
        while (v >> (nb + 1)) > 0:
            nb += 1
        j = 0
        while True:
            if j >= MAX_PREFIX:
                st[ERR] = ERR_PREFIX
                return 0, x, rng, pos
            more, x, rng, pos = bin_(op, x, rng, pos, st, buf, ctx, EG_BASE + j, 1 if j < nb else 0, fast, slow)
            if more == 0:
                break
            j += 1
        low_bits, x, rng, pos = bypass(op, x, rng, pos, st, buf, v, j)
        mag = n_gt + ((1 << j) | low_bits)
        if mag > MAX_ABS_LEVEL:
            st[ERR] = ERR_LEVEL
            return 0, x, rng, pos
        return (-mag if neg else mag), x, rng, pos

    return bypass, njit(inline="always")(code_level)


_enc_bypass, code_level = _side(_enc_side_bin, _enc_side_bypass)   # OP_ENCODE, OP_COST, OP_PEEK


@njit(cache=True, inline="always")
def neighbours(levels, i, start, row_len):
    """(a, b, u) of position i for a chunk starting at `start` (0 outside the chunk)."""
    a = levels[i - 1] if i - 1 >= start else 0
    b = levels[i - 2] if i - 2 >= start else 0
    u = levels[i - row_len] if row_len > 0 and i - row_len >= start else 0
    return a, b, u


# --- chunk kernels ------------------------------------------------------------------------------
# The per-chunk loops are compiled without numba's reference counting (_nrt=False): with it, the
# inlined bin functions cost an atomic incref/decref pair per bin, which halves the speed. They
# therefore allocate nothing; the wrappers below allocate the coder state and contexts.

@njit(cache=True, _nrt=False, nogil=True)
def _code_chunk(op, levels, start, s, e, n_gt, mode, row_len, fast, slow, buf, pos, st, ctx):
    """Levels s..e-1 of the chunk that starts at `start` (a level's neighbours are the levels before
    it from `start` on), with contexts ctx as they are. op = OP_ENCODE writes a whole chunk
    (s = start) into buf from pos and returns the end position (-1 when buf is full); OP_COST
    returns the levels' estimated cost (1/65536 bit) and adapts ctx as the encoder would. op is a
    run-time value, so this kernel compiles once for the encoder, the cost scan of its settings
    search and rate_update; the branch on op is the same for every bin and costs the encoder a few
    per cent at most."""
    if op == OP_ENCODE:
        enc_init(st, pos, buf.shape[0])
        x = st[LOW]
        rng = st[RANGE]
    else:
        x = np.int64(0)
        rng = np.int64(0)
    a = levels[s - 1] if s - 1 >= start else 0
    b = levels[s - 2] if s - 2 >= start else 0
    for i in range(s, e):
        u = levels[i - row_len] if row_len > 0 and i - row_len >= start else 0
        k = levels[i]
        _, x, rng, _ = code_level(op, x, rng, pos, k, a, b, u, mode, n_gt, ctx, st, buf, fast, slow)
        b = a
        a = k
    if op != OP_ENCODE:
        return x
    _, x, rng, _ = _enc_bypass(op, x, rng, pos, st, buf, CHECK_VALUE, CHECK_BITS)
    end = enc_finish(st, buf, pos, x, rng)
    if st[ERR] != ERR_NONE:
        return -1
    return end


@njit(cache=True, nogil=True)
def encode_chunks(levels, chunk_size, n_gt, mode, row_len, fast, slow, buf, chunk_ends):
    """Encode every chunk into buf back to back; chunk_ends[c] = end offset of chunk c.
    Returns the total length, or -1 when buf is too small."""
    n = levels.shape[0]
    st = np.zeros(STATE_SIZE, dtype=np.int64)
    ctx = new_contexts(N_CONTEXTS)
    op = np.int64(OP_ENCODE)  # int64s, not literals: one compiled _code_chunk serves every use
    pos = np.int64(0)
    for c in range(chunk_ends.shape[0]):
        s = c * chunk_size
        reset_contexts(ctx)
        pos = _code_chunk(op, levels, s, s, min(n, s + chunk_size), n_gt, mode, row_len, fast, slow, buf, pos, st,
                          ctx)
        if pos < 0:
            return -1
        chunk_ends[c] = pos
    return pos


@njit(cache=True, inline="always")
def _dec_bypass_bins(buf, end, v, rng, e, pos, nbits):
    """nbits (0..31) equiprobable bins, most significant first; returns (value, v, rng, e, pos),
    value -1 for an impossible one."""
    result = np.int64(0)
    while nbits > 0:
        m = nbits if nbits < 8 else 8
        nbits -= m
        part, v, rng, e, pos = dec_bypass(buf, end, v, rng, e, pos, m)
        if part < 0:
            return part, v, rng, e, pos
        result = (result << m) | part
    return result, v, rng, e, pos


@njit(cache=True, inline="always")
def _chunk_end(buf, end, v, rng, e, pos):
    """After a chunk's last level: its check bins, and every byte of it read (an error code)."""
    check, v, rng, e, pos = _dec_bypass_bins(buf, end, v, rng, e, pos, CHECK_BITS)
    if check < 0:
        return ERR_BYPASS
    if check != CHECK_VALUE:
        return ERR_CHECK
    if end > dec_consumed(e, pos):
        return ERR_TRAILING
    return ERR_NONE


@njit(cache=True, _nrt=False, nogil=True)
def _decode_chunk(buf, start, end, out, s, e_out, n_gt, mode, row_len, ctx, tab):
    """Levels s..e_out-1 from the chunk buf[start:end]: the bins of code_level, read with the
    decoder's own bin functions and contexts (cabac_coder); returns an error code (0 = fine)."""
    err, v, rng, e, pos = dec_init(buf, start, end)
    if err != ERR_NONE:
        return err
    dec_reset_contexts(ctx)
    a = np.int64(0)
    b = np.int64(0)
    gt_neg = np.int64(MAX_GT * N_GT_CLASS)
    for i in range(s, e_out):
        u = out[np.uint64(i - row_len)] if row_len > 0 and i - row_len >= s else 0
        sa, s2, m, g = neighbourhood_classes(a, b, u, mode)
        sig, v, rng, e, pos = dec_bin(buf, end, ctx, tab, SIG_BASE + sa * N_SIG_MAG + m, v, rng, e, pos)
        k = np.int64(0)
        if sig:
            neg, v, rng, e, pos = dec_bin(buf, end, ctx, tab, SIGN_BASE + sa * 3 + s2, v, rng, e, pos)
            ci0 = GT_BASE + neg * gt_neg + g
            ci = ci0
            ci_end = ci0 + n_gt * N_GT_CLASS
            gt = np.int64(1)
            while ci < ci_end:          # gt_j: |k| > j + 1; the first 0 ends the level
                gt, v, rng, e, pos = dec_bin(buf, end, ctx, tab, ci, v, rng, e, pos)
                if gt == 0:
                    break
                ci += N_GT_CLASS
            mag = 1 + (ci - ci0) // N_GT_CLASS
            if gt:
                # remainder: Exp-Golomb order 0 of mag - n_gt (>= 1): prefix of ones, then bypass bins
                j = 0
                more = np.int64(1)
                while more:
                    if j >= MAX_PREFIX:
                        return ERR_PREFIX
                    more, v, rng, e, pos = dec_bin(buf, end, ctx, tab, EG_BASE + j, v, rng, e, pos)
                    j += more
                low_bits, v, rng, e, pos = _dec_bypass_bins(buf, end, v, rng, e, pos, j)
                if low_bits < 0:
                    return ERR_BYPASS
                mag = n_gt + ((1 << j) | low_bits)
                if mag > MAX_ABS_LEVEL:
                    return ERR_LEVEL
            k = -mag if neg else mag
        out[np.uint64(i)] = k
        b = a
        a = k
    return _chunk_end(buf, end, v, rng, e, pos)


# --- the "prev" design's decoder walk: one bin per step, no branch on a bin's value ---------------
# In mode 0 a bin's context decides the next bin's context, given the bin's value, and whether a
# 0 ends the level (and which): sig(sa) -1-> sign(sa), -0-> level 0, next sig(0); sign(sa) -v->
# gt_0 of sign v; gt_j -1-> gt_j+1, -0-> level +-(j + 1), next sig(1 or 2). So the walk can be a
# table: every decoder context gets a row of PREV_ROW values, its DEC_FIELDS values and then
# (next offset after a 1, next offset after a 0, the level a 0 ends, 1 if a 0 ends a level), and
# each step decodes one bin, stores the level a 0 would end, advances the level index by (0 ends
# a level) and picks the next row with a select. The branch on each bin's value that the general
# walk mispredicts (sig, the end of the gt run: 0.7 a level at Laplace b = 1, 1.1 at b = 4) is
# gone; the next context's load waits for the select instead. Past the last gt flag the next row
# is one of two marker rows (sign +/-) after the contexts, where the Exp-Golomb remainder is read
# as in the general walk. The warm-up shift table follows the marker rows in the same array.
PREV_ROW = 8
PREV_NEXT1, PREV_NEXT0, PREV_VALUE0, PREV_ENDS0 = DEC_FIELDS, DEC_FIELDS + 1, DEC_FIELDS + 2, DEC_FIELDS + 3
PREV_EG = N_CONTEXTS * PREV_ROW               # marker rows: remainder of a positive, a negative level
PREV_TAB = (N_CONTEXTS + 2) * PREV_ROW        # the warm-up shift table (dec_shift_table)
PREV_SIZE = PREV_TAB + MAX_COUNT + 1


@njit(cache=True, _nrt=False, nogil=True)
def prev_walk_init(w, n_gt, fast, slow):
    """The prev walk's array (PREV_SIZE values) for n_gt flags and the rate pair (fast, slow):
    rows of the walk table, the marker rows and the shift table (contexts: _decode_chunk_prev)."""
    w[:PREV_TAB] = 0
    for sa in range(3):
        ks = (SIG_BASE + sa * N_SIG_MAG) * PREV_ROW
        kn = (SIGN_BASE + sa * 3) * PREV_ROW
        w[ks + PREV_NEXT1] = kn
        w[ks + PREV_NEXT0] = SIG_BASE * PREV_ROW
        w[ks + PREV_ENDS0] = 1                         # ... level 0
        for neg in range(2):
            first = (GT_BASE + neg * MAX_GT * N_GT_CLASS) * PREV_ROW if n_gt > 0 else PREV_EG + neg * PREV_ROW
            w[kn + (PREV_NEXT1 if neg else PREV_NEXT0)] = first
    for neg in range(2):
        after = (SIG_BASE + (1 if neg else 2) * N_SIG_MAG) * PREV_ROW
        for j in range(n_gt):
            kg = (GT_BASE + neg * MAX_GT * N_GT_CLASS + j * N_GT_CLASS) * PREV_ROW
            w[kg + PREV_NEXT1] = kg + N_GT_CLASS * PREV_ROW if j + 1 < n_gt else PREV_EG + neg * PREV_ROW
            w[kg + PREV_NEXT0] = after
            w[kg + PREV_VALUE0] = -(j + 1) if neg else j + 1
            w[kg + PREV_ENDS0] = 1
    dec_shift_table(w[PREV_TAB:], fast, slow, WARM_SHIFT)


@njit(cache=True, _nrt=False, nogil=True)
def _decode_chunk_prev(buf, start, end, out, s, e_out, n_gt, w):
    """_decode_chunk for the "prev" design (mode 0), the default for tensors without rows: the
    same bins, contexts and errors, walked as a table (see above; w from prev_walk_init, its
    contexts reset here). A test pins it to the general walk, damaged streams included."""
    err, v, rng, e, pos = dec_init(buf, start, end)
    if err != ERR_NONE:
        return err
    for ci in range(N_CONTEXTS):
        k = ci * PREV_ROW
        w[k + DEC_PROB] = 1 << (PROB_BITS - 1)
        w[k + DEC_FAST] = 1 << (STATE_BITS - 1)
        w[k + DEC_SLOW] = 1 << (STATE_BITS - 1)
        w[k + DEC_STATE] = 0
    k = np.int64(SIG_BASE * PREV_ROW)
    i = np.uint64(s)
    i_end = np.uint64(e_out)
    while i < i_end:
        if k < PREV_EG:
            uk = np.uint64(k)
            next1 = w[uk + np.uint64(PREV_NEXT1)]            # loaded before the bin: off its chain
            next0 = w[uk + np.uint64(PREV_NEXT0)]
            out[i] = w[uk + np.uint64(PREV_VALUE0)]         # the level, if this bin is a 0 that ends it
            ends0 = w[uk + np.uint64(PREV_ENDS0)]
            bit, v, rng, e, pos = dec_bin_at(buf, end, w, k, w, PREV_TAB, v, rng, e, pos)
            i += np.uint64((1 - bit) & ends0)
            k = next1 if bit else next0                     # a select of two loaded values (cmov)
        else:
            # remainder: Exp-Golomb order 0 of mag - n_gt (>= 1): prefix of ones, then bypass bins
            neg = (k - PREV_EG) // PREV_ROW
            j = 0
            more = np.int64(1)
            while more:
                if j >= MAX_PREFIX:
                    return ERR_PREFIX
                more, v, rng, e, pos = dec_bin_at(buf, end, w, (EG_BASE + j) * PREV_ROW, w, PREV_TAB, v, rng, e, pos)
                j += more
            low_bits, v, rng, e, pos = _dec_bypass_bins(buf, end, v, rng, e, pos, j)
            if low_bits < 0:
                return ERR_BYPASS
            mag = n_gt + ((1 << j) | low_bits)
            if mag > MAX_ABS_LEVEL:
                return ERR_LEVEL
            out[i] = -mag if neg else mag
            i += np.uint64(1)
            k = (SIG_BASE + (1 if neg else 2) * N_SIG_MAG) * PREV_ROW
    return _chunk_end(buf, end, v, rng, e, pos)


@njit(cache=True, nogil=True)
def decode_chunks_serial(buf, offsets, chunk_size, n_gt, mode, row_len, fast, slow, out, errs):
    """Decode chunk c from buf[offsets[c]:offsets[c+1]] into out; errs[c] = error code (0 = fine).
    buf must extend at least one byte past the last offset (cabac_coder: the decoder's byte reads)."""
    n = out.shape[0]
    if offsets[offsets.shape[0] - 1] >= buf.shape[0]:
        errs[:] = ERR_UNPADDED
        return
    ctx = np.empty(N_CONTEXTS * DEC_FIELDS, dtype=np.int64)
    tab = np.empty(MAX_COUNT + 1, dtype=np.int64)
    dec_shift_table(tab, fast, slow, WARM_SHIFT)
    for c in range(offsets.shape[0] - 1):
        s = c * chunk_size
        errs[c] = _decode_chunk(buf, offsets[c], offsets[c + 1], out, s, min(n, s + chunk_size),
                                n_gt, mode, row_len, ctx, tab)


@njit(cache=True, parallel=True, nogil=True)
def decode_chunks_parallel(buf, offsets, chunk_size, n_gt, mode, row_len, fast, slow, out, errs):
    """As decode_chunks_serial, one chunk per task on every core."""
    n = out.shape[0]
    n_chunks = offsets.shape[0] - 1
    if offsets[n_chunks] >= buf.shape[0]:
        errs[:] = ERR_UNPADDED
        return
    contexts = np.zeros((n_chunks, N_CONTEXTS * DEC_FIELDS), dtype=np.int64)
    tab = np.empty(MAX_COUNT + 1, dtype=np.int64)
    dec_shift_table(tab, fast, slow, WARM_SHIFT)
    for c in prange(n_chunks):
        s = c * chunk_size
        errs[c] = _decode_chunk(buf, offsets[c], offsets[c + 1], out, s, min(n, s + chunk_size),
                                n_gt, mode, row_len, contexts[c], tab)


@njit(cache=True, nogil=True)
def decode_prev_chunks_serial(buf, offsets, chunk_size, n_gt, mode, row_len, fast, slow, out, errs):
    """decode_chunks_serial for a mode 0 stream, with the prev walk (_decode_chunk_prev).
    (mode and row_len: unused, for the same signature.)"""
    n = out.shape[0]
    if offsets[offsets.shape[0] - 1] >= buf.shape[0]:
        errs[:] = ERR_UNPADDED
        return
    w = np.empty(PREV_SIZE, dtype=np.int64)
    prev_walk_init(w, n_gt, fast, slow)
    for c in range(offsets.shape[0] - 1):
        s = c * chunk_size
        errs[c] = _decode_chunk_prev(buf, offsets[c], offsets[c + 1], out, s, min(n, s + chunk_size), n_gt, w)


@njit(cache=True, parallel=True, nogil=True)
def decode_prev_chunks_parallel(buf, offsets, chunk_size, n_gt, mode, row_len, fast, slow, out, errs):
    """decode_chunks_parallel for a mode 0 stream, with the prev walk."""
    n = out.shape[0]
    n_chunks = offsets.shape[0] - 1
    if offsets[n_chunks] >= buf.shape[0]:
        errs[:] = ERR_UNPADDED
        return
    template = np.empty(PREV_SIZE, dtype=np.int64)
    prev_walk_init(template, n_gt, fast, slow)
    walks = np.empty((n_chunks, PREV_SIZE), dtype=np.int64)
    for c in range(n_chunks):   # (a copy inside the prange body raced with the decoding: numba's parfor)
        walks[c] = template
    for c in prange(n_chunks):
        s = c * chunk_size
        errs[c] = _decode_chunk_prev(buf, offsets[c], offsets[c + 1], out, s, min(n, s + chunk_size), n_gt,
                                     walks[c])


def chunk_decoders(mode: int):
    """(serial, parallel) chunk decode kernels for a stream of context design `mode` (same
    arguments): mode 0 has a walk of its own, compiled only when a mode 0 stream is decoded."""
    if mode == MODE_PREV:
        return decode_prev_chunks_serial, decode_prev_chunks_parallel
    return decode_chunks_serial, decode_chunks_parallel


@njit(cache=True, nogil=True)
def cost_chunks(levels, chunk_size, n_gt, mode, row_len, fast, slow, limit):
    """Estimated cost (1/65536 bit) of the first `limit` levels, chunked and adapted as the encoder
    would, check bins included (termination bytes are not)."""
    n = min(levels.shape[0], limit)
    st = np.zeros(STATE_SIZE, dtype=np.int64)
    ctx = new_contexts(N_CONTEXTS)
    total = 0
    op = np.int64(OP_COST)  # int64s, not literals, and a uint8 buf: the _code_chunk that encode_chunks compiles
    pos = np.int64(0)
    unused = np.zeros(1, dtype=np.uint8)
    s = np.int64(0)
    while s < n:
        e = min(n, s + chunk_size)
        reset_contexts(ctx)
        total += _code_chunk(op, levels, s, s, e, n_gt, mode, row_len, fast, slow, unused, pos, st, ctx)
        total += CHECK_BITS << COST_FRAC_BITS
        s = e
    return total


# --- rate model for RD quantization -------------------------------------------------------------

@njit(cache=True, inline="always")
def _peek(ctx, ci, bit):
    return bin_cost(ctx_prob(ctx, ci), bit, COST_TABLE)


@njit(cache=True, _nrt=False, nogil=True)
def rate_cost(ctx, st, k, a, b, u, mode, n_gt, fast, slow):
    """Cost of coding level k next (1/65536 bit) after neighbours a, b, u (see neighbours) in state
    ctx; ctx is not changed (code_level's OP_PEEK, errors flagged in st the same way).

    The bins of code_level costed directly rather than through an inlined code_level: compiling
    that copy took 4-6 s of a first `--trellis --lambda` or `--lambda` encode (numba's IR inliner),
    this takes a fraction of a second. The contexts come from neighbourhood_classes as in
    code_level; tests check the two give the same cost for every kind of level, design and n_gt.
    (fast, slow: unused by a peek, kept for the rate model's uniform signature.)"""
    sa, s2, m, g = neighbourhood_classes(a, b, u, mode)
    sig_ci = SIG_BASE + sa * N_SIG_MAG + m
    if k == 0:
        return _peek(ctx, sig_ci, 0)
    neg = 1 if k < 0 else 0
    cost = _peek(ctx, sig_ci, 1) + _peek(ctx, SIGN_BASE + sa * 3 + s2, neg)
    mag = abs(k)
    gbase = GT_BASE + neg * (MAX_GT * N_GT_CLASS) + g
    for j in range(n_gt):  # gt_j = |k| > j + 1; the first 0 ends the level
        if mag <= j + 1:
            return cost + _peek(ctx, gbase + j * N_GT_CLASS, 0)
        cost += _peek(ctx, gbase + j * N_GT_CLASS, 1)
    v = mag - n_gt  # Exp-Golomb-0 of v >= 1: nb prefix ones, a zero, nb bypass bins
    nb = 0
    while (v >> (nb + 1)) > 0:
        nb += 1
    for j in range(min(nb, MAX_PREFIX)):
        cost += _peek(ctx, EG_BASE + j, 1)
    if nb >= MAX_PREFIX:
        st[ERR] = ERR_PREFIX
        return cost
    cost += _peek(ctx, EG_BASE + nb, 0) + (nb << COST_FRAC_BITS)
    if mag > MAX_ABS_LEVEL:
        st[ERR] = ERR_LEVEL
    return cost


@njit(cache=True, _nrt=False, nogil=True)
def rate_update(ctx, st, levels, start, s, e, row_len, mode, n_gt, fast, slow):
    """Adapt ctx as the encoder does after coding levels s..e-1 of the chunk starting at `start`;
    returns their cost (1/65536 bit)."""
    # st's bytes stand in for the encoder's output buffer, which a cost never touches
    return _code_chunk(np.int64(OP_COST), levels, start, s, e, n_gt, mode, row_len, fast, slow,
                       st.view(np.uint8), np.int64(0), st, ctx)
