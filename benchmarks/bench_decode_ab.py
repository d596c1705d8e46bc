"""Decode speed of this tree against an older one, side by side in one run: the `float` coder on
MiniLM in bfloat16 (next to zstd decompressing the same tensor bytes) and `HuffmanBackend.decode` on
rounded Laplace levels.

    mkdir /tmp/before && git archive ce05368 cdlcodec formats | tar -x -C /tmp/before
    python benchmarks/bench_decode_ab.py --before-tree /tmp/before [--rounds 15] [--levels 8000000]

What is timed is what a user calls, one tensor at a time, one thread:
  bf16      float_exact.decode of each of MiniLM's 101 tensors (bfloat16, round to nearest even),
            the array it returns included: GB/s of decoded tensor bytes (45 MB)
  zstd      zstandard decompression of one zstd-19 frame of the same tensor bytes
  huffman   HuffmanBackend.decode of 8 M rounded Laplace(b) levels, the int64 array it returns
            included: M levels/s
Each tree runs in its own worker process (the trees are both `cdlcodec`); the workers take turns,
one round each at a time, so both see the same load. Times are CPU seconds of the worker; a figure
is the median over rounds, a ratio the median over rounds of the ratio within a round. Every
decode is checked against the original bytes / levels, and the coded bytes of both trees are
checked to be identical.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np

WORKER = r"""
import json, sys, time
import numpy as np
tree, inputs = sys.argv[1], sys.argv[2]
if tree:
    sys.path.insert(0, tree)
import cdlcodec
from cdlcodec.backends import float_exact
from cdlcodec.backends.huffman import HuffmanBackend
assert not tree or cdlcodec.__file__.startswith(tree), cdlcodec.__file__
z = np.load(inputs, allow_pickle=False)
floats = [(bytes(z[f"p{i}"]), bytes(z[f"q{i}"]), int(z[f"n{i}"]), "bfloat16") for i in range(int(z["tensors"]))]
bits = z["bits"]
huff = HuffmanBackend()
coded = {}
for b in z["scales"]:
    levels = z[f"levels{b}"]
    coded[float(b)] = (*huff.encode(levels), levels.size)
    assert np.array_equal(huff.decode(*coded[float(b)]), levels)
got = np.concatenate([float_exact.decode(*a) for a in floats])
assert got.tobytes() == bits.tobytes()
zstd = None
import zstandard
frame = bytes(z["zstd"])
dz = zstandard.ZstdDecompressor()
assert dz.decompress(frame) == bits.tobytes()
sizes = {str(b): len(p) + len(q) for b, (p, q, _) in coded.items()}
print(json.dumps({"ready": True, "huffman_bytes": sizes}), flush=True)

def cpu(fn):
    t = time.process_time(); fn(); return time.process_time() - t

for line in sys.stdin:
    out = {"bf16": cpu(lambda: [float_exact.decode(*a) for a in floats]),
           "zstd": cpu(lambda: dz.decompress(frame))}
    for b, args in coded.items():
        out[f"huffman{b}"] = cpu(lambda: huff.decode(*args))
    print(json.dumps(out), flush=True)
"""


def _inputs(path: str, model: str, levels: int, scales: list[float]) -> int:
    import zstandard

    from cdlcodec.backends import float_exact
    from cdlcodec.dtypes import from_float64
    from cdlcodec.io.onnx_model import read_onnx

    arrays = [from_float64(r.array.astype(np.float64), "bfloat16").view(np.uint16).ravel()
              for r in read_onnx(model).records if r.numel and r.dtype == "float32"]
    bits = np.concatenate(arrays)
    data = {"tensors": len(arrays), "bits": bits, "scales": np.array(scales),
            "zstd": np.frombuffer(zstandard.ZstdCompressor(level=19).compress(bits.tobytes()), np.uint8)}
    for i, a in enumerate(arrays):
        p, q = float_exact.encode(a, "bfloat16")
        data[f"p{i}"], data[f"q{i}"], data[f"n{i}"] = np.frombuffer(p, np.uint8), np.frombuffer(q, np.uint8), a.size
    for b in scales:
        data[f"levels{b}"] = np.rint(np.random.default_rng(0).laplace(0.0, b, levels)).astype(np.int64)
    np.savez(path, **data)
    return bits.nbytes


class Worker:
    def __init__(self, label: str, tree: str, inputs: str):
        env = dict(os.environ, NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1")
        self.label = label
        self.proc = subprocess.Popen([sys.executable, "-c", WORKER, tree, inputs], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True, env=env)
        self.ready = self._reply()

    def _reply(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"worker {self.label} died")
        return json.loads(line)

    def round(self) -> dict:
        self.proc.stdin.write("round\n")
        self.proc.stdin.flush()
        return self._reply()

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait()


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before-tree", required=True, help="an older cdlcodec source tree (cdlcodec/ inside)")
    ap.add_argument("--model", default="/work/bench/models/minilm.onnx")
    ap.add_argument("--levels", type=int, default=8_000_000)
    ap.add_argument("--scales", default="1,4")
    ap.add_argument("--rounds", type=int, default=15)
    args = ap.parse_args(argv)
    scales = [float(s) for s in args.scales.split(",")]
    load0 = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="cdl_ab_") as tmp:
        inputs = os.path.join(tmp, "inputs.npz")
        nbytes = _inputs(inputs, args.model, args.levels, scales)
        workers = [Worker("before", os.path.abspath(args.before_tree), inputs), Worker("after", "", inputs)]
        assert workers[0].ready["huffman_bytes"] == workers[1].ready["huffman_bytes"], "coded sizes differ"
        times: dict[tuple[str, str], list[float]] = {}
        for _ in range(args.rounds):
            for w in workers:
                for key, sec in w.round().items():
                    times.setdefault((w.label, key), []).append(sec)
        for w in workers:
            w.close()
    load1 = os.getloadavg()
    med = {k: float(np.median(v)) for k, v in times.items()}

    def ratio(a, b):  # median over rounds of time(b) / time(a): how many times faster a is than b
        return float(np.median(np.array(times[b]) / np.array(times[a])))

    print(f"load average {load0[0]:.1f} at the start, {load1[0]:.1f} at the end; {args.rounds} interleaved "
          f"rounds, CPU time, one thread\n")
    print("| what | before | after | after / before | after / zstd (same round) | zstd |")
    print("|---|---:|---:|---:|---:|---:|")
    print(f"| MiniLM bf16, float_exact.decode of 101 tensors | {nbytes / med[('before', 'bf16')] / 1e9:.3f} GB/s | "
          f"{nbytes / med[('after', 'bf16')] / 1e9:.3f} GB/s | {ratio(('after', 'bf16'), ('before', 'bf16')):.3f}x | "
          f"{ratio(('after', 'bf16'), ('after', 'zstd')):.2f}x | {nbytes / med[('after', 'zstd')] / 1e9:.3f} GB/s |")
    for b in scales:
        key = f"huffman{b}"
        print(f"| HuffmanBackend.decode, {args.levels / 1e6:.0f} M Laplace(b={b:g}) levels, int64 out | "
              f"{args.levels / med[('before', key)] / 1e6:.0f} M/s | {args.levels / med[('after', key)] / 1e6:.0f} M/s | "
              f"{ratio(('after', key), ('before', key)):.3f}x | | |")
    print(f"\nhuffman coded bytes (identical in both trees): {workers[1].ready['huffman_bytes']}")


if __name__ == "__main__":
    main(sys.argv[1:])
