"""CO3's per-bucket codec without any communication: fp conversion + static Huffman, and back.

encode_bucket(x) returns the frame bytes *and* the float32 gradient the receivers will decode, so
the sender can run error feedback (eq. 14) on exactly what was transmitted. decode_bucket(frame)
validates the frame (wire.GradientFrame.parse) and rebuilds that gradient bit-exactly.

The lossless stage reuses the project's Huffman coder (cdlcodec.backends.huffman): a static code
whose lengths come from the GenNorm fit of the bucket (eq. 10c; every producible code gets a
length) or from the bucket's own histogram (optimal for this bucket; absent codes get no length).
The lengths travel as 5-bit integers, so the receiver rebuilds the identical code table.
"""
from __future__ import annotations

import numpy as np

from ..errors import CdlDecodeError, CdlInputError
from . import fpconv, gennorm, wire

CODE_SOURCES = ("gennorm", "histogram")
BIAS_SOURCES = ("search", "gennorm")


def _huffman():
    from ..backends import huffman  # imported late: the backend pulls in numba

    return huffman


def _code_lengths(codes: np.ndarray, fmt: fpconv.FpFormat, unit: np.float32, x: np.ndarray,
                  code_source: str) -> np.ndarray:
    if code_source == "gennorm":
        fit = gennorm.fit(x)
        if fit is not None:
            counts = gennorm.counts_for_code(fit, fmt, float(unit))
            # The fit's floor of one count per code guarantees every emitted code is codable; make
            # sure anyway, since a code without a length would be unencodable.
            present = np.bincount(codes, minlength=fmt.num_codes) > 0
            counts[present] = np.maximum(counts[present], 1)
            return np.asarray(_huffman().code_lengths(counts, max_len=wire.MAX_CODE_LENGTH), dtype=np.uint8)
    counts = np.bincount(codes, minlength=fmt.num_codes).astype(np.int64)
    return np.asarray(_huffman().code_lengths(counts, max_len=wire.MAX_CODE_LENGTH), dtype=np.uint8)


def choose_unit(x: np.ndarray, fmt: fpconv.FpFormat, bias_source: str = "search") -> np.float32:
    """The float32 unit for this bucket from the L2-optimal exponent bias (eq. 12)."""
    if bias_source == "gennorm":
        fit = gennorm.fit(x)
        bias = gennorm.bias_from_fit(fit, fmt) if fit is not None else fpconv.search_bias(x, fmt)
    elif bias_source == "search":
        bias = fpconv.search_bias(x, fmt)
    else:
        raise CdlInputError(f"unknown bias source {bias_source!r} (known: {', '.join(BIAS_SOURCES)})")
    return fpconv.clamp_unit(fpconv.unit_for_bias(bias, fmt), fmt)


def encode_bucket(x: np.ndarray, fmt: fpconv.FpFormat, code_source: str = "gennorm",
                  bias_source: str = "search") -> tuple[bytes, np.ndarray]:
    """(frame bytes, float32 quantized values the receivers will decode) for a flat float array."""
    if code_source not in CODE_SOURCES:
        raise CdlInputError(f"unknown code source {code_source!r} (known: {', '.join(CODE_SOURCES)})")
    x = np.asarray(x, dtype=np.float32).ravel()
    source_id = wire.SOURCE_GENNORM if code_source == "gennorm" else wire.SOURCE_HISTOGRAM
    if not np.all(np.isfinite(x)):
        frame = wire.GradientFrame(fmt.format_id, wire.FLAG_NONFINITE, source_id, x.size, 0, b"", 0, b"")
        return frame.to_bytes(), np.full(x.size, np.nan, dtype=np.float32)
    unit = choose_unit(x, fmt, bias_source)
    unit_bits = int(np.array([unit], dtype=np.float32).view(np.uint32)[0])
    codes = fpconv.quantize(x, fmt, unit)
    ghat = fpconv.dequantize(codes, fmt, unit)
    if codes.size == 0 or np.all(codes == codes[0]):
        constant = int(codes[0]) if codes.size else 0
        frame = wire.GradientFrame(fmt.format_id, wire.FLAG_CONSTANT, source_id, x.size, unit_bits, b"", constant, b"")
        return frame.to_bytes(), ghat
    lengths = _code_lengths(codes, fmt, unit, x, code_source)
    payload = bytes(_huffman().encode_symbols(codes, lengths))
    frame = wire.GradientFrame(fmt.format_id, 0, source_id, x.size, unit_bits, wire.pack_lengths(lengths), 0, payload)
    return frame.to_bytes(), ghat


def decode_bucket(data: bytes, expected_numel: int, peer: str = "peer") -> np.ndarray:
    """float32 values of one validated frame; CdlDecodeError for anything malformed."""
    frame = wire.GradientFrame.parse(data, expected_numel, peer)
    fmt = fpconv.FORMATS_BY_ID.get(frame.format_id)
    if fmt is None:
        raise CdlDecodeError(f"gradient frame from {peer} uses unknown fp format id {frame.format_id}")
    if frame.flags & wire.FLAG_NONFINITE:
        if frame.lengths or frame.payload:
            raise CdlDecodeError(f"gradient frame from {peer} flags non-finite values but carries a payload")
        return np.full(frame.numel, np.nan, dtype=np.float32)
    unit = frame.unit
    if not fpconv.valid_unit(unit, fmt):
        raise CdlDecodeError(f"gradient frame from {peer} has an invalid quantization unit {float(unit)!r}")
    values = fpconv.code_values(fmt, unit)
    if frame.flags & wire.FLAG_CONSTANT:
        if frame.lengths or frame.payload:
            raise CdlDecodeError(f"gradient frame from {peer} is flagged constant but carries a payload")
        if frame.constant_code >= fmt.num_codes:
            raise CdlDecodeError(f"gradient frame from {peer} has constant code {frame.constant_code} out of range")
        return np.full(frame.numel, values[frame.constant_code], dtype=np.float32)
    lengths = wire.unpack_lengths(frame.lengths, fmt.num_codes)
    wire.check_prefix_code(lengths, f"gradient frame from {peer}")
    try:
        codes = np.asarray(_huffman().decode_symbols(frame.payload, lengths, frame.numel), dtype=np.int64)
    except CdlDecodeError as exc:
        raise CdlDecodeError(f"gradient frame from {peer}: {exc}") from exc
    if codes.shape != (frame.numel,) or (codes.size and (codes.min() < 0 or codes.max() >= fmt.num_codes)):
        raise CdlDecodeError(f"gradient frame from {peer} decodes to codes outside the fp alphabet")
    return values[codes]
