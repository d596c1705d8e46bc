"""The `cabac` backend: exact round trips, pinned bytes, hostile payloads, and the rate model."""
from __future__ import annotations

import os
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdlcodec.backends import get
from cdlcodec.backends.base import MAX_ABS_LEVEL, EncodeHint
from cdlcodec.backends.cabac import CabacBackend
from cdlcodec.backends.varint import write_uvarint as _varint
from cdlcodec.backends.cabac_binarization import (
    MAX_GT, N_CONTEXTS, cost_chunks, neighbours, rate_cost, rate_update,
)
from cdlcodec.backends.cabac_coder import (
    COST_FRAC_BITS, CTX_FAST, CTX_PROB, CTX_SLOW, DEC_FAST, DEC_FIELDS, DEC_PROB, DEC_SLOW, MAX_COUNT, RATE_PAIRS,
    STATE_SIZE, WARM_SHIFT, ctx_update, dec_reset_contexts, dec_shift_table, dec_update, new_contexts,
)
from cdlcodec.errors import CdlDecodeError, CdlInputError

GOLDEN = os.path.join(os.path.dirname(__file__), "golden")
M = MAX_ABS_LEVEL


def roundtrip(backend, levels, shape=None):
    levels = np.asarray(levels, dtype=np.int64)
    payload, params = backend.encode(levels, EncodeHint(shape=shape) if shape else None)
    out = backend.decode(payload, params, levels.size)
    assert out.dtype == np.int64 and out.shape == levels.shape
    np.testing.assert_array_equal(out, levels)
    return payload, params


def lcg_levels(n, seed, spread):
    """Deterministic pseudo-random levels from integer arithmetic only (stable across numpy versions)."""
    out = np.empty(n, dtype=np.int64)
    x = seed
    for i in range(n):
        x = (x * 6364136223846793005 + 1442695040888963407) % 2**64
        r = x >> 40
        mag = 0
        while r & 1 and mag < spread:   # geometric magnitudes
            mag += 1
            r >>= 1
        out[i] = -mag if (x >> 33) & 1 else mag
    return out


ADVERSARIAL = {
    "empty": np.zeros(0, np.int64),
    "one": np.array([7]),
    "one_negative_max": np.array([-M]),
    "all_zero": np.zeros(5000, np.int64),
    "outlier": np.concatenate([np.zeros(3000, np.int64), [M], np.zeros(3000, np.int64)]),
    "extremes": np.array([M, -M, 0, M, M, -M, 1, -1, M - 1, -(M - 1)] * 20),
    "long_runs": np.repeat(np.array([0, 5, 0, -3, 0, 1, 1000, 0]), 700),
    "sparse": np.where(np.arange(20000) % 97 == 0, np.arange(20000) % 13 - 6, 0),
    "powers": np.array([(1 << k) + d for k in range(31) for d in (-1, 0) if (1 << k) + d <= M] * 3),
    "ramp": np.arange(-3000, 3000),
}


