"""`cabac` backend: context-adaptive binary arithmetic coding of integer levels (DeepCABAC, Sec. III-B).

The coder itself lives in `cabac_coder` (range coder, probability estimators) and
`cabac_binarization` (bins, contexts, chunk kernels, rate model for RD quantization); this module
chooses the stream parameters and reads/writes them.

Stream = payload + params. The payload is the concatenation of independently decodable chunks
(contexts reset at every chunk start), decoded in parallel. The params, all integers:

    u8      format version (1)
    u8      n_gt            number of greater-than flags (0 .. 32)
    u8      mode            context design (0 prev, 1 prev2, 2 prev2+row)
    u8      rate_idx        index into cabac_coder.RATE_PAIRS (estimator shifts)
    varint  chunk_size      levels per chunk (>= 1)
    varint  row_len         row length for the previous-row context (0 = none)
    varint  n_chunks        must equal ceil(count / chunk_size)
    varint  length of each chunk in bytes; they must add up to len(payload)

Decoding depends on nothing but payload, params and count (a `shape` passed to decode is not
needed: the row length travels in the params).
"""
from __future__ import annotations

from typing import NamedTuple

import numpy as np

from ..errors import CdlDecodeError, CdlInputError
from .base import MAX_ABS_LEVEL, EncodeHint, check_count, gathered
from .stats import COUNT_BLOCK, as_coded_levels, as_levels, int64_blocks
from .varint import read_uvarint, write_uvarint  # the same LEB128 integers as the raw and huffman params
from .cabac_binarization import (
    MAX_GT, MODE_PREV, MODE_PREV2, MODE_PREV2_ROW, chunk_decoders, cost_chunks, encode_chunks,
)
from .cabac_coder import COST_FRAC_BITS, ERROR_TEXT, MAX_BINS_PER_BIT, RATE_PAIRS

FORMAT_VERSION = 1

# Defaults chosen by measurement (benchmarks/bench_cabac.py, benchmarks/results/cabac.md).
DEFAULT_N_GT = 10
DEFAULT_MODE = None            # auto: prev, or prev2+row when the sample says it is smaller
DEFAULT_CHUNK_SIZE = 1 << 16
RATE_SAMPLE = 1 << 16          # levels used to pick the estimator rates
PARALLEL_MIN_LEVELS = 1 << 17   # below this, starting threads costs more than it saves
FLUSH_BITS_ESTIMATE = 12       # average termination bytes per chunk, for estimate_bits
PARALLEL_BATCH = 256           # chunks per parallel kernel call: its per-chunk state stays small
PARALLEL_MIN_CHUNKS = 32       # chunks per block of decode_blocks when decoding on several cores
# A chunk of L bytes codes at most 8 * (L + TERMINATION_SLACK) bits of bins: the encoder strips the
# zero bytes that end its final value (at most 4, more only when the last bytes of the stream were
# zero by chance) and the decoder reads zeros past the end (max_chunk_levels).
TERMINATION_SLACK = 8
DECODE_PADDING = 8             # zero bytes after the payload in the decoder's copy (at least 1)


class _Reader:
    def __init__(self, data: bytes):
        self.data = data
        self.pos = 0

    def u8(self, what: str) -> int:
        if self.pos >= len(self.data):
            raise CdlDecodeError(f"cabac params end before {what}")
        self.pos += 1
        return self.data[self.pos - 1]

    def varint(self, what: str, limit: int) -> int:
        try:
            value, self.pos = read_uvarint(self.data, self.pos)
        except CdlDecodeError as exc:
            raise CdlDecodeError(f"cabac params: {what}: {exc}") from None
        if value > limit:
            raise CdlDecodeError(f"cabac params: {what} {value} exceeds {limit}")
        return value


def max_chunk_levels(length):
    """The most levels a chunk of `length` bytes (an int or an int64 array) can hold: every level codes at least one bin, and a
    bin costs at least 1 / MAX_BINS_PER_BIT bits (cabac_coder). A constant tensor of 2**27 zeros
    honestly takes 742 bytes in one chunk, so this is loose only by the termination slack."""
    return MAX_BINS_PER_BIT * 8 * (length + TERMINATION_SLACK)


