"""Encode and decode a synthetic checkpoint bigger than a few GB: peak memory against the bound,
throughput on 1 and N threads side by side, bytes identical across thread counts (issue 15).

Usage: python benchmarks/scale/bench_scale.py [--gb 4.3] [--rows 4096] [--cols 2048] [--threads 1,2] [--dtype float32]
                                              [--dir /tmp] [--markdown results.md]

Writes a deterministic float32 (or --dtype bfloat16) .safetensors file of Laplace-distributed weights (many rows x cols
tensors) into a temporary folder, runs `cdlcodec encode` and `cdlcodec decode` (to .safetensors) as
subprocesses under /usr/bin/time -v once per thread count, and prints for each: wall time,
throughput (M params/s), peak resident memory against the bound 500 MB + 3 x the largest tensor,
and whether the .cdl files (and the decoded files) are byte-identical across thread counts. The
temporary folder is removed at the end. Timings are only as good as the machine is quiet: the load
average before and after is printed with them.
"""
from __future__ import annotations

import argparse
import filecmp
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tempfile
import time

import numpy as np

BOUND_BASE = 500 * 10**6  # bytes; the bound is BOUND_BASE + 3 x the largest tensor (issue 15)
CODES, ITEMSIZE = {"float32": "F32", "bfloat16": "BF16"}, {"float32": 4, "bfloat16": 2}


def write_checkpoint(path: str, n_tensors: int, rows: int, cols: int, dtype: str, seed: int = 15) -> int:
    """A .safetensors file of n_tensors rows x cols Laplace(0, 0.02) tensors (F32 or BF16); returns its size."""
    nbytes = rows * cols * ITEMSIZE[dtype]
    header = {f"model.layers.{i}.weight": {"dtype": CODES[dtype], "shape": [rows, cols],
                                           "data_offsets": [i * nbytes, (i + 1) * nbytes]} for i in range(n_tensors)}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    rng = np.random.default_rng(seed)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for i in range(n_tensors):
            scale = 0.02 * (1 + (i % 7) / 7)  # tensors differ in scale, as layers do
            values = rng.laplace(0.0, scale, rows * cols).astype(np.float32)
            if dtype == "bfloat16":
                values = (values.view(np.uint32) >> 16).astype(np.uint16)  # truncation to bf16
            fh.write(values.tobytes())
    return os.path.getsize(path)


