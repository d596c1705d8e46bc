"""`huffman` backend: a static canonical Huffman code per tensor, length-limited to 24 bits.

Byte layout (version 1; a second implementation needs only this docstring and the definition of
uvarint/svarint in `cdlcodec.backends.varint`)
--------------------------------------------------------------------------------------------------
params start with one kind byte:
  0 EMPTY   params = 00.                         count must be 0, payload empty.
  1 SINGLE  params = 01 || svarint(v).           every level is v; payload empty (0 bits per level).
  2 DENSE   params = 02 || svarint(min) || uvarint(n = max - min + 1) || length runs over the n
            values min..max, a length of 0 meaning "value absent".
  3 SPARSE  params = 03 || uvarint(m) || svarint(v_0) || uvarint(v_i - v_(i-1) - 1) for i = 1..m-1
            || length runs over the m values (all lengths >= 1).
  length runs: a sequence of uvarint tokens t = (run - 1) * 32 + length, each standing for `run`
  consecutive code lengths equal to `length` (0..24); the runs cover the alphabet exactly.
  No trailing bytes. Symbols lie within ±(2**31 - 1). DENSE/SPARSE tables have at least two coded
  symbols, at most `count` of them, and code lengths 1..24 with Kraft sum  sum 2**-l <= 1.
  The encoder writes whichever of DENSE and SPARSE is shorter (DENSE on a tie).

code words: canonical Huffman. Coded symbols are ordered by (length, value); the first gets the
  all-zero code of its length and each next one the previous code + 1, shifted left by the length
  difference (DEFLATE's rule, RFC 1951 section 3.2.2).
payload: the code words of the levels in order, most significant bit first (stream bit j is bit
  7 - (j mod 8) of byte floor(j / 8)); the last byte is padded with zero bits. The payload is exactly
  ceil(total code bits / 8) bytes long.

Code lengths come from a Huffman tree on the tensor's histogram (two-queue construction, ties
broken by value, see `huffman_kernels.huffman_depths`), then limited to 24 bits with a deterministic
Kraft-sum repair (`huffman_kernels.limit_depths`). An `EncodeHint.pmf` (e.g. a PMF learned during
CDL training) is an optional second source of lengths, used only when it gives fewer total bits.

Reusable helpers on a dense alphabet 0..n-1: `code_lengths`, `canonical_codes`, `encode_symbols`,
`decode_symbols`, `coded_bits`.
"""
from __future__ import annotations

import numpy as np

from ..errors import CdlDecodeError, CdlInputError
from . import huffman_kernels as hk
from .base import MAX_ABS_LEVEL, EncodeHint, check_count, gathered
from .stats import DENSE_RANGE_LIMIT, as_coded_levels, dense_counts, int64_blocks
from .varint import read_svarint, write_svarint

MAX_CODE_LEN = hk.MAX_CODE_LEN
PMF_SCALE_BITS = 20
PACKAGE_MERGE_MAX_BYTES = 1 << 26  # learned probabilities are integerised as max(1, round(p * 2**20))

_EMPTY_PARAMS = bytes([hk.KIND_EMPTY])


# --- helpers on a dense alphabet -------------------------------------------------------------------

def _check_max_len(max_len: int) -> int:
    max_len = int(max_len)
    if not 1 <= max_len <= MAX_CODE_LEN:
        raise CdlInputError(f"max_len must be within 1..{MAX_CODE_LEN}, got {max_len}")
    return max_len


def _lengths_of_positive(weights: np.ndarray, max_len: int) -> np.ndarray:
    """uint8 code lengths for strictly positive int64 weights (at least two of them).

    Huffman lengths when they fit in max_len bits; otherwise the optimal limited lengths from
    package-merge, or (for alphabets so large that package-merge would need more than
    PACKAGE_MERGE_MAX_BYTES of work memory) the deterministic Kraft-repair heuristic.
    """
    order = np.argsort(weights, kind="stable")  # ties: lower symbol index first, fixed
    sorted_w = np.ascontiguousarray(weights[order])
    depths = hk.huffman_depths(sorted_w)
    if int(depths.max()) > max_len and 2 * sorted_w.size * max_len <= PACKAGE_MERGE_MAX_BYTES:
        limited = hk.package_merge_lengths(sorted_w, np.int64(max_len))
    else:  # within the limit this only hands the same lengths back in weight order
        limited = hk.limit_depths(depths, np.int64(max_len))
    lengths = np.empty(weights.size, np.uint8)
    lengths[order] = limited
    return lengths


