"""Floating-point conversion of gradients to fp4 [sign 1, mantissa 2, exponent 1] or fp8 [1, 5, 2]
with a per-bucket exponent bias (CO3, eq. 12).

Representation. A code is `sign << (m + e) | E << m | M` for exponent field E and mantissa field M.
Like IEEE floats, E = 0 is subnormal, so zero is representable and small gradients are not pushed
up to the smallest normal number. Measured in a *unit* u the magnitudes are the integers

    E = 0:  M                         (0 .. 2^m - 1)
    E > 0:  (2^m + M) * 2^(E - 1)     (2^m .. (2^(m+1) - 1) * 2^(2^e - 2))

and the value of a code is `sign * magnitude * u`. No codes are reserved for inf/NaN: values beyond
the largest magnitude saturate. The exponent bias b of eq. 12 is the real number with
u = 2^b / 2^m (b places the first normal binade); the search below runs b over a grid of 1/8.

Bit-exactness. The decoder never recomputes u from b: u travels as float32 bits, and a decoded value
is one IEEE float32 product `magnitude * u` of two float32 numbers, correctly rounded and hence
identical on every machine. The sender computes its own quantized gradient with the same function,
which is why decoded gradients equal the sender's quantized gradients exactly.
"""
from __future__ import annotations

from dataclasses import dataclass

import math

import numpy as np
from ..jit import njit

from ..errors import CdlInputError

# Grid step of the exponent-bias search, in binades (log2 units).
BIAS_STEP = 1.0 / 8.0
# Buckets larger than this are searched on a deterministic strided subsample (encoder-side only).
SEARCH_SAMPLE = 1 << 16
# The unit must keep every magnitude finite and non-denormal after multiplication.
FLOAT32_MAX = float(np.finfo(np.float32).max)
FLOAT32_TINY = float(np.finfo(np.float32).tiny)


@dataclass(frozen=True)
class FpFormat:
    """A sign/mantissa/exponent layout [1, mant, exp] (the paper's [sgn, mant, exp])."""

    name: str
    format_id: int  # travels in the wire header
    mant: int
    exp: int

    @property
    def num_codes(self) -> int:
        return 1 << (1 + self.mant + self.exp)

    @property
    def bits(self) -> int:
        return 1 + self.mant + self.exp

    @property
    def max_magnitude(self) -> int:
        """Largest magnitude in units: (2^(m+1) - 1) * 2^(2^e - 2)."""
        return ((1 << (self.mant + 1)) - 1) << ((1 << self.exp) - 2)

    def magnitude_table(self) -> np.ndarray:
        """Integer magnitude of every unsigned code E << m | M (length 2^(m+e))."""
        m = self.mant
        table = np.empty(1 << (m + self.exp), dtype=np.int64)
        for e_field in range(1 << self.exp):
            for mant in range(1 << m):
                code = (e_field << m) | mant
                table[code] = mant if e_field == 0 else ((1 << m) + mant) << (e_field - 1)
        return table


FP4 = FpFormat("fp4", 1, mant=2, exp=1)
FP8 = FpFormat("fp8", 2, mant=5, exp=2)
FORMATS = {f.name: f for f in (FP4, FP8)}
FORMATS_BY_ID = {f.format_id: f for f in (FP4, FP8)}


def get_format(name: str) -> FpFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise CdlInputError(f"unknown floating-point format {name!r} (known: {', '.join(FORMATS)})") from None


def code_values(fmt: FpFormat, unit: np.float32) -> np.ndarray:
    """float32 value of every code 0 .. 2^(1+m+e) - 1 for this unit (one exact product each)."""
    mags = fmt.magnitude_table().astype(np.float32)
    pos = mags * np.float32(unit)
    return np.concatenate([pos, -pos]).astype(np.float32)


def _quantize_magnitudes(a: np.ndarray, fmt: FpFormat) -> np.ndarray:
    """Nearest representable magnitude (in units, float64 integers) to each a >= 0, saturating.

    Inside a binade the representable magnitudes are evenly spaced, so rounding a / spacing to the
    nearest integer (ties to even) is the nearest neighbour; a result that rounds up to the next
    binade's first value is representable too.
    """
    m = fmt.mant
    a = np.minimum(a, float(fmt.max_magnitude))
    # frexp: a = f * 2^k with f in [0.5, 1) -> floor(log2 a) = k - 1, exact for every float.
    _, k = np.frexp(a)
    spacing_exp = np.maximum(k - 1 - m, 0)  # subnormal and first normal binade have spacing 1
    spacing = np.ldexp(1.0, spacing_exp)
    q = np.rint(a / spacing) * spacing
    return np.minimum(q, float(fmt.max_magnitude))


def _magnitudes_to_codes(q: np.ndarray, fmt: FpFormat) -> np.ndarray:
    m = fmt.mant
    qi = q.astype(np.int64)
    _, k = np.frexp(q)
    e_field = np.where(qi < (1 << m), 0, k - m).astype(np.int64)  # k - 1 = floor(log2 q) = E - 1 + m
    shift = np.maximum(e_field - 1, 0)
    mant = np.where(e_field == 0, qi, (qi >> shift) - (1 << m))
    return (e_field << m) | mant


def quantize(x: np.ndarray, fmt: FpFormat, unit: float) -> np.ndarray:
    """Codes (int64, 0 .. 2^(1+m+e)-1) of the nearest representable values to float array x.

    Non-finite inputs are the caller's business (see co3_hook: such buckets are flagged, not coded).
    """
    unit32 = np.float32(unit)
    xf = np.asarray(x, dtype=np.float64).ravel()
    q = _quantize_magnitudes(np.abs(xf) / float(unit32), fmt)
    codes = _magnitudes_to_codes(q, fmt)
    negative = (xf < 0) & (q > 0)  # -0 collapses onto +0: one symbol for zero
    return np.where(negative, codes | (1 << (fmt.mant + fmt.exp)), codes)


