"""numba kernels behind the `huffman` backend: code lengths, canonical codes, bit I/O, table parsing.

Everything here is integer-only and deterministic; it decides coded bytes. Conventions:
- a code table is a `uint8` array of code lengths over a dense alphabet 0..n-1 (0 = no code);
- canonical codes are assigned in order of (length, symbol index), the first code of each length
  being all zeros at the shortest length (as in DEFLATE, RFC 1951 section 3.2.2);
- code words go into the payload most significant bit first; stream bit j is bit (7 - j mod 8) of
  byte floor(j / 8); the last byte is padded with zero bits.
Kernel errors are returned as negative status codes (see ERROR_MESSAGES) and turned into
CdlDecodeError by the Python layer, so a corrupt stream never raises anything else.
"""
from __future__ import annotations

import numpy as np

from ..jit import njit
from .varint import ERR_MALFORMED, ERR_TRUNCATED, get_svarint, get_uvarint, put_uvarint, zigzag

MAX_CODE_LEN = 24  # format limit: code words are at most 24 bits
PRIMARY_BITS = 11  # the decoder's lookup tables have 2**11 entries (see MULTI_SYMBOLS)
# Each entry of the multi-symbol table holds up to MULTI_SYMBOLS whole code words that fit in the
# next PRIMARY_BITS bits (int32 values: 2**11 * 4 * 4 = 32 KB, plus 8 KB of counts; they stay in a
# 48 KB L1 data cache). Four fit the short codes of weight-like levels (2-5 bits on average).
# When every coded value fits in int16 (weights' levels nearly always do), the values are int16
# and the counts uint16, and the window grows to NARROW_PRIMARY_BITS: 2**12 * 4 * 2 = 32 KB plus
# 8 KB, still inside L1, and more code words per lookup (b = 4 Laplace levels: +20 % symbols/s).
NARROW_PRIMARY_BITS = 12
MULTI_SYMBOLS = 4

# param kinds
KIND_EMPTY = 0
KIND_SINGLE = 1
KIND_DENSE = 2
KIND_SPARSE = 3
AFTER_KIND = np.int64(1)  # params after the kind byte; an int64, not a literal 1, so the varint kernels compile once

ERR_TRUNCATED_PARAMS = ERR_TRUNCATED  # the varint kernels' own codes
ERR_BAD_VARINT = ERR_MALFORMED
ERR_BAD_LENGTH = -3
ERR_RUN_OVERFLOW = -4
ERR_RANGE = -5
ERR_KRAFT = -6
ERR_TOO_MANY_SYMBOLS = -7
ERR_TOO_FEW_SYMBOLS = -8
ERR_TRAILING_PARAMS = -9
ERR_PAYLOAD_OVERRUN = -10
ERR_INVALID_CODE = -11
ERR_PAYLOAD_TRAILING = -12
ERR_PADDING = -13
ERR_BAD_KIND = -14

ERROR_MESSAGES = {
    ERR_TRUNCATED_PARAMS: "code table is truncated",
    ERR_BAD_VARINT: "malformed varint in the code table",
    ERR_BAD_LENGTH: f"code length outside 1..{MAX_CODE_LEN}",
    ERR_RUN_OVERFLOW: "code-length run goes past the end of the alphabet",
    ERR_RANGE: "symbol outside the supported level range",
    ERR_KRAFT: "code lengths violate the Kraft inequality (not a prefix code)",
    ERR_TOO_MANY_SYMBOLS: "code table has more symbols than the tensor has elements",
    ERR_TOO_FEW_SYMBOLS: "code table has fewer than two symbols",
    ERR_TRAILING_PARAMS: "trailing bytes after the code table",
    ERR_PAYLOAD_OVERRUN: "payload ends before all levels were decoded",
    ERR_INVALID_CODE: "payload contains a bit pattern that is not a code word",
    ERR_PAYLOAD_TRAILING: "payload has trailing bytes after the last code word",
    ERR_PADDING: "non-zero padding bits at the end of the payload",
    ERR_BAD_KIND: "unknown code table kind",
}


