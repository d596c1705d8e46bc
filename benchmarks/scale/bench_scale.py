"""Encode and decode a synthetic checkpoint bigger than a few GB: peak memory against the bound,
throughput on 1 and N threads side by side, bytes identical across thread counts (issue 15).

Usage: python benchmarks/scale/bench_scale.py [--gb 4.3] [--rows 4096] [--cols 2048] [--threads 1,2] [--dtype float32]
                                              [--dir /tmp] [--markdown results.md] [--decode-repeat 2] [--onnx]

Writes a deterministic float32 (or --dtype bfloat16) .safetensors file of Laplace-distributed weights (many rows x cols
tensors) into a temporary folder, runs `cdlcodec encode` and `cdlcodec decode` (to .safetensors) as
subprocesses under /usr/bin/time -v once per thread count, and prints for each: wall time,
throughput (M params/s), peak resident memory against the bound 500 MB + 3 x the largest tensor,
and whether the .cdl files (and the decoded files) are byte-identical across thread counts. The
temporary folder is removed at the end. Timings are only as good as the machine is quiet: the load
average before and after is printed with them (--decode-repeat interleaves repeated decodes).
With --onnx the same tensors are also written as an ONNX model whose weights are in an external data
file, and both are encoded with one quantizer: peak memory side by side, payloads compared.
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


def laplace_tensors(n_tensors: int, rows: int, cols: int, dtype: str, seed: int = 15):
    """The checkpoint's tensors, one at a time: rows x cols Laplace(0, 0.02 ...) values as F32 or BF16 bits."""
    rng = np.random.default_rng(seed)
    for i in range(n_tensors):
        scale = 0.02 * (1 + (i % 7) / 7)  # tensors differ in scale, as layers do
        values = rng.laplace(0.0, scale, rows * cols).astype(np.float32)
        if dtype == "bfloat16":
            values = (values.view(np.uint32) >> 16).astype(np.uint16)  # truncation to bf16
        yield values


def write_checkpoint(path: str, n_tensors: int, rows: int, cols: int, dtype: str, seed: int = 15) -> int:
    """A .safetensors file of n_tensors rows x cols Laplace(0, 0.02) tensors (F32 or BF16); returns its size."""
    nbytes = rows * cols * ITEMSIZE[dtype]
    header = {f"model.layers.{i}.weight": {"dtype": CODES[dtype], "shape": [rows, cols],
                                           "data_offsets": [i * nbytes, (i + 1) * nbytes]} for i in range(n_tensors)}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(blob)))
        fh.write(blob)
        for values in laplace_tensors(n_tensors, rows, cols, dtype, seed):
            fh.write(values.tobytes())
    return os.path.getsize(path)


