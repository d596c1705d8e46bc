"""The huffman backend and its public helpers: exact round trips, limits, determinism, hostile input."""
from __future__ import annotations

import heapq

import numpy as np
import pytest
from backend_checks import check_every_truncation_fails, check_golden_stream
from hypothesis import given, settings, strategies as st

from cdlcodec.backends import get
from cdlcodec.backends import huffman_kernels as hk
from cdlcodec.backends.base import EncodeHint
from cdlcodec.backends.huffman import (
    HuffmanBackend,
    canonical_codes,
    code_lengths,
    coded_bits,
    decode_symbols,
    encode_symbols,
)
from cdlcodec.backends.varint import write_svarint, write_uvarint
from cdlcodec.backends.stats import histogram, order0_entropy_bits
from cdlcodec.errors import CdlDecodeError, CdlInputError

M = 2**31 - 1
BACKEND = HuffmanBackend()


def fibonacci(n: int) -> np.ndarray:
    fib = [1, 1]
    while len(fib) < n:
        fib.append(fib[-1] + fib[-2])
    return np.array(fib[:n], dtype=np.int64)


def shuffled_repeat(values, counts, seed=0) -> np.ndarray:
    x = np.repeat(np.asarray(values, np.int64), counts)
    np.random.default_rng(seed).shuffle(x)
    return x


def cases() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1234)
    return {
        "empty": np.zeros(0, np.int64),
        "one_element": np.array([7], np.int64),
        "one_negative_extreme": np.array([-M], np.int64),
        "all_equal": np.full(1000, -3, np.int64),
        "two_symbols": np.array([0, 1, 1, 0, 1, 1, 1, 0, 0, 1], np.int64),
        "two_symbols_skewed": np.array([5] * 999 + [-5], np.int64),
        "extremes": np.array([-M, M, 0, M, -M, -M], np.int64),
        "small_range": rng.integers(-3, 4, 5001),
        "laplace": np.round(rng.laplace(0, 6, 20000)).astype(np.int64),
        "gaussian_wide": np.round(rng.normal(0, 3000, 20000)).astype(np.int64),
        "dense_80k_alphabet": rng.permutation(np.arange(-40000, 40000, dtype=np.int64)),
        "sparse_70k_alphabet": rng.integers(-M, M + 1, 70000),
        "fibonacci_30": shuffled_repeat(np.arange(30) * 3 - 40, fibonacci(30)),  # Huffman depth 29 > 24
        "geometric": shuffled_repeat(np.arange(40), np.maximum(1, (2.0 ** (22 - np.arange(40) * 0.9)).astype(np.int64))),
    }


CASES = cases()


def roundtrip(levels, hint=None):
    payload, params = BACKEND.encode(levels, hint)
    out = BACKEND.decode(payload, params, levels.size)
    assert out.dtype == np.int64 and out.shape == (levels.size,)
    np.testing.assert_array_equal(out, levels)
    return payload, params


@pytest.mark.parametrize("name", list(CASES))
def test_roundtrip_fixed_cases(name):
    levels = CASES[name]
    payload, params = roundtrip(levels)
    # estimate_bits is the exact size of the output
    assert BACKEND.estimate_bits(levels) == 8 * (len(payload) + len(params))


def test_registry_returns_this_backend():
    assert isinstance(get("huffman"), HuffmanBackend)
    assert get("huffman").name == "huffman"


def test_single_symbol_and_empty_cost_no_payload():
    assert BACKEND.encode(np.zeros(0, np.int64)) == (b"", b"\x00")
    payload, params = BACKEND.encode(np.full(10_000, -M, np.int64))
    assert payload == b"" and len(params) <= 6


def test_bits_close_to_entropy_on_weight_like_data():
    levels = CASES["laplace"]
    payload, _ = BACKEND.encode(levels)
    h0 = order0_entropy_bits(levels) / levels.size
    bits = 8 * len(payload) / levels.size
    assert h0 <= bits <= h0 + 0.05


def test_length_limit_holds_on_fibonacci_counts():
    levels = CASES["fibonacci_30"]
    values, counts = histogram(levels)
    order = np.argsort(counts, kind="stable")
    assert hk.huffman_depths(counts[order]).max() > 24  # the unlimited code really is too long
    lengths = code_lengths(counts)
    assert lengths.max() == 24
    assert hk.kraft_units(lengths, 24) <= 1 << 24