def code_lengths(counts, max_len: int = MAX_CODE_LEN) -> np.ndarray:
    """Length-limited Huffman code lengths (uint8) for symbol counts over the alphabet 0..n-1.

    Symbols with count 0 get length 0 (no code); a single used symbol gets length 1. The result is
    deterministic (ties broken by symbol index), never longer than `max_len` (1..24) and satisfies
    the Kraft inequality; CdlInputError if more than 2**max_len symbols are used or counts are
    negative.
    """
    max_len = _check_max_len(max_len)
    c = np.ascontiguousarray(np.asarray(counts), dtype=np.int64).ravel()
    if c.size and int(c.min()) < 0:
        raise CdlInputError("symbol counts must be non-negative")
    used = np.flatnonzero(c)
    out = np.zeros(c.size, np.uint8)
    if used.size == 0:
        return out
    if used.size == 1:
        out[used[0]] = 1
        return out
    if used.size > (1 << max_len):
        raise CdlInputError(f"{used.size} symbols cannot get prefix codes of at most {max_len} bits")
    out[used] = _lengths_of_positive(c[used], max_len)
    return out


def _as_lengths(lengths) -> np.ndarray:
    ln = np.asarray(lengths)
    if ln.ndim != 1 or ln.dtype.kind not in "iu":
        raise CdlInputError("code lengths must be a 1-D integer array")
    if ln.size and (int(ln.min()) < 0 or int(ln.max()) > MAX_CODE_LEN):
        raise CdlInputError(f"code lengths must lie within 0..{MAX_CODE_LEN}")
    ln = np.ascontiguousarray(ln, dtype=np.uint8)
    if hk.kraft_units(ln, np.int64(MAX_CODE_LEN)) > (1 << MAX_CODE_LEN):
        raise CdlInputError("code lengths violate the Kraft inequality (not a prefix code)")
    return ln


def canonical_codes(lengths) -> np.ndarray:
    """Canonical code word (int64, read as `length` bits MSB-first) of every symbol; 0 where length is 0."""
    return hk.canonical_codes(_as_lengths(lengths))


def coded_bits(counts, lengths) -> int:
    """Payload bits that symbols with these counts take under these code lengths."""
    return int(np.dot(np.asarray(counts, np.int64), np.asarray(lengths, np.int64)))


