"""Rate-distortion quantization (DeepCABAC eq. 10-11): per weight, the level with the lowest
F_i (w_i - k Δ)² / Δ² + λ · R(k | context).

- Δ is the step (per tensor or per output channel, same rules as the uniform quantizer). Distortion
  is measured in units of Δ², so one λ means the same trade-off for every tensor: λ = 0.1 accepts
  an extra squared error of 0.1 Δ² to save one bit. λ = 0 is nearest rounding, bit for bit.
- R comes from the backend that will code the tensor:
  * cabac: the backend's own rate model (`cabac_binarization.rate_cost` / `rate_update`) scanning
    the tensor in coding order, contexts evolving with the levels already chosen, chunks reset
    exactly as the encoder resets them (DeepCABAC's sequential RD quantization);
  * huffman (and raw): code lengths of a Huffman code built from the current level histogram,
    re-estimated `iterations` times (the histogram shifts as levels move to cheaper codes).
  `auto` uses the cabac model (the backend that wins on size).
- Candidates per weight: the two integers around w/Δ and 0; the nearest wins ties.
- F_i: optional sensitivity weights (e.g. a diagonal Fisher estimate, `fisher.py`), normalised to
  mean 1 per tensor so λ keeps its meaning; absent = 1 (DeepCABAC "DC-v2").
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..backends import EncodeHint
from ..backends.cabac_binarization import N_CONTEXTS, neighbours, rate_cost, rate_update
from ..backends.cabac_coder import COST_FRAC_BITS, STATE_SIZE, new_contexts
from ..errors import CdlInputError
from ..jit import njit
from .base import DEFAULT_REL_STEP, Quantizer, parameter_error
from .channel import broadcast_steps, channel_steps, level_limit, nearest_levels
from .params import ChannelParams, UniformParams
from .uniform import UniformQuantizer

GRANULARITIES = ("tensor", "channel")
RATE_MODELS = ("auto", "cabac", "huffman", "raw")


def step_plan(rule: UniformQuantizer, granularity: str, w32: np.ndarray):
    """(step as float64 array broadcastable to w, quant dict) for one tensor."""
    if granularity == "channel" and w32.ndim >= 1 and w32.shape[0] > 0:
        steps = channel_steps(rule, w32, 0)
        return broadcast_steps(steps, w32.shape, 0), ChannelParams(0, tuple(float(s) for s in steps)).to_json()
    step = rule.step_for(w32)
    return np.float64(step), UniformParams(step).to_json()


def check_lam_granularity(lam, granularity: str) -> None:
    """The checks RD and trellis quantizers share (parameter errors, see base.parameter_error)."""
    if not (isinstance(lam, (int, float)) and math.isfinite(lam) and lam >= 0):
        raise parameter_error(f"lam must be a finite number >= 0, got {lam}", "lam")
    if granularity not in GRANULARITIES:
        raise parameter_error(f"granularity must be one of {', '.join(GRANULARITIES)}, got {granularity!r}",
                              "granularity")


def normalised_weights(fisher: np.ndarray | None, size: int) -> np.ndarray:
    """F_i / mean(F) as a flat float64 array (all ones without F); zeros get a small floor."""
    if fisher is None:
        return np.ones(size, dtype=np.float64)
    f = np.asarray(fisher, dtype=np.float64).ravel()
    if f.size != size or not np.all(np.isfinite(f)) or np.any(f < 0):
        raise CdlInputError("Fisher weights must be finite, non-negative and match the tensor's size")
    mean = f.mean() if f.size else 0.0
    if mean <= 0:
        return np.ones(size, dtype=np.float64)
    f = f / mean
    return np.maximum(f, 1e-3)  # an insensitive weight still should not drift arbitrarily far


# --- Huffman rate model ----------------------------------------------------------------------------

def rd_huffman(r: np.ndarray, weight: np.ndarray, lam: float, limit: int, iterations: int = 3) -> np.ndarray:
    """Levels minimising weight·(r - k)² + λ·len(k), len from the Huffman code of the current
    histogram, iterated. r = w/Δ (flat float64)."""
    from ..backends.huffman import code_lengths

    nearest = np.clip(np.rint(r), -limit, limit).astype(np.int64)
    other = np.clip(np.where(r >= nearest, nearest + 1, nearest - 1), -limit, limit)
    zero = np.zeros_like(nearest)
    cands = (nearest, other, zero)
    levels = nearest
    for _ in range(max(1, iterations)):
        lo, hi = int(levels.min()), int(levels.max())
        counts = np.bincount(levels - lo, minlength=hi - lo + 1)
        lengths = code_lengths(counts).astype(np.float64)
        unseen = float(lengths.max()) + 2.0     # a symbol not in the table costs an escape
        best_cost = None
        best = nearest
        for c in cands:
            idx = c - lo
            inside = (idx >= 0) & (idx < lengths.size)
            bits = np.full(c.shape, unseen)
            bits[inside] = lengths[idx[inside]]
            bits[inside & (bits == 0)] = unseen
            cost = weight * (r - c) ** 2 + lam * bits
            if best_cost is None:
                best_cost, best = cost, c.copy()
            else:
                better = cost < best_cost
                best_cost = np.where(better, cost, best_cost)
                best = np.where(better, c, best)
        if np.array_equal(best, levels):
            break
        levels = best
    return levels


# --- CABAC rate model ------------------------------------------------------------------------------

@njit(cache=True)
def rd_cabac_scan(r, weight, lam, limit, chunk_size, n_gt, mode, row_len, fast, slow, out):
    """Sequential RD decisions with the cabac rate model; contexts adapt to the chosen levels and
    reset at every chunk start, as in the encoder. r = w/Δ; the result is written to `out`."""
    n = r.shape[0]
    scale = 1.0 / float(1 << COST_FRAC_BITS)
    st = np.zeros(STATE_SIZE, dtype=np.int64)
    zero = np.int64(0)
    s = np.int64(0)
    while s < n:
        e = min(n, s + chunk_size)
        ctx = new_contexts(N_CONTEXTS)
        for i in range(s, e):
            a, b, u = neighbours(out, i, s, row_len)
            x = r[i]
            k0 = np.int64(np.rint(x))
            k1 = k0 + 1 if x >= k0 else k0 - 1
            k0 = max(-limit, min(limit, k0))
            k1 = max(-limit, min(limit, k1))
            best = k0
            best_cost = weight[i] * (x - k0) ** 2 + lam * scale * rate_cost(ctx, st, k0, a, b, u, mode, n_gt, fast, slow)
            if k1 != k0:
                c1 = weight[i] * (x - k1) ** 2 + lam * scale * rate_cost(ctx, st, k1, a, b, u, mode, n_gt, fast, slow)
                if c1 < best_cost:
                    best, best_cost = k1, c1
            if k0 != 0 and k1 != 0:
                c2 = weight[i] * x * x + lam * scale * rate_cost(ctx, st, zero, a, b, u, mode, n_gt, fast, slow)
                if c2 < best_cost:
                    best, best_cost = zero, c2
            out[i] = best
            rate_update(ctx, st, out, s, i, i + 1, row_len, mode, n_gt, fast, slow)
        s = e
    return out


def cabac_settings(levels: np.ndarray, shape: tuple[int, ...]):
    """(chunk_size, n_gt, mode, row_len, fast, slow) the cabac encoder would use for these levels
    (the backend's public rate model, `CabacBackend.settings`)."""
    from ..backends import get

    s = get("cabac").settings(levels, EncodeHint(shape=tuple(shape)))
    return tuple(int(s[key]) for key in ("chunk_size", "n_gt", "mode", "row_len", "fast", "slow"))


def rd_cabac(r: np.ndarray, weight: np.ndarray, lam: float, limit: int, shape: tuple[int, ...],
             passes: int = 2) -> np.ndarray:
    """Levels chosen greedily in coding order with the cabac rate model (eq. 11, L_ik from CABAC).

    The stream settings (context design, estimator rates) are those the encoder picks for the
    current levels; a second pass re-reads them from the RD levels, since the encoder will.
    """
    levels = np.clip(np.rint(r), -limit, limit).astype(np.int64)
    for _ in range(max(1, passes)):
        chunk, n_gt, mode, row_len, fast, slow = cabac_settings(levels, shape)
        out = np.zeros(r.size, dtype=np.int64)
        rd_cabac_scan(r, weight, float(lam), np.int64(limit), chunk, n_gt, mode, row_len, fast, slow, out)
        if np.array_equal(out, levels):
            break
        levels = out
    return levels


def resolve_rate_model(backend: str, rate: str = "auto") -> str:
    """Which rate model to use for a tensor coded with `backend`."""
    if rate != "auto":
        return rate
    if backend == "huffman" or backend == "raw":
        return "huffman"
    return "cabac"


def rd_levels(r: np.ndarray, weight: np.ndarray, lam: float, limit: int, model: str,
              shape: tuple[int, ...], iterations: int = 3) -> np.ndarray:
    if model == "cabac":
        return rd_cabac(r, weight, lam, limit, shape)
    return rd_huffman(r, weight, lam, limit, iterations)


@dataclass(frozen=True)
class RDQuantizer(Quantizer):
    """DeepCABAC-style RD quantizer (eq. 11). Step rule as UniformQuantizer; `lam` = λ (per Δ²).

    fisher: optional {tensor name: array of F_i} (see fisher.py); rate: "auto" (the backend being
    used; cabac for auto), "cabac" or "huffman"; granularity: "tensor" or "channel".
    """

    lam: float = 0.0
    rel_step: float | None = DEFAULT_REL_STEP
    step: float | None = None
    bits: int | None = None
    granularity: str = "tensor"
    rate: str = "auto"
    iterations: int = 3
    fisher: dict | None = field(default=None, compare=False, hash=False)

    uses_step_rule = True

    def __post_init__(self):
        check_lam_granularity(self.lam, self.granularity)
        if self.rate not in RATE_MODELS:
            raise parameter_error(f"rate must be one of {', '.join(RATE_MODELS)}, got {self.rate!r}", "rate")
        self.rule  # validates the step options

    @property
    def rule(self) -> UniformQuantizer:
        rel = self.rel_step if self.step is None and self.bits is None else None
        return UniformQuantizer(rel_step=rel, step=self.step, bits=self.bits)

    def describe(self) -> str:
        text = f"rd lambda={self.lam:g} {self.rule.describe()}"
        if self.granularity == "channel":
            text += " per-channel"
        if self.fisher is not None:
            text += " fisher-weighted"
        return text

    def quantize(self, values64: np.ndarray, w32: np.ndarray) -> tuple[np.ndarray, dict]:
        levels, quant = self.quantize_tensor(values64, w32, "auto", None)
        return levels, quant

    def quantize_record(self, record, values64, w32, backend: str):
        fisher = None if self.fisher is None else self.fisher.get(record.name)
        levels, quant = self.quantize_tensor(values64, w32, backend, fisher)
        return levels, quant, EncodeHint(shape=record.shape)

    def quantize_tensor(self, values64: np.ndarray, w32: np.ndarray, backend: str, fisher) -> tuple[np.ndarray, dict]:
        if not np.all(np.isfinite(w32)):
            raise CdlInputError("tensor holds NaN or infinite values; keep it lossless with --keep")
        rule = self.rule
        step, quant = step_plan(rule, self.granularity, w32)
        limit = level_limit(rule)
        if self.lam == 0 and fisher is None or values64.size == 0:
            return nearest_levels(values64, step, limit).ravel(), quant
        nearest_levels(values64, step, limit)  # same "step too small" check as nearest rounding
        r = np.ascontiguousarray((values64 / step).ravel(), dtype=np.float64)
        weight = normalised_weights(fisher, r.size)
        model = resolve_rate_model(backend, self.rate)
        return rd_levels(r, weight, float(self.lam), limit, model, tuple(w32.shape), self.iterations), quant