@given(st.lists(st.integers(1, 10**9), min_size=2, max_size=60), st.integers(1, 24))
@settings(max_examples=150, deadline=None)
def test_code_lengths_are_a_prefix_code_within_the_limit(counts, max_len):
    counts = np.array(counts, np.int64)
    if counts.size > 2**max_len:
        with pytest.raises(CdlInputError):
            code_lengths(counts, max_len)
        return
    lengths = code_lengths(counts, max_len)
    assert lengths.min() >= 1 and lengths.max() <= max_len
    assert hk.kraft_units(lengths, max_len) <= 1 << max_len
    # more frequent symbols never get longer codes
    order = np.argsort(counts, kind="stable")
    assert np.all(np.diff(lengths[order].astype(int)) <= 0)


def optimal_limited_cost(counts, max_len) -> int:
    """Reference: package-merge (optimal length-limited prefix code), slow and simple."""
    leaves = sorted((int(c), (i,)) for i, c in enumerate(counts))
    level = list(leaves)
    for _ in range(max_len - 1):
        packages = [(level[k][0] + level[k + 1][0], level[k][1] + level[k + 1][1]) for k in range(0, len(level) - 1, 2)]
        level = sorted(leaves + packages, key=lambda item: item[0])
    lengths = np.zeros(len(counts), np.int64)
    for _, members in level[: 2 * len(counts) - 2]:
        for i in members:
            lengths[i] += 1
    return int(np.dot(lengths, counts))


def unlimited_huffman_cost(counts) -> int:
    heap = [int(c) for c in counts]
    heapq.heapify(heap)
    cost = 0
    while len(heap) > 1:
        a, b = heapq.heappop(heap), heapq.heappop(heap)
        cost += a + b
        heapq.heappush(heap, a + b)
    return cost


@given(st.lists(st.integers(1, 10**6), min_size=2, max_size=40))
@settings(max_examples=100, deadline=None)
def test_unlimited_lengths_are_optimal(counts):
    lengths = code_lengths(np.array(counts), 24)
    if lengths.max() < 24:
        assert coded_bits(counts, lengths) == unlimited_huffman_cost(counts)


@pytest.mark.parametrize("n,max_len", [(30, 24), (30, 20), (25, 12), (20, 6), (16, 5), (32, 5)])
def test_length_limiting_is_optimal(n, max_len):
    counts = fibonacci(n)[::-1].copy()  # descending, so symbol order differs from weight order
    assert coded_bits(counts, code_lengths(counts, max_len)) == optimal_limited_cost(counts, max_len)


@given(st.lists(st.integers(1, 10**6), min_size=2, max_size=30), st.integers(3, 8))
@settings(max_examples=100, deadline=None)
def test_package_merge_matches_reference(counts, max_len):
    if len(counts) > 2**max_len:
        return
    assert coded_bits(counts, code_lengths(counts, max_len)) == optimal_limited_cost(counts, max_len)


@pytest.mark.parametrize("n,max_len,slack", [(30, 24, 1.001), (40, 24, 1.001), (25, 12, 1.05), (20, 6, 1.15)])
def test_fallback_heuristic_is_valid_and_close(n, max_len, slack):
    # used instead of package-merge only for enormous alphabets; checked directly here
    counts = fibonacci(n)
    depths = hk.huffman_depths(counts)
    lengths = hk.limit_depths(depths, max_len)
    assert lengths.max() <= max_len and hk.kraft_units(lengths, max_len) <= 1 << max_len
    assert coded_bits(counts, lengths) <= slack * optimal_limited_cost(counts, max_len)


def test_backend_roundtrip_with_the_fallback_heuristic(monkeypatch):
    import cdlcodec.backends.huffman as huffman_module
    levels = CASES["fibonacci_30"]
    with_pm = BACKEND.encode(levels)
    monkeypatch.setattr(huffman_module, "PACKAGE_MERGE_MAX_BYTES", 0)
    payload, params = BACKEND.encode(levels)
    np.testing.assert_array_equal(BACKEND.decode(payload, params, levels.size), levels)
    assert len(with_pm[0]) <= len(payload)


