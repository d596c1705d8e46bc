"""Quantize a CDL / R-CDL checkpoint with what it learned (CDL paper, eq. 12, 25-27).

A checkpoint written by `cdlcodec train` (formats/cdl-checkpoint.md) is recognised when it is read
(cdlcodec.io.cdl_checkpoint sets the metadata "cdl.mode"); the encoder then binds this quantizer
(codec.encode_records). For every quantized layer l it holds the float weight w_l, the learned step q_l, sharpness α_l
and bit width b; for every activation quantizer the step s_l, sharpness β_l and bit width b.

- Weights: `argmax` (default) takes the most probable level of the CPMF of eq. 12, which for this
  CPMF is clip(rint(w/q), A) computed in float32 -- the levels the trained model was evaluated with;
  `sample` draws each level from the CPMF with a seeded generator (reproducible). Levels lie in the
  layer's alphabet A = {-2^(b-1) .. 2^(b-1)-1} (eq. 10a). Stored as {"scheme": "uniform", "step": q,
  "bits": b, "alpha": α}; the decoder's float32(k) * float32(q) is exactly the eval-mode weight.
- Every other tensor of the checkpoint (biases, q/α/s/β scalars, bit widths, the metadata entry, any
  float tensor that is not a CDL weight) is stored losslessly, so the decoded state_dict is again a
  CDL checkpoint that `cdlcodec.cdl.checkpoint.build_model_from_checkpoint` rebuilds.
- The activation quantizers (json section "cdl.activations") and the float architecture's ONNX
  graph come with the model file from the reader (cdlcodec.io.cdl_checkpoint), not from here.
- Entropy models: the learned MPMF (eq. 25) of each layer goes to the backend as EncodeHint.pmf
  (the Huffman backend builds a table from it when that is smaller; CABAC adapts on its own). The
  coded bits per layer are reported next to H(w_l) = |w_l| H(MPMF) (eq. 26) and in total (eq. 27).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass

import numpy as np

from ..backends import EncodeHint
from ..cdl_format import hard_levels, read_cdl_metadata, records_as_tensors
from ..errors import CdlInputError
from .base import Quantizer, parameter_error
from .params import UniformParams

CPMF_MODES = ("argmax", "sample")
REPORT_KEY = "cdl.rate_report"
_CHUNK_BYTES = 1 << 25


def cpmf_probabilities(w32: np.ndarray, q: float, alpha: float, lo: int, hi: int) -> np.ndarray:
    """P(k | w) = softmax_k(-α (w - k q)²) over k = lo..hi (eq. 12), shape [n, hi-lo+1], float64."""
    points = np.arange(lo, hi + 1, dtype=np.float64) * np.float64(np.float32(q))
    logits = -float(alpha) * (np.asarray(w32, dtype=np.float64).reshape(-1, 1) - points) ** 2
    logits -= logits.max(axis=1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(axis=1, keepdims=True)
    return p


def _row_chunks(n: int, width: int):
    rows = max(1, _CHUNK_BYTES // (8 * max(width, 1)))
    for start in range(0, n, rows):
        yield start, min(n, start + rows)


def mpmf(w32: np.ndarray, q: float, alpha: float, lo: int, hi: int) -> np.ndarray:
    """The layer's marginal PMF: mean over weights of the CPMF (eq. 25)."""
    flat = np.asarray(w32, dtype=np.float32).ravel()
    total = np.zeros(hi - lo + 1, dtype=np.float64)
    for s, e in _row_chunks(flat.size, hi - lo + 1):
        total += cpmf_probabilities(flat[s:e], q, alpha, lo, hi).sum(axis=0)
    return total / max(flat.size, 1)


def entropy_bits(pmf: np.ndarray) -> float:
    p = pmf[pmf > 0]
    return float(-(p * np.log2(p)).sum())


def sample_levels(w32: np.ndarray, q: float, alpha: float, lo: int, hi: int,
                  rng: np.random.Generator) -> np.ndarray:
    """One draw per weight from its CPMF (eq. 12) by inverse CDF; int64 levels within lo..hi."""
    flat = np.asarray(w32, dtype=np.float32).ravel()
    out = np.empty(flat.size, dtype=np.int64)
    u = rng.random(flat.size)
    for s, e in _row_chunks(flat.size, hi - lo + 1):
        cdf = np.cumsum(cpmf_probabilities(flat[s:e], q, alpha, lo, hi), axis=1)
        pick = (cdf < u[s:e, None]).sum(axis=1)
        out[s:e] = lo + np.minimum(pick, hi - lo)
    return out