# --- code lengths --------------------------------------------------------------------------------

@njit(cache=True, nogil=True)
def huffman_depths(weights):
    """Huffman code lengths (unlimited) for positive `weights` sorted ascending; int64 array, same order.

    Two-queue construction (van Leeuwen): leaves are consumed in sorted order and merged nodes are
    created in non-decreasing weight order, so the two smallest items are always at the queue heads.
    Ties take the leaf first, which fixes the tree for equal weights. Needs at least two weights.
    """
    m = weights.size
    node_w = np.empty(m - 1, np.int64)        # merged nodes, in creation order
    node_parent = np.empty(m - 1, np.int64)
    leaf_parent = np.empty(m, np.int64)
    li = 0  # next unconsumed leaf
    ni = 0  # next unconsumed merged node
    for k in range(m - 1):
        total = 0
        for _ in range(2):
            if li < m and (ni >= k or weights[li] <= node_w[ni]):
                leaf_parent[li] = k
                total += weights[li]
                li += 1
            else:
                node_parent[ni] = k
                total += node_w[ni]
                ni += 1
        node_w[k] = total
    depth = np.empty(m - 1, np.int64)
    depth[m - 2] = 0
    for k in range(m - 3, -1, -1):
        depth[k] = depth[node_parent[k]] + 1
    out = np.empty(m, np.int64)
    for i in range(m):
        out[i] = depth[leaf_parent[i]] + 1
    return out


@njit(cache=True, nogil=True)
def limit_depths(depths, max_len):
    """Length-limit Huffman depths (one per leaf, sorted by ascending weight) to `max_len`.

    Returns uint8 lengths in the same order, non-increasing, with Kraft sum <= 1 (equal to 1 when the
    input code was complete). Deterministic heuristic in the spirit of zlib's gen_bitlen:
    1. clamp every depth to max_len (this can push the Kraft sum above 1);
    2. while the sum exceeds 1, lengthen one code of the longest length below max_len (the
       cheapest move: it belongs to the least frequent symbols among the shorter codes);
    3. spend any remaining slack by shortening codes, shortest (most frequent) lengths first.
    Lengths are kept as a histogram per length and handed back to leaves in weight order, so more
    frequent symbols never get longer codes. Requires len(depths) <= 2**max_len.
    """
    m = depths.size
    bl = np.zeros(max_len + 1, np.int64)
    for i in range(m):
        d = depths[i]
        if d > max_len:
            d = max_len
        bl[d] += 1
    one = np.int64(1) << max_len
    kraft = 0
    for length in range(1, max_len + 1):
        kraft += bl[length] << (max_len - length)
    while kraft > one:
        length = max_len - 1
        while bl[length] == 0:
            length -= 1
        bl[length] -= 1
        bl[length + 1] += 1
        kraft -= np.int64(1) << (max_len - length - 1)
    for length in range(2, max_len + 1):
        gain = np.int64(1) << (max_len - length)
        while bl[length] > 0 and kraft + gain <= one:
            bl[length] -= 1
            bl[length - 1] += 1
            kraft += gain
    out = np.empty(m, np.uint8)
    i = 0
    for length in range(max_len, 0, -1):  # least frequent leaves first get the longest codes
        for _ in range(bl[length]):
            out[i] = length
            i += 1
    return out


