"""The float coder's decode kernel alone, per bfloat16 weight, side by side with the tree before.

Takes the first 2**18 weights of MiniLM's largest matrices (bfloat16, round to nearest even), codes
them with version 1 (byte planes) and version 2 (exponent + top mantissa bits), and times one
chunk's decode, interleaved, best of --repeat (wall clock: a chunk takes about half a millisecond):
the kernel of --before-tree (its decode_fused, version 1 only) next to this tree's decode_chunk16.

    mkdir /tmp/before && git archive e334c62 cdlcodec formats | tar -x -C /tmp/before
    python benchmarks/lossless/bench_float_kernel.py --before-tree /tmp/before
"""
from __future__ import annotations

import argparse
import importlib.util
import sys
import time

import numpy as np

from cdlcodec.backends import float_exact as fe
from cdlcodec.backends import float_kernels as fk
from cdlcodec.dtypes import from_float64
from cdlcodec.io.onnx_model import read_onnx


def _before_kernels(tree: str):
    """The previous float_kernels module, compiled without cache (its package is not importable)."""
    source = open(f"{tree}/cdlcodec/backends/float_kernels.py").read()
    source = source.replace("from ..jit import njit", "from numba import njit").replace("cache=True, ", "")
    spec = importlib.util.spec_from_loader("before_float_kernels", loader=None)
    module = importlib.util.module_from_spec(spec)
    exec(compile(source, "before_float_kernels", "exec"), module.__dict__)
    return module


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="/work/bench/models/minilm.onnx")
    ap.add_argument("--before-tree", required=True)
    ap.add_argument("--tensors", type=int, default=3)
    ap.add_argument("--repeat", type=int, default=15)
    args = ap.parse_args(argv)
    before = _before_kernels(args.before_tree)
    records = sorted((r for r in read_onnx(args.model).records if r.dtype == "float32"), key=lambda r: -r.numel)
    print("| tensor | before: v1 ns/weight | now: v1 ns/weight | now: v2 ns/weight | v1 / v2 size |")
    print("|---|---:|---:|---:|---:|")
    for rec in records[:args.tensors]:
        bits = from_float64(rec.array.astype(np.float64), "bfloat16").view(np.uint16).ravel()[:1 << fe.CHUNK_LOG2]
        n = bits.size
        p1, q1 = fe._encode_planes(bits, "bfloat16")
        d1 = np.frombuffer(p1, np.uint8)
        l1 = int(d1[:4].view("<u4")[0])
        freq1 = fe._parse_params(q1, "bfloat16")[2][0][1]
        t_before, t_now = before.decode_table(freq1), fk.decode_tables(freq1, fe.V1_SCALE_BITS)
        p2, q2 = fe._encode_packed(bits, "bfloat16")
        d2 = np.frombuffer(p2, np.uint8)
        l2 = int(d2[:4].view("<u4")[0])
        freq2, s2 = fe._read_table(d2, 4, 4 + l2, q2[3], 0)
        t2 = fk.decode_tables(freq2, q2[3])
        outs = [np.empty(n, np.uint16) for _ in range(3)]
        runs = [lambda: before.decode_fused(d1, 4, l1, n, t_before, 4 + l1, False, outs[0], 0),
                lambda: fk.decode_chunk16(d1, 4, l1, n, *t_now, fe.V1_SCALE_BITS, False, 4 + l1, outs[1], 0),
                lambda: fk.decode_chunk16(d2, s2, 4 + l2 - s2, n, *t2, q2[3], True, 4 + l2, outs[2], 0)]
        best = [float("inf")] * 3
        for _ in range(args.repeat):
            for k, run in enumerate(runs):
                start = time.perf_counter()
                run()
                best[k] = min(best[k], time.perf_counter() - start)
        assert all(o.tobytes() == bits.tobytes() for o in outs), rec.name
        print(f"| {rec.name} | {best[0] / n * 1e9:.2f} | {best[1] / n * 1e9:.2f} | {best[2] / n * 1e9:.2f} | "
              f"{len(p1) + len(q1):,} / {len(p2) + len(q2):,} |", flush=True)


if __name__ == "__main__":
    main(sys.argv[1:])
