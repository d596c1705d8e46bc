"""The decoders' fast paths (issue 15, point 3): huffman's multi-symbol table and cabac's padded,
branch-free bin decoding must decode exactly what the plain definitions of the codes say."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdlcodec.backends import huffman_kernels as hk
from cdlcodec.backends.base import MAX_ABS_LEVEL
from cdlcodec.backends.cabac import CabacBackend
from cdlcodec.backends.cabac import _parse_params
from cdlcodec.backends.cabac_binarization import (
    N_CONTEXTS, chunk_decoders, decode_chunks_parallel, decode_chunks_serial, decode_prev_chunks_parallel,
    decode_prev_chunks_serial, rate_update,
)
from cdlcodec.backends.cabac_coder import (
    CTX_FAST, CTX_PROB, CTX_SLOW, ERR_UNPADDED, PROB_BITS, RATE_PAIRS, STATE_BITS, STATE_SIZE, new_contexts,
)
from cdlcodec.backends.huffman import HuffmanBackend, canonical_codes, code_lengths, decode_symbols, encode_symbols
from cdlcodec.errors import CdlDecodeError

M = MAX_ABS_LEVEL
HUFF = HuffmanBackend()


# --- huffman -----------------------------------------------------------------------------------

def reference_decode(payload: bytes, lengths: np.ndarray, count: int) -> list[int]:
    """Bit by bit, straight from the canonical code (no tables)."""
    codes = canonical_codes(lengths)
    words = {(int(lengths[s]), int(codes[s])): s for s in np.flatnonzero(lengths)}
    bits = "".join(f"{b:08b}" for b in payload)
    out, pos = [], 0
    for _ in range(count):
        code, n = 0, 0
        while (n, code) not in words:
            code, n = (code << 1) | int(bits[pos]), n + 1
            pos += 1
        out.append(words[(n, code)])
    return out


def multi_table(lengths):
    used = np.flatnonzero(lengths)
    tables = hk.build_decode_tables(used.astype(np.int64), np.ascontiguousarray(lengths[used]),
                                    np.int64(hk.PRIMARY_BITS))
    return tables, hk.build_multi_table(tables[0], tables[1], np.int64(hk.PRIMARY_BITS))


@settings(max_examples=40, deadline=None)
@given(st.lists(st.integers(1, 1000), min_size=2, max_size=40))
def test_multi_symbol_entries_are_the_code_words_inside_each_window(counts):
    lengths = code_lengths(np.array(counts))
    (_, _, *_), (multi_val, multi_len) = multi_table(lengths)
    codes = canonical_codes(lengths)
    words = {(int(lengths[s]), int(codes[s])): s for s in np.flatnonzero(lengths)}
    w = hk.PRIMARY_BITS
    for e in range(1 << w):
        bits = f"{e:0{w}b}"
        expect, pos = [], 0
        while len(expect) < hk.MULTI_SYMBOLS:
            found = next((words[(n, int(bits[pos:pos + n], 2))] for n in range(1, w - pos + 1)
                          if (n, int(bits[pos:pos + n], 2)) in words), None)
            if found is None:
                break
            expect.append(found)
            pos += int(lengths[found])
        assert multi_len[e] >> 8 == len(expect) and multi_len[e] & 255 == pos, e
        assert list(multi_val[e * hk.MULTI_SYMBOLS:e * hk.MULTI_SYMBOLS + len(expect)]) == expect, e


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data(), counts=st.lists(st.integers(1, 50), min_size=2, max_size=30),
       n=st.integers(0, 40))
def test_symbols_decode_as_the_reference_says(data, counts, n):
    """Every count around MULTI_SYMBOLS (tail loop), short and long code words mixed."""
    counts = np.array(counts)
    counts[0] *= 1 << 20  # one very frequent symbol: long code words for the rare ones
    lengths = code_lengths(counts, max_len=hk.MAX_CODE_LEN)
    symbols = np.array(data.draw(st.lists(st.sampled_from(np.flatnonzero(lengths).tolist()),
                                          min_size=n, max_size=n)), dtype=np.int64)
    payload = encode_symbols(symbols, lengths)
    decoded = decode_symbols(payload, lengths, symbols.size)
    assert decoded.tolist() == symbols.tolist() == reference_decode(payload, lengths, symbols.size)


def test_long_code_words_between_short_ones():
    # Fibonacci-like counts give code words up to 24 bits, longer than the table window
    counts = np.array([1, 1] + [int(1.6 ** k) + 1 for k in range(2, 30)])
    lengths = code_lengths(counts)
    assert lengths.max() > hk.PRIMARY_BITS
    rng = np.random.default_rng(5)
    symbols = rng.integers(0, counts.size, 5000)
    payload = encode_symbols(symbols, lengths)
    np.testing.assert_array_equal(decode_symbols(payload, lengths, symbols.size), symbols)
    assert decode_symbols(payload, lengths, symbols.size).tolist() == reference_decode(payload, lengths, 5000)


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 7, 8, 9, 1000, 100_003])
@pytest.mark.parametrize("scale", [0.3, 1.0, 4.0, 40.0])
def test_laplace_roundtrip_every_length(n, scale):
    levels = np.rint(np.random.default_rng(n).laplace(0, scale, n)).astype(np.int64)
    payload, params = HUFF.encode(levels)
    np.testing.assert_array_equal(HUFF.decode(payload, params, n), levels)


@pytest.mark.parametrize("levels", [
    np.array([M, -M, 0, 0, 0, 0, 0, 1, -1, M, 0, 0, 0], np.int64),   # max-abs levels in the int32 table
    np.full(50, 7, np.int64),                                          # one symbol (no payload)
    np.concatenate([np.zeros(1000, np.int64), [3]]),                    # all equal but one
])
def test_edge_case_roundtrips(levels):
    payload, params = HUFF.encode(levels)
    np.testing.assert_array_equal(HUFF.decode(payload, params, levels.size), levels)


def test_fast_path_reports_invalid_patterns_and_overruns():
    # incomplete code: "0" -> 4, "10" -> 5; "11" is no code word. Eight symbols take the
    # multi-symbol loop, so the bad pattern is met there, not only in the one-symbol tail.
    lengths = np.array([1, 2, 0], np.uint8)
    good = encode_symbols(np.array([0, 1, 0, 0, 1, 1, 0, 1]), lengths)
    np.testing.assert_array_equal(decode_symbols(good, lengths, 8), [0, 1, 0, 0, 1, 1, 0, 1])
    with pytest.raises(CdlDecodeError, match="not a code word"):
        decode_symbols(bytes([0b01011000, 0]), lengths, 8)
    with pytest.raises(CdlDecodeError, match="payload"):
        decode_symbols(good[:1], lengths, 8)     # cut: the levels run past the payload
    with pytest.raises(CdlDecodeError):
        decode_symbols(good + b"\x00\x00\x00\x00\x00", lengths, 8)   # trailing bytes


# --- cabac -------------------------------------------------------------------------------------

def test_contexts_cache_their_clamped_probability():
    rng = np.random.default_rng(3)
    ctx = new_contexts(N_CONTEXTS)
    st_ = np.zeros(STATE_SIZE, np.int64)
    for fast, slow in RATE_PAIRS[:3]:
        levels = np.rint(rng.laplace(0, 2, 3000)).astype(np.int64)
        rate_update(ctx, st_, levels, 0, 0, levels.size, 0, 1, 4, int(fast), int(slow))
        mean = (ctx[:, CTX_FAST] + ctx[:, CTX_SLOW]) >> (STATE_BITS + 1 - PROB_BITS)
        np.testing.assert_array_equal(ctx[:, CTX_PROB], np.clip(mean, 1, (1 << PROB_BITS) - 1))


def test_decode_kernel_refuses_an_unpadded_buffer():
    levels = np.arange(-50, 50, dtype=np.int64)
    payload, params = CabacBackend(mode=0, rate_idx=0).encode(levels)
    offsets = np.array([0, len(payload)], np.int64)
    out, errs = np.empty(levels.size, np.int64), np.zeros(1, np.int64)
    fast, slow = (int(v) for v in RATE_PAIRS[0])
    args = (offsets, 1 << 16, 10, 0, 0, fast, slow, out, errs)
    decode_chunks_serial(np.frombuffer(payload, np.uint8), *args)
    assert errs[0] == ERR_UNPADDED
    decode_chunks_serial(np.frombuffer(payload + b"\x00", np.uint8), *args)
    assert errs[0] == 0
    np.testing.assert_array_equal(out, levels)


@pytest.mark.parametrize("scale", [0.2, 1.0, 4.0, 64.0])
@pytest.mark.parametrize("chunk", [1, 777, 1 << 16])
def test_cabac_laplace_roundtrip_serial_and_parallel(scale, chunk):
    n = 140_000 if chunk > 1 else 3000   # enough levels for the threads; chunks of one level cost params
    levels = np.rint(np.random.default_rng(int(scale * 10) + chunk).laplace(0, scale, n)).astype(np.int64)
    payload, params = CabacBackend(chunk_size=chunk).encode(levels)
    for parallel in (False, True):
        np.testing.assert_array_equal(CabacBackend(parallel=parallel).decode(payload, params, levels.size), levels)


@pytest.mark.parametrize("levels", [
    np.zeros(0, np.int64), np.array([0]), np.array([-M]), np.full(70_000, 5, np.int64),
    np.array([M, -M] * 40 + [0] * 10, np.int64),
])
def test_cabac_edge_case_roundtrips(levels):
    be = CabacBackend(chunk_size=1 << 12)
    payload, params = be.encode(levels)
    np.testing.assert_array_equal(be.decode(payload, params, levels.size), levels)


@pytest.mark.parametrize("n_gt", [0, 1, 3, 10, 32])
def test_cabac_prev_walk_decodes_as_the_general_walk(n_gt):
    """Mode 0 streams decode with a walk of their own (_decode_chunk_prev): the same levels and the
    same error code as the general walk, chunk by chunk, on valid streams and on damaged ones."""
    assert chunk_decoders(0) == (decode_prev_chunks_serial, decode_prev_chunks_parallel)
    assert chunk_decoders(1) == chunk_decoders(2) == (decode_chunks_serial, decode_chunks_parallel)
    rng = np.random.default_rng(n_gt)
    levels = np.concatenate([np.rint(rng.laplace(0, s, 3000)).astype(np.int64) for s in (0.3, 1.0, 4.0, 300.0)]
                            + [np.array([M, -M, 0, 1, -1, n_gt, -n_gt - 1, n_gt + 1], np.int64)])
    payload, params = CabacBackend(mode=0, n_gt=n_gt, chunk_size=1000).encode(levels)
    stream = _parse_params(params, len(payload))
    assert stream.mode == 0 and stream.offsets.size > 10
    fast, slow = (int(v) for v in RATE_PAIRS[stream.rate_idx])
    args = (stream.chunk_size, n_gt, 0, stream.row_len, fast, slow)
    damaged = [bytes(payload)]
    for _ in range(12):  # bit flips and cut bytes: every error path of the walk
        b = bytearray(payload)
        b[int(rng.integers(len(b)))] ^= 1 << int(rng.integers(8))
        damaged.append(bytes(b))
    damaged.append(bytes(payload[:-1]) + b"\x00")
    error_codes = set()
    for data in damaged:
        buf = np.frombuffer(data + b"\x00" * 8, np.uint8)
        results = []
        for kernel in (decode_chunks_serial, decode_prev_chunks_serial, decode_prev_chunks_parallel):
            out = np.full(levels.size, 7, np.int64)
            errs = np.zeros(stream.offsets.size - 1, np.int64)
            kernel(buf, stream.offsets, *args, out, errs)
            results.append((out, errs))
        ok = results[0][1] == 0
        error_codes.update(int(x) for x in results[0][1])
        for out, errs in results[1:]:
            np.testing.assert_array_equal(errs, results[0][1])
            for c in np.flatnonzero(ok):  # a chunk's levels are defined when it decodes without error
                np.testing.assert_array_equal(out[c * 1000:(c + 1) * 1000], results[0][0][c * 1000:(c + 1) * 1000])
        if data == damaged[0]:
            assert ok.all()
            np.testing.assert_array_equal(results[1][0], levels)
    assert error_codes - {0}, error_codes  # the damage reached the walks' error paths
    errs = np.zeros(stream.offsets.size - 1, np.int64)
    decode_prev_chunks_serial(np.frombuffer(payload, np.uint8), stream.offsets, *args, np.empty(levels.size, np.int64), errs)
    assert (errs == ERR_UNPADDED).all()