@njit(cache=True, nogil=True)
def package_merge_lengths(weights, max_len):
    """Optimal code lengths of at most `max_len` bits for positive `weights` sorted ascending.

    Package-merge (Larmore & Hirschberg 1990) as a coin collector's problem: the deepest list holds
    the leaves; each shallower list merges the leaves with packages (sums of adjacent pairs) of the
    list below, a leaf before a package of equal weight. Taking the 2m - 2 cheapest items of the
    top list and following the packages down gives each leaf one bit per list it is taken from.
    Memory: one byte per item and list (about 2 * m * max_len bytes). Needs 2 <= m <= 2**max_len.
    Returns uint8 lengths in the same order (non-increasing).
    """
    m = weights.size
    width = 2 * m
    is_package = np.zeros((max_len, width), np.uint8)  # row j: list of depth j + 1
    list_len = np.zeros(max_len, np.int64)
    cur = np.empty(width, np.int64)
    cur[:m] = weights  # deepest list: the leaves
    cur_len = m
    list_len[max_len - 1] = m
    nxt = np.empty(width, np.int64)
    for j in range(max_len - 2, -1, -1):
        npk = cur_len // 2
        li = 0
        pi = 0
        k = 0
        while li < m or pi < npk:
            if pi >= npk or (li < m and weights[li] <= cur[2 * pi] + cur[2 * pi + 1]):
                nxt[k] = weights[li]
                li += 1
            else:
                nxt[k] = cur[2 * pi] + cur[2 * pi + 1]
                is_package[j, k] = 1
                pi += 1
            k += 1
        cur_len = k
        list_len[j] = k
        cur, nxt = nxt, cur
    lengths = np.zeros(m, np.uint8)
    take = 2 * m - 2
    for j in range(max_len):
        if take > list_len[j]:
            take = list_len[j]  # cannot happen for m <= 2**max_len; keeps indexing safe regardless
        packages = 0
        leaves = 0
        for k in range(take):
            if is_package[j, k]:
                packages += 1
            else:
                leaves += 1
        for i in range(leaves):
            lengths[i] += 1
        take = 2 * packages
    return lengths  # leaves are taken cheapest-first, so lengths are non-increasing


@njit(cache=True, nogil=True)
def canonical_codes(lengths):
    """Canonical code word of every symbol (int64; 0 where the length is 0), order (length, index)."""
    max_len = 0
    for i in range(lengths.size):
        if lengths[i] > max_len:
            max_len = lengths[i]
    bl = np.zeros(max_len + 2, np.int64)
    for i in range(lengths.size):
        bl[lengths[i]] += 1
    bl[0] = 0
    next_code = np.zeros(max_len + 2, np.int64)
    code = 0
    for length in range(1, max_len + 1):
        code = (code + bl[length - 1]) << 1
        next_code[length] = code
    codes = np.zeros(lengths.size, np.int64)
    for i in range(lengths.size):
        length = lengths[i]
        if length:
            codes[i] = next_code[length]
            next_code[length] += 1
    return codes


@njit(cache=True, nogil=True)
def kraft_units(lengths, max_len):
    """Kraft sum of `lengths` in units of 2**-max_len, or -1 if a length exceeds max_len."""
    total = 0
    for i in range(lengths.size):
        length = np.int64(lengths[i])
        if length > max_len:
            return -1
        if length:
            total += np.int64(1) << (max_len - length)
    return total


# --- bit I/O -------------------------------------------------------------------------------------

@njit(cache=True, nogil=True)
def payload_bits(symbols, base, lengths):
    """Total code bits for symbols (index = symbol - base); -1 if a symbol has no code or is out of range."""
    n = lengths.size
    total = 0
    for i in range(symbols.size):
        s = symbols[i] - base
        if s < 0 or s >= n or lengths[s] == 0:
            return -1
        total += lengths[s]
    return total


WRITER_STATE = 3  # a bit writer between encode_run calls: pending bits, how many, next byte to write


@njit(cache=True, nogil=True)
def packed_codes(codes, lengths):
    """code << 5 | length of every symbol: one table load per symbol in encode_run."""
    packed = np.empty(codes.size, np.int64)
    for i in range(codes.size):
        packed[i] = (codes[i] << 5) | np.int64(lengths[i])
    return packed