def dequantize(codes: np.ndarray, fmt: FpFormat, unit: float) -> np.ndarray:
    """float32 values of codes; exactly what every receiver computes."""
    return code_values(fmt, np.float32(unit))[np.asarray(codes, dtype=np.int64)]


def unit_for_bias(bias: float, fmt: FpFormat) -> np.float32:
    """u = 2^b / 2^m as float32 (encoder side only; the decoder reads u from the header)."""
    return np.float32(np.exp2(bias - fmt.mant))


def valid_unit(unit: np.float32, fmt: FpFormat) -> bool:
    """A unit the decoder accepts: positive, normal, and no magnitude overflows float32."""
    u = float(unit)
    return np.isfinite(u) and FLOAT32_TINY <= u <= FLOAT32_MAX / (2 * fmt.max_magnitude)


def _search_sample(x: np.ndarray) -> np.ndarray:
    if x.size <= SEARCH_SAMPLE:
        return x
    stride = -(-x.size // SEARCH_SAMPLE)
    return x[::stride]


def candidate_biases(absmax: float, fmt: FpFormat, span: float) -> np.ndarray:
    """Bias grid from the no-clipping bias (largest value just representable) down `span` binades.

    Lower biases trade clipping of the few largest values for finer steps near zero, which is where
    heavy-tailed gradients put most of their mass.
    """
    top = np.log2(absmax) - np.log2(fmt.max_magnitude) + fmt.mant  # bias with max|x| == max magnitude
    top = np.ceil(top / BIAS_STEP) * BIAS_STEP
    n = int(round(span / BIAS_STEP)) + 1
    return top - BIAS_STEP * np.arange(n)


@njit(cache=True, nogil=True)
def _l2_error_kernel(x_abs, weights, units, mant, max_mag):
    """Sum of weighted squared errors of nearest-value fp quantization, one sum per unit.

    Float arithmetic is fine here: this only *chooses* the bias (encoder side); the codes
    themselves come from `quantize`. Ties cost the same error either way, so rounding half up
    gives the same sums as the encoder's round-half-even.
    """
    out = np.zeros(units.size)
    top = float(max_mag)
    first_wide = 2.0 ** (mant + 1)  # from here on the spacing doubles every binade
    for j in range(units.size):
        u = units[j]
        inv_u = 1.0 / u
        total = 0.0
        for i in range(x_abs.size):
            a = x_abs[i] * inv_u
            if a >= top:
                q = top
            else:
                spacing = 1.0
                limit = first_wide
                while a >= limit:
                    spacing *= 2.0
                    limit *= 2.0
                q = math.floor(a / spacing + 0.5) * spacing
                if q > top:
                    q = top
            d = (a - q) * u
            total += weights[i] * d * d
        out[j] = total
    return out


def l2_errors(x: np.ndarray, fmt: FpFormat, biases: np.ndarray, weights: np.ndarray | None = None) -> np.ndarray:
    """Sum of (weighted) squared quantization errors of x for each bias (eq. 12's objective)."""
    x_abs = np.ascontiguousarray(np.abs(np.asarray(x, dtype=np.float64)).ravel())
    w = np.ones_like(x_abs) if weights is None else np.ascontiguousarray(weights, dtype=np.float64).ravel()
    units = np.array([float(unit_for_bias(float(b), fmt)) for b in biases], dtype=np.float64)
    return _l2_error_kernel(x_abs, w, units, fmt.mant, fmt.max_magnitude)


def search_bias(x: np.ndarray, fmt: FpFormat, span: float | None = None) -> float:
    """Exponent bias minimising the L2 error over this bucket by direct search (eq. 12).

    The grid runs in steps of 1/8 binade from the no-clipping bias down `span` binades, searched
    coarse to fine; a bucket of zeros (or an empty one) gets bias 0.
    """
    sample = _search_sample(np.asarray(x, dtype=np.float64).ravel())
    absmax = float(np.max(np.abs(sample))) if sample.size else 0.0
    if not absmax > 0.0:
        return 0.0
    if span is None:
        span = 4.0 if fmt.exp == 1 else 6.0
    return float(_coarse_to_fine(sample, fmt, candidate_biases(absmax, fmt, span)))


def _coarse_to_fine(x: np.ndarray, fmt: FpFormat, grid: np.ndarray, weights: np.ndarray | None = None) -> float:
    """Best bias of a descending grid: every 4th point first, then the 1/8 steps around the winner.

    The error is smooth in the bias at the scale of half a binade, so this finds the grid optimum
    (checked against the exhaustive search in the tests) at about a third of the cost.
    """
    coarse_idx = np.arange(0, grid.size, 4)
    errors = l2_errors(x, fmt, grid[coarse_idx], weights)
    best = int(coarse_idx[int(np.argmin(errors))])
    fine_idx = np.arange(max(best - 3, 0), min(best + 4, grid.size))
    errors = l2_errors(x, fmt, grid[fine_idx], weights)
    return float(grid[int(fine_idx[int(np.argmin(errors))])])


def clamp_unit(unit: np.float32, fmt: FpFormat) -> np.float32:
    """Pull a unit into the decoder's accepted range (only matters for absurdly small/large buckets)."""
    u = float(unit)
    lo, hi = FLOAT32_TINY, FLOAT32_MAX / (2 * fmt.max_magnitude)
    return np.float32(min(max(u, lo), hi))
