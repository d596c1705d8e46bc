"""NNCodec (Fraunhofer HHI, the NNC standard) as a reference point for "encode to a fidelity target".

NNCodec lives in its own venv (it pins numpy<2, which today's onnx cannot load), so this
script runs in two processes:
  * the driver, with the benchmark venv, owns the ONNX model and the eval inputs;
  * a worker, with the NNCodec venv, codes the weights at the qp the driver asks for
    (nnc.compress with dependent/trellis quantization, use_dq=True) and decodes them again.

    /work/bench/venv/bin/python benchmarks/fidelity/nncodec_ref.py --bench /work/bench \
        --nnc-python /work/bench/nnc-venv/bin/python [--models silero_vad ...]

For each model: the largest qp (coarsest step, smallest bitstream) whose decoded weights keep
the mean output cosine on the eval inputs >= 0.99. Every float initializer is coded (1-D ones at
NNCodec's default nonweight_qp=-75, i.e. near lossless) except Resize scales, which must stay
exact and are counted as float32 beside the bitstream; bits/param = bitstream bytes * 8 /
ALL float params, the denominator baselines.py uses. Writes BENCH/results/nncodec.json.
"""
import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

TARGET = 0.99
QP_DENSITY = 2  # NNCodec's default: step = 2 ** (qp / 2**qp_density)


def worker():
    """Reads 'qp' lines on stdin, answers one JSON line each; weights come from argv[2] (npz)."""
    from nncodec import nnc
    with np.load(sys.argv[2]) as z:
        params = {k: z[k].astype(np.float32) for k in z.files}
    out_dir = Path(sys.argv[3])
    for line in sys.stdin:
        qp = int(line)
        t0 = time.time()
        bs = nnc.compress(params, bitstream_path=str(out_dir / f"qp{qp}.nnc"), qp=qp, qp_density=QP_DENSITY,
                          use_dq=True, return_bitstream=True, verbose=False)
        decoded = nnc.decompress(bs)  # wants the bytearray it returned; bytes are taken for a path
        np.savez(out_dir / f"qp{qp}.npz", **{k: np.asarray(v, np.float32) for k, v in decoded.items()})
        print(json.dumps({"qp": qp, "bytes": len(bs), "npz": str(out_dir / f"qp{qp}.npz"),
                          "seconds": round(time.time() - t0, 1)}), flush=True)


class Worker:
    def __init__(self, nnc_python, weights):
        self.tmp = tempfile.TemporaryDirectory(prefix="nncref_")
        npz = Path(self.tmp.name) / "weights.npz"
        np.savez(npz, **weights)
        self.proc = subprocess.Popen([nnc_python, __file__, "--worker", str(npz), self.tmp.name],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)

    def code(self, qp):
        self.proc.stdin.write(f"{qp}\n")
        self.proc.stdin.flush()
        # NNCodec prints progress on stdout too; our answer is the JSON line.
        while True:
            line = self.proc.stdout.readline()
            if not line:
                raise RuntimeError(f"NNCodec worker died at qp {qp}")
            if line.startswith('{"qp"'):
                reply = json.loads(line)
                with np.load(reply["npz"]) as z:
                    decoded = {k: z[k] for k in z.files}
                Path(reply["npz"]).unlink()
                return reply, decoded

    def close(self):
        self.proc.stdin.close()
        self.proc.wait()
        self.tmp.cleanup()


def run_model(bench, name, nnc_python):
    from baselines import Evaluator, load_bench, structural_tensors
    t0 = time.time()
    model, feeds = load_bench(bench, name)
    ev = Evaluator(name, model, feeds)
    exact = {k: w for k, w in ev.weights.items() if k in structural_tensors(model)}
    exact_bytes = sum(w.nbytes for w in exact.values())  # stored as float32 beside the bitstream
    worker_proc = Worker(nnc_python, {k: w for k, w in ev.weights.items() if k not in exact})
    sweep = {}

    def try_qp(qp):
        if qp not in sweep:
            reply, decoded = worker_proc.code(qp)
            decoded.update(exact)
            missing = set(ev.weights) - set(decoded)
            assert not missing, f"NNCodec dropped {sorted(missing)[:3]}"
            decoded = {k: decoded[k].reshape(w.shape) for k, w in ev.weights.items()}
            reply["bytes"] += exact_bytes
            c, outs = ev.cosine(decoded)
            sweep[qp] = {"bytes": reply["bytes"], "cosine": c, "task": ev.task(outs),
                         "code_seconds": reply["seconds"]}
            print(f"  {name} qp={qp}: {reply['bytes'] * 8 / ev.n_params:.3f} bits/param, cosine {c:.5f}", flush=True)
        return sweep[qp]["cosine"] >= TARGET

    try:
        # Coarse walk in steps of 4 (one halving of the step size), then refine by 1.
        qp = -28  # typical neighbourhood of the answer; walked from there
        if try_qp(qp):
            while qp < 0 and try_qp(qp + 4):
                qp += 4
            lo, hi = qp, qp + 4
        else:
            while qp > -100 and not try_qp(qp - 4):
                qp -= 4
            lo, hi = qp - 4, qp
        best = lo if sweep.get(lo, {}).get("cosine", 0) >= TARGET else None
        for q in range(lo + 1, hi):
            if try_qp(q):
                best = q
            else:
                break
    finally:
        worker_proc.close()
    res = {"params": ev.n_params, "qp_density": QP_DENSITY, "use_dq": True,
           "sweep": {str(k): v for k, v in sorted(sweep.items())}, "seconds": round(time.time() - t0, 1)}
    if best is not None:
        b = sweep[best]
        res.update(qp=best, bytes=b["bytes"], bits_per_param=b["bytes"] * 8 / ev.n_params,
                   cosine=b["cosine"], task=b["task"])
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bench", type=Path, default=Path("/work/bench"))
    ap.add_argument("--nnc-python", default="/work/bench/nnc-venv/bin/python")
    ap.add_argument("--models", nargs="*")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from baselines import TASKS
    out_path = args.bench / "results" / "nncodec.json"
    results = json.loads(out_path.read_text()) if out_path.exists() else {}
    for name in args.models or list(TASKS):
        results[name] = run_model(args.bench, name, args.nnc_python)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(results, indent=1))
    print(f"\n{'model':12} {'params':>10} {'qp':>4} {'bits/param':>10} {'cosine':>8} task")
    for name, r in results.items():
        if "qp" in r:
            task = ", ".join(f"{k}={v:.3f}" for k, v in r["task"].items() if isinstance(v, float))
            print(f"{name:12} {r['params']:10d} {r['qp']:4d} {r['bits_per_param']:10.3f} {r['cosine']:8.5f} {task}")
        else:
            print(f"{name:12} {r['params']:10d} no qp reached cosine {TARGET}")


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        worker()
    else:
        main()