@njit(cache=True, nogil=True)
def encode_run(symbols, base, packed, out, state):
    """Write the code word of every (symbol - base) MSB-first into `out`, continuing the bit writer
    `state` (zeros at the payload's start; updated); caller checked every symbol has a code.
    encode_end writes the last bits."""
    acc = state[0]   # pending bits, right-aligned; fewer than 56 of them
    nacc = state[1]
    pos = state[2]
    for i in range(symbols.size):
        entry = packed[symbols[i] - base]
        length = entry & 31
        acc = (acc << length) | (entry >> 5)
        nacc += length
        if nacc >= 32:
            nacc -= 32
            word = acc >> nacc
            out[pos] = (word >> 24) & 0xFF
            out[pos + 1] = (word >> 16) & 0xFF
            out[pos + 2] = (word >> 8) & 0xFF
            out[pos + 3] = word & 0xFF
            pos += 4
            acc &= (np.int64(1) << nacc) - 1
    state[0] = acc
    state[1] = nacc
    state[2] = pos


@njit(cache=True, nogil=True)
def encode_end(out, state):
    """The pending bits of the writer `state`, zero padded to a whole byte."""
    acc = state[0]
    nacc = state[1]
    pos = state[2]
    while nacc >= 8:
        nacc -= 8
        out[pos] = (acc >> nacc) & 0xFF
        pos += 1
    if nacc > 0:
        out[pos] = (acc << (8 - nacc)) & 0xFF


@njit(cache=True, nogil=True)
def build_decode_tables(values, lengths, primary_bits):
    """Decoder tables for symbols `values` (int64, ascending) with code `lengths` (uint8, all >= 1).

    Returns (prim_val, prim_len, first_code, len_count, len_offset, sorted_vals, max_len):
    - prim_val/prim_len: 2**primary_bits entries indexed by the next primary_bits stream bits; a
      length of 0 means "longer code (or invalid pattern), use the canonical fallback";
    - first_code[l], len_count[l], len_offset[l]: canonical code of the first length-l symbol, how
      many there are, and where they start in sorted_vals (symbols in (length, value) order).
    """
    n = values.size
    max_len = 0
    for i in range(n):
        if lengths[i] > max_len:
            max_len = lengths[i]
    len_count = np.zeros(MAX_CODE_LEN + 2, np.int64)
    for i in range(n):
        len_count[lengths[i]] += 1
    first_code = np.zeros(MAX_CODE_LEN + 2, np.int64)
    len_offset = np.zeros(MAX_CODE_LEN + 2, np.int64)
    code = 0
    offset = 0
    for length in range(1, MAX_CODE_LEN + 1):
        code = (code + len_count[length - 1]) << 1 if length > 1 else 0
        first_code[length] = code
        len_offset[length] = offset
        offset += len_count[length]
    sorted_vals = np.empty(n, np.int64)
    fill = len_offset.copy()
    for i in range(n):
        length = lengths[i]
        sorted_vals[fill[length]] = values[i]
        fill[length] += 1
    size = np.int64(1) << primary_bits
    prim_val = np.zeros(size, np.int64)
    prim_len = np.zeros(size, np.int64)
    for length in range(1, min(max_len, primary_bits) + 1):
        shift = primary_bits - length
        for j in range(len_count[length]):
            start = (first_code[length] + j) << shift
            v = sorted_vals[len_offset[length] + j]
            for e in range(start, start + (np.int64(1) << shift)):
                prim_val[e] = v
                prim_len[e] = length
    return prim_val, prim_len, first_code, len_count, len_offset, sorted_vals, max_len


