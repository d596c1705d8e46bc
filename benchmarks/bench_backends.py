"""Benchmark of the raw and huffman backends against order-0 entropy and general-purpose compressors.

For each model (a LeNet-5 trained here on the bundled MNIST digits, and MiniLM from a safetensors
file), every tensor with ndim >= 2 is quantized uniformly, k = round(w / (R * std(w))), and the same
integers are coded by: huffman, raw, and lzma / bz2 / zlib of the smallest int8/int16/int32 bytes.
Reported: bits per parameter of each, the per-tensor order-0 entropy (the bound for huffman),
encode/decode throughput, and the numba first-call latency (fresh interpreter, warm and cold cache).

    python benchmarks/bench_backends.py [--minilm PATH] [--rel-steps 0.05,0.2,1.0] [--out FILE]
    NUMBA_NUM_THREADS=1 python benchmarks/bench_backends.py --laplace 8000000 [--repeats 5]

--laplace N only measures huffman's one-stream throughput on N rounded Laplace levels of several
scales (median CPU time; decode includes allocating the int64 output, as a caller gets it).

Throughputs are CPU seconds of this process (all kernels are single-threaded), so they stay
meaningful on a machine shared with other jobs; the latency figures give wall and CPU time.
"""
from __future__ import annotations

import argparse
import bz2
import lzma
import os
import platform
import subprocess
import sys
import tempfile
import time
import zlib
from pathlib import Path

import numpy as np

from cdlcodec.backends.huffman import HuffmanBackend
from cdlcodec.backends.raw import RawBackend
from cdlcodec.backends.stats import order0_entropy_bits

HUFF = HuffmanBackend()
RAW = RawBackend()


# --- models --------------------------------------------------------------------------------------

def trained_lenet(epochs: int, seed: int = 0) -> dict[str, np.ndarray]:
    import torch

    from cdlcodec.data.mnist import load_mnist_5k
    from cdlcodec.models import build

    torch.manual_seed(seed)
    (x_train, y_train), (x_test, y_test) = load_mnist_5k()
    model = build("lenet5")
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    xt, yt = torch.from_numpy(x_train), torch.from_numpy(y_train).long()
    gen = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        perm = torch.randperm(len(xt), generator=gen)
        for i in range(0, len(xt), 64):
            idx = perm[i:i + 64]
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(xt[idx]), yt[idx])
            loss.backward()
            opt.step()
    with torch.no_grad():
        acc = (model(torch.from_numpy(x_test)).argmax(1).numpy() == y_test).mean()
    print(f"LeNet-5 trained {epochs} epochs, test accuracy {100 * acc:.1f} %", flush=True)
    return {k: v.detach().numpy().astype(np.float32) for k, v in model.state_dict().items()}


def minilm(path: Path) -> dict[str, np.ndarray] | None:
    if not path.exists():
        print(f"MiniLM skipped: {path} not found", flush=True)
        return None
    from safetensors.numpy import load_file

    return {k: v.astype(np.float32) for k, v in load_file(str(path)).items()}


# --- measurements --------------------------------------------------------------------------------

def quantize(tensors: dict[str, np.ndarray], rel_step: float) -> dict[str, np.ndarray]:
    out = {}
    for name, w in tensors.items():
        if w.ndim < 2 or w.size == 0:
            continue
        std = float(np.std(w, dtype=np.float32))
        step = rel_step * std if std > 0 else 1.0
        out[name] = np.round(w.ravel() / np.float32(step)).astype(np.int64)
    return out


def smallest_int_bytes(levels: np.ndarray) -> bytes:
    for dt in (np.int8, np.int16, np.int32):
        info = np.iinfo(dt)
        if levels.min() >= info.min and levels.max() <= info.max:
            return levels.astype(dt).tobytes()
    raise ValueError("levels do not fit int32")


def best_time(fn, repeats: int) -> float:
    """Best CPU time of this process over `repeats` runs. Every kernel runs on one core, so CPU time
    is the one-core figure even when other jobs compete for the machine (wall time would not be)."""
    best = float("inf")
    for _ in range(repeats):
        t = time.process_time()
        fn()
        best = min(best, time.process_time() - t)
    return best


