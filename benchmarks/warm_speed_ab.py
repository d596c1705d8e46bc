"""Warm (steady-state) speed of the cabac kernels and the cabac-rate quantizers, this tree against an
older one, side by side (issue 18: restructuring kernels for a faster first compile must not slow
them down).

    NUMBA_NUM_THREADS=1 python benchmarks/warm_speed_ab.py --before-tree DIR [--levels 2000000] [--rounds 3]

DIR is a source tree laid out as installed (see benchmarks/cold_start.py). Each round runs one child
process per tree, alternating, each with its own numba cache (compiled before timing); a figure is
the best CPU time of 5 calls in a child, and the table shows the median over rounds. Rows: the
cabac chunk encoder, serial decoder and cost scan (M levels/s) on rounded Laplace(b) levels with
the encoder's own settings; the trellis (8 states) and the scalar RD scan with the cabac rate
model at λ = 0.1 (M weights/s). The children also check that both trees give the same bytes.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile

_CHILD = r"""
import hashlib, json, sys, time
import numpy as np
from cdlcodec.backends import cabac_binarization as cb
from cdlcodec.backends.cabac import CabacBackend, _parse_params
from cdlcodec.backends.cabac_coder import RATE_PAIRS
from cdlcodec.quantizers import rd, trellis
from cdlcodec.quantizers.params import state_machine

n = int(sys.argv[1])
def best(fn, k=5):
    b = 1e9
    for _ in range(k):
        t = time.process_time(); fn(); b = min(b, time.process_time() - t)
    return b
out, digest = {}, hashlib.sha256()
for scale in (1.0, 4.0):
    lv = np.rint(np.random.default_rng(0).laplace(0, scale, n)).astype(np.int64)
    be = CabacBackend(parallel=False)
    s = be.settings(lv)
    args = (be.chunk_size, be.n_gt, s["mode"], s["row_len"], s["fast"], s["slow"])
    n_chunks = -(-n // be.chunk_size)
    buf, ends = np.empty(2 * n + 64 * n_chunks, np.uint8), np.zeros(n_chunks, np.int64)
    encode = lambda: cb.encode_chunks(lv, *args, buf, ends)
    size = encode()
    payload = buf[:size].copy()
    padded = np.zeros(size + 8, np.uint8); padded[:size] = payload
    offsets = np.concatenate(([0], ends)).astype(np.int64)
    dec, errs = np.empty(n, np.int64), np.zeros(n_chunks, np.int64)
    # the kernel CabacBackend.decode uses for this mode (trees before chunk_decoders had one for all)
    serial = cb.chunk_decoders(s["mode"])[0] if hasattr(cb, "chunk_decoders") else cb.decode_chunks_serial
    decode = lambda: serial(padded, offsets, *args, dec, errs)
    cost = lambda: cb.cost_chunks(lv, *args, n)
    for f in (encode, decode, cost):
        f()
    assert np.array_equal(dec, lv) and not errs.any()
    b = f"b={scale:g}"
    out[f"cabac encode {b}"] = n / best(encode) / 1e6
    out[f"cabac decode {b}"] = n / best(decode) / 1e6
    out[f"cabac cost scan {b}"] = n / best(cost) / 1e6
    digest.update(payload.tobytes()); digest.update(str(int(cost())).encode())
m = n // 10
r = np.random.default_rng(1).laplace(0, 3, m)
w = np.ones(m)
next_state, qid = state_machine(8)
t_out, r_out = np.zeros(m, np.int64), np.zeros(m, np.int64)
scan_t = lambda: trellis.viterbi_scan(r, w, 0.1, np.int64(1000), next_state, qid, 1 << 16, 10, 1, 4, 7, 1024, t_out)
scan_r = lambda: rd.rd_cabac_scan(r, w, 0.1, np.int64(1000), 1 << 16, 10, 2, 400, 4, 7, r_out)
scan_t(); scan_r()
out["trellis scan, cabac rate"] = m / best(scan_t, 3) / 1e6
out["RD scan, cabac rate"] = m / best(scan_r, 3) / 1e6
digest.update(t_out.tobytes()); digest.update(r_out.tobytes())
out["digest"] = digest.hexdigest()[:16]
print(json.dumps(out))
"""


def child(tree: str | None, cache: str, n: int) -> dict:
    env = dict(os.environ, NUMBA_CACHE_DIR=cache)
    if tree:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [tree, env.get("PYTHONPATH")]))
    proc = subprocess.run([sys.executable, "-c", _CHILD, str(n)], capture_output=True, text=True, env=env,
                          cwd=tempfile.gettempdir())
    if proc.returncode != 0:
        sys.exit(f"worker failed:\n{proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--before-tree", required=True)
    parser.add_argument("--levels", type=int, default=2_000_000)
    parser.add_argument("--rounds", type=int, default=3)
    opts = parser.parse_args()
    trees = {"before": os.path.abspath(opts.before_tree), "after": None}
    results = {label: [] for label in trees}
    with tempfile.TemporaryDirectory() as caches:
        for _ in range(opts.rounds):
            for label, tree in trees.items():
                results[label].append(child(tree, os.path.join(caches, label), opts.levels))
    digests = {label: {r.pop("digest") for r in runs} for label, runs in results.items()}
    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end; {opts.levels:,} levels, "
          f"{opts.rounds} rounds; same bytes and levels in both trees: {digests['before'] == digests['after']}\n")
    print("| kernel | before | after | after / before |")
    print("|---|---:|---:|---:|")
    for key in results["after"][0]:
        before = statistics.median(r[key] for r in results["before"])
        after = statistics.median(r[key] for r in results["after"])
        ratios = statistics.median(a[key] / b[key] for a, b in zip(results["after"], results["before"]))
        unit = "M weights/s" if "scan," in key else "M levels/s"
        print(f"| {key} | {before:.1f} {unit} | {after:.1f} {unit} | {ratios:.3f} |")


if __name__ == "__main__":
    main()