@given(st.lists(st.integers(0, 1000), min_size=1, max_size=80), st.data())
@settings(max_examples=100, deadline=None)
def test_symbol_helpers_roundtrip(counts, data):
    counts = np.array(counts, np.int64)
    lengths = code_lengths(counts)
    used = np.flatnonzero(lengths)
    if used.size == 0:
        assert encode_symbols(np.zeros(0, np.int64), lengths) == b""
        return
    symbols = np.array(data.draw(st.lists(st.sampled_from(list(used)), max_size=200)), np.int64)
    payload = encode_symbols(symbols, lengths)
    assert len(payload) == (coded_bits(np.bincount(symbols, minlength=counts.size), lengths) + 7) // 8
    np.testing.assert_array_equal(decode_symbols(payload, lengths, symbols.size), symbols)


def test_canonical_codes_follow_the_deflate_rule():
    # RFC 1951 section 3.2.2 example: lengths (3,3,3,3,3,2,4,4) -> codes 010,011,100,101,110,00,1110,1111
    codes = canonical_codes([3, 3, 3, 3, 3, 2, 4, 4])
    assert list(codes) == [0b010, 0b011, 0b100, 0b101, 0b110, 0b00, 0b1110, 0b1111]


def test_symbol_helpers_reject_bad_input():
    lengths = code_lengths([5, 3, 0, 1])
    with pytest.raises(CdlInputError):
        encode_symbols([2], lengths)  # no code
    with pytest.raises(CdlInputError):
        encode_symbols([4], lengths)  # outside the alphabet
    with pytest.raises(CdlInputError):
        encode_symbols([0], [1, 1, 1])  # Kraft sum above one
    with pytest.raises(CdlInputError):
        code_lengths([1, 2, 3], max_len=25)
    with pytest.raises(CdlInputError):
        code_lengths([1, 1, 1, 1, 1], max_len=2)  # 5 symbols need more than 2 bits
    with pytest.raises(CdlDecodeError):
        decode_symbols(b"\x00", [1, 1], 9)


@given(st.one_of(
    st.lists(st.integers(-8, 8), max_size=300),
    st.lists(st.integers(-2000, 2000), max_size=300),
    st.lists(st.sampled_from([-M, -M + 1, -1, 0, 1, M - 1, M]), max_size=100),
    st.lists(st.integers(-M, M), max_size=200),
    st.lists(st.one_of(st.just(0), st.just(0), st.integers(-M, M)), max_size=200),
))
@settings(max_examples=300, deadline=None)
def test_roundtrip_property(values):
    levels = np.array(values, dtype=np.int64)
    payload, params = roundtrip(levels)
    assert BACKEND.estimate_bits(levels) == 8 * (len(payload) + len(params))
    assert BACKEND.encode(levels) == (payload, params)  # deterministic


def test_deterministic_across_input_dtypes():
    levels = CASES["laplace"]
    assert BACKEND.encode(levels) == BACKEND.encode(levels.astype(np.int32)) == BACKEND.encode(list(levels))


def test_dense_and_sparse_tables_both_roundtrip():
    dense_params = BACKEND.encode(CASES["laplace"])[1]
    sparse_params = BACKEND.encode(CASES["sparse_70k_alphabet"])[1]
    assert dense_params[0] == hk.KIND_DENSE and sparse_params[0] == hk.KIND_SPARSE


# --- learned-PMF hint ------------------------------------------------------------------------------

def test_pmf_hint_is_used_only_when_smaller():
    rng = np.random.default_rng(5)
    # 256 symbols seen 1..3 times: the empirical code mixes lengths 7..10 (a long table), a uniform
    # model gives every symbol 8 bits (a one-token table) and wins overall.
    levels = rng.permutation(np.repeat(np.arange(256), rng.integers(1, 4, 256)))
    uniform = EncodeHint(pmf=(np.arange(256), np.full(256, 1 / 256)))
    plain = BACKEND.encode(levels)
    hinted = BACKEND.encode(levels, uniform)
    assert len(hinted[0]) + len(hinted[1]) < len(plain[0]) + len(plain[1])
    np.testing.assert_array_equal(BACKEND.decode(*hinted, levels.size), levels)
    assert BACKEND.estimate_bits(levels, uniform) == 8 * (len(hinted[0]) + len(hinted[1]))
    # a misleading model (and one that misses present levels) is never worse than no model
    laplace = CASES["laplace"]
    wrong = EncodeHint(pmf=(np.array([100, 101, 0]), np.array([0.9, 0.1, 1e-9])))
    assert BACKEND.encode(laplace, wrong) == BACKEND.encode(laplace)
    roundtrip(laplace, wrong)


