"""Generalized-normal (GenNorm) model of a gradient bucket (CO3, eqs. 9-10c).

GenNorm(mu, alpha, beta) has pdf beta / (2 alpha Gamma(1/beta)) * exp(-(|x - mu| / alpha)^beta) (eq. 9),
variance alpha^2 Gamma(3/beta) / Gamma(1/beta) (eq. 10b) and kurtosis
Gamma(5/beta) Gamma(1/beta) / Gamma(3/beta)^2 (eq. 10c), which depends on beta only. The fit is by
moments: beta from the sample kurtosis (eq. 10c solved by bisection), alpha from the variance.

Everything here runs on the encoder only. Its outputs (Huffman code lengths, an exponent bias) travel
as integers / float32 bits, so the float arithmetic below never has to agree between machines.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from . import fpconv

BETA_MIN, BETA_MAX = 0.1, 8.0


@dataclass(frozen=True)
class GenNormFit:
    mu: float
    alpha: float
    beta: float

    @property
    def sigma(self) -> float:
        return self.alpha * math.sqrt(math.exp(math.lgamma(3.0 / self.beta) - math.lgamma(1.0 / self.beta)))


def kurtosis_of_beta(beta: float) -> float:
    """Eq. 10c."""
    return math.exp(math.lgamma(5.0 / beta) + math.lgamma(1.0 / beta) - 2.0 * math.lgamma(3.0 / beta))


def beta_from_kurtosis(kurt: float) -> float:
    """Invert eq. 10c; kurtosis falls monotonically in beta (Laplace 6, normal 3, uniform 1.8)."""
    if not np.isfinite(kurt):
        return BETA_MIN
    kurt = min(max(kurt, kurtosis_of_beta(BETA_MAX)), kurtosis_of_beta(BETA_MIN))
    lo, hi = math.log(BETA_MIN), math.log(BETA_MAX)
    for _ in range(60):
        mid = 0.5 * (lo + hi)
        if kurtosis_of_beta(math.exp(mid)) > kurt:
            lo = mid
        else:
            hi = mid
    return math.exp(0.5 * (lo + hi))


def fit(x: np.ndarray) -> GenNormFit | None:
    """Moment fit; None for fewer than 2 values or zero variance (no distribution to speak of)."""
    x = np.asarray(x, dtype=np.float64).ravel()
    if x.size < 2:
        return None
    mu = float(np.mean(x))
    d = x - mu
    var = float(np.mean(d * d))
    if not var > 0.0 or not np.isfinite(var):
        return None
    kurt = float(np.mean(d**4)) / (var * var)
    beta = beta_from_kurtosis(kurt)
    alpha = math.sqrt(var * math.exp(math.lgamma(1.0 / beta) - math.lgamma(3.0 / beta)))
    return GenNormFit(mu, alpha, beta)


def _gammainc_lower_regularized(a: float, x: np.ndarray) -> np.ndarray:
    """P(a, x) for x >= 0: power series below a + 1, Lentz continued fraction above."""
    x = np.asarray(x, dtype=np.float64)
    out = np.zeros_like(x)
    log_pref = lambda v: a * np.log(v) - v - math.lgamma(a)  # noqa: E731
    small = (x > 0) & (x < a + 1.0)
    if np.any(small):
        v = x[small]
        term = np.full_like(v, 1.0 / a)
        total = term.copy()
        for n in range(1, 500):
            term = term * v / (a + n)
            total += term
            if np.all(np.abs(term) < np.abs(total) * 1e-15):
                break
        out[small] = total * np.exp(log_pref(v))
    out[np.isposinf(x)] = 1.0
    large = (x >= a + 1.0) & np.isfinite(x)
    if np.any(large):
        v = x[large]
        tiny = 1e-300
        b = v + 1.0 - a
        c = np.full_like(v, 1.0 / tiny)
        d = 1.0 / b
        h = d.copy()
        for i in range(1, 500):
            an = -i * (i - a)
            b = b + 2.0
            d = an * d + b
            d = np.where(np.abs(d) < tiny, tiny, d)
            c = b + an / c
            c = np.where(np.abs(c) < tiny, tiny, c)
            d = 1.0 / d
            delta = d * c
            h = h * delta
            if np.all(np.abs(delta - 1.0) < 1e-15):
                break
        out[large] = 1.0 - np.exp(log_pref(v)) * h
    return out


def cdf(fit_: GenNormFit, x: np.ndarray) -> np.ndarray:
    """GenNorm CDF: 1/2 + sign(x - mu) / 2 * P(1/beta, (|x - mu| / alpha)^beta)."""
    z = (np.asarray(x, dtype=np.float64) - fit_.mu) / fit_.alpha
    p = _gammainc_lower_regularized(1.0 / fit_.beta, np.abs(z) ** fit_.beta)
    return 0.5 + 0.5 * np.sign(z) * p


def code_probabilities(fit_: GenNormFit, fmt: fpconv.FpFormat, unit: float) -> np.ndarray:
    """Probability of every fp code under the fit: the mass between the midpoints around its value."""
    values = fpconv.code_values(fmt, np.float32(unit)).astype(np.float64)
    half = fmt.num_codes // 2
    pos = values[:half]  # increasing magnitudes 0 .. max
    edges = np.concatenate([(pos[:-1] + pos[1:]) / 2.0, [np.inf]])
    lower_edges = np.concatenate([[0.0], edges[:-1]])
    # Positive codes own [lower, upper); code 0 also owns the mirrored (-edge0, 0). One cdf call.
    n = edges.size
    c = cdf(fit_, np.concatenate([edges, lower_edges, -lower_edges, -edges]))
    p_pos = c[:n] - c[n:2 * n]
    p_neg = c[2 * n:3 * n] - c[3 * n:]
    probs = np.concatenate([p_pos, p_neg])
    probs[0] += p_neg[0]
    probs[half] = 0.0  # negative zero is never produced
    return np.clip(probs, 0.0, None)


def counts_for_code(fit_: GenNormFit, fmt: fpconv.FpFormat, unit: float, total: int = 1 << 20) -> np.ndarray:
    """Integer pseudo-counts for a static Huffman code; every producible code gets at least 1.

    The floor of 1 keeps every value the quantizer can emit codable, even where the fit's tails are
    too light, so a GenNorm code never fails on an outlier.
    """
    probs = code_probabilities(fit_, fmt, unit)
    counts = np.floor(probs * total).astype(np.int64)
    counts = np.maximum(counts, 1)
    counts[fmt.num_codes // 2] = 0
    return counts


def bias_from_fit(fit_: GenNormFit, fmt: fpconv.FpFormat, span: float | None = None) -> float:
    """Exponent bias minimising the expected L2 error under the fitted GenNorm (eq. 12 in expectation).

    The paper fits polynomials in beta to this minimisation (eqs. 15-16); we evaluate the
    minimisation itself on a quadrature grid of the fitted density (the printed eq. 16 coefficients
    give biases in the thousands, so they cannot be used as printed).
    """
    sigma = fit_.sigma
    if not sigma > 0.0:
        return 0.0
    # Quadrature over |x - mu| <= 12 sigma (beyond that the mass is negligible for beta >= 0.1 scaled fits
    # relative to the clipping error already counted at the top of the range).
    grid = np.linspace(0.0, 12.0 * sigma, 8193)[1:]
    z = grid / fit_.alpha
    weights = np.exp(-(z**fit_.beta))
    weights /= weights.sum()
    absmax = float(grid[-1])
    if span is None:
        span = 8.0 if fmt.exp == 1 else 10.0
    return fpconv._coarse_to_fine(grid, fmt, fpconv.candidate_biases(absmax, fmt, span), weights)