def write_onnx_external(path: str, n_tensors: int, rows: int, cols: int, dtype: str, seed: int = 15) -> int:
    """The same tensors as write_checkpoint as the initializers of an ONNX model (y_i = x @ w_i) whose
    weights are all in one external data file beside it, `<path>.data`, written tensor by tensor;
    returns the data file's size."""
    from onnx import TensorProto, helper

    nbytes, location = rows * cols * ITEMSIZE[dtype], os.path.basename(path) + ".data"
    with open(path + ".data", "wb") as fh:
        for values in laplace_tensors(n_tensors, rows, cols, dtype, seed):
            fh.write(values.tobytes())
    onnx_type = TensorProto.FLOAT if dtype == "float32" else TensorProto.BFLOAT16
    inits, nodes, outputs = [], [], []
    for i in range(n_tensors):
        tensor = TensorProto(name=f"model.layers.{i}.weight", data_type=onnx_type, dims=[rows, cols],
                             data_location=TensorProto.EXTERNAL)
        for key, value in (("location", location), ("offset", str(i * nbytes)), ("length", str(nbytes))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        inits.append(tensor)
        nodes.append(helper.make_node("MatMul", ["x", tensor.name], [f"y{i}"]))
        outputs.append(helper.make_tensor_value_info(f"y{i}", onnx_type, [1, cols]))
    graph = helper.make_graph(nodes, "scale", [helper.make_tensor_value_info("x", onnx_type, [1, rows])], outputs, inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    with open(path, "wb") as fh:
        fh.write(model.SerializeToString())
    return os.path.getsize(path + ".data")


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


# The CLI's data-free default for a file without a graph (an ONNX model's default, a fidelity target,
# runs the model whole), given explicitly so that both files are encoded alike.
DATA_FREE_ENCODE = """import sys
from cdlcodec.api import encode_with_options
from cdlcodec.codec import EncodeOptions
from cdlcodec.fidelity.encode import data_free_default
encode_with_options(sys.argv[1], sys.argv[2], EncodeOptions(quantizer=data_free_default(), quiet=True, threads=int(sys.argv[3])))
"""


def compare_onnx_external(work: str, src: str, n_tensors: int, a, threads: list[int]) -> list:
    """Encode the .safetensors checkpoint and the same tensors as an ONNX model with external data, with
    one quantizer, per thread count: (source, threads, timed result, payloads identical to the
    .safetensors encode's)."""
    from cdlcodec.formats.container import ContainerReader

    model = os.path.join(work, "model.onnx")
    write_onnx_external(model, n_tensors, a.rows, a.cols, a.dtype)
    found = []
    for t in threads:
        outs = {}
        for source, path in (("safetensors", src), ("onnx external", model)):
            outs[source] = os.path.join(work, f"q_{source[:4]}_t{t}.cdl")
            result = timed([sys.executable, "-c", DATA_FREE_ENCODE, path, outs[source], str(t)])
            print(f"encode {source} --threads {t}: {result['wall']:.1f} s, peak {result['rss'] / 1e6:.0f} MB", flush=True)
            found.append([source, t, result, "(reference)" if source == "safetensors" else ""])
        with ContainerReader(outs["safetensors"]) as x, ContainerReader(outs["onnx external"]) as y:
            same = [e.name for e in x.tensors] == [e.name for e in y.tensors] and all(
                x.read_payload(e) == y.read_payload(f) for e, f in zip(x.tensors, y.tensors))
        found[-1][3] = "yes" if same else "NO"
        for path in outs.values():
            os.remove(path)
    return found


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
    ap.add_argument("--decode-repeat", type=int, default=1,
                    help="decode this many times per thread count, interleaved (1, 2, 1, 2, ...): a shared machine's load moves")
    ap.add_argument("--onnx", action="store_true",
                    help="also write the tensors as an ONNX model with external data and encode it and the .safetensors "
                         "file with the same quantizer (the data-free default): peak memory side by side, payloads compared")
    a = ap.parse_args()
    threads = [int(t) for t in a.threads.split(",")]
    tensor_bytes = a.rows * a.cols * ITEMSIZE[a.dtype]
    n_tensors = max(1, round(a.gb * 1e9 / tensor_bytes))
    params = n_tensors * a.rows * a.cols
    bound = BOUND_BASE + 3 * tensor_bytes
    cli = [sys.executable, "-m", "cdlcodec"]
    work = tempfile.mkdtemp(prefix="cdl_scale_", dir=a.dir)
    rows, onnx_rows = [], []
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
        for repeat in range(a.decode_repeat):
            for t in threads:
                out = os.path.join(work, f"decoded_t{t}.safetensors")
                if os.path.exists(out):
                    os.remove(out)
                result = timed([*cli, "decode", os.path.join(work, f"model_t{threads[0]}.cdl"), "-o", out, "-q",
                                "--threads", str(t)])
                result["load"] = os.getloadavg()[0]
                rows.append(("decode", t, result))
                print(f"decode --threads {t}: {result['wall']:.1f} s, {params / result['wall'] / 1e6:.1f} M params/s, "
                      f"peak {result['rss'] / 1e6:.0f} MB, CPU {result['cpu']:.1f} s, load {result['load']:.1f}", flush=True)
        load_after = os.getloadavg()
        same_cdl = all(filecmp.cmp(os.path.join(work, f"model_t{threads[0]}.cdl"), os.path.join(work, f"model_t{t}.cdl"),
                                   shallow=False) for t in threads[1:])
        same_out = all(filecmp.cmp(os.path.join(work, f"decoded_t{threads[0]}.safetensors"),
                                   os.path.join(work, f"decoded_t{t}.safetensors"), shallow=False) for t in threads[1:])
        cdl_size = os.path.getsize(os.path.join(work, f"model_t{threads[0]}.cdl"))
        if a.onnx:
            onnx_rows = compare_onnx_external(work, src, n_tensors, a, threads)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    lines = [f"Synthetic {a.dtype} checkpoint: {n_tensors} tensors of {a.rows}x{a.cols} (Laplace), {params / 1e6:,.0f} M params, "
             f"{size / 1e9:.2f} GB -> {cdl_size / 1e9:.2f} GB .cdl ({8 * cdl_size / params:.2f} bits/param). "
             f"Bound: 500 MB + 3 x {tensor_bytes / 1e6:.1f} MB = {bound / 1e6:.0f} MB. "
             f"{os.cpu_count()} cores; load average {load_before[0]:.1f} before, {load_after[0]:.1f} after.", "",
             "| step | threads | wall s | M params/s | speed-up | CPU s | peak RSS MB | within bound |",
             "|---|---|---|---|---|---|---|---|"]
    for i, (step, t, r) in enumerate(rows):  # speed-up against the first thread count's run just before
        base = next(x for s, u, x in reversed(rows[:i + 1]) if s == step and u == threads[0])
        lines.append(f"| {step} | {t} | {r['wall']:.1f} | {params / r['wall'] / 1e6:.1f} | {base['wall'] / r['wall']:.2f}x | "
                     f"{r['cpu']:.0f} | {r['rss'] / 1e6:.0f} | {'yes' if r['rss'] <= bound else 'NO'} |")
    lines += ["", f".cdl bytes identical across thread counts: {'yes' if same_cdl else 'NO'}; "
              f"decoded .safetensors identical: {'yes' if same_out else 'NO'}"]
    if onnx_rows:
        lines += ["", "Encode of the same tensors from .safetensors and from ONNX with external data (the data-free default quantizer):", "",
                  "| source | threads | wall s | CPU s | peak RSS MB | within bound | payloads identical |", "|---|---|---|---|---|---|---|"]
        for source, t, r, same in onnx_rows:
            lines.append(f"| {source} | {t} | {r['wall']:.1f} | {r['cpu']:.0f} | {r['rss'] / 1e6:.0f} | "
                         f"{'yes' if r['rss'] <= bound else 'NO'} | {same} |")
    print("\n".join(lines))
    if a.markdown:
        with open(a.markdown, "w") as fh:
            fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