@pytest.mark.parametrize("name", sorted(ADVERSARIAL))
@pytest.mark.parametrize("mode", [None, 0, 1, 2])
def test_adversarial_roundtrip(name, mode):
    levels = ADVERSARIAL[name]
    roundtrip(CabacBackend(mode=mode), levels)
    roundtrip(CabacBackend(mode=mode, chunk_size=257, n_gt=2), levels, shape=(max(1, levels.size // 50), 50) if levels.size >= 100 else None)


def test_registry_and_protocol():
    backend = get("cabac")
    assert backend.name == "cabac"
    payload, params = backend.encode(np.array([1, -2, 0, 3]))
    assert isinstance(payload, bytes) and isinstance(params, bytes)
    assert backend.decode(payload, params, 4, shape=(2, 2)).tolist() == [1, -2, 0, 3]


@pytest.mark.parametrize("n_gt", [0, 1, 5, MAX_GT])
@pytest.mark.parametrize("rate_idx", range(len(RATE_PAIRS)))
def test_every_setting_roundtrips(n_gt, rate_idx):
    levels = lcg_levels(3000, seed=n_gt * 31 + rate_idx, spread=40)
    roundtrip(CabacBackend(n_gt=n_gt, rate_idx=rate_idx, chunk_size=1000), levels, shape=(60, 50))


def test_previous_row_context_is_used_and_self_contained():
    # Columns with very different scales: the row above predicts the magnitude.
    rows, cols = 200, 64
    scale = (np.arange(cols) % 8) ** 2
    levels = (lcg_levels(rows * cols, seed=3, spread=3).reshape(rows, cols) * scale).ravel()
    row = CabacBackend(mode=2)
    payload, params = roundtrip(row, levels, shape=(rows, cols))
    assert params[2] == 2  # prev2+row really used
    plain_payload, _ = CabacBackend(mode=0).encode(levels)
    assert len(payload) < len(plain_payload)
    # decoding needs neither the shape nor the same backend settings
    np.testing.assert_array_equal(CabacBackend(mode=0).decode(payload, params, levels.size, shape=None), levels)


def test_parallel_and_serial_decode_agree():
    rng = np.random.default_rng(11)
    levels = np.rint(rng.laplace(0, 3, 300_000)).astype(np.int64)  # enough levels for the threads
    payload, params = CabacBackend(chunk_size=16_384).encode(levels)
    a = CabacBackend(parallel=True).decode(payload, params, levels.size)
    b = CabacBackend(parallel=False).decode(payload, params, levels.size)
    np.testing.assert_array_equal(a, levels)
    np.testing.assert_array_equal(b, levels)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    data=st.lists(st.one_of(st.integers(-3, 3), st.integers(-M, M), st.just(0)), max_size=400),
    mode=st.sampled_from([None, 0, 1, 2]),
    n_gt=st.integers(0, MAX_GT),
    chunk=st.integers(1, 500),
    cols=st.integers(1, 40),
)
def test_property_roundtrip_and_determinism(data, mode, n_gt, chunk, cols):
    levels = np.array(data, dtype=np.int64)
    backend = CabacBackend(mode=mode, n_gt=n_gt, chunk_size=chunk)
    shape = (levels.size // cols, cols) if levels.size % cols == 0 and levels.size else None
    payload, params = roundtrip(backend, levels, shape)
    assert backend.encode(levels, EncodeHint(shape=shape)) == (payload, params)


# --- golden streams: any change of the coded bytes is a format event -------------------------------

GOLDEN_CASES = {
    "cabac_small": (lambda: lcg_levels(600, seed=1, spread=6), dict(), None),
    "cabac_rows": (lambda: lcg_levels(1200, seed=2, spread=12), dict(mode=2, chunk_size=500, n_gt=3), (40, 30)),
    "cabac_extremes": (lambda: ADVERSARIAL["extremes"], dict(mode=1, n_gt=0), None),
}


def _golden_blob(payload, params):
    return struct.pack("<I", len(params)) + params + payload


@pytest.mark.parametrize("name", sorted(GOLDEN_CASES))
def test_golden_stream(name):
    make, kwargs, shape = GOLDEN_CASES[name]
    levels = make()
    payload, params = CabacBackend(**kwargs).encode(levels, EncodeHint(shape=shape) if shape else None)
    path = os.path.join(GOLDEN, f"{name}.bin")
    if os.environ.get("CDL_REGENERATE_GOLDEN"):
        with open(path, "wb") as fh:
            fh.write(_golden_blob(payload, params))
    with open(path, "rb") as fh:
        blob = fh.read()
    assert _golden_blob(payload, params) == blob, "cabac output changed: a format event (see docs/cabac.md)"
    (plen,) = struct.unpack("<I", blob[:4])
    np.testing.assert_array_equal(CabacBackend().decode(blob[4 + plen:], blob[4:4 + plen], levels.size), levels)


# --- hostile payloads and params -----------------------------------------------------------------

def _params_with_lengths(params: bytes, lengths) -> bytes:
    """Re-serialise single-byte-header params with new chunk lengths (to forge a consistent length)."""
    head = bytearray(params[:4])
    pos = 4
    fields = []
    for _ in range(3):
        value, shift = 0, 0
        while True:
            byte = params[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        fields.append(value)
    for v in fields:
        head += _varint(v)
    for v in lengths:
        head += _varint(v)
    return bytes(head)


def test_every_truncation_is_detected():
    levels = lcg_levels(400, seed=5, spread=9)
    backend = CabacBackend(chunk_size=10_000)
    payload, params = backend.encode(levels)
    assert len(payload) > 50
    for cut in range(len(payload)):
        short = payload[:cut]
        # 1) as stored: the chunk lengths in the params no longer cover the payload
        with pytest.raises(CdlDecodeError):
            backend.decode(short, params, levels.size)
        # 2) with forged params that agree with the short payload: the coder itself must notice
        with pytest.raises(CdlDecodeError):
            backend.decode(short, _params_with_lengths(params, [cut]), levels.size)


def test_extra_bytes_are_detected_or_harmless():
    """Bytes appended under forged params: the decoder reads zeros past the end of a chunk, so an
    appended byte inside that window can leave the final value inside the final interval; then the
    output is still exact. Otherwise the check bins or the unread-bytes check raise."""
    levels = lcg_levels(300, seed=6, spread=5)
    backend = CabacBackend()
    payload, params = backend.encode(levels)
    for extra in (b"\x00", b"\x01", b"\x80", b"\xff", b"\xff\xff", b"\x00" * 5, b"\x12\x34\x56\x78\x9a"):
        try:
            out = backend.decode(payload + extra, _params_with_lengths(params, [len(payload) + len(extra)]), levels.size)
        except CdlDecodeError:
            continue
        np.testing.assert_array_equal(out, levels)
    with pytest.raises(CdlDecodeError):  # far beyond anything the decoder reads
        backend.decode(payload + b"\xab" * 64, _params_with_lengths(params, [len(payload) + 64]), levels.size)


def test_bit_flips_error_or_bounded_output():
    levels = lcg_levels(2000, seed=7, spread=8)
    backend = CabacBackend(chunk_size=700)
    payload, params = backend.encode(levels)
    rng = np.random.default_rng(0)
    detected = 0
    for trial in range(300):
        data = bytearray(payload)
        for _ in range(1 + trial % 3):
            data[rng.integers(len(data))] ^= 1 << int(rng.integers(8))
        try:
            out = backend.decode(bytes(data), params, levels.size)
        except CdlDecodeError:
            detected += 1
            continue
        assert out.shape == levels.shape and np.abs(out).max() <= M
    assert detected > 250  # almost every flip desynchronises the coder and fails the check bins


def test_corrupt_params_raise():
    levels = lcg_levels(500, seed=8, spread=5)
    backend = CabacBackend(chunk_size=200)
    payload, params = backend.encode(levels)
    bad = [
        b"", b"\x01", b"\x02" + params[1:], params[:1] + b"\x21" + params[2:], params[:2] + b"\x03" + params[3:],
        params[:3] + b"\x06" + params[4:], params + b"\x00", params[:-1],
        params[:4] + b"\x00" + params[5:],                         # chunk size 0
        params[:4] + b"\xff" * 11,                                  # endless varint
        params[:4] + b"\xff\xff\xff\xff\x7f" + params[5:],          # chunk size beyond int32
    ]
    for p in bad:
        with pytest.raises(CdlDecodeError):
            backend.decode(payload, p, levels.size)
    with pytest.raises(CdlDecodeError):
        backend.decode(payload, params, levels.size + 1000)  # needs more chunks than the stream has
    with pytest.raises(CdlDecodeError):
        backend.decode(payload, params, -1)
    # a huge declared count is refused by the chunk-count check before anything is allocated
    with pytest.raises(CdlDecodeError):
        backend.decode(payload, params, 10**15)


@settings(max_examples=150, deadline=None)
@given(payload=st.binary(max_size=64), count=st.integers(0, 300), header=st.binary(min_size=4, max_size=4))
def test_fuzz_random_streams_never_crash(payload, count, header):
    backend = CabacBackend()
    params = bytes([1, header[1] % 40, header[2] % 4, header[3] % 8]) + _varint(64) + _varint(header[0] % 9) \
        + _varint(-(-count // 64)) + b"".join(_varint(len(payload) if i == 0 else 0) for i in range(-(-count // 64)))
    try:
        out = backend.decode(payload, params, count)
    except CdlDecodeError:
        return
    assert out.shape == (count,) and (count == 0 or np.abs(out).max() <= M)


def test_bad_input_levels():
    backend = CabacBackend()
    with pytest.raises(CdlInputError):
        backend.encode(np.array([M + 1]))
    with pytest.raises(CdlInputError):
        backend.encode(np.array([0.5, 1.0]))
    with pytest.raises(CdlInputError):
        CabacBackend(n_gt=MAX_GT + 1)
    with pytest.raises(CdlInputError):
        CabacBackend(mode=7)


# --- estimates and the rate model used by RD quantization ---------------------------------------

@pytest.mark.parametrize("spread", [1, 4, 30])
def test_estimate_matches_real_size(spread):
    levels = lcg_levels(40_000, seed=spread, spread=spread)
    backend = CabacBackend(chunk_size=16_384)
    payload, _ = backend.encode(levels)
    estimate = backend.estimate_bits(levels)
    assert abs(estimate - 8 * len(payload)) <= 0.003 * 8 * len(payload) + 64


def test_rate_model_replays_the_encoder():
    levels = lcg_levels(5000, seed=9, spread=7)
    rows, cols = 100, 50
    backend = CabacBackend(mode=2, n_gt=4, chunk_size=1 << 20)
    s = backend.settings(levels, EncodeHint(shape=(rows, cols)))
    assert s["mode"] == 2 and s["row_len"] == cols
    mode, n_gt, row_len, fast, slow = s["mode"], s["n_gt"], s["row_len"], s["fast"], s["slow"]
    ctx = new_contexts(N_CONTEXTS)
    scratch = np.zeros(STATE_SIZE, np.int64)
    total = 0
    for i in range(levels.size):
        a, b, u = neighbours(levels, i, 0, row_len)
        before = ctx.copy()
        peek = rate_cost(ctx, scratch, levels[i], a, b, u, mode, n_gt, fast, slow)
        np.testing.assert_array_equal(ctx, before)          # peeking changes nothing
        cost = rate_update(ctx, scratch, levels, 0, i, i + 1, row_len, mode, n_gt, fast, slow)
        assert peek == cost > 0   # a level's bins use distinct contexts: peek = the encoder's cost
        total += cost
    kernel_total = cost_chunks(levels, 1 << 20, n_gt, mode, row_len, fast, slow, levels.size)
    assert total + (16 << COST_FRAC_BITS) == kernel_total   # same walk, same contexts
    # a chunk that starts inside the array: its first levels have no neighbours before `start`
    ctx = new_contexts(N_CONTEXTS)
    tail = rate_update(ctx, scratch, levels, 3000, 3000, levels.size, row_len, mode, n_gt, fast, slow)
    assert tail + (16 << COST_FRAC_BITS) == cost_chunks(levels[3000:].copy(), 1 << 20, n_gt, mode, row_len, fast, slow,
                                                        levels.size)
    payload, _ = backend.encode(levels, EncodeHint(shape=(rows, cols)))
    assert abs(total / (1 << COST_FRAC_BITS) - 8 * len(payload)) < 0.005 * 8 * len(payload) + 48


@pytest.mark.parametrize("mode", [0, 1, 2])
def test_rate_cost_equals_the_encoders_walk_for_every_kind_of_level(mode):
    """rate_cost sums the bins' costs itself (not through code_level, for a fast first compile): it
    must equal the encoder's own walk of one level (OP_COST through rate_update) for zero, sign,
    gt ladder, Exp-Golomb prefix and suffix, every neighbourhood class and n_gt, in any context state."""
    rng = np.random.default_rng(mode)
    mags = sorted({*range(0, 40), *(2**j + d for j in range(5, 21) for d in (-1, 0, 1)), MAX_ABS_LEVEL})
    ks = np.array([s * m for m in mags for s in ((1, -1) if m else (1,))], np.int64)
    neigh = [(0, 0, 0), (1, 0, 0), (-1, 2, -1), (0, -1, 1), (3, -5, 0), (-2, 0, 7), (0, 0, -1), (40, 1, 2)]
    scratch = np.zeros(STATE_SIZE, np.int64)
    row_len = np.int64(3)  # levels [u, b, a, k]: u is k's row neighbour
    for n_gt in (0, 1, 2, 4, MAX_GT):
        ctx = new_contexts(N_CONTEXTS)
        ctx[:, 3] = rng.integers(1, 1 << 15, N_CONTEXTS)  # CTX_PROB: the only field a cost reads
        for a, b, u in neigh:
            for k in ks:
                levels = np.array([u, b, a, k], np.int64)
                peek = rate_cost(ctx, scratch, k, np.int64(a), np.int64(b), np.int64(u), mode, n_gt, 4, 7)
                walked = rate_update(ctx.copy(), scratch, levels, 0, 3, 4, row_len, mode, n_gt, 4, 7)
                assert peek == walked, (n_gt, a, b, u, int(k))


def test_smaller_than_order0_entropy_on_laplace():
    from cdlcodec.backends.stats import order0_entropy_bits

    rng = np.random.default_rng(1)
    levels = np.rint(rng.laplace(0, 2, 200_000)).astype(np.int64)
    payload, params = roundtrip(CabacBackend(), levels)
    assert 8 * (len(payload) + len(params)) <= 1.006 * order0_entropy_bits(levels)


@pytest.mark.parametrize("rate_idx", range(len(RATE_PAIRS)))
def test_decoder_contexts_adapt_exactly_as_the_encoders(rate_idx):
    """The decoder's flat contexts (warm-up state -> shift table) give the encoder's probability after
    every update, through the warm-up and long after it, for runs of either bit and coin tosses."""
    fast, slow = (int(v) for v in RATE_PAIRS[rate_idx])
    rng = np.random.default_rng(rate_idx)
    bits = np.concatenate([np.zeros(700, np.int64), np.ones(300, np.int64), (rng.random(3000) < 0.2).astype(np.int64),
                           (rng.random(2000) < 0.5).astype(np.int64)])
    enc = new_contexts(1)
    dec = np.zeros(DEC_FIELDS, np.int64)
    dec_reset_contexts(dec)
    tab = np.zeros(MAX_COUNT + 1, np.int64)
    dec_shift_table(tab, fast, slow, WARM_SHIFT)
    assert dec[DEC_PROB] == enc[0, CTX_PROB]
    for bit in bits:
        ctx_update(enc, 0, int(bit), fast, slow, WARM_SHIFT)
        dec_update(dec, tab, 0, int(bit))
        assert dec[DEC_PROB] == enc[0, CTX_PROB]
        assert (dec[DEC_FAST], dec[DEC_SLOW]) == (enc[0, CTX_FAST], enc[0, CTX_SLOW])