@dataclass(frozen=True)
class CpmfQuantizer(Quantizer):
    """Options for CDL checkpoints: mode "argmax" (default) or "sample" with `seed`."""

    mode: str = "argmax"
    seed: int = 0

    def __post_init__(self):
        if self.mode not in CPMF_MODES:
            raise parameter_error(f"mode must be one of {', '.join(CPMF_MODES)}, got {self.mode!r}", "mode")

    def describe(self) -> str:
        return f"cdl cpmf={self.mode}" + (f" seed={self.seed}" if self.mode == "sample" else "")

    def quantize(self, values64, w32):
        raise CdlInputError("the CPMF quantizer applies to CDL checkpoints only (their learned steps are needed)")

    def prepare(self, model, backend: str) -> "BoundCpmfQuantizer":
        return BoundCpmfQuantizer(self, read_cdl_metadata(records_as_tensors(model.records)))


class BoundCpmfQuantizer(Quantizer):
    """CpmfQuantizer bound to one checkpoint's metadata (see the module docstring)."""

    def __init__(self, options: CpmfQuantizer, meta):
        self.options = options
        self.meta = meta
        self.by_weight = {w.weight: (i, w) for i, w in enumerate(meta.weights)}
        self.layers: dict[str, dict] = {}

    def describe(self) -> str:
        return self.options.describe()

    def quantize_record(self, record, values64, w32, backend: str):
        found = self.by_weight.get(record.name)
        if found is None:
            return None  # a float tensor the CDL model does not quantize: keep it exactly
        index, info = found
        lo, hi = info.level_range
        if self.options.mode == "argmax":
            levels = hard_levels(w32, info.q, info.bits).ravel()
        else:
            rng = np.random.Generator(np.random.PCG64([int(self.options.seed), index]))
            levels = sample_levels(w32, info.q, info.alpha, lo, hi, rng)
        levels = np.clip(levels, lo, hi)
        pmf = mpmf(w32, info.q, info.alpha, lo, hi)
        self.layers[record.name] = {
            "module": info.module, "count": int(levels.size), "bits": info.bits,
            "entropy_bits": levels.size * entropy_bits(pmf),           # H(w_l), eq. 26
            "hard_entropy_bits": _histogram_entropy(levels),
        }
        quant = UniformParams(float(np.float32(info.q)), (("bits", info.bits), ("alpha", float(info.alpha)),
                                                          ("source", "cdl"))).to_json()
        hint = EncodeHint(pmf=(np.arange(lo, hi + 1, dtype=np.int64), pmf), shape=tuple(record.shape))
        return levels, quant, hint

    def finish(self, coded_bits: dict):
        layers, total_coded, total_entropy, total_count = [], 0, 0.0, 0
        for name, info in self.layers.items():
            coded = int(coded_bits.get(name, 0))
            row = dict(info, tensor=name, coded_bits=coded,
                       ratio=(coded / info["entropy_bits"]) if info["entropy_bits"] > 0 else math.inf)
            layers.append(row)
            total_coded += coded
            total_entropy += info["entropy_bits"]
            total_count += info["count"]
        report = {"mode": self.meta.mode, "cpmf": self.options.mode, "layers": layers,
                  "total": {"count": total_count, "coded_bits": total_coded, "entropy_bits": total_entropy,
                            "ratio": total_coded / total_entropy if total_entropy > 0 else math.inf}}
        meta = {REPORT_KEY: json.dumps(_jsonable(report), sort_keys=True, separators=(",", ":"))}
        return meta, report


def _histogram_entropy(levels: np.ndarray) -> float:
    _, counts = np.unique(levels, return_counts=True)
    p = counts / counts.sum()
    return float(levels.size * -(p * np.log2(p)).sum())


def _jsonable(obj):
    if isinstance(obj, dict):
        return {k: _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, list):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, float):
        return round(obj, 3)
    return obj


def format_report(report: dict) -> str:
    """Human-readable table: per layer and total coded bits next to H(w_l) (eq. 26-27)."""
    lines = [f"{'layer':<16} {'b':>2} {'weights':>8} {'coded bits':>11} {'H(w_l) bits':>12} {'coded/H':>8}"]
    for row in report["layers"] + [dict(report["total"], module="total", bits="")]:
        ratio = row["ratio"]
        lines.append(f"{row['module']:<16} {row['bits']!s:>2} {row['count']:>8} {row['coded_bits']:>11,} "
                     f"{row['entropy_bits']:>12,.0f} {ratio:>8.3f}")
    return "\n".join(lines)