def measure(levels_by_name: dict[str, np.ndarray], repeats: int) -> dict:
    n = sum(v.size for v in levels_by_name.values())
    bits = dict(huffman=0, raw=0, entropy=0.0, lzma=0, bz2=0, zlib=0)
    worst_gap = 0.0  # largest huffman - H0 (bits/param, params included) over tensors with H0 >= 2
    worst_name = ""
    encoded = {}
    for name, lv in levels_by_name.items():
        hp, hq = HUFF.encode(lv)
        rp, rq = RAW.encode(lv)
        encoded[name] = (hp, hq, rp, rq)
        np.testing.assert_array_equal(HUFF.decode(hp, hq, lv.size), lv)
        np.testing.assert_array_equal(RAW.decode(rp, rq, lv.size), lv)
        h0 = order0_entropy_bits(lv)
        hbits = 8 * (len(hp) + len(hq))
        bits["huffman"] += hbits
        bits["raw"] += 8 * (len(rp) + len(rq))
        bits["entropy"] += h0
        data = smallest_int_bytes(lv)
        bits["lzma"] += 8 * len(lzma.compress(data))
        bits["bz2"] += 8 * len(bz2.compress(data, 9))
        bits["zlib"] += 8 * len(zlib.compress(data, 9))
        if h0 / lv.size >= 2.0 and (hbits - h0) / lv.size > worst_gap:
            worst_gap, worst_name = (hbits - h0) / lv.size, name
    entropy_ge2 = [k for k, v in levels_by_name.items() if order0_entropy_bits(v) / v.size >= 2.0]
    n_ge2 = sum(levels_by_name[k].size for k in entropy_ge2)
    gap_ge2 = (sum(8 * (len(encoded[k][0]) + len(encoded[k][1])) - order0_entropy_bits(levels_by_name[k])
                   for k in entropy_ge2) / n_ge2) if n_ge2 else float("nan")

    def enc_all(backend):
        for lv in levels_by_name.values():
            backend.encode(lv)

    def dec_all(backend, idx):
        for name, lv in levels_by_name.items():
            e = encoded[name]
            backend.decode(e[idx], e[idx + 1], lv.size)

    times = {
        "huffman_enc": best_time(lambda: enc_all(HUFF), repeats),
        "huffman_dec": best_time(lambda: dec_all(HUFF, 0), repeats),
        "raw_enc": best_time(lambda: enc_all(RAW), repeats),
        "raw_dec": best_time(lambda: dec_all(RAW, 2), repeats),
    }
    return dict(n=n, bits=bits, worst_gap=worst_gap, worst_name=worst_name, gap_ge2=gap_ge2, n_ge2=n_ge2,
                tensors=len(levels_by_name), times=times)


def kernel_throughput(levels: np.ndarray, repeats: int) -> tuple[float, float]:
    """Huffman encode / decode M symbols/s on one large concatenated stream (no per-tensor overhead)."""
    p, q = HUFF.encode(levels)
    dec = best_time(lambda: HUFF.decode(p, q, levels.size), repeats)
    enc = best_time(lambda: HUFF.encode(levels), repeats)
    return levels.size / enc / 1e6, levels.size / dec / 1e6


def laplace_throughput(n: int, repeats: int, lines: list[str]) -> None:
    """Huffman encode / decode M levels/s on rounded Laplace levels (one stream each), medians."""
    lines.append(f"\n### huffman on {n:,} rounded Laplace levels (one core, CPU time, median of {repeats})\n")
    lines.append("| Laplace b | bits/level | order-0 entropy | encode M/s | decode M/s |")
    lines.append("|---|---:|---:|---:|---:|")
    for b in (0.5, 1.0, 4.0, 16.0):
        levels = np.rint(np.random.default_rng(0).laplace(0.0, b, n)).astype(np.int64)
        p, q = HUFF.encode(levels)
        np.testing.assert_array_equal(HUFF.decode(p, q, n), levels)

        def median_time(fn):
            times = []
            for _ in range(repeats):
                t = time.process_time()
                fn()
                times.append(time.process_time() - t)
            return float(np.median(times))

        dec = median_time(lambda: HUFF.decode(p, q, n))
        enc = median_time(lambda: HUFF.encode(levels))
        lines.append(f"| {b} | {8 * (len(p) + len(q)) / n:.4f} | {order0_entropy_bits(levels) / n:.4f} | "
                     f"{n / enc / 1e6:.0f} | {n / dec / 1e6:.0f} |")
    print("\n".join(lines[-(4 + 3):]), flush=True)


FIRST_CALL = r"""
import time
w0, c0 = time.perf_counter(), time.process_time()
import numpy as np
from cdlcodec.backends.huffman import HuffmanBackend
from cdlcodec.backends.raw import RawBackend
w1, c1 = time.perf_counter(), time.process_time()
x = np.round(np.random.default_rng(0).laplace(0, 5, 1000)).astype(np.int64)
for b in (HuffmanBackend(), RawBackend()):
    p, q = b.encode(x)
    assert (b.decode(p, q, x.size) == x).all()
w2, c2 = time.perf_counter(), time.process_time()
print(f"{w1 - w0:.3f} {w2 - w1:.3f} {c1 - c0:.3f} {c2 - c1:.3f}")
"""


