"""Single-process tests of the pieces behind cdlcodec.distributed: fp conversion, GenNorm fit,
the CO3 frame codec with its validation, and the CDL tensor codec."""
from __future__ import annotations

import math
import struct

import numpy as np
import pytest
import torch

from cdlcodec.backends import available
from cdlcodec.distributed import co3_codec, fpconv, gennorm, tensor_codec, wire
from cdlcodec.distributed import decode_tensor, encode_tensor
from cdlcodec.errors import CdlDecodeError, CdlInputError

FORMATS = [fpconv.FP4, fpconv.FP8]


def gradient_like(n: int, seed: int = 0, beta: float = 0.8, scale: float = 1e-3) -> np.ndarray:
    """GenNorm(0, scale, beta) samples: |X / scale|^beta ~ Gamma(1 / beta)."""
    rng = np.random.default_rng(seed)
    mag = rng.gamma(1.0 / beta, size=n) ** (1.0 / beta)
    return (scale * mag * rng.choice([-1.0, 1.0], size=n)).astype(np.float32)


# ---------------------------------------------------------------- fp conversion (eq. 12)

@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_fp_format_layout(fmt):
    table = fmt.magnitude_table()
    assert len(table) == 1 << (fmt.mant + fmt.exp)
    assert np.all(np.diff(table) > 0), "magnitudes must increase with the code"
    assert table[0] == 0 and table[-1] == fmt.max_magnitude
    codes = fpconv._magnitudes_to_codes(table.astype(np.float64), fmt)
    np.testing.assert_array_equal(codes, np.arange(len(table)))
    # fp4 [1,2,1] with subnormals is the uniform grid 0..7; fp8 [1,5,2] tops out at 63 * 4.
    if fmt is fpconv.FP4:
        np.testing.assert_array_equal(table, np.arange(8))
    else:
        assert fmt.max_magnitude == 252 and fmt.num_codes == 256


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_quantize_is_nearest_value_and_saturates(fmt):
    x = gradient_like(4000, seed=1)
    unit = fpconv.unit_for_bias(fpconv.search_bias(x, fmt), fmt)
    codes = fpconv.quantize(x, fmt, unit)
    values = fpconv.dequantize(codes, fmt, unit).astype(np.float64)
    grid = fpconv.code_values(fmt, unit).astype(np.float64)
    best = np.min(np.abs(x.astype(np.float64)[:, None] - grid[None, :]), axis=1)
    np.testing.assert_allclose(np.abs(values - x), best, rtol=0, atol=1e-12)
    big = np.array([1e30, -1e30, 0.0, -0.0], dtype=np.float32)
    c = fpconv.quantize(big, fmt, unit)
    top = fmt.num_codes // 2 - 1
    assert list(c) == [top, top + fmt.num_codes // 2, 0, 0], "saturate, and -0 is coded as +0"


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_bias_search_minimises_l2_error(fmt):
    x = gradient_like(20000, seed=2, beta=0.6)
    best = fpconv.search_bias(x, fmt)
    grid = fpconv.candidate_biases(float(np.abs(x).max()), fmt, 6.0)
    errors = fpconv.l2_errors(x, fmt, grid)
    assert fpconv.l2_errors(x, fmt, np.array([best]))[0] <= errors.min() * (1 + 1e-12)
    # Heavy tails: clipping a few outliers beats covering the maximum (the point of eq. 12).
    no_clip = grid[0]
    assert best < no_clip
    assert fpconv.l2_errors(x, fmt, np.array([best]))[0] < 0.9 * errors[0]
    assert fpconv.search_bias(np.zeros(10, np.float32), fmt) == 0.0


# ---------------------------------------------------------------- GenNorm (eqs. 9-10c)

def test_kurtosis_inversion_and_special_cases():
    assert gennorm.kurtosis_of_beta(2.0) == pytest.approx(3.0)
    assert gennorm.kurtosis_of_beta(1.0) == pytest.approx(6.0)
    for beta in (0.3, 0.7, 1.0, 1.5, 2.0, 4.0):
        assert gennorm.beta_from_kurtosis(gennorm.kurtosis_of_beta(beta)) == pytest.approx(beta, rel=1e-9)


@pytest.mark.parametrize("beta", [0.7, 1.0, 2.0])
def test_fit_recovers_shape_and_scale(beta):
    x = gradient_like(400_000, seed=3, beta=beta, scale=2e-3)
    fit = gennorm.fit(x)
    assert fit.beta == pytest.approx(beta, rel=0.08)
    assert fit.alpha == pytest.approx(2e-3, rel=0.08)
    assert fit.sigma == pytest.approx(float(np.std(x)), rel=1e-6)
    assert gennorm.fit(np.ones(5)) is None and gennorm.fit(np.ones(1)) is None


def test_cdf_matches_integrated_pdf():
    fit = gennorm.GenNormFit(mu=0.1, alpha=0.5, beta=0.8)
    xs = np.linspace(-6, 6, 200_001)
    pdf = fit.beta / (2 * fit.alpha * math.gamma(1 / fit.beta)) * np.exp(-(np.abs(xs - fit.mu) / fit.alpha) ** fit.beta)
    integral = np.concatenate([[0.0], np.cumsum((pdf[1:] + pdf[:-1]) / 2 * np.diff(xs))])
    probe = np.array([-3.0, -0.5, 0.1, 0.4, 2.0])
    expected = np.interp(probe, xs, integral) + float(gennorm.cdf(fit, np.array([-6.0]))[0])
    np.testing.assert_allclose(gennorm.cdf(fit, probe), expected, atol=2e-6)


@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
def test_gennorm_code_model_fits_the_histogram(fmt):
    x = gradient_like(100_000, seed=4, beta=0.9)
    unit = fpconv.unit_for_bias(fpconv.search_bias(x, fmt), fmt)
    probs = gennorm.code_probabilities(gennorm.fit(x), fmt, unit)
    assert probs.sum() == pytest.approx(1.0, abs=1e-9)
    hist = np.bincount(fpconv.quantize(x, fmt, unit), minlength=fmt.num_codes) / x.size
    nz = hist > 0
    entropy = -np.sum(hist[nz] * np.log2(hist[nz]))
    cross = -np.sum(hist[nz] * np.log2(probs[nz]))
    assert cross < entropy + 0.02, "a matched GenNorm model codes within 0.02 bit of the entropy"
    # The GenNorm-optimal bias is close to the direct search on data drawn from that GenNorm.
    assert abs(gennorm.bias_from_fit(gennorm.fit(x), fmt) - fpconv.search_bias(x, fmt)) <= 0.5


# ---------------------------------------------------------------- CO3 frames

@pytest.mark.parametrize("fmt", FORMATS, ids=lambda f: f.name)
@pytest.mark.parametrize("source", co3_codec.CODE_SOURCES)
@pytest.mark.parametrize("bias_source", co3_codec.BIAS_SOURCES)
def test_bucket_round_trip_is_exact(fmt, source, bias_source):
    x = gradient_like(5000, seed=5)
    frame, ghat = co3_codec.encode_bucket(x, fmt, source, bias_source)
    out = co3_codec.decode_bucket(frame, x.size)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out.view(np.uint32), ghat.view(np.uint32))
    raw_bits = x.size * 32
    assert len(frame) * 8 < raw_bits * (fmt.bits + 0.5) / 32, "Huffman must beat the fixed-length fp code"