class _Stream(NamedTuple):
    n_gt: int
    mode: int
    rate_idx: int
    chunk_size: int
    row_len: int
    offsets: np.ndarray  # n_chunks + 1 byte offsets into the payload


def _parse_params(params: bytes, payload_len: int) -> _Stream:
    """The stream parameters (see the module docstring); CdlDecodeError for malformed ones."""
    r = _Reader(bytes(params))
    version = r.u8("format version")
    if version != FORMAT_VERSION:
        raise CdlDecodeError(f"cabac stream version {version} is not supported (expected {FORMAT_VERSION})")
    n_gt = r.u8("n_gt")
    mode = r.u8("mode")
    rate_idx = r.u8("rate index")
    if n_gt > MAX_GT or mode > MODE_PREV2_ROW or rate_idx >= len(RATE_PAIRS):
        raise CdlDecodeError("cabac params hold an unknown n_gt, context mode or rate index")
    chunk_size = r.varint("chunk size", MAX_ABS_LEVEL)
    row_len = r.varint("row length", MAX_ABS_LEVEL)
    n_chunks = r.varint("chunk count", len(params))
    if chunk_size < 1:
        raise CdlDecodeError("cabac chunk size is 0")
    offsets = np.zeros(n_chunks + 1, dtype=np.int64)
    end = 0
    for c in range(n_chunks):
        end += r.varint("chunk length", payload_len)
        if end > payload_len:
            raise CdlDecodeError(f"cabac chunks cover more than the {payload_len} payload bytes")
        offsets[c + 1] = end
    if r.pos != len(params):
        raise CdlDecodeError("cabac params have trailing bytes")
    if end != payload_len:
        raise CdlDecodeError(f"cabac chunks cover {end} bytes, payload has {payload_len}")
    return _Stream(n_gt, mode, rate_idx, chunk_size, row_len, offsets)


def _max_levels(stream: _Stream) -> int:
    """Backend.max_count: the chunk count times the chunk size, and no more than the chunks' bytes hold."""
    lengths = np.diff(stream.offsets)
    return min(lengths.size * stream.chunk_size, int(max_chunk_levels(lengths).sum()))


def _row_len(shape, count: int) -> int:
    """Row length of the matrix form (rows = first axis), or 0 when there is no previous row."""
    if not shape or len(shape) < 2:
        return 0
    row = int(np.prod(shape[1:], dtype=np.int64))
    if row <= 0 or row >= count:
        return 0
    return row


