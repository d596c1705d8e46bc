"""Benchmark of the `cabac` backend against order-0 entropy and the huffman backend, side by side.

    python benchmarks/bench_cabac.py [--minilm PATH] [--levels 1000000] [--epochs 2]

1. Synthetic sources: rounded Laplace(b=1) and Laplace(b=4), 1,000,000 levels each. Size against
   the order-0 entropy (target <= 1.005x) and huffman; encode/decode throughput on one core (CPU
   seconds of this process: the kernels are single-threaded, so the figure stays meaningful on a
   shared machine); chunked decode on two threads (wall clock, best of several runs).
2. Chunk size: size cost of independent chunks against one chunk.
3. Trained weights at <= 2 bits/weight: LeNet-5 trained here on the bundled MNIST digits and
   MiniLM (safetensors) if present; every tensor with ndim >= 2 quantized k = round(w / (R * std)).
   Sizes per context design (gains of each design against the DeepCABAC/NNC-like baseline).

Decode speed side by side (issue 15, point 3), alone with --speed:

    NUMBA_NUM_THREADS=1 python benchmarks/bench_cabac.py --speed [--speed-levels 8000000] \
        [--scales 1,4] [--repeats 5] [--nnc-python /work/bench/nnc-venv/bin/python] [--before-tree DIR]

codes the same Laplace levels with NNCodec's C++ CABAC (its own venv), this tree's cabac and
huffman backends and, with --before-tree, an older cdlcodec source tree (e.g. extracted with
`git archive`), each in its own worker process (benchmarks/speed_worker.py); the rounds are
interleaved and every speed is a median of CPU times; a ratio is the median over rounds of the
ratio within a round, so it compares runs made under the same load. cabac runs with its default settings on one thread (parallel=False). A before tree is
laid out as installed: `mkdir DIR && git archive REV cdlcodec formats | tar -x -C DIR &&
mv DIR/formats DIR/cdlcodec/formats`.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cdlcodec.backends.base import EncodeHint
from cdlcodec.backends.cabac import CabacBackend
from cdlcodec.backends.cabac_coder import RATE_PAIRS
from cdlcodec.backends.stats import order0_entropy_bits

try:
    from cdlcodec.backends.huffman import HuffmanBackend
    HUFF = HuffmanBackend()
except ImportError:  # pragma: no cover - the huffman backend is optional for this script
    HUFF = None


def cpu_best(fn, repeat=5):
    best = float("inf")
    for _ in range(repeat):
        t = time.process_time()
        fn()
        best = min(best, time.process_time() - t)
    return best


def wall_best(fn, repeat=9):
    best = float("inf")
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t)
    return best


def stream_bits(backend, levels, shape=None):
    payload, params = backend.encode(levels, EncodeHint(shape=shape) if shape else None)
    return 8 * (len(payload) + len(params))


# --- 1. synthetic --------------------------------------------------------------------------------

def synthetic(n: int):
    print("## Synthetic sources\n")
    rng = np.random.default_rng(0)
    auto = CabacBackend(parallel=False)
    nnc_like = CabacBackend(mode=0, rate_idx=0, parallel=False)  # prev-level contexts, shifts (4, 7)
    print("| source | H0 bits/level | cabac | cabac / H0 | cabac NNC-like (4,7) / H0 | huffman / H0 "
          "| cabac enc M/s | cabac enc M/s (fixed settings) | cabac dec M/s | huffman enc M/s | huffman dec M/s |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for b in (1, 4):
        levels = np.rint(rng.laplace(0.0, b, n)).astype(np.int64)
        h0 = order0_entropy_bits(levels)
        payload, params = auto.encode(levels)
        np.testing.assert_array_equal(auto.decode(payload, params, n), levels)
        bits = 8 * (len(payload) + len(params))
        nnc_bits = stream_bits(nnc_like, levels)
        s = auto.settings(levels)
        fixed = CabacBackend(mode=s["mode"], rate_idx=s["rate_idx"], parallel=False)
        t_enc = cpu_best(lambda: auto.encode(levels))
        t_enc_fixed = cpu_best(lambda: fixed.encode(levels))
        t_dec = cpu_best(lambda: auto.decode(payload, params, n))
        row = [f"Laplace(b={b})", f"{h0 / n:.4f}", f"{bits / n:.4f}", f"{bits / h0:.4f}", f"{nnc_bits / h0:.4f}"]
        if HUFF is not None:
            hp, hq = HUFF.encode(levels)
            HUFF.decode(hp, hq, n)
            row += [f"{8 * (len(hp) + len(hq)) / h0:.4f}"]
            h_enc = cpu_best(lambda: HUFF.encode(levels))
            h_dec = cpu_best(lambda: HUFF.decode(hp, hq, n))
        else:
            row += ["n/a"]
        row += [f"{n / t_enc / 1e6:.1f}", f"{n / t_enc_fixed / 1e6:.1f}", f"{n / t_dec / 1e6:.1f}"]
        row += [f"{n / h_enc / 1e6:.1f}", f"{n / h_dec / 1e6:.1f}"] if HUFF is not None else ["n/a", "n/a"]
        print("| " + " | ".join(row) + " |")
        print(f"\n(b={b}: settings chosen {s})\n")

    print("### Chunks decoded on two threads (wall clock; the machine is shared, so best of 9)\n")
    levels = np.rint(np.random.default_rng(1).laplace(0.0, 1, 4 * n)).astype(np.int64)
    one = CabacBackend(chunk_size=1 << 30, parallel=False)
    p1, q1 = one.encode(levels)
    serial, parallel = CabacBackend(parallel=False), CabacBackend(parallel=True)
    pc, qc = serial.encode(levels)
    for be, p, q in ((one, p1, q1), (serial, pc, qc), (parallel, pc, qc)):
        np.testing.assert_array_equal(be.decode(p, q, levels.size), levels)
    t1 = wall_best(lambda: one.decode(p1, q1, levels.size))
    ts = wall_best(lambda: serial.decode(pc, qc, levels.size))
    tp = wall_best(lambda: parallel.decode(pc, qc, levels.size))
    print(f"{levels.size} Laplace(b=1) levels, default chunks of {serial.chunk_size}: size cost "
          f"{100 * (len(pc) + len(qc) - len(p1) - len(q1)) / (len(p1) + len(q1)):.3f} % against one chunk; "
          f"decode one chunk {levels.size / t1 / 1e6:.1f} M/s, chunks serial {levels.size / ts / 1e6:.1f} M/s, "
          f"chunks on {os.cpu_count()} threads {levels.size / tp / 1e6:.1f} M/s: speed-up {t1 / tp:.2f}x "
          f"(vs serial chunks {ts / tp:.2f}x)\n")


def chunk_sizes(n: int):
    print("## Chunk size cost (Laplace b=1, single-threaded sizes)\n")
    levels = np.rint(np.random.default_rng(2).laplace(0.0, 1, n)).astype(np.int64)
    ref = stream_bits(CabacBackend(chunk_size=1 << 30), levels)
    print("| chunk size | bits/level | cost vs one chunk |")
    print("|---|---|---|")
    for cs in (1 << 13, 1 << 14, 1 << 15, 1 << 16, 1 << 17, 1 << 18):
        bits = stream_bits(CabacBackend(chunk_size=cs), levels)
        print(f"| {cs} | {bits / n:.4f} | {100 * (bits - ref) / ref:+.3f} % |")
    print()


# --- 3. trained weights --------------------------------------------------------------------------

def trained_lenet(epochs: int) -> dict[str, np.ndarray]:
    import torch

    from cdlcodec.data.mnist import load_mnist_5k
    from cdlcodec.models import build

    torch.manual_seed(0)
    (xtr, ytr), (xte, yte) = load_mnist_5k()
    model = build("lenet5")
    opt = torch.optim.Adam(model.parameters(), 1e-3)
    x, y = torch.from_numpy(xtr), torch.from_numpy(ytr).long()
    for _ in range(epochs):
        perm = torch.randperm(len(x))
        for i in range(0, len(x), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x[idx]), y[idx]).backward()
            opt.step()
    with torch.no_grad():
        acc = float((model(torch.from_numpy(xte)).argmax(1).numpy() == yte).mean())
    print(f"LeNet-5 trained {epochs} epochs on the bundled MNIST: test accuracy {acc:.3f}\n")
    return {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items() if v.ndim >= 2}


DESIGNS = [
    ("NNC-like: prev level, shifts (4,7)", dict(mode=0, rate_idx=0)),
    ("prev level, rates per tensor", dict(mode=0)),
    ("two previous levels", dict(mode=1)),
    ("two previous + previous row", dict(mode=2)),
    ("auto (default)", dict()),
]


def trained(name: str, weights: dict[str, np.ndarray], rel_steps):
    print(f"## {name}: {sum(w.size for w in weights.values())} weights in {len(weights)} tensors\n")
    header = "| R | H0 bits/w | huffman bits/w | " + " | ".join(d for d, _ in DESIGNS) + " | best vs H0 | best vs huffman |"
    print(header)
    print("|" + "---|" * (header.count("|") - 1))
    for r in rel_steps:
        tensors = [(np.rint(w / (r * float(np.std(w)))).astype(np.int64).ravel(), w.shape) for w in weights.values()]
        n = sum(t.size for t, _ in tensors)
        h0 = sum(order0_entropy_bits(t) for t, _ in tensors)
        huff = sum(stream_bits(HUFF, t) for t, _ in tensors) if HUFF is not None else float("nan")
        sizes = []
        for _, kwargs in DESIGNS:
            be = CabacBackend(**kwargs)
            sizes.append(sum(stream_bits(be, t, shape) for t, shape in tensors))
        base = sizes[0]
        cells = [f"{s / n:.4f} ({100 * (s - base) / base:+.2f} %)" for s in sizes]
        best = min(sizes)
        print(f"| {r} | {h0 / n:.4f} | {huff / n:.4f} | " + " | ".join(cells)
              + f" | {best / h0:.4f} | {best / huff:.4f} |")
    print()


def n_gt_sweep(n: int):
    print("## Number of greater-than flags (Laplace b=4, size / H0, decode M/s one core)\n")
    levels = np.rint(np.random.default_rng(3).laplace(0.0, 4, n)).astype(np.int64)
    h0 = order0_entropy_bits(levels)
    print("| n_gt | size / H0 | dec M/s |")
    print("|---|---|---|")
    for k in (1, 2, 4, 6, 10, 16):
        be = CabacBackend(n_gt=k, parallel=False)
        p, q = be.encode(levels)
        t = cpu_best(lambda: be.decode(p, q, n), repeat=3)
        print(f"| {k} | {8 * (len(p) + len(q)) / h0:.4f} | {n / t / 1e6:.1f} |")
    print()


# --- decode speed side by side with NNCodec ------------------------------------------------------

NNC_PYTHON = "/work/bench/nnc-venv/bin/python"
WORKER = str(Path(__file__).with_name("speed_worker.py"))


class SpeedWorker:
    """A speed_worker.py child: `kind` nnc or cdl, `tree` a cdlcodec source tree put first on its path."""

    def __init__(self, label, python, kind, levels_file, tree=None):
        env = dict(os.environ, NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1")
        self.label = label
        self.proc = subprocess.Popen([python, WORKER, kind, levels_file] + ([str(tree)] if tree else []),
                                     stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        self.sizes = self._reply()["sizes"]

    def _reply(self):
        while True:  # NNCodec may print on stdout too; the answers are the JSON lines
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"speed worker {self.label} died")
            if line.startswith("{"):
                return json.loads(line)

    def round(self):
        self.proc.stdin.write("round\n")
        self.proc.stdin.flush()
        return self._reply()

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()


def speed_side_by_side(n, scales, repeats, nnc_python, before_tree):
    print(f"## Decode speed side by side: {n:,} Laplace levels, one thread, CPU time, median of {repeats} "
          "interleaved rounds\n")
    rows = []
    for b in scales:
        levels = np.rint(np.random.default_rng(0).laplace(0.0, b, n)).astype(np.int64)
        with tempfile.TemporaryDirectory(prefix="cdlspeed_") as tmp:
            path = os.path.join(tmp, "levels.npy")
            np.save(path, levels)
            workers = [SpeedWorker("NNCodec", nnc_python, "nnc", path)]
            if before_tree:
                workers.append(SpeedWorker("before", sys.executable, "cdl", path, before_tree))
            workers.append(SpeedWorker("after", sys.executable, "cdl", path))
            times = {}
            for _ in range(repeats):
                for w in workers:
                    for coder, t in w.round().items():
                        for op, sec in t.items():
                            times.setdefault((w.label, coder, op), []).append(sec)
            sizes = {(w.label, coder): size for w in workers for coder, size in w.sizes.items()}
            for w in workers:
                w.close()
        med = {key: float(np.median(v)) for key, v in times.items()}
        rate = {key: n / sec / 1e6 for key, sec in med.items()}

        def ratio(label, op):
            """Median over rounds of NNCodec's time / cabac's time in the same round (the load drifts)."""
            return float(np.median(np.array(times[("NNCodec", "nncodec", op)]) / np.array(times[(label, "cabac", op)])))

        for label in [w for w in ("before", "after") if (w, "cabac", "dec") in med]:
            rows.append((b, label, rate[("NNCodec", "nncodec", "enc")], rate[("NNCodec", "nncodec", "dec")],
                         rate[(label, "cabac", "enc")], rate[(label, "cabac", "dec")],
                         ratio(label, "enc"), ratio(label, "dec"),
                         rate[(label, "huffman", "dec")], 8 * sizes[("NNCodec", "nncodec")] / n,
                         8 * sizes[(label, "cabac")] / n, 8 * sizes[(label, "huffman")] / n))
    print("| Laplace b | tree | NNCodec enc / dec M/s | cabac enc / dec M/s | cabac / NNCodec enc | "
          "cabac / NNCodec dec | huffman dec M/s | bits/level NNCodec / cabac / huffman |")
    print("|---|---|---|---|---|---|---|---|")
    for (b, label, ne, nd, ce, cd, re, rd, hd, nb, cb, hb) in rows:
        print(f"| {b} | {label} | {ne:.1f} / {nd:.1f} | {ce:.1f} / {cd:.1f} | {re:.2f}x | **{rd:.2f}x** | "
              f"{hd:.0f} | {nb:.4f} / {cb:.4f} / {hb:.4f} |")
    print()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minilm", default="/tmp/models/minilm/model.safetensors")
    ap.add_argument("--levels", type=int, default=1_000_000)
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--rel-steps", default="1.0,2.0")
    ap.add_argument("--speed", action="store_true", help="only the decode speed comparison with NNCodec")
    ap.add_argument("--speed-levels", type=int, default=8_000_000)
    ap.add_argument("--scales", default="1,4", help="Laplace scales of the speed comparison")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--nnc-python", default=NNC_PYTHON)
    ap.add_argument("--before-tree", default=None, help="an older cdlcodec source tree to compare with")
    args = ap.parse_args()
    if args.speed:
        speed_side_by_side(args.speed_levels, [float(v) for v in args.scales.split(",")], args.repeats,
                           args.nnc_python, args.before_tree)
        return
    rel_steps = [float(v) for v in args.rel_steps.split(",")]
    print(f"# cabac benchmark ({platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
          f"rate pairs {RATE_PAIRS.tolist()})\n")
    CabacBackend().decode(*CabacBackend().encode(np.arange(-5, 5)), 10)  # compile / load kernels
    synthetic(args.levels)
    chunk_sizes(args.levels)
    n_gt_sweep(args.levels)
    trained("LeNet-5", trained_lenet(args.epochs), rel_steps)
    if os.path.exists(args.minilm):
        from safetensors.numpy import load_file

        weights = {k: v.astype(np.float32) for k, v in load_file(args.minilm).items() if v.ndim >= 2}
        trained("MiniLM (all-MiniLM-L6-v2)", weights, rel_steps)
    else:
        print(f"MiniLM not found at {args.minilm}: skipped\n")


if __name__ == "__main__":
    main()