@njit(cache=True, nogil=True)
def build_multi_table(prim_val, prim_len, primary_bits):
    """Multi-symbol decode table from the single-symbol one (decoding only; no coded byte depends on it).

    For every primary_bits-bit window: the code words that lie wholly inside it, greedily from the
    left, at most MULTI_SYMBOLS of them. multi_val[e * MULTI_SYMBOLS + j] is the j-th value (int32:
    levels lie within +-(2**31 - 1)); multi_len[e] = bits | count << 8, count 0 when the first code
    word is longer than the window (or the window starts with a pattern that is no code word).
    A following code word is recognised from the window shifted left with zeros coming in; it is
    taken only if its length fits in the window's remaining bits, so the zeros never decide it.
    """
    size = np.int64(1) << primary_bits
    mask = size - 1
    multi_val = np.zeros(size * MULTI_SYMBOLS, np.int32)
    multi_len = np.zeros(size, np.int32)
    for e in range(size):
        used = 0
        n = 0
        while n < MULTI_SYMBOLS:
            idx = (e << used) & mask
            length = prim_len[idx]
            if length == 0 or used + length > primary_bits:
                break
            multi_val[e * MULTI_SYMBOLS + n] = prim_val[idx]
            used += length
            n += 1
        multi_len[e] = used | (n << 8)
    return multi_val, multi_len


# The decoder's bit buffer is left-aligned: the next unread bit is bit 63 of an int64 (the sign bit:
# right shifts are arithmetic, hence the masks), `nbits` bits are valid and the rest are zero.

@njit(cache=True, inline="always")
def _top_bits(buf, n):
    return (buf >> (64 - n)) & ((np.int64(1) << n) - 1)


@njit(cache=True, inline="always")
def _one_symbol(buf, primary_bits, prim_val, prim_len, first_code, len_count, len_offset, sorted_vals, max_len):
    """The code word at the top of the bit buffer: (value, length), length 0 when it is no code word."""
    peek = _top_bits(buf, primary_bits)
    length = prim_len[peek]
    if length:
        return prim_val[peek], length
    for length in range(primary_bits + 1, max_len + 1):
        d = _top_bits(buf, length) - first_code[length]
        if d >= 0 and d < len_count[length]:
            return sorted_vals[len_offset[length] + d], length
    return np.int64(0), np.int64(0)


@njit(cache=True, inline="always")
def _refill(data, pos, buf, nbits):
    """Append the next 32 payload bits below the nbits (< 32) valid ones."""
    word = ((np.int64(data[pos]) << 24) | (np.int64(data[pos + 1]) << 16)
            | (np.int64(data[pos + 2]) << 8) | np.int64(data[pos + 3]))
    return buf | (word << (32 - nbits)), nbits + 32, pos + 4


READER_STATE = 3  # a bit reader between decode_run calls: bit buffer, bits in it, next byte to load


@njit(cache=True, nogil=True)
def decode_run(data, n_real, state, primary_bits, prim_val, prim_len, multi_val, multi_len,
               first_code, len_count, len_offset, sorted_vals, max_len, out):
    """Decode out.size symbols into `out`, continuing from the bit reader `state` (zeros at the
    payload's start; updated); returns 0 or a negative error code. decode_end checks the payload's end.

    `data` is the payload followed by at least 8 zero bytes (16 for the fast reader to reach its
    end). The bulk goes through _fast_run: multi-symbol lookups, one lookup emitting every code
    word inside the next primary_bits bits (up to MULTI_SYMBOLS; all slots are written, the unused
    ones are overwritten by the next lookup). What it leaves, the last symbols and those in the
    payload's last 16 bytes, takes the one-symbol path: the bit buffer holds `nbits` unread bits and
    is refilled 32 bits at a time whenever fewer than 32 remain, so a whole code word (<= 24 bits)
    is always present; reading past the real payload is detected at the next refill (the loop is
    bounded by the count in any case). (A tested multi-symbol loop between the two only made the
    kernel longer to compile.)
    """
    status, i, buf, nbits, pos = _fast_run(data, state[0], state[1], state[2], primary_bits, multi_val, multi_len,
                                           first_code, len_count, len_offset, sorted_vals, max_len, out)
    if status < 0:
        return status
    count = out.shape[0]
    limit = n_real + 4
    while i < count:
        if nbits < 32:
            if pos >= limit:
                return ERR_PAYLOAD_OVERRUN
            buf, nbits, pos = _refill(data, pos, buf, nbits)
        value, length = _one_symbol(buf, primary_bits, prim_val, prim_len, first_code, len_count,
                                    len_offset, sorted_vals, max_len)
        if length == 0:
            return ERR_INVALID_CODE
        out[i] = value
        i += 1
        buf <<= length
        nbits -= length
    state[0] = buf
    state[1] = nbits
    state[2] = pos
    return 0