def encode_symbols(symbols, lengths) -> bytes:
    """Canonical-Huffman code `symbols` (integers in 0..n-1, each with a non-zero length) to bytes.

    The layout is the backend's payload layout (MSB-first, zero padded to a whole byte).
    """
    ln = _as_lengths(lengths)
    sym = np.ascontiguousarray(np.asarray(symbols), dtype=np.int64).ravel()
    nbits = hk.payload_bits(sym, np.int64(0), ln)
    if nbits < 0:
        raise CdlInputError("a symbol is outside the alphabet or has no code (length 0)")
    return _encoded(sym, 0, hk.canonical_codes(ln), ln, (nbits + 7) // 8)


def _encoded(symbols: np.ndarray, base: int, codes: np.ndarray, lengths: np.ndarray, nbytes: int) -> bytes:
    """The code words of every (symbol - base), MSB-first, zero padded: `nbytes` bytes. Written block
    by block from int64 copies of the symbols, which may be narrow (no int64 copy of a whole tensor)."""
    out = np.zeros(nbytes, np.uint8)
    packed = hk.packed_codes(codes, lengths)
    state = np.zeros(hk.WRITER_STATE, np.int64)
    for _, block in int64_blocks(symbols):
        hk.encode_run(block, np.int64(base), packed, out, state)
    hk.encode_end(out, state)
    return out.tobytes()


def _decoded_blocks(payload, values, lengths, count: int, what: str, block: int | None):
    """The `count` symbols of a canonical code over `values` (ascending) with `lengths` (>= 1), in
    blocks of `block` (None: one array)."""
    n_real = len(payload)
    if count > 8 * n_real:  # every code word is at least one bit: reject before allocating
        raise CdlDecodeError(f"{what}: payload of {n_real} bytes cannot hold {count} levels")
    data = np.empty(n_real + 16, np.uint8)  # 16 zeros after the payload: decode_run's fast reader reads ahead
    data[:n_real] = np.frombuffer(payload, np.uint8)
    data[n_real:] = 0
    # int16 tables and a wider window where the values allow (huffman_kernels.NARROW_PRIMARY_BITS)
    narrow = -(1 << 15) <= int(values.min()) and int(values.max()) < 1 << 15
    primary = np.int64(hk.NARROW_PRIMARY_BITS if narrow else hk.PRIMARY_BITS)
    prim_val, prim_len, first_code, len_count, len_offset, sorted_vals, max_len = hk.build_decode_tables(
        values, lengths, primary)
    multi_val, multi_len = hk.build_multi_table(prim_val, prim_len, primary)
    if narrow:
        multi_val, multi_len = multi_val.astype(np.int16), multi_len.astype(np.uint16)
    state = np.zeros(hk.READER_STATE, np.int64)
    block = count if block is None else max(1, block)
    for start in range(0, count, block):
        out = np.empty(min(block, count - start), np.int64)
        status = hk.decode_run(data, np.int64(n_real), state, primary, prim_val, prim_len,
                               multi_val, multi_len, first_code, len_count, len_offset, sorted_vals,
                               np.int64(max_len), out)
        if status == 0 and start + out.size == count:
            status = hk.decode_end(np.int64(n_real), state)
        if status < 0:
            raise CdlDecodeError(f"{what}: {hk.ERROR_MESSAGES[status]}")
        yield out


def decode_symbols(payload: bytes, lengths, count: int) -> np.ndarray:
    """Inverse of `encode_symbols`: exactly `count` symbols (int64) or CdlDecodeError."""
    try:
        ln = _as_lengths(lengths)
    except CdlInputError as exc:
        raise CdlDecodeError(str(exc)) from exc
    count = int(count)
    if count < 0:
        raise CdlDecodeError(f"negative symbol count {count}")
    used = np.flatnonzero(ln)
    if count == 0:
        if len(payload):
            raise CdlDecodeError("payload has trailing bytes after the last code word")
        return np.zeros(0, np.int64)
    if used.size == 0:
        raise CdlDecodeError("no symbol has a code")
    return gathered(_decoded_blocks(bytes(payload), used.astype(np.int64), np.ascontiguousarray(ln[used]), count,
                                    "huffman", None), count)


# --- the backend ---------------------------------------------------------------------------------

def _pmf_weights(values: np.ndarray, hint: EncodeHint) -> np.ndarray:
    """Integer weights max(1, round(p * 2**20)) of the coded values under hint.pmf (1 if absent)."""
    pmf_levels, pmf_probs = hint.pmf
    pl = np.asarray(pmf_levels).ravel()
    pp = np.asarray(pmf_probs, dtype=np.float64).ravel()
    if pl.shape != pp.shape:
        raise CdlInputError("hint.pmf: levels and probabilities differ in length")
    if pl.size and pl.dtype.kind not in "iu":
        if not np.all(np.isfinite(pl)) or np.any(pl != np.round(pl)):
            raise CdlInputError("hint.pmf: levels must be integers")
    if not np.all(np.isfinite(pp)) or np.any(pp < 0):
        raise CdlInputError("hint.pmf: probabilities must be finite and non-negative")
    pl = pl.astype(np.int64)
    total = pp.sum()
    if total > 0:
        pp = pp / total
    weights = np.ones(values.size, np.int64)
    if pl.size:
        order = np.argsort(pl, kind="stable")
        pl, pp = pl[order], pp[order]
        pos = np.minimum(np.searchsorted(pl, values), pl.size - 1)
        hit = pl[pos] == values
        scaled = np.maximum(1.0, np.round(pp[pos] * float(1 << PMF_SCALE_BITS)))
        weights[hit] = scaled[hit].astype(np.int64)
    return weights


class _Plan:
    """Everything encode and estimate_bits share: the alphabet, its lengths and the params."""

    __slots__ = ("arr", "kind", "values", "lengths", "params", "payload_bits", "dense_base", "index")

    def __init__(self, levels, hint: EncodeHint | None):
        arr = as_coded_levels(levels)
        self.arr = arr
        self.payload_bits = 0
        self.index = None
        if arr.size == 0:
            self.kind, self.params = hk.KIND_EMPTY, _EMPTY_PARAMS
            return
        lo, hi = int(arr.min()), int(arr.max())
        if lo == hi:
            self.kind, self.params = hk.KIND_SINGLE, bytes([hk.KIND_SINGLE]) + write_svarint(lo)
            return
        span = hi - lo + 1
        if span <= max(DENSE_RANGE_LIMIT, 2 * arr.size):
            full = dense_counts(arr, lo, span)
            present = np.flatnonzero(full)
            values = present.astype(np.int64) + lo
            counts = full[present].astype(np.int64)
            self.dense_base = lo  # encode indexes a full-range table with level - lo
        else:
            values, inverse, counts = np.unique(arr, return_inverse=True, return_counts=True)
            values, counts = values.astype(np.int64), counts.astype(np.int64)
            self.index = np.ascontiguousarray(inverse.ravel(), dtype=np.int64)
            self.dense_base = None
        if values.size > (1 << MAX_CODE_LEN):
            self.kind, self.params = None, None  # not codable: encode raises, estimate_bits says inf
            self.values = values
            return
        lengths = _lengths_of_positive(counts, MAX_CODE_LEN)
        params = self._table(values, lengths)
        bits = coded_bits(counts, lengths)
        if hint is not None and hint.pmf is not None:
            alt_lengths = _lengths_of_positive(_pmf_weights(values, hint), MAX_CODE_LEN)
            alt_params = self._table(values, alt_lengths)
            alt_bits = coded_bits(counts, alt_lengths)
            if 8 * len(alt_params) + (alt_bits + 7) // 8 * 8 < 8 * len(params) + (bits + 7) // 8 * 8:
                lengths, params, bits = alt_lengths, alt_params, alt_bits
        self.kind = params[0]
        self.values, self.lengths, self.params, self.payload_bits = values, lengths, params, bits

    @staticmethod
    def _table(values, lengths) -> bytes:
        dense = hk.write_dense_table(values, lengths)
        sparse = hk.write_sparse_table(values, lengths)
        return (sparse if sparse.size < dense.size else dense).tobytes()

    def total_bits(self) -> float:
        if self.params is None:
            return float("inf")
        return float(8 * len(self.params) + 8 * ((self.payload_bits + 7) // 8))

    def payload(self) -> bytes:
        if self.params is None:
            raise CdlInputError(
                f"huffman: {self.values.size} distinct levels exceed the {1 << MAX_CODE_LEN} codes of at most "
                f"{MAX_CODE_LEN} bits; use the raw backend"
            )
        if self.kind in (hk.KIND_EMPTY, hk.KIND_SINGLE):
            return b""
        nbytes = np.int64((self.payload_bits + 7) // 8)
        codes = hk.canonical_codes(self.lengths)
        if self.dense_base is not None:
            lo = self.dense_base
            span = int(self.values[-1]) - lo + 1
            full_codes = np.zeros(span, np.int64)
            full_lengths = np.zeros(span, np.uint8)
            full_codes[self.values - lo] = codes
            full_lengths[self.values - lo] = self.lengths
            return _encoded(self.arr, lo, full_codes, full_lengths, nbytes)
        return _encoded(self.index, 0, codes, self.lengths, nbytes)


class HuffmanBackend:
    """Static canonical Huffman per tensor (see module docstring for the byte layout)."""

    name = "huffman"
    narrow_levels = True  # encode takes int8/16/32 levels as they are (stats.as_coded_levels)

    def encode(self, levels, hint: EncodeHint | None = None) -> tuple[bytes, bytes]:
        plan = _Plan(levels, hint)
        return plan.payload(), plan.params

    def estimate_bits(self, levels, hint: EncodeHint | None = None) -> float:
        """Exact size in bits of what `encode` returns (payload rounded to bytes + params); inf for a
        tensor with more than 2**24 distinct levels, which this backend cannot code."""
        return _Plan(levels, hint).total_bits()

    def max_count(self, payload_len: int, params: bytes) -> int | None:
        """At least one bit per level; a single-symbol table is a constant tensor (no payload, no bound)."""
        if not params:
            raise CdlDecodeError("huffman: empty backend parameters")
        if params[0] == hk.KIND_EMPTY:
            return 0
        if params[0] == hk.KIND_SINGLE:
            return None if payload_len == 0 else 0
        return 8 * payload_len

    def decode(self, payload: bytes, params: bytes, count: int, shape=None) -> np.ndarray:
        return gathered(self.decode_blocks(payload, params, count, shape), int(count))

    def decode_blocks(self, payload: bytes, params: bytes, count: int, shape=None, block: int | None = None):
        params = bytes(params)
        payload = bytes(payload)
        count = int(count)
        if count < 0:
            raise CdlDecodeError(f"huffman: negative element count {count}")
        if not params:
            raise CdlDecodeError("huffman: empty backend parameters")
        kind = params[0]
        if kind not in (hk.KIND_EMPTY, hk.KIND_SINGLE):
            # before the tables, which may hold `count` symbols
            check_count(self.name, len(payload), count, self.max_count(len(payload), params))
        if kind == hk.KIND_EMPTY:
            if len(params) != 1:
                raise CdlDecodeError("huffman: trailing bytes after the code table")
            if count != 0 or payload:
                raise CdlDecodeError(f"huffman: empty code table but {count} levels / {len(payload)} payload bytes")
            return
        if count == 0:
            raise CdlDecodeError("huffman: a non-empty code table for zero levels")
        if kind == hk.KIND_SINGLE:
            value, end = read_svarint(params, 1)
            if end != len(params):
                raise CdlDecodeError("huffman: trailing bytes after the code table")
            if abs(value) > MAX_ABS_LEVEL:
                raise CdlDecodeError(f"huffman: level {value} outside ±{MAX_ABS_LEVEL}")
            if payload:
                raise CdlDecodeError("huffman: a single-symbol table takes no payload bytes")
            block = count if block is None else max(1, block)
            for start in range(0, count, block):
                yield np.full(min(block, count - start), value, dtype=np.int64)
            return
        table = np.frombuffer(params, np.uint8)
        empty_v, empty_l = np.zeros(0, np.int64), np.zeros(0, np.uint8)
        used = hk.parse_table(table, np.int64(count), np.int64(MAX_ABS_LEVEL), empty_v, empty_l, False)
        if used < 0:
            raise CdlDecodeError(f"huffman: {hk.ERROR_MESSAGES.get(used, 'invalid code table')}")
        values = np.empty(used, np.int64)
        lengths = np.empty(used, np.uint8)
        hk.parse_table(table, np.int64(count), np.int64(MAX_ABS_LEVEL), values, lengths, True)
        yield from _decoded_blocks(payload, values, lengths, count, "huffman", block)


__all__ = [
    "HuffmanBackend",
    "MAX_CODE_LEN",
    "code_lengths",
    "canonical_codes",
    "coded_bits",
    "encode_symbols",
    "decode_symbols",
]