def test_pmf_hint_is_validated():
    with pytest.raises(CdlInputError):
        BACKEND.encode(np.array([1, 2, 3]), EncodeHint(pmf=(np.array([1, 2]), np.array([0.5]))))
    with pytest.raises(CdlInputError):
        BACKEND.encode(np.array([1, 2, 3]), EncodeHint(pmf=(np.array([1, 2]), np.array([np.nan, 0.5]))))


# --- bad input on the encode side ------------------------------------------------------------------

@pytest.mark.parametrize("bad", [np.array([M + 1]), np.array([-M - 1]), np.array([0.5, 1.0]), np.zeros((2, 2), np.int64),
                                 np.array([2**63 - 1], np.uint64)])
def test_encode_rejects_bad_levels(bad):
    with pytest.raises(CdlInputError):
        BACKEND.encode(bad)
    with pytest.raises(CdlInputError):
        BACKEND.estimate_bits(bad)


# --- hostile streams ---------------------------------------------------------------------------------

SMALL = np.array([0, 0, 1, -1, 0, 2, 0, -1, 0, 0, 5, 0, 1, 0, -2, 0, 0, 3], np.int64)


def decode_or_error(payload, params, count):
    """Decode must either succeed with exactly `count` in-range levels or raise CdlDecodeError."""
    try:
        out = BACKEND.decode(payload, params, count)
    except CdlDecodeError:
        return None
    assert out.shape == (count,) and out.dtype == np.int64
    if count:
        assert np.abs(out).max() <= M
    return out


def test_every_truncation_fails_cleanly():
    check_every_truncation_fails(BACKEND, SMALL)


def test_wrong_counts_fail_cleanly():
    payload, params = BACKEND.encode(SMALL)
    for count in (0, SMALL.size + 40, 10**15):
        with pytest.raises(CdlDecodeError):
            BACKEND.decode(payload, params, count)
    with pytest.raises(CdlDecodeError):
        BACKEND.decode(payload, params, -1)
    with pytest.raises(CdlDecodeError):
        BACKEND.decode(b"", b"\x00", 3)