FAST_LOOKUPS = 4  # multi-symbol lookups after each refill of _fast_run (written out 4 times there): 4 windows of <= 14 bits fit in 56


@njit(cache=True, nogil=True, inline="always")
def _be64(data, p):
    """The 8 bytes at data[p:p+8] as a big-endian uint64 (the caller checked the bound)."""
    return ((np.uint64(data[p]) << np.uint64(56)) | (np.uint64(data[p + np.uint64(1)]) << np.uint64(48))
            | (np.uint64(data[p + np.uint64(2)]) << np.uint64(40)) | (np.uint64(data[p + np.uint64(3)]) << np.uint64(32))
            | (np.uint64(data[p + np.uint64(4)]) << np.uint64(24)) | (np.uint64(data[p + np.uint64(5)]) << np.uint64(16))
            | (np.uint64(data[p + np.uint64(6)]) << np.uint64(8)) | np.uint64(data[p + np.uint64(7)]))


@njit(cache=True, nogil=True, boundscheck=False, inline="always")
def _lookup(ub, nb, i, shift, slots, multi_val, multi_len, out):
    """One multi-symbol lookup of _fast_run: all MULTI_SYMBOLS slots written at out[i:], (ub, nb,
    i) advanced by its code words, and its count."""
    peek = ub >> shift
    entry = np.uint64(multi_len[peek])
    slot = peek * slots
    out[i] = multi_val[slot]
    out[i + np.uint64(1)] = multi_val[slot + np.uint64(1)]
    out[i + np.uint64(2)] = multi_val[slot + np.uint64(2)]
    out[i + np.uint64(3)] = multi_val[slot + np.uint64(3)]
    length = entry & np.uint64(255)
    n = entry >> np.uint64(8)
    return ub << length, nb - length, i + n, n


@njit(cache=True, nogil=True, boundscheck=False, inline="always")
def _fast_run(data, buf, nbits, pos, primary_bits, multi_val, multi_len, first_code, len_count, len_offset,
              sorted_vals, max_len, out):
    """decode_run's bulk: (status, symbols decoded into out[:i], buf, nbits, pos) in decode_run's
    reader convention, leaving the last symbols and the last bytes of `data` to decode_run's loops.

    The refill has no branch (F. Giesen, "Reading bits in far too many ways", variant 4): it ORs
    the 8 bytes at pos in below the valid bits and advances pos by the whole bytes that fit, after
    which at least 56 bits are valid: FAST_LOOKUPS window lookups follow without a test. The bits
    below the valid ones are then the stream's next bits rather than zeros; they are cleared on the
    way out. A refill reads data[pos:pos+8] with pos <= data.size - 16 (two refills per round at
    most, 7 bytes apart), so reads stay inside `data` whatever the stream holds; a corrupt stream
    is caught by decode_run's checks and decode_end. 1.5x the symbols per second of the tested
    refill on Laplace levels of b = 1..16."""
    i = np.uint64(0)
    if primary_bits * FAST_LOOKUPS > 56 or data.size < 16:
        return np.int64(0), np.int64(0), buf, nbits, pos
    ub = np.uint64(buf)
    nb = np.uint64(nbits)
    p = np.uint64(pos)
    count = np.uint64(out.shape[0])
    shift = np.uint64(64 - primary_bits)
    limit = np.uint64(data.size - 16)
    slots = np.uint64(MULTI_SYMBOLS)
    while i + np.uint64(FAST_LOOKUPS * MULTI_SYMBOLS) <= count and p <= limit:
        ub |= _be64(data, p) >> nb
        p += (np.uint64(63) - nb) >> np.uint64(3)
        nb |= np.uint64(56)
        # Straight-line lookups (FAST_LOOKUPS = 4). A window that starts with a code word longer
        # than itself has count 0 and length 0: it takes nothing, and neither do the lookups after
        # it (its junk values are overwritten), so only the last count needs testing.
        ub, nb, i, n = _lookup(ub, nb, i, shift, slots, multi_val, multi_len, out)
        ub, nb, i, n = _lookup(ub, nb, i, shift, slots, multi_val, multi_len, out)
        ub, nb, i, n = _lookup(ub, nb, i, shift, slots, multi_val, multi_len, out)
        ub, nb, i, n = _lookup(ub, nb, i, shift, slots, multi_val, multi_len, out)
        if n == np.uint64(0):  # a code word longer than the window (rare): canonical search
            ub |= _be64(data, p) >> nb  # >= 56 bits again, for a code word of up to 24
            p += (np.uint64(63) - nb) >> np.uint64(3)
            nb |= np.uint64(56)
            length = np.uint64(0)
            for ln in range(primary_bits + 1, max_len + 1):
                d = np.int64(ub >> np.uint64(64 - ln)) - first_code[ln]
                if d >= 0 and d < len_count[ln]:
                    out[i] = sorted_vals[len_offset[ln] + d]
                    length = np.uint64(ln)
                    break
            if length == np.uint64(0):
                return ERR_INVALID_CODE, np.int64(0), buf, nbits, pos
            i += np.uint64(1)
            ub <<= length
            nb -= length
    if nb == np.uint64(0):
        ub = np.uint64(0)
    else:
        ub &= ~((np.uint64(1) << (np.uint64(64) - nb)) - np.uint64(1))
    return np.int64(0), np.int64(i), np.int64(ub), np.int64(nb), np.int64(p)