@pytest.mark.parametrize("values", [np.zeros(0), np.zeros(7), np.full(9, 3e-4), np.array([1e-3])],
                         ids=["empty", "zeros", "constant", "single"])
def test_degenerate_buckets(values):
    for fmt in FORMATS:
        frame, ghat = co3_codec.encode_bucket(values.astype(np.float32), fmt)
        assert len(frame) == wire.GRAD_HEADER_SIZE
        np.testing.assert_array_equal(co3_codec.decode_bucket(frame, values.size), ghat)


def test_nonfinite_bucket_decodes_to_nan():
    x = gradient_like(100)
    x[3] = np.inf
    frame, ghat = co3_codec.encode_bucket(x, fpconv.FP8)
    assert np.all(np.isnan(ghat)) and np.all(np.isnan(co3_codec.decode_bucket(frame, 100)))


def test_every_header_byte_flip_and_truncation_is_a_clean_error():
    x = gradient_like(3000, seed=6)
    frame, _ = co3_codec.encode_bucket(x, fpconv.FP4)
    rng = np.random.default_rng(0)
    positions = list(range(wire.GRAD_HEADER_SIZE + 12)) + list(rng.integers(0, len(frame), 200))
    for pos in positions:
        bad = bytearray(frame)
        bad[pos] ^= 1 << int(rng.integers(0, 8))
        with pytest.raises(CdlDecodeError):
            co3_codec.decode_bucket(bytes(bad), x.size)
    for cut in list(range(0, 40)) + [len(frame) // 2, len(frame) - 1]:
        with pytest.raises(CdlDecodeError):
            co3_codec.decode_bucket(frame[:cut], x.size)
    with pytest.raises(CdlDecodeError, match="trailing"):
        co3_codec.decode_bucket(frame + b"\0", x.size)
    with pytest.raises(CdlDecodeError, match="elements"):
        co3_codec.decode_bucket(frame, x.size + 1)


def _reframe(frame: bytes, **changes) -> bytes:
    """Re-pack a frame with fields changed and a *valid* CRC: only the semantic checks can catch it."""
    f = wire.GradientFrame.parse(frame, struct.unpack_from("<Q", frame, 8)[0])
    fields = dict(f.__dict__)
    fields.update(changes)
    return wire.GradientFrame(**fields).to_bytes()


def test_semantic_checks_behind_a_valid_checksum():
    x = gradient_like(2000, seed=7)
    frame, _ = co3_codec.encode_bucket(x, fpconv.FP8)
    f = wire.GradientFrame.parse(frame, x.size)
    bad_lengths = wire.pack_lengths(np.ones(256, dtype=np.uint8))  # Kraft sum 128 > 1
    cases = {
        "format": _reframe(frame, format_id=9),
        "Kraft": _reframe(frame, lengths=bad_lengths),
        "code-length table": _reframe(frame, lengths=f.lengths[:-1]),
        "unit": _reframe(frame, unit_bits=0x7F800000),  # +inf
        "payload": _reframe(frame, payload=f.payload[: len(f.payload) // 3]),
        "constant": _reframe(frame, flags=wire.FLAG_CONSTANT),
    }
    for what, data in cases.items():
        with pytest.raises(CdlDecodeError):
            co3_codec.decode_bucket(data, x.size)


def test_length_packing_round_trip():
    lengths = np.random.default_rng(1).integers(0, 25, size=256).astype(np.uint8)
    packed = wire.pack_lengths(lengths)
    assert len(packed) == 160
    np.testing.assert_array_equal(wire.unpack_lengths(packed, 256), lengths)


# ---------------------------------------------------------------- tensor codec

class WeightQuantizer:
    """Stand-in exposing what a CDL weight quantizer does: step q, sharpness alpha, bits b."""

    def __init__(self, q, bits):
        self.q = torch.tensor(q)
        self.alpha = torch.tensor(50.0)
        self.bits = bits


class ActivationQuantizer:
    def __init__(self, s, bits):
        self.s = torch.tensor(s)
        self.beta = torch.tensor(20.0)
        self.bits = bits


@pytest.mark.parametrize("backend", available())
def test_tensor_round_trip_every_backend(backend):
    t = torch.from_numpy(gradient_like(3 * 40 * 7, seed=8, scale=0.05)).reshape(3, 40, 7)
    quant = WeightQuantizer(0.01, 6)
    payload = encode_tensor(t, quant, backend=backend)
    out = decode_tensor(payload)
    assert out.shape == t.shape and out.dtype == t.dtype
    expected = tensor_codec.reference_dequantize(t, quant)
    assert torch.equal(out, expected)
    levels = torch.round(t / 0.01).clamp(-32, 31)
    assert torch.equal(out, levels * torch.tensor(0.01))


def test_tensor_codec_alphabets_and_dtypes():
    act = ActivationQuantizer(0.1, 3)
    a = torch.tensor([-1.0, 0.04, 0.06, 0.3, 5.0])
    out = decode_tensor(encode_tensor(a, act))
    assert torch.equal(out, torch.tensor([0.0, 0.0, 1.0, 3.0, 7.0]) * torch.tensor(0.1)), "unsigned, clipped"
    half = (torch.arange(-64, 65) / 64).to(torch.float16)
    out = decode_tensor(encode_tensor(half, step=1 / 64))
    assert out.dtype == torch.float16 and torch.equal(out, half), "a grid-aligned tensor is lossless"
    empty = decode_tensor(encode_tensor(torch.zeros(0, 5), step=0.1, bits=4))
    assert empty.shape == (0, 5)
    big = decode_tensor(encode_tensor(np.array([1e6, -1e6], dtype=np.float32), step=1.0))
    assert big.tolist() == [1e6, -1e6]


def test_tensor_codec_bad_input_and_corrupt_payloads():
    with pytest.raises(CdlInputError):
        encode_tensor(torch.ones(3))
    with pytest.raises(CdlInputError):
        encode_tensor(torch.ones(3), step=0.0)
    with pytest.raises(CdlInputError):
        encode_tensor(torch.tensor([1.0, float("nan")]), step=0.1)
    with pytest.raises(CdlInputError):
        encode_tensor(torch.ones(3, dtype=torch.int32), step=0.1)
    with pytest.raises(CdlInputError):
        encode_tensor(torch.ones(3), object())
    payload = encode_tensor(torch.randn(200), step=0.05, bits=8)
    rng = np.random.default_rng(2)
    for pos in list(range(48)) + list(rng.integers(0, len(payload), 100)):
        bad = bytearray(payload)
        bad[pos] ^= 1 << int(rng.integers(0, 8))
        with pytest.raises(CdlDecodeError):
            decode_tensor(bytes(bad))
    for cut in range(0, len(payload), 7):
        with pytest.raises(CdlDecodeError):
            decode_tensor(payload[:cut])
    with pytest.raises(CdlDecodeError, match="limit"):
        decode_tensor(payload, max_numel=10)


def test_tensor_codec_reads_real_cdl_layers():
    from cdlcodec.cdl.layers import ActivationQuantizer as CdlActivation, CDLLinear
    from cdlcodec.cdl.quantizer import hard_quantize

    torch.manual_seed(0)
    layer = CDLLinear(30, 20, bits=4).eval()
    out = decode_tensor(encode_tensor(layer.weight, layer))
    lo, hi = layer.bounds
    assert torch.equal(out, hard_quantize(layer.weight, layer.q, lo, hi)), "the layer's eval-mode weight"
    act = CdlActivation(bits=3, s0=0.2)
    x = torch.randn(5, 7).abs()
    out = decode_tensor(encode_tensor(x, act))
    lo, hi = act.bounds
    assert (lo, hi) == (0, 7) and torch.equal(out, hard_quantize(x, act.s, lo, hi))
