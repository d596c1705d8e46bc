"""Edge outputs (issue 14) on real ONNX models: `encode --deploy int8` then `decode --weights qdq`.

For each model: opset before/after, sizes (original, .cdl, QDQ ONNX, onnxruntime.quantization's
dynamic int8 per-channel ONNX), onnx.checker full_check, whether DequantizeLinear reproduces the
coded weights bit for bit, onnxruntime parity with the float decode under default session options
(and with session.qdq_matmulnbits_accuracy_level=0), output cosine to the original model, decode
time and peak memory (/usr/bin/time -v), --matmul-nbits, onnxruntime load time (session creation)
and CPU latency, and the same steps without --deploy for comparison.

    python benchmarks/edge/bench_edge.py /work/bench/models/{minilm,ocr_rec,mobilenetv2,silero_vad}.onnx \\
        --data /work/bench/data --out benchmarks/results/edge_outputs.md
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

import numpy as np
import onnx
import onnxruntime as ort
from onnx import numpy_helper

SAMPLES = 16


def cli(*args) -> tuple[str, float, int]:
    """Run `cdlcodec ARGS` under /usr/bin/time -v: (stderr, seconds, peak RSS in KB)."""
    proc = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", "cdlcodec", *args, "-q"],
                          capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"cdlcodec {' '.join(args)} failed:\n{proc.stderr}")
    wall = re.search(r"Elapsed \(wall clock\) time \(h:mm:ss or m:ss\): (?:(\d+):)?(\d+):([\d.]+)", proc.stderr)
    seconds = int(wall.group(1) or 0) * 3600 + int(wall.group(2)) * 60 + float(wall.group(3))
    peak = int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1))
    notes = [line for line in proc.stderr.splitlines() if line.startswith("cdlcodec: note")]
    return "\n".join(notes), seconds, peak


def session(path, entries=()):
    so = ort.SessionOptions()
    for key, value in entries:
        so.add_session_config_entry(key, value)
    return ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])


def outputs(path, feed, entries=()):
    s = session(path, entries)
    return s.run(None, {i.name: feed[i.name] for i in s.get_inputs()})[0]


def latencies_ms(runs: dict, feed, repeats=10) -> dict:
    """Median wall time of one run on the batch for each (path, session entries), after a warm-up run.
    The sessions take turns, so load from other processes falls on all of them alike."""
    sessions = {label: session(path, entries) for label, (path, entries) in runs.items()}
    inputs = {label: {i.name: feed[i.name] for i in s.get_inputs()} for label, s in sessions.items()}
    times = {label: [] for label in sessions}
    for label, s in sessions.items():
        s.run(None, inputs[label])
    for _ in range(repeats):
        for label, s in sessions.items():
            start = time.perf_counter()
            s.run(None, inputs[label])
            times[label].append(time.perf_counter() - start)
    return {label: 1000 * float(np.median(t)) for label, t in times.items()}


def load_ms(runs: dict, repeats=5) -> dict:
    """Median onnxruntime session creation time (parse, graph optimisation, initializer packing) for
    each (path, session entries), the sessions taking turns as in `latencies_ms`."""
    times = {label: [] for label in runs}
    for _ in range(repeats):
        for label, (path, entries) in runs.items():
            start = time.perf_counter()
            session(path, entries)
            times[label].append(time.perf_counter() - start)
    return {label: 1000 * float(np.median(t)) for label, t in times.items()}


def cosine(a, b) -> float:
    """Mean per-sample cosine; over the whole batch where a sample's output is one number (silero_vad's
    speech probability), whose cosine with itself is 1 whatever its value."""
    rows = len(a) if a.size > len(a) else 1
    a, b = a.reshape(rows, -1).astype(np.float64), b.reshape(rows, -1).astype(np.float64)
    return float(np.mean(np.sum(a * b, 1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1) + 1e-30)))


def dequantized_exactly(qdq_path, float_path) -> bool:
    """Every DequantizeLinear output, computed as the operator defines it, equals the float decode."""
    q, f = onnx.load(qdq_path), {t.name: numpy_helper.to_array(t) for t in onnx.load(float_path).graph.initializer}
    inits = {t.name: numpy_helper.to_array(t) for t in q.graph.initializer}
    for node in q.graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in inits:
            continue
        ints, scale = inits[node.input[0]].astype(np.int64), inits[node.input[1]]
        axis = next((a.i for a in node.attribute if a.name == "axis"), None)
        if axis is not None:
            shape = [1] * ints.ndim
            shape[axis] = -1
            scale = scale.reshape(shape)
        if not np.array_equal(ints.astype(scale.dtype) * scale, f[node.output[0]]):
            return False
    return True


def opset(path) -> int:
    imports = onnx.load(path, load_external_data=False).opset_import
    return next(o.version for o in imports if o.domain in ("", "ai.onnx"))


def integer_types(path) -> str:
    names = {3: "int8", 5: "int16", 6: "int32", 22: "int4"}
    kinds = {t.data_type for t in onnx.load(path).graph.initializer if t.name.endswith("_quantized")}
    return "/".join(sorted(names.get(k, str(k)) for k in kinds)) or "-"


def full_check(path) -> str:
    try:
        onnx.checker.check_model(path, full_check=True)
        return "pass"
    except Exception as exc:  # reported, not raised: a benchmark row
        return f"FAIL ({str(exc)[:60]})"


def bench(model: str, data_dir: str, rel_step: float, root: str) -> dict:
    name = os.path.splitext(os.path.basename(model))[0]
    feed = dict(np.load(os.path.join(data_dir, f"{name}_eval.npz")))
    feed = {k: v[:SAMPLES] for k, v in feed.items()}
    p = lambda suffix: os.path.join(root, f"{name}_{suffix}")  # noqa: E731
    row = {"model": name, "opset": opset(model), "size": os.path.getsize(model)}
    _, row["encode_s"], _ = cli("encode", model, "-o", p("d8.cdl"), "--deploy", "int8", "--rel-step", str(rel_step))
    row["notes"], row["decode_s"], row["decode_kb"] = cli("decode", p("d8.cdl"), "-o", p("d8q.onnx"),
                                                          "--weights", "qdq")
    _, row["decode_float_s"], row["decode_float_kb"] = cli("decode", p("d8.cdl"), "-o", p("d8f.onnx"))
    row.update(cdl=os.path.getsize(p("d8.cdl")), qdq=os.path.getsize(p("d8q.onnx")), qdq_opset=opset(p("d8q.onnx")),
               qdq_types=integer_types(p("d8q.onnx")), check=full_check(p("d8q.onnx")),
               exact=dequantized_exactly(p("d8q.onnx"), p("d8f.onnx")))
    original, flt = outputs(model, feed), outputs(p("d8f.onnx"), feed)
    row["default_diff"] = float(np.abs(outputs(p("d8q.onnx"), feed) - flt).max())
    row["acc0_diff"] = float(np.abs(outputs(p("d8q.onnx"), feed, [("session.qdq_matmulnbits_accuracy_level", "0")])
                                    - flt).max())
    row["cosine"] = cosine(outputs(p("d8q.onnx"), feed), original)
    _, row["nbits_s"], row["nbits_kb"] = cli("decode", p("d8.cdl"), "-o", p("d8n.onnx"), "--weights", "qdq",
                                             "--matmul-nbits")
    row["nbits"] = os.path.getsize(p("d8n.onnx"))
    row["nbits_diff"] = float(np.abs(outputs(p("d8n.onnx"), feed) - flt).max())
    runs = {"fp32 (original)": (model, ()), "qdq, default options": (p("d8q.onnx"), ()),
            "qdq, accuracy_level=0": (p("d8q.onnx"), [("session.qdq_matmulnbits_accuracy_level", "0")]),
            "qdq --matmul-nbits": (p("d8n.onnx"), ())}
    row["load"] = load_ms(runs)
    row["latency"] = latencies_ms(runs, feed)
    # the same step without --deploy: what decode --weights qdq wrote before
    cli("encode", model, "-o", p("r.cdl"), "--rel-step", str(rel_step))
    row["plain_notes"], _, _ = cli("decode", p("r.cdl"), "-o", p("rq.onnx"), "--weights", "qdq")
    row.update(plain_qdq=os.path.getsize(p("rq.onnx")), plain_opset=opset(p("rq.onnx")),
               plain_types=integer_types(p("rq.onnx")))
    # onnxruntime.quantization's int8 per-channel weights (dynamic quantization: no calibration data)
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(model, p("ortq.onnx"), per_channel=True, weight_type=QuantType.QInt8)
    row["ortq"] = os.path.getsize(p("ortq.onnx"))
    row["ortq_cosine"] = cosine(outputs(p("ortq.onnx"), feed), original)
    return row


def table(rows: list[dict], rel_step: float) -> str:
    mb = lambda n: f"{n / 1e6:.2f} MB"  # noqa: E731
    lines = [f"`--deploy int8 --rel-step {rel_step}`, then `decode --weights qdq`; outputs on {SAMPLES} eval samples; "
             f"onnxruntime {ort.__version__}, onnx {onnx.__version__}.", "",
             "| model | opset in → QDQ | weights | full_check | DQ = coded weights | ORT default vs float decode "
             "| with accuracy_level=0 | cosine to original | .onnx | .cdl | QDQ .onnx | ORT quantize_dynamic int8 "
             "(cosine) | decode qdq: s, peak RSS | decode float: s, peak RSS |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['opset']} → {r['qdq_opset']} | {r['qdq_types']} | {r['check']} | "
                     f"{'bit-exact' if r['exact'] else 'NO'} | {r['default_diff']:.2g} | {r['acc0_diff']:.2g} | "
                     f"{r['cosine']:.6f} | {mb(r['size'])} | {mb(r['cdl'])} | {mb(r['qdq'])} | {mb(r['ortq'])} "
                     f"({r['ortq_cosine']:.6f}) | {r['decode_s']:.1f} s, {r['decode_kb'] / 1024:.0f} MB | "
                     f"{r['decode_float_s']:.1f} s, {r['decode_float_kb'] / 1024:.0f} MB |")
    lines += ["", "`decode --weights qdq --matmul-nbits` (MatMul weights as com.microsoft MatMulNBits, "
              "accuracy_level 0), and onnxruntime CPU latency (median of 10 runs of the batch, sessions "
              "taking turns), and onnxruntime load time (session creation, median of 5):", "",
              "| model | size | default options vs float decode | " + " | ".join(rows[0]["latency"])
              + " | " + " | ".join(f"load: {label}" for label in rows[0]["load"]) + " |",
              "|---|---|---|" + "---|" * (len(rows[0]["latency"]) + len(rows[0]["load"]))]
    for r in rows:
        lines.append(f"| {r['model']} | {mb(r['nbits'])} | {r['nbits_diff']:.2g} | "
                     + " | ".join(f"{v:.1f} ms" for v in r["latency"].values()) + " | "
                     + " | ".join(f"{v:.1f} ms" for v in r["load"].values()) + " |")
    lines += ["", f"Same `--rel-step {rel_step}` without `--deploy` (levels beyond int8):", "",
              "| model | opset in → QDQ | weights | QDQ .onnx |", "|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['opset']} → {r['plain_opset']} | {r['plain_types']} | "
                     f"{mb(r['plain_qdq'])} |")
    lines += ["", "Notes printed by `decode --weights qdq` (with --deploy int8):", ""]
    for r in rows:
        for note in (r["notes"] or "(none)").splitlines():
            lines.append(f"- {r['model']}: {note}")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="+")
    parser.add_argument("--data", required=True, help="folder with <model>_eval.npz")
    parser.add_argument("--rel-step", type=float, default=0.01)
    parser.add_argument("--out", default=None, help="write the markdown table here too")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as root:
        rows = [bench(m, args.data, args.rel_step, root) for m in args.models]
    text = table(rows, args.rel_step)
    print(text)
    if args.out:
        with open(args.out, "w") as f:
            f.write(text)


if __name__ == "__main__":
    main()
