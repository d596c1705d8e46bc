"""The raw backend: exact round trips, the documented byte layout, determinism and hostile input."""
from __future__ import annotations


import numpy as np
import pytest
from backend_checks import check_every_truncation_fails, check_golden_stream
from hypothesis import given, settings, strategies as st

from cdlcodec.backends import get
from cdlcodec.backends.raw import RawBackend
from cdlcodec.backends.varint import read_svarint, read_uvarint, unzigzag, write_svarint, write_uvarint, zigzag
from cdlcodec.errors import CdlDecodeError, CdlInputError

M = 2**31 - 1
BACKEND = RawBackend()


def cases() -> dict[str, np.ndarray]:
    rng = np.random.default_rng(99)
    return {
        "empty": np.zeros(0, np.int64),
        "one_element": np.array([-17], np.int64),
        "all_equal": np.full(999, 12345, np.int64),
        "two_symbols": np.array([4, 5, 5, 4, 4, 4, 5], np.int64),
        "extremes": np.array([-M, M, 0, M, -M], np.int64),
        "width_3": rng.integers(-4, 4, 1001),
        "width_8": rng.integers(-128, 128, 1000),
        "width_13": rng.integers(0, 8192, 777),
        "width_16": rng.integers(-30000, 35536, 500),
        "width_31": rng.integers(0, M + 1, 300),
        "width_32": np.concatenate([rng.integers(-M, M + 1, 300), [-M, M]]),
        "large_alphabet": rng.permutation(np.arange(-50000, 50000, dtype=np.int64)),
    }


CASES = cases()


@pytest.mark.parametrize("name", list(CASES))
def test_roundtrip_fixed_cases(name):
    levels = CASES[name]
    payload, params = BACKEND.encode(levels)
    np.testing.assert_array_equal(BACKEND.decode(payload, params, levels.size), levels)
    assert BACKEND.estimate_bits(levels) == 8 * (len(payload) + len(params))


@pytest.mark.parametrize("name", list(CASES))
def test_layout_is_the_documented_one(name):
    levels = CASES[name]
    payload, params = BACKEND.encode(levels)
    base = int(levels.min()) if levels.size else 0
    width = int(levels.max() - base).bit_length() if levels.size else 0
    assert params == bytes([width]) + write_svarint(base)
    assert len(payload) == (levels.size * width + 7) // 8
    # LSB-first bit packing, checked against a direct Python reading of the stream
    stream = int.from_bytes(payload, "little")
    mask = (1 << width) - 1
    for i in range(0, levels.size, max(1, levels.size // 50)):
        assert (stream >> (i * width)) & mask == levels[i] - base
    if width in (8, 16, 32):
        assert payload == (levels - base).astype(f"<u{width // 8}").tobytes()


def test_registry_returns_this_backend():
    assert isinstance(get("raw"), RawBackend)


def test_constant_tensor_takes_no_payload():
    payload, params = BACKEND.encode(np.full(10**6, -M, np.int64))
    assert payload == b"" and params == b"\x00" + write_svarint(-M)


@given(st.one_of(
    st.lists(st.integers(-8, 8), max_size=300),
    st.lists(st.integers(-M, M), max_size=200),
    st.lists(st.sampled_from([-M, -1, 0, 1, M]), max_size=100),
    st.integers(0, 32).flatmap(lambda w: st.lists(st.integers(0, 2**w - 1 if w < 32 else 2**32 - 2).map(lambda v: v - M), max_size=100)),
))
@settings(max_examples=300, deadline=None)
def test_roundtrip_property(values):
    levels = np.array(values, dtype=np.int64)
    payload, params = BACKEND.encode(levels)
    np.testing.assert_array_equal(BACKEND.decode(payload, params, levels.size), levels)
    assert BACKEND.encode(levels) == (payload, params)
    assert BACKEND.estimate_bits(levels) == 8 * (len(payload) + len(params))


@given(st.integers(0, 2**63 - 1))
def test_uvarint_roundtrip(value):
    data = write_uvarint(value)
    assert read_uvarint(data, 0) == (value, len(data))


@given(st.integers(-(2**62), 2**62 - 1))
def test_svarint_roundtrip(value):
    assert unzigzag(zigzag(value)) == value
    data = write_svarint(value)
    assert read_svarint(data, 0) == (value, len(data))


@pytest.mark.parametrize("bad", [np.array([M + 1]), np.array([-M - 1]), np.array([1.5]), np.zeros((3, 1), np.int64)])
def test_encode_rejects_bad_levels(bad):
    with pytest.raises(CdlInputError):
        BACKEND.encode(bad)


SMALL = np.array([3, -2, 0, 7, 7, 1, -2, 5, 0], np.int64)


def test_every_truncation_fails_cleanly():
    check_every_truncation_fails(BACKEND, SMALL)


@pytest.mark.parametrize("params,payload,count", [
    (b"\x21" + write_svarint(0), b"\x00" * 40, 8),          # width 33
    (b"\x04" + write_svarint(M + 1), b"\x00", 2),           # base out of range
    (b"\x04" + write_svarint(M - 3), b"\xff", 2),           # decodes to M + 12
    (b"\x04" + write_svarint(0), b"\x00", 3),               # payload too short for 3 levels
    (b"\x04" + write_svarint(0), b"\x00\xf0", 3),           # non-zero padding
    (b"\x04" + write_svarint(0), b"\x00", -1),              # negative count
    (b"\x04\x80", b"\x00", 2),                              # truncated varint
    (b"\x04\x80\x00", b"\x00", 2),                          # non-minimal varint
    (b"\x04" + b"\xff" * 10, b"\x00", 2),                   # over-long varint
    (b"\x20" + write_svarint(-M), b"\xff" * 4, 1),          # -M + 2**32 - 1 > M
])
def test_hostile_streams_raise_decode_error(params, payload, count):
    with pytest.raises(CdlDecodeError):
        BACKEND.decode(payload, params, count)


@given(st.binary(max_size=12), st.binary(max_size=40), st.integers(0, 100))
@settings(max_examples=300, deadline=None)
def test_random_streams_never_crash(params, payload, count):
    try:
        out = BACKEND.decode(payload, params, count)
    except CdlDecodeError:
        return
    assert out.shape == (count,) and out.dtype == np.int64
    if count:
        assert np.abs(out).max() <= M


GOLDEN_INPUTS = {
    "raw_small.bin": SMALL,
    "raw_extremes.bin": np.array([-M, M, 0, 1, -1], np.int64),
}


@pytest.mark.parametrize("name", list(GOLDEN_INPUTS))
def test_golden_streams(name):
    check_golden_stream(BACKEND, name, GOLDEN_INPUTS[name])
