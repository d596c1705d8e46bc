"""Data-free step rules on the real models: what a default that cannot run the model does to it.

    python benchmarks/fidelity/data_free.py --bench /work/bench [--models ...]   # needs zstandard, scipy

Each float tensor of >= 2 dimensions is rounded with the rule (1-D tensors kept), the model is run
on the held-apart inputs, and the output cosine, the task check and the order-0 entropy of the
levels are printed. Rules: one step per tensor (r x std) and one per output channel (r x the
channel's std, the output axis read from the graph), at a few r.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import onnx

sys.path.insert(0, str(Path(__file__).parent))
from baselines import TASKS, Evaluator, entropy_bits, load_bench  # noqa: E402

from cdlcodec.fidelity.allocate import unit_steps  # noqa: E402
from cdlcodec.fidelity.roles import output_axes  # noqa: E402
from cdlcodec.io.model_files import read_model  # noqa: E402

RULES = [("tensor", 0.1), ("tensor", 0.02), ("channel", 0.05), ("channel", 0.02), ("channel", 0.01)]


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bench", default="/work/bench")
    ap.add_argument("--models", nargs="*", default=[m for m in TASKS if m != "lenet5"])
    args = ap.parse_args()
    for name in args.models:
        ev = Evaluator(name, *load_bench(args.bench, name))
        model = read_model(str(Path(args.bench) / "models" / f"{name}.onnx"))
        axes = output_axes(onnx.load_from_string(model.sections[0][2]))
        for granularity, rel in RULES:
            weights, bits = dict(ev.weights), 0.0
            for key, w in ev.weights.items():
                if w.ndim < 2:
                    bits += 32 * w.size
                    continue
                step = rel * unit_steps(w.astype(np.float64), axes.get(key, 0) if granularity == "channel" else None)
                levels = np.rint(w / step)
                weights[key] = (levels * step).astype(np.float32)
                bits += entropy_bits(levels.astype(np.int64))
            cos, outputs = ev.cosine(weights)
            print(f"{name:12s} {granularity:8s} r={rel:<5g} {bits / ev.n_params:6.2f} bits/param  cosine {cos:.5f}  "
                  f"{ev.task(outputs)}", flush=True)


if __name__ == "__main__":
    main()
