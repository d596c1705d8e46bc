"""Where the second core goes in a 2-thread decode (issue 15): per-thread CPU accounting of
`cdlcodec.decode` to .safetensors on 1 and 2 threads, side by side, repeated and interleaved.

Usage: python benchmarks/scale/bench_decode_threads.py [--tensors 32] [--rows 4096] [--cols 2048] [--repeat 2] [--dir /tmp]

Writes the synthetic checkpoint of bench_scale.py (float32 Laplace tensors), encodes it with the CLI,
deletes it, then decodes the container in this process, --repeat times per thread count
(1, 2, 1, 2, ...), and prints for each decode: wall time, the process's CPU time, and how it splits
between the calling thread (reading payloads, writing the output) and the decoding threads. The
process start-up (imports, numba's kernel loading) is measured apart: a CLI decode of one tensor.

A shared machine hides a 2-thread speed-up (with the kernel's per-session autogroups, a busy
machine gives a 2-thread process the CPU share of a 1-thread one), so the wall-time ratio is printed
with the load average, and beside it the speed-up the CPU accounting allows on an idle 2-core
machine, an upper bound: start-up + the 1-thread CPU for one thread against start-up +
max(calling thread, all CPU / 2) for two (the calling thread cannot go faster than its own work;
everything else shares two cores). Waits for the GIL and the memory bandwidth two cores share are
not CPU time: the bound cannot see them.
"""
from __future__ import annotations

import argparse
import filecmp
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_scale import timed, write_checkpoint  # noqa: E402


def decode_once(cdl: str, out: str, threads: int) -> dict:
    import cdlcodec

    if os.path.exists(out):
        os.remove(out)
    wall, cpu, main = time.perf_counter(), time.process_time(), time.thread_time()
    cdlcodec.decode(cdl, out, threads=threads)
    wall, cpu, main = time.perf_counter() - wall, time.process_time() - cpu, time.thread_time() - main
    return {"wall": wall, "cpu": cpu, "main": main, "others": cpu - main, "load": os.getloadavg()[0]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--tensors", type=int, default=32)
    ap.add_argument("--rows", type=int, default=4096)
    ap.add_argument("--cols", type=int, default=2048)
    ap.add_argument("--repeat", type=int, default=2)
    ap.add_argument("--dir", default=None)
    a = ap.parse_args()
    cli = [sys.executable, "-m", "cdlcodec"]
    work = tempfile.mkdtemp(prefix="cdl_threads_", dir=a.dir)
    try:
        src, cdl = os.path.join(work, "model.safetensors"), os.path.join(work, "model.cdl")
        write_checkpoint(src, a.tensors, a.rows, a.cols, "float32")
        subprocess.run([*cli, "encode", src, "-o", cdl, "-q"], check=True)
        os.remove(src)
        one = os.path.join(work, "one.safetensors")
        startup_run = timed([*cli, "decode", cdl, "--only", "model.layers.0.weight", "-o", one, "-q"])
        outs = {t: os.path.join(work, f"decoded_t{t}.safetensors") for t in (1, 2)}
        decode_once(cdl, outs[1], 1)  # warm: kernels loaded, pages of the container cached
        runs = []
        for _ in range(a.repeat):
            for t in (1, 2):
                r = decode_once(cdl, outs[t], t)
                runs.append((t, r))
                print(f"threads {t}: wall {r['wall']:.2f} s, CPU {r['cpu']:.2f} s (calling thread {r['main']:.2f}, "
                      f"decoding threads {r['others']:.2f}), load {r['load']:.1f}", flush=True)
        same = filecmp.cmp(outs[1], outs[2], shallow=False)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    params = a.tensors * a.rows * a.cols
    per_tensor = min(r["cpu"] for t, r in runs if t == 1) / a.tensors
    startup = max(0.0, startup_run["cpu"] - per_tensor)
    print(f"\n{a.tensors} float32 tensors of {a.rows}x{a.cols} ({params / 1e6:.0f} M params); {os.cpu_count()} cores")
    print(f"process start-up (CLI decode of one tensor, less its share): {startup:.2f} s CPU")
    print("| run | wall 1 thread | wall 2 threads | measured speed-up | CPU 1 / 2 threads | calling thread (2) | "
          "idle 2-core bound, in process | idle bound, CLI with start-up | load |")
    print("|---|---|---|---|---|---|---|---|---|")
    for i in range(0, len(runs), 2):
        (_, r1), (_, r2) = runs[i], runs[i + 1]
        t1, t2 = r1["cpu"], max(r2["main"], r2["cpu"] / 2)
        print(f"| {i // 2 + 1} | {r1['wall']:.2f} | {r2['wall']:.2f} | {r1['wall'] / r2['wall']:.2f}x | "
              f"{r1['cpu']:.2f} / {r2['cpu']:.2f} | {r2['main']:.2f} | {t1 / t2:.2f}x | "
              f"{(startup + t1) / (startup + t2):.2f}x | {r1['load']:.1f} / {r2['load']:.1f} |")
    print(f"\ndecoded .safetensors identical for 1 and 2 threads: {'yes' if same else 'NO'}")


if __name__ == "__main__":
    main()