class CabacBackend:
    """Context-adaptive binary arithmetic coder (see module docstring for the stream layout).

    n_gt, mode, rate_idx, chunk_size: None = default (rate_idx None = picked per tensor by the
    estimated cost on its first levels). parallel: decode chunks on every core.
    """

    name = "cabac"
    narrow_levels = True  # encode takes int8/16/32 levels as they are (stats.as_coded_levels)

    def __init__(self, n_gt: int | None = None, mode: int | None = None, rate_idx: int | None = None,
                 chunk_size: int | None = None, parallel: bool = True):
        self.n_gt = DEFAULT_N_GT if n_gt is None else int(n_gt)
        self.mode = DEFAULT_MODE if mode is None else int(mode)  # None = chosen per tensor
        self.rate_idx = rate_idx
        self.chunk_size = DEFAULT_CHUNK_SIZE if chunk_size is None else int(chunk_size)
        self.parallel = parallel
        if not 0 <= self.n_gt <= MAX_GT:
            raise CdlInputError(f"cabac n_gt must be in 0..{MAX_GT}")
        if self.mode not in (None, MODE_PREV, MODE_PREV2, MODE_PREV2_ROW):
            raise CdlInputError("cabac mode must be 0 (prev), 1 (prev2) or 2 (prev2+row)")
        if rate_idx is not None and not 0 <= rate_idx < len(RATE_PAIRS):
            raise CdlInputError(f"cabac rate_idx must be in 0..{len(RATE_PAIRS) - 1}")
        if not 1 <= self.chunk_size <= MAX_ABS_LEVEL:
            raise CdlInputError("cabac chunk_size must be a positive int32")

    # --- parameter choice ---------------------------------------------------------------------
    def _settings(self, levels: np.ndarray, hint: EncodeHint | None):
        """(mode, row_len, rate_idx) the encoder uses for these levels.

        Unset choices are made by the estimated cost (cost_chunks) of the first RATE_SAMPLE levels:
        first the estimator rates under the baseline context design, then the design itself
        (baseline, or two previous levels + previous row when the tensor has rows)."""
        count, levels = levels.size, np.asarray(levels[:RATE_SAMPLE], dtype=np.int64)  # all the costs look at
        row_len = _row_len(hint.shape if hint is not None else None, count)
        if row_len >= self.chunk_size:
            row_len = 0
        mode = self.mode
        if mode == MODE_PREV2_ROW and row_len == 0:
            mode = MODE_PREV2
        probe_mode = MODE_PREV if mode is None else mode
        probe_row = row_len if probe_mode == MODE_PREV2_ROW else 0
        rate_idx = self.rate_idx
        if rate_idx is None:
            rate_idx = 0
            if count:
                costs = [self._cost(levels, probe_mode, probe_row, r, RATE_SAMPLE) for r in range(len(RATE_PAIRS))]
                rate_idx = int(np.argmin(costs))
        if mode is None:
            mode = MODE_PREV
            if row_len and count:
                base = self._cost(levels, MODE_PREV, 0, rate_idx, RATE_SAMPLE)
                if self._cost(levels, MODE_PREV2_ROW, row_len, rate_idx, RATE_SAMPLE) < base:
                    mode = MODE_PREV2_ROW
        if mode != MODE_PREV2_ROW:
            row_len = 0
        return mode, row_len, rate_idx

    def settings(self, levels, hint: EncodeHint | None = None) -> dict:
        """The stream settings encode() would choose: chunk_size, n_gt, mode, row_len, fast, slow."""
        mode, row_len, rate_idx = self._settings(as_levels(levels), hint)
        fast, slow = (int(v) for v in RATE_PAIRS[rate_idx])
        return {"chunk_size": self.chunk_size, "n_gt": self.n_gt, "mode": mode, "row_len": row_len,
                "rate_idx": rate_idx, "fast": fast, "slow": slow}

    def _cost(self, levels, mode, row_len, rate_idx, limit) -> int:
        fast, slow = (int(v) for v in RATE_PAIRS[rate_idx])
        return int(cost_chunks(levels, self.chunk_size, self.n_gt, mode, row_len, fast, slow, limit))

    # --- protocol -----------------------------------------------------------------------------
    def encode(self, levels, hint: EncodeHint | None = None) -> tuple[bytes, bytes]:
        levels = as_coded_levels(levels)
        n = levels.size
        mode, row_len, rate_idx = self._settings(levels, hint)
        fast, slow = (int(v) for v in RATE_PAIRS[rate_idx])
        n_chunks = -(-n // self.chunk_size)
        # whole chunks at a time (each codes on its own), from int64 copies of narrow levels: no int64
        # copy nor output buffer for the whole tensor
        pieces, lengths = [], []
        for _, block in int64_blocks(levels, max(1, COUNT_BLOCK // self.chunk_size) * self.chunk_size):
            piece, ends = self._encode_chunks(block, mode, row_len, fast, slow)
            pieces.append(piece)
            lengths.extend(np.diff(ends, prepend=0).tolist())
        params = bytearray([FORMAT_VERSION, self.n_gt, mode, rate_idx])
        params += write_uvarint(self.chunk_size) + write_uvarint(row_len) + write_uvarint(n_chunks)
        for length in lengths:
            params += write_uvarint(int(length))
        return b"".join(pieces), bytes(params)

    def _encode_chunks(self, levels: np.ndarray, mode: int, row_len: int, fast: int, slow: int) -> tuple[bytes, np.ndarray]:
        """The coded chunks of int64 `levels` back to back, and each chunk's end offset."""
        n = levels.size
        chunk_ends = np.zeros(-(-n // self.chunk_size), dtype=np.int64)
        capacity = 64 + 16 * chunk_ends.size + n + n // 2
        while True:
            buf = np.empty(capacity, dtype=np.uint8)
            total = encode_chunks(levels, self.chunk_size, self.n_gt, mode, row_len, fast, slow, buf, chunk_ends)
            if total >= 0:
                return buf[:total].tobytes(), chunk_ends
            capacity *= 4

    def max_count(self, payload_len: int, params: bytes) -> int:
        return _max_levels(_parse_params(params, payload_len))

    def decode(self, payload: bytes, params: bytes, count: int, shape=None) -> np.ndarray:
        return gathered(self.decode_blocks(payload, params, count, shape), int(count))

    def decode_blocks(self, payload: bytes, params: bytes, count: int, shape=None, block: int | None = None):
        """Whole chunks at a time (at least one; with `parallel`, enough to keep every core busy)."""
        count = int(count)
        if count < 0:
            raise CdlDecodeError("negative level count")
        stream = _parse_params(params, len(payload))
        n_chunks, chunk_size = stream.offsets.size - 1, stream.chunk_size
        if n_chunks != -(-count // chunk_size):
            raise CdlDecodeError(f"cabac stream has {n_chunks} chunks, {count} levels need {-(-count // chunk_size)}")
        check_count(self.name, len(payload), count, _max_levels(stream))
        parallel = self.parallel and n_chunks > 1 and count >= PARALLEL_MIN_LEVELS
        per_block = max(1, n_chunks) if block is None else max(1, block // chunk_size, PARALLEL_MIN_CHUNKS if parallel else 1)
        for first in range(0, n_chunks, per_block):
            yield self._decode_chunks(payload, stream, first, min(first + per_block, n_chunks), count, parallel)

    @staticmethod
    def _decode_chunks(payload, stream: _Stream, first: int, last: int, count: int, parallel: bool) -> np.ndarray:
        """The levels of chunks first..last-1, from a padded copy of their bytes only (a chunk's decoder
        reads zeros past its end whatever follows it, so the copy decodes as the whole payload would)."""
        chunk_size = stream.chunk_size
        out = np.empty(min(count, last * chunk_size) - first * chunk_size, dtype=np.int64)
        start, end = int(stream.offsets[first]), int(stream.offsets[last])
        # the kernels load a byte past a chunk's end without a branch (then mask it): pad by one
        buf = np.zeros(end - start + DECODE_PADDING, dtype=np.uint8)
        buf[:end - start] = np.frombuffer(payload, dtype=np.uint8, count=end - start, offset=start)
        offsets = stream.offsets[first:last + 1] - start
        errs = np.zeros(last - first, dtype=np.int64)
        fast, slow = (int(v) for v in RATE_PAIRS[stream.rate_idx])
        args = (chunk_size, stream.n_gt, stream.mode, stream.row_len, fast, slow)
        serial_kernel, parallel_kernel = chunk_decoders(stream.mode)
        if parallel and last - first > 1:
            # in batches: the kernel holds coder state and contexts (7.7 kB) for every chunk it gets
            for a in range(0, last - first, PARALLEL_BATCH):
                b = min(a + PARALLEL_BATCH, last - first)
                parallel_kernel(buf, offsets[a:b + 1], *args, out[a * chunk_size:], errs[a:b])
        else:
            serial_kernel(buf, offsets, *args, out, errs)
        bad = np.flatnonzero(errs)
        if bad.size:
            c = int(bad[0])
            raise CdlDecodeError(f"cabac chunk {first + c}: {ERROR_TEXT.get(int(errs[c]), 'corrupt stream')}")
        return out

    def estimate_bits(self, levels, hint: EncodeHint | None = None) -> float:
        levels = as_levels(levels)
        if levels.size == 0:
            return 0.0
        mode, row_len, rate_idx = self._settings(levels, hint)
        fast, slow = (int(v) for v in RATE_PAIRS[rate_idx])
        cost = cost_chunks(levels, self.chunk_size, self.n_gt, mode, row_len, fast, slow, levels.size)
        n_chunks = -(-levels.size // self.chunk_size)
        return cost / float(1 << COST_FRAC_BITS) + FLUSH_BITS_ESTIMATE * n_chunks
