"""cdlcodec's fidelity-target encoder on the real models, side by side with the baselines.

    python benchmarks/fidelity/bench_fidelity.py --bench /work/bench [--models minilm ...] [--target 0.99]

For every model: `encode_to_target` tuned on BENCH/data/NAME_calib.npz (the encoder never sees the
evaluation inputs), then the written container is decoded with the ordinary decoder and run on the
held-apart BENCH/data/NAME_eval.npz: output cosine and the model's task check, next to nearest
rounding, int8 + zstd-19 (baselines.json) and NNCodec (nncodec.json) from the same inputs.
Also the default encode (no options: cosine >= 0.999 and the same decisions on the calibration data)
and its task checks.
bits/param divides the container's whole size by all float params of the ONNX model (1-D included);
"weights" bits/param counts only the tensor payloads and backend parameters (no graph, no index),
the part comparable with a weights-only bitstream such as NNCodec's.
"""
import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from baselines import Evaluator, load_bench  # noqa: E402

from cdlcodec.codec import decode_container  # noqa: E402
from cdlcodec.dtypes import to_float64  # noqa: E402
from cdlcodec.fidelity.measures import Target  # noqa: E402
from cdlcodec.fidelity.search import UNCHECKED_DEFAULT, FidelityOptions, encode_to_target  # noqa: E402
from cdlcodec.io.model_files import read_model  # noqa: E402


def evaluate_container(ev: Evaluator, path: str) -> tuple[float, dict]:
    decoded = {r.name: to_float64(r.array, r.dtype).astype(np.float32) for r in decode_container(path).records
               if r.is_float}
    weights = {k: decoded.get(k, v) for k, v in ev.weights.items()}
    cos, outputs = ev.cosine(weights)
    return cos, ev.task(outputs)


def payload_bytes(path: str) -> int:
    """Bytes of the tensor payloads and their backend parameters: the file without its graph section
    and index (what a weights-only codec such as NNCodec's bitstream holds)."""
    from cdlcodec.formats.container import ContainerReader

    with ContainerReader(path) as reader:
        return sum(e.length + len(e.backend_params) for e in reader.tensors)


def run(bench: Path, name: str, target: float, gptq: bool, tmp: Path, only: str | None = None,
        retarget: tuple[float, ...] = ()) -> dict:
    model_path = bench / "models" / f"{name}.onnx"
    calib = bench / "data" / f"{name}_calib.npz"
    ev = Evaluator(name, *load_bench(bench, name))
    source = read_model(str(model_path))
    out = {}
    runs = [("target", target, False), ("default", 0.999, True)]  # the CLI default also keeps decisions
    # When the calibration-tuned file misses the goal on the held-apart inputs, stricter encode
    # targets are tried (the baselines are tuned on the held-apart inputs directly).
    runs[1:1] = [(f"retarget{t:g}", t, False) for t in retarget]
    for label, tgt, decisions in runs if not only else [r for r in runs if r[0].startswith(only)]:
        if label.startswith("retarget") and any(out[k]["eval_cosine"] >= target for k in out):
            continue
        path = tmp / f"{name}_{label}.cdl"
        start = time.perf_counter()
        # the default as `cdlcodec encode` runs it: stricter where no decision can be checked
        unchecked = UNCHECKED_DEFAULT if label == "default" else None
        summary, report = encode_to_target(source, str(path), FidelityOptions(Target("cosine", tgt), str(calib),
                                                                                gptq=gptq, quiet=True,
                                                                                same_decisions=decisions,
                                                                                unchecked_target=unchecked))
        seconds = time.perf_counter() - start
        cos, task = evaluate_container(ev, str(path))
        payload = payload_bytes(str(path))
        out[label] = {"target": tgt, "bits_per_param": 8 * summary.coded_bytes / ev.n_params,
                      "weights_bits_per_param": 8 * payload / ev.n_params,
                      "calib_cosine": report.checked, "eval_cosine": cos, "task": task,
                      "encode_seconds": seconds, "model_runs": report.runs}
        print(f"{name:12s} {label:8s} cos>={tgt}: {out[label]['bits_per_param']:.3f} bits/param "
              f"({out[label]['weights_bits_per_param']:.3f} in tensor payloads), "
              f"calib {report.checked:.5f}, held-apart {cos:.5f}, {task}, {seconds:.0f} s"
              f" [target {report.describe_target()}]", flush=True)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench", default="/work/bench")
    ap.add_argument("--models", nargs="*")
    ap.add_argument("--target", type=float, default=0.99)
    ap.add_argument("--no-gptq", action="store_true")
    ap.add_argument("--only", choices=["target", "default"], help="run one of the two encodes")
    ap.add_argument("--retarget", type=float, nargs="*", default=(),
                    help="stricter encode targets tried in turn while the held-apart cosine misses --target")
    ap.add_argument("--out", default=None, help="JSON results (default BENCH/results/cdlcodec.json)")
    args = ap.parse_args()
    bench = Path(args.bench)
    names = args.models or sorted(p.stem for p in (bench / "models").glob("*.onnx"))
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name in names:
            results[name] = run(bench, name, args.target, not args.no_gptq, Path(tmp), args.only,
                                tuple(args.retarget))
    out = Path(args.out) if args.out else bench / "results" / "cdlcodec.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    _table(bench, results)


def _table(bench: Path, results: dict) -> None:
    def load(name):
        p = bench / "results" / name
        return json.loads(p.read_text()) if p.exists() else {}
    base, nnc = load("baselines.json"), load("nncodec.json")
    print("\nweights bits/param at mean output cosine >= target on held-apart inputs (cdlcodec: '-' = missed)")
    print(f"{'model':12s} {'nearest':>8s} {'int8+zstd':>9s} {'NNCodec':>8s} {'cdlcodec':>8s} {'vs NNCodec':>10s}")
    for name, r in results.items():
        if "target" not in r:
            continue
        b = base.get(name, {})
        near = b.get("nearest", {}).get("bits_per_param_entropy")
        int8 = b.get("int8_zstd19", {}).get("bits_per_param")
        ref = nnc.get(name, {}).get("bits_per_param")
        met = [v for k, v in r.items() if k != "default" and v["eval_cosine"] >= r["target"]["target"]]
        ours = min(v["weights_bits_per_param"] for v in met) if met else None
        fmt = lambda v: f"{v:8.3f}" if isinstance(v, (int, float)) else f"{'-':>8s}"
        ratio = f"{(1 - ours / ref) * 100:+9.1f}%" if ours and ref else f"{'-':>10s}"
        print(f"{name:12s} {fmt(near)} {fmt(int8):>9s} {fmt(ref)} {fmt(ours)} {ratio}")


if __name__ == "__main__":
    main()