def timed(cmd: list[str]) -> dict:
    """Run `cmd` under /usr/bin/time -v: wall seconds, peak RSS bytes, user + system CPU seconds."""
    start = time.perf_counter()
    proc = subprocess.run(["/usr/bin/time", "-v", *cmd], capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): {' '.join(cmd)}\n{proc.stderr[-2000:]}")

    def field(name: str) -> float:
        return float(re.search(rf"{re.escape(name)}: ([\d.]+)", proc.stderr).group(1))

    return {"wall": wall, "rss": int(field("Maximum resident set size (kbytes)")) * 1024,
            "cpu": field("User time (seconds)") + field("System time (seconds)")}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--gb", type=float, default=4.3, help="checkpoint size in GB (10^9 bytes; 4.3 = 128 float32 tensors of 4096x2048 = 4.0 GiB)")
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=2048)
    # float32 by default: with the default Limits a container may decode to at most 16 GiB of values plus
    # int64 levels (Limits.max_decoded_bytes, whole file), i.e. about 1.7 G parameters: a 4 GB bf16
    # checkpoint (2.1 G parameters) is refused at encode time, a 4 GB float32 one (1.1 G) is not.
    ap.add_argument("--dtype", choices=sorted(CODES), default="float32")
    ap.add_argument("--threads", default="1,2", help="thread counts to compare, comma-separated")
    ap.add_argument("--dir", default=None, help="where the temporary folder goes (default: the system's)")
    ap.add_argument("--markdown", default=None, help="also write the table to this file")
    a = ap.parse_args()
    threads = [int(t) for t in a.threads.split(",")]
    tensor_bytes = a.rows * a.cols * ITEMSIZE[a.dtype]
    n_tensors = max(1, round(a.gb * 1e9 / tensor_bytes))
    params = n_tensors * a.rows * a.cols
    bound = BOUND_BASE + 3 * tensor_bytes
    cli = [sys.executable, "-m", "cdlcodec"]
    work = tempfile.mkdtemp(prefix="cdl_scale_", dir=a.dir)
    rows = []
    try:
        src = os.path.join(work, "model.safetensors")
        t0 = time.perf_counter()
        size = write_checkpoint(src, n_tensors, a.rows, a.cols, a.dtype)
        print(f"checkpoint: {n_tensors} {a.dtype} tensors of {a.rows}x{a.cols}, {params / 1e6:.0f} M params, "
              f"{size / 1e9:.2f} GB (written in {time.perf_counter() - t0:.0f} s); "
              f"bound {bound / 1e6:.0f} MB = 500 MB + 3 x {tensor_bytes / 1e6:.1f} MB")
        load_before = os.getloadavg()
        for t in threads:
            cdl = os.path.join(work, f"model_t{t}.cdl")
            result = timed([*cli, "encode", src, "-o", cdl, "-q", "--threads", str(t)])
            rows.append(("encode", t, result))
            print(f"encode --threads {t}: {result['wall']:.1f} s, {params / result['wall'] / 1e6:.1f} M params/s, "
                  f"peak {result['rss'] / 1e6:.0f} MB, CPU {result['cpu']:.0f} s", flush=True)
        for t in threads:
            out = os.path.join(work, f"decoded_t{t}.safetensors")
            result = timed([*cli, "decode", os.path.join(work, f"model_t{threads[0]}.cdl"), "-o", out, "-q",
                            "--threads", str(t)])
            rows.append(("decode", t, result))
            print(f"decode --threads {t}: {result['wall']:.1f} s, {params / result['wall'] / 1e6:.1f} M params/s, "
                  f"peak {result['rss'] / 1e6:.0f} MB, CPU {result['cpu']:.0f} s", flush=True)
        load_after = os.getloadavg()
        same_cdl = all(filecmp.cmp(os.path.join(work, f"model_t{threads[0]}.cdl"), os.path.join(work, f"model_t{t}.cdl"),
                                   shallow=False) for t in threads[1:])
        same_out = all(filecmp.cmp(os.path.join(work, f"decoded_t{threads[0]}.safetensors"),
                                   os.path.join(work, f"decoded_t{t}.safetensors"), shallow=False) for t in threads[1:])
        cdl_size = os.path.getsize(os.path.join(work, f"model_t{threads[0]}.cdl"))
    finally:
        shutil.rmtree(work, ignore_errors=True)

    lines = [f"Synthetic {a.dtype} checkpoint: {n_tensors} tensors of {a.rows}x{a.cols} (Laplace), {params / 1e6:,.0f} M params, "
             f"{size / 1e9:.2f} GB -> {cdl_size / 1e9:.2f} GB .cdl ({8 * cdl_size / params:.2f} bits/param). "
             f"Bound: 500 MB + 3 x {tensor_bytes / 1e6:.1f} MB = {bound / 1e6:.0f} MB. "
             f"{os.cpu_count()} cores; load average {load_before[0]:.1f} before, {load_after[0]:.1f} after.", "",
             "| step | threads | wall s | M params/s | speed-up | CPU s | peak RSS MB | within bound |",
             "|---|---|---|---|---|---|---|---|"]
    for step, t, r in rows:
        base = next(x for s, u, x in rows if s == step and u == threads[0])
        lines.append(f"| {step} | {t} | {r['wall']:.1f} | {params / r['wall'] / 1e6:.1f} | {base['wall'] / r['wall']:.2f}x | "
                     f"{r['cpu']:.0f} | {r['rss'] / 1e6:.0f} | {'yes' if r['rss'] <= bound else 'NO'} |")
    lines += ["", f".cdl bytes identical across thread counts: {'yes' if same_cdl else 'NO'}; "
              f"decoded .safetensors identical: {'yes' if same_out else 'NO'}"]
    print("\n".join(lines))
    if a.markdown:
        with open(a.markdown, "w") as fh:
            fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
