"""What every registered lossless backend must do, run over `backends.available()` automatically: a
backend registered tomorrow is checked by these tests without a line added here. (Golden streams
stay with each backend's own tests, which know the inputs and settings they were written with.)"""
from __future__ import annotations

import numpy as np
import pytest

from cdlcodec import backends
from cdlcodec.backends import MAX_ABS_LEVEL as M
from cdlcodec.backends import EncodeHint
from cdlcodec.errors import CdlDecodeError, CdlInputError
from backend_checks import check_every_truncation_fails

NAMES = backends.available()
RNG = np.random.default_rng(20240611)

DISTRIBUTIONS = {
    "empty": np.zeros(0, np.int64),
    "single": np.array([-5], np.int64),
    "constant": np.full(1000, 3, np.int64),
    "constant_max": np.full(17, M, np.int64),
    "extremes": np.array([M, -M, 0, M, -M, 1, -1, M - 1, -(M - 1)], np.int64),
    "two_values": RNG.choice(np.array([-M, M]), 301).astype(np.int64),
    "laplacian": np.rint(RNG.laplace(0, 2, 5000)).astype(np.int64),
    "mostly_zero": np.where(RNG.random(4000) < 0.95, 0, RNG.integers(-3, 4, 4000)).astype(np.int64),
    "wide_sparse": RNG.integers(-M, M, 200, endpoint=True).astype(np.int64),
    "uniform_byte": RNG.integers(-128, 128, 3000).astype(np.int64),
}
SMALL = np.array([3, -2, 0, 7, 7, 1, -2, 5, 0, -M, M], np.int64)


def test_every_builtin_backend_is_available():
    assert {"raw", "huffman", "cabac"} <= set(NAMES)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("dist", sorted(DISTRIBUTIONS))
def test_round_trip_is_exact_and_deterministic(name, dist):
    backend, levels = backends.get(name), DISTRIBUTIONS[dist]
    hint = EncodeHint(shape=(levels.size,))
    payload, params = backend.encode(levels, hint)
    assert (payload, params) == backend.encode(levels.copy(), hint)  # same levels, same bytes
    assert isinstance(payload, bytes) and isinstance(params, bytes)
    out = backend.decode(payload, params, levels.size, (levels.size,))
    assert out.dtype == np.int64 and out.shape == levels.shape
    np.testing.assert_array_equal(out, levels)
    bound = backend.max_count(len(payload), params)  # the bomb guard never refuses an honest stream
    assert bound is None or levels.size <= bound


@pytest.mark.parametrize("name", NAMES)
def test_a_matrix_hint_changes_nothing_the_decoder_needs(name):
    backend = backends.get(name)
    levels = np.rint(RNG.laplace(0, 1.5, (40, 25))).astype(np.int64).ravel()
    payload, params = backend.encode(levels, EncodeHint(shape=(40, 25)))
    np.testing.assert_array_equal(backend.decode(payload, params, levels.size), levels)


@pytest.mark.parametrize("name", NAMES)
def test_every_truncation_raises_a_decode_error(name):
    check_every_truncation_fails(backends.get(name), SMALL)


@pytest.mark.parametrize("name", NAMES)
def test_a_wrong_count_gives_exactly_that_count_or_a_decode_error(name):
    """A count the payload cannot hold is a CdlDecodeError (checked before allocating); one more level
    may honestly fit in a code's padding bits, so then exactly `count` levels come back, the first
    ones unchanged. Never another exception, never an array of another size."""
    backend = backends.get(name)
    payload, params = backend.encode(SMALL)
    for count in (SMALL.size * 64, 10**15, -1):
        with pytest.raises(CdlDecodeError):
            backend.decode(payload, params, count)
    for count in (SMALL.size - 1, SMALL.size + 1):
        try:
            out = backend.decode(payload, params, count)
        except CdlDecodeError:
            continue
        assert out.shape == (count,)
        np.testing.assert_array_equal(out[:min(count, SMALL.size)], SMALL[:count])


BAD_LEVELS = {
    "above_max": np.array([M + 1]),
    "below_min": np.array([-M - 1]),
    "int64_min": np.array([np.iinfo(np.int64).min]),   # |x| overflows int64: must not slip through abs()
    "uint64_huge": np.array([2**64 - 1], np.uint64),
    "floats": np.array([0.5, 1.0]),
    "matrix": np.zeros((3, 2), np.int64),
}


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("bad", sorted(BAD_LEVELS))
def test_every_backend_refuses_the_same_bad_levels(name, bad):
    """One level validator (backends.stats.as_levels) for every backend: the same inputs are refused."""
    with pytest.raises(CdlInputError):
        backends.get(name).encode(BAD_LEVELS[bad])
    with pytest.raises(CdlInputError):
        backends.get(name).estimate_bits(BAD_LEVELS[bad])