@njit(cache=True, nogil=True)
def decode_end(n_real, state):
    """After the last decode_run: bits consumed, or a negative error code when the payload does not
    end with the last code word and zero padding."""
    buf = state[0]
    nbits = state[1]
    consumed = state[2] * 8 - nbits
    if consumed > n_real * 8:
        return ERR_PAYLOAD_OVERRUN
    if (consumed + 7) // 8 != n_real:
        return ERR_PAYLOAD_TRAILING
    if buf != 0:
        return ERR_PADDING  # padding bits (and the zero bytes behind the payload) must be zero
    return consumed


# --- compact code tables (params) ----------------------------------------------------------------

@njit(cache=True, nogil=True)
def _put_length_runs(out, pos, lengths):
    """Run-length tokens uvarint((run - 1) << 5 | length) covering `lengths` (maximal runs)."""
    i = 0
    n = lengths.size
    while i < n:
        j = i + 1
        while j < n and lengths[j] == lengths[i]:
            j += 1
        pos = put_uvarint(out, pos, ((j - i - 1) << 5) | np.int64(lengths[i]))
        i = j
    return pos


@njit(cache=True, nogil=True)
def write_dense_table(values, lengths):
    """Params of kind DENSE: kind, svarint(min), uvarint(max - min + 1), runs of lengths over the range
    (0 for absent values). `values` ascending, `lengths` >= 1. Works without materialising the range."""
    n = values.size
    out = np.zeros(21 + 20 * n, np.uint8)
    out[0] = KIND_DENSE
    pos = put_uvarint(out, AFTER_KIND, zigzag(values[0]))
    pos = put_uvarint(out, pos, values[n - 1] - values[0] + 1)
    i = 0
    while i < n:
        j = i + 1
        while j < n and lengths[j] == lengths[i] and values[j] == values[j - 1] + 1:
            j += 1
        pos = put_uvarint(out, pos, ((j - i - 1) << 5) | np.int64(lengths[i]))
        if j < n:
            gap = values[j] - values[j - 1] - 1
            if gap > 0:
                pos = put_uvarint(out, pos, (gap - 1) << 5)
        i = j
    return out[:pos]


