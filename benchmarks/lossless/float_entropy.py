"""Conditional entropies behind the float coder's design (docs/backends.md), per checkpoint.

Bits per weight over all float tensors of an ONNX model (empirical entropies of per-tensor
histograms; table costs not counted unless said):
  bfloat16 (round to nearest even): exponent H0; exponent given the previous one; the 10-bit symbol
    exponent + top 2 mantissa bits (version 2), per tensor and per 2**18-element chunk with 220 bytes
    per extra table; exponent and the whole sign+mantissa byte jointly.
  float32: exponent + top mantissa byte given the exponent + two raw-entropy bytes; the same with the
    exponent given the previous one and the middle byte given the top one (as % of 32 bits).

    python benchmarks/lossless/float_entropy.py /work/bench/models/{minilm,mobilenetv2,silero_vad}.onnx
"""
from __future__ import annotations

import sys

import numpy as np

from cdlcodec.dtypes import from_float64
from cdlcodec.io.onnx_model import read_onnx


def bits_total(values: np.ndarray, size: int) -> float:
    """Empirical entropy of `values` times their number (bits)."""
    counts = np.bincount(values, minlength=size).astype(float)
    counts = counts[counts > 0]
    return float(-(counts * np.log2(counts / counts.sum())).sum())


def conditional(context: np.ndarray, values: np.ndarray, csize: int, vsize: int) -> float:
    return bits_total(context * vsize + values, csize * vsize) - bits_total(context, csize)


def main(paths: list[str]) -> None:
    for path in paths:
        tensors = [r.array for r in read_onnx(path).records if r.numel and r.dtype == "float32"]
        n = sum(a.size for a in tensors)
        t: dict[str, float] = {}
        add = lambda key, v: t.__setitem__(key, t.get(key, 0.0) + v)
        for a in tensors:
            u = from_float64(a.astype(np.float64), "bfloat16").view(np.uint16).astype(np.int64).ravel()
            e, sym = (u >> 7) & 0xFF, (u >> 5) & 0x3FF
            add("bf16 exponent H0", bits_total(e, 256))
            add("bf16 exponent | previous", conditional(np.r_[0, e[:-1]], e, 256, 256))
            add("bf16 exponent+2 bits, per tensor", bits_total(sym, 1024))
            chunks = range(0, sym.size, 1 << 18)
            add("bf16 exponent+2 bits, per chunk", sum(bits_total(sym[c:c + (1 << 18)], 1024) for c in chunks)
                + (220 * 8 * (len(chunks) - 1)))
            add("bf16 exponent+byte jointly", bits_total(e * 256 + ((u >> 8) & 0x80 | u & 0x7F), 65536))
            w = a.view(np.uint32).astype(np.int64).ravel()
            e32, b1, b2, b3 = (w >> 23) & 0xFF, ((w >> 24) & 0x80) | ((w >> 16) & 0x7F), (w >> 8) & 0xFF, w & 0xFF
            top = conditional(e32, b1, 256, 256)
            add("fp32 order-0 with top byte | exponent", bits_total(e32, 256) + top + bits_total(b2, 256)
                + bits_total(b3, 256))
            add("fp32 with contexts", conditional(np.r_[0, e32[:-1]], e32, 256, 256) + top
                + conditional(b1 & 0x7F, b2, 128, 256) + bits_total(b3, 256))
        print(path)
        for key, value in t.items():
            share = f"  ({100 * value / n / 32:.2f} % of float32)" if key.startswith("fp32") else \
                (f"  (+6 raw bits: {100 * (value / n + 6) / 16:.2f} % of bfloat16)" if "2 bits" in key else "")
            print(f"  {key}: {value / n:.4f} bits/weight{share}")


if __name__ == "__main__":
    main(sys.argv[1:])