def first_call_latency() -> dict[str, tuple[float, ...]]:
    """Wall and CPU seconds of (import, first encode+decode) in fresh interpreters: with an empty numba
    cache (a private NUMBA_CACHE_DIR, so the real cache is left alone), then with that cache warm."""
    out = {}
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        for label in ("cold cache", "warm cache"):
            res = subprocess.run([sys.executable, "-c", FIRST_CALL], env=env, capture_output=True, text=True, check=True)
            out[label] = tuple(map(float, res.stdout.split()))
    return out


# --- report --------------------------------------------------------------------------------------

def report_model(title: str, tensors: dict[str, np.ndarray], rel_steps, repeats: int, lines: list[str]) -> None:
    for r in rel_steps:
        start = len(lines)
        lv = quantize(tensors, r)
        m = measure(lv, repeats)
        n, b, t = m["n"], m["bits"], m["times"]
        lines.append(f"\n### {title}, step = {r} x std ({m['tensors']} tensors, {n:,} params)\n")
        lines.append("| coder | bits/param | vs order-0 entropy |")
        lines.append("|---|---:|---:|")
        h0 = b["entropy"] / n
        for key, label in (("entropy", "order-0 entropy (per tensor)"), ("huffman", "huffman (payload + params)"),
                           ("raw", "raw (bit-packed)"), ("lzma", "lzma of int8/16/32"), ("bz2", "bz2 -9 of int8/16/32"),
                           ("zlib", "zlib -9 of int8/16/32")):
            bpp = b[key] / n
            lines.append(f"| {label} | {bpp:.4f} | {bpp - h0:+.4f} |")
        if m["n_ge2"]:
            lines.append(f"\nTensors with entropy >= 2 bits ({m['n_ge2']:,} params): huffman - entropy = "
                         f"{m['gap_ge2']:.4f} bit/param overall, worst tensor {m['worst_gap']:.4f} ({m['worst_name']}).")
        else:
            lines.append("\nNo tensor has an entropy of 2 bits or more at this step.")
        lines.append(f"\nThroughput over all tensors (one core, CPU time, best of {repeats}): huffman encode "
                     f"{n / t['huffman_enc'] / 1e6:.1f} M params/s, decode {n / t['huffman_dec'] / 1e6:.1f} M params/s; "
                     f"raw encode {n / t['raw_enc'] / 1e6:.1f}, decode {n / t['raw_dec'] / 1e6:.1f} M params/s.")
        if n >= 1_000_000:
            enc, dec = kernel_throughput(np.concatenate(list(lv.values())), repeats)
            lines.append(f"Huffman on all tensors as one stream: encode {enc:.1f} M symbols/s, decode {dec:.1f} M symbols/s.")
        print("\n".join(lines[start:]), flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--minilm", type=Path, default=Path("/tmp/models/minilm/model.safetensors"))
    ap.add_argument("--rel-steps", default="0.05,0.2,1.0")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=None, help="also write the markdown report here")
    ap.add_argument("--laplace", type=int, default=0, metavar="N", help="only huffman's speed on N Laplace levels")
    args = ap.parse_args()
    rel_steps = [float(s) for s in args.rel_steps.split(",")]
    os.environ.setdefault("NUMBA_NUM_THREADS", "1")
    if args.laplace:
        laplace_throughput(args.laplace, args.repeats, [])
        return

    lines = [f"Machine: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, "
             f"Python {platform.python_version()}, numpy {np.__version__}"]
    lat = first_call_latency()
    lines.append("\n### numba first-call latency (fresh interpreter; import / first encode+decode of both backends)\n")
    for label, (imp, first, imp_cpu, first_cpu) in lat.items():
        lines.append(f"- {label}: import {imp:.2f} s wall ({imp_cpu:.2f} s CPU), "
                     f"first encode+decode {first:.2f} s wall ({first_cpu:.2f} s CPU)")
    print("\n".join(lines), flush=True)

    report_model("LeNet-5 (trained here)", trained_lenet(args.epochs), rel_steps, args.repeats, lines)
    tensors = minilm(args.minilm)
    if tensors is not None:
        report_model("all-MiniLM-L6-v2", tensors, rel_steps, args.repeats, lines)
    if args.out:
        args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