@njit(cache=True, nogil=True)
def write_sparse_table(values, lengths):
    """Params of kind SPARSE: kind, uvarint(m), svarint(first value), m-1 uvarint gaps
    (value[i] - value[i-1] - 1), then runs of the m lengths."""
    n = values.size
    out = np.zeros(21 + 20 * n, np.uint8)
    out[0] = KIND_SPARSE
    pos = put_uvarint(out, AFTER_KIND, n)
    pos = put_uvarint(out, pos, zigzag(values[0]))
    for i in range(1, n):
        pos = put_uvarint(out, pos, values[i] - values[i - 1] - 1)
    pos = _put_length_runs(out, pos, lengths)
    return out[:pos]


@njit(cache=True, nogil=True)
def parse_table(params, max_symbols, max_abs, values_out, lengths_out, fill):
    """Parse DENSE or SPARSE params; returns the number of symbols with a code, or an error code.

    Called twice: first with fill=False to validate and count (nothing is allocated, so a hostile
    table cannot ask for a huge allocation), then with arrays of that size and fill=True.
    At most `max_symbols` coded symbols are accepted (the element count: the encoder only gives
    codes to values present in the tensor) and every symbol must lie within ±max_abs.
    """
    if params.size < 1:
        return ERR_TRUNCATED_PARAMS
    kind = params[0]
    one = np.int64(1) << MAX_CODE_LEN
    kraft = 0
    used = 0
    if kind == KIND_DENSE:
        base, pos = get_svarint(params, AFTER_KIND)
        if pos < 0:
            return pos
        n, pos = get_uvarint(params, pos)
        if pos < 0:
            return pos
        if base < -max_abs or n < 2 or n - 1 > max_abs - base:
            return ERR_RANGE
        k = 0  # alphabet position
        while k < n:
            t, pos = get_uvarint(params, pos)
            if pos < 0:
                return pos
            length = t & 31
            run = (t >> 5) + 1
            if length > MAX_CODE_LEN:
                return ERR_BAD_LENGTH
            if run > n - k:
                return ERR_RUN_OVERFLOW
            if length:
                if run > max_symbols - used:
                    return ERR_TOO_MANY_SYMBOLS
                kraft += run << (MAX_CODE_LEN - length)
                if kraft > one:
                    return ERR_KRAFT
                if fill:
                    for r in range(run):
                        values_out[used + r] = base + k + r
                        lengths_out[used + r] = length
                used += run
            k += run
    elif kind == KIND_SPARSE:
        m, pos = get_uvarint(params, AFTER_KIND)
        if pos < 0:
            return pos
        if m < 2:
            return ERR_TOO_FEW_SYMBOLS
        if m > max_symbols:
            return ERR_TOO_MANY_SYMBOLS
        if m > params.size:  # every symbol needs at least one gap byte
            return ERR_TRUNCATED_PARAMS
        v, pos = get_svarint(params, pos)
        if pos < 0:
            return pos
        if v < -max_abs or v > max_abs:
            return ERR_RANGE
        if fill:
            values_out[0] = v
        for i in range(1, m):
            gap, pos = get_uvarint(params, pos)
            if pos < 0:
                return pos
            if gap >= max_abs - v:  # next value v + gap + 1 must stay <= max_abs
                return ERR_RANGE
            v += gap + 1
            if fill:
                values_out[i] = v
        k = 0
        while k < m:
            t, pos = get_uvarint(params, pos)
            if pos < 0:
                return pos
            length = t & 31
            run = (t >> 5) + 1
            if length == 0 or length > MAX_CODE_LEN:
                return ERR_BAD_LENGTH
            if run > m - k:
                return ERR_RUN_OVERFLOW
            kraft += run << (MAX_CODE_LEN - length)
            if kraft > one:
                return ERR_KRAFT
            if fill:
                for r in range(run):
                    lengths_out[k + r] = length
            k += run
        used = m
    else:
        return ERR_BAD_KIND
    if pos != params.size:
        return ERR_TRAILING_PARAMS
    if used < 2:
        return ERR_TOO_FEW_SYMBOLS
    return used
