"""Serial vs two-thread (prange over chunks) cabac decoding of the same stream, in one process.

Usage: python benchmarks/bench_cabac_threads.py [--levels 4000000] [--repeat 3]
Prints wall-clock and CPU throughput for both; the speed-up is meaningful only on an idle machine.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from cdlcodec.backends.cabac import CabacBackend


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--levels", type=int, default=4_000_000)
    ap.add_argument("--repeat", type=int, default=3)
    a = ap.parse_args()
    levels = np.rint(np.random.default_rng(0).laplace(0, 1, a.levels)).astype(np.int64)
    serial, parallel = CabacBackend(parallel=False), CabacBackend(parallel=True)
    payload, params = serial.encode(levels)
    results = {}
    for name, backend in (("serial", serial), ("two threads", parallel)):
        assert np.array_equal(backend.decode(payload, params, levels.size), levels)  # also warms up
        wall, cpu = time.perf_counter(), time.process_time()
        for _ in range(a.repeat):
            backend.decode(payload, params, levels.size)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        results[name] = a.repeat * levels.size / wall / 1e6
        print(f"{name:12s} {results[name]:6.1f} M levels/s wall, {a.repeat * levels.size / cpu / 1e6:6.1f} M levels/s CPU")
    print(f"speed-up {results['two threads'] / results['serial']:.2f}x "
          f"({8 * (len(payload) + len(params)) / levels.size:.4f} bits/level, Laplace(b=1))")


if __name__ == "__main__":
    main()