def test_every_bit_flip_decodes_or_fails_cleanly():
    payload, params = BACKEND.encode(SMALL)
    stream = params + payload
    for bit in range(8 * len(stream)):
        flipped = bytearray(stream)
        flipped[bit // 8] ^= 1 << (bit % 8)
        decode_or_error(bytes(flipped[len(params):]), bytes(flipped[: len(params)]), SMALL.size)


@pytest.mark.parametrize("params", [
    b"",
    b"\x07",                                                              # unknown kind
    b"\x00\x00",                                                          # trailing bytes
    b"\x01",                                                              # single, no value
    b"\x01" + write_svarint(M + 1),                                       # single, out of range
    b"\x02" + write_svarint(0) + write_uvarint(2) + b"\x02",            # lengths don't cover alphabet
    b"\x02" + write_svarint(0) + write_uvarint(2) + write_uvarint((5 << 5) | 1),  # run past the end
    b"\x02" + write_svarint(0) + write_uvarint(3) + write_uvarint((2 << 5) | 1),  # Kraft 3/2 > 1
    b"\x02" + write_svarint(0) + write_uvarint(2) + write_uvarint((1 << 5) | 25),  # length 25
    b"\x02" + write_svarint(M) + write_uvarint(2) + write_uvarint((1 << 5) | 1),  # M + 1 out of range
    b"\x02" + write_svarint(0) + write_uvarint(2**40) + write_uvarint(((2**40 - 1) << 5) | 24),  # huge alphabet
    b"\x02" + write_svarint(0) + write_uvarint(1) + write_uvarint(1),    # one symbol in a dense table
    b"\x03" + write_uvarint(10**9) + write_svarint(0),                   # sparse count beyond the bytes
    b"\x03" + write_uvarint(2) + write_svarint(M) + write_uvarint(0) + write_uvarint((1 << 5) | 1),  # overflow
    b"\x03" + write_uvarint(2) + write_svarint(0) + write_uvarint(0) + write_uvarint((1 << 5) | 0),  # length 0
    b"\x02\x80",                                                          # truncated varint
    b"\x02\x80\x00" + write_uvarint(2) + write_uvarint((1 << 5) | 1),   # non-minimal varint
    b"\x02" + b"\xff" * 12,                                               # over-long varint
])
def test_hostile_params_raise_decode_error(params):
    with pytest.raises(CdlDecodeError):
        BACKEND.decode(b"\x55" * 64, params, 100)


@given(st.binary(max_size=40), st.binary(max_size=40), st.integers(0, 300))
@settings(max_examples=400, deadline=None)
def test_random_streams_never_crash(params, payload, count):
    decode_or_error(payload, params, count)


@given(st.binary(max_size=60), st.integers(0, 200))
@settings(max_examples=200, deadline=None)
def test_random_payload_under_a_valid_table_never_crashes(payload, count):
    _, params = BACKEND.encode(CASES["laplace"][:500])
    decode_or_error(payload, params, count)


def test_incomplete_code_rejects_unassigned_patterns():
    # one 1-bit code "0" for value 4 and one 2-bit code "10" for value 5: "11" is not a code word
    params = b"\x02" + write_svarint(4) + write_uvarint(2) + write_uvarint(1) + write_uvarint(2)
    np.testing.assert_array_equal(BACKEND.decode(bytes([0b01000000]), params, 2), [4, 5])
    with pytest.raises(CdlDecodeError):
        BACKEND.decode(bytes([0b11000000]), params, 1)
    with pytest.raises(CdlDecodeError):
        BACKEND.decode(bytes([0b01000001]), params, 2)  # non-zero padding


# --- golden streams ----------------------------------------------------------------------------------

GOLDEN_INPUTS = {
    "huffman_small.bin": SMALL,
    "huffman_extremes.bin": np.array([-M, M, 0, 0, 0, 1, M, -M, 0, 0], np.int64),
    "huffman_sparse.bin": np.array([-1_000_000, 3, 3, 3, 1_000_000, 7, 3, 2_000_000_000], np.int64),
}


@pytest.mark.parametrize("name", list(GOLDEN_INPUTS))
def test_golden_streams(name):
    check_golden_stream(BACKEND, name, GOLDEN_INPUTS[name])


def test_too_many_distinct_levels_is_a_clean_error(monkeypatch):
    # the real limit is 2**24 distinct levels; a 4-bit limit shows the same path on 17 levels
    import cdlcodec.backends.huffman as huffman_module
    monkeypatch.setattr(huffman_module, "MAX_CODE_LEN", 4)
    levels = np.arange(17, dtype=np.int64)
    assert BACKEND.estimate_bits(levels) == float("inf")
    with pytest.raises(CdlInputError, match="raw backend"):
        BACKEND.encode(levels)
    assert BACKEND.estimate_bits(levels[:16]) < float("inf")


@pytest.mark.parametrize("scale", [0.7, 4.0, 60.0])
@pytest.mark.parametrize("spread", [1, 70_001])  # int16 tables with a 12-bit window / int32 with 11 bits
def test_fast_reader_matches_in_whole_and_in_blocks(scale, spread):
    """decode_run's branch-free reader (4 lookups per refill, long code words in between) gives the
    levels of the whole array and of every block split, and hands over to the careful loop near the
    payload's end."""
    levels = np.rint(np.random.default_rng(int(scale * 10)).laplace(0.0, scale, 50_003)).astype(np.int64) * spread
    payload, params = BACKEND.encode(levels)
    assert np.array_equal(BACKEND.decode(payload, params, levels.size), levels)
    for block in (1, 15, 16, 17, 1000, 32768):
        blocks = list(BACKEND.decode_blocks(payload, params, levels.size, block=block))
        assert np.array_equal(np.concatenate(blocks), levels), block


def test_fast_reader_corrupt_streams_fail_cleanly():
    levels = np.rint(np.random.default_rng(5).laplace(0.0, 30.0, 20_000)).astype(np.int64)
    payload, params = BACKEND.encode(levels)
    rng = np.random.default_rng(6)
    for _ in range(200):
        bad = bytearray(payload)
        for pos in rng.integers(0, len(bad), 3):
            bad[pos] = rng.integers(0, 256)
        decode_or_error(bytes(bad), params, levels.size)
    for cut in (1, 9, 17, len(payload) // 2):
        with pytest.raises(CdlDecodeError):
            BACKEND.decode(payload[:-cut], params, levels.size)
