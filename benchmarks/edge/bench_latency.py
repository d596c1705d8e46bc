"""CPU latency of edge outputs (issue 14 point 4): fp32 vs QDQ int8 vs int4, side by side in onnxruntime.

For each model: `encode --deploy int8 --rel-step R` and `encode --deploy int4 --rel-step R` (R = 0.01:
the grid's own step wherever R x std is finer), each decoded with `--weights qdq` (DequantizeLinear;
int4 needs opset 21) and with `--weights qdq --matmul-nbits` (MatMul weights as com.microsoft
MatMulNBits, 8 or 4 bits, accuracy_level 0), and the int8 one with `--matmul-integer` (MatMul weights
as DynamicQuantizeLinear -> MatMulInteger: activations quantized on every run); plus
onnxruntime.quantization's `quantize_dynamic` int8 per-channel model (MatMulInteger, and ConvInteger
for convolutions, which cdlcodec does not write). Every session
runs the same eval batch; the sessions take turns (round robin, `--repeats` rounds, after one warm-up
run each) and the median is reported, so load from other processes falls on all of them alike. Also:
file size and output cosine to the original model (mean per sample; over the batch for one-number
outputs).

    python benchmarks/edge/bench_latency.py /work/bench/models/{minilm,mobilenetv2,ocr_rec,silero_vad}.onnx \\
        --data /work/bench/data --out benchmarks/results/edge_latency.md
"""
from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnxruntime as ort

SAMPLES = 16


def cli(*args) -> None:
    proc = subprocess.run([sys.executable, "-m", "cdlcodec", *args, "-q"], capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"cdlcodec {' '.join(args)} failed:\n{proc.stderr}")


def session(path: str, threads: int, entries=()):
    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    for key, value in entries:
        so.add_session_config_entry(key, value)
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def cosine(a, b) -> float:
    rows = len(a) if a.size > len(a) else 1
    a, b = a.reshape(rows, -1).astype(np.float64), b.reshape(rows, -1).astype(np.float64)
    return float(np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)))


def bench(model: str, data_dir: str, rel_step: float, root: str, repeats: int, threads: int) -> dict:
    name = os.path.splitext(os.path.basename(model))[0]
    feed = {k: v[:SAMPLES] for k, v in np.load(os.path.join(data_dir, f"{name}_eval.npz")).items()}
    p = lambda suffix: os.path.join(root, f"{name}_{suffix}")  # noqa: E731
    runs = {"fp32 (original)": model}
    for grid in ("int8", "int4"):
        cli("encode", model, "-o", p(f"{grid}.cdl"), "--deploy", grid, "--rel-step", str(rel_step))
        cli("decode", p(f"{grid}.cdl"), "-o", p(f"{grid}_qdq.onnx"), "--weights", "qdq")
        cli("decode", p(f"{grid}.cdl"), "-o", p(f"{grid}_nbits.onnx"), "--weights", "qdq", "--matmul-nbits")
        runs[f"QDQ {grid}"] = p(f"{grid}_qdq.onnx")
        runs[f"QDQ {grid} --matmul-nbits"] = p(f"{grid}_nbits.onnx")
        if grid == "int8":
            cli("decode", p("int8.cdl"), "-o", p("int8_integer.onnx"), "--weights", "qdq", "--matmul-integer")
            runs["QDQ int8 --matmul-integer"] = p("int8_integer.onnx")
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(model, p("ortq.onnx"), per_channel=True, weight_type=QuantType.QInt8)
    runs["ORT quantize_dynamic int8 (MatMulInteger/ConvInteger)"] = p("ortq.onnx")
    sessions = {label: session(path, threads) for label, path in runs.items()}
    inputs = {label: {i.name: feed[i.name] for i in s.get_inputs()} for label, s in sessions.items()}
    reference = sessions["fp32 (original)"].run(None, inputs["fp32 (original)"])[0]
    row = {"model": name, "size": {}, "cosine": {}, "ms": {}}
    times = {label: [] for label in sessions}
    for label, s in sessions.items():  # warm-up, and the outputs
        row["cosine"][label] = cosine(s.run(None, inputs[label])[0], reference)
        row["size"][label] = os.path.getsize(runs[label])
    for _ in range(repeats):
        for label, s in sessions.items():
            start = time.perf_counter()
            s.run(None, inputs[label])
            times[label].append(time.perf_counter() - start)
    row["ms"] = {label: 1000 * float(np.median(t)) for label, t in times.items()}
    return row


def table(rows: list[dict], args) -> str:
    labels = list(rows[0]["ms"])
    lines = [f"onnxruntime {ort.__version__}, CPUExecutionProvider, intra_op_num_threads={args.threads}, "
             f"{SAMPLES} eval samples a run, median of {args.repeats} runs (sessions taking turns); "
             f"`--deploy int8|int4 --rel-step {args.rel_step}`; load average at start {args.load0}, "
             f"at end {open('/proc/loadavg').read().split()[0]}.", "",
             "| model | " + " | ".join(labels) + " |", "|---|" + "---|" * len(labels)]
    for r in rows:
        base = r["ms"]["fp32 (original)"]
        lines.append(f"| {r['model']} | " + " | ".join(
            f"{r['ms'][k]:.1f} ms ({r['ms'][k] / base:.2f}x), {r['size'][k] / 1e6:.2f} MB, cos {r['cosine'][k]:.4f}"
            for k in labels) + " |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--data", required=True, help="folder with <model>_eval.npz")
    parser.add_argument("--rel-step", type=float, default=0.01)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--threads", type=int, default=1, help="onnxruntime intra-op threads (1: steadier on a "
                                                                 "shared machine)")
    parser.add_argument("--out", default=None, help="write the markdown table here too")
    args = parser.parse_args()
    args.load0 = open("/proc/loadavg").read().split()[0]
    with tempfile.TemporaryDirectory() as root:
        rows = []
        for m in args.models:
            rows.append(bench(m, args.data, args.rel_step, root, args.repeats, args.threads))
            print(table(rows, args), flush=True)
    text = table(rows, args)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
