"""CDL / R-CDL training benchmark on LeNet-5 / MNIST-5k (issue 4).

Runs FP, CDL and R-CDL at b=4 and b=2 with λ=γ=0, then R-CDL at b=4 for three increasing λ=γ,
all from the same initial weights and seed, on 2 CPU threads. Prints one JSON line per run and a
table with accuracy, Huffman bits per weight / activation (eq. 41), H(w)/|w| and training step time
relative to FP measured in the same process.

    python benchmarks/bench_cdl.py [--epochs 3] [--lambdas 2e-7,1e-6,5e-6]
"""
from __future__ import annotations

import argparse
import json
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--lambdas", default="2e-7,1e-6,5e-6")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from cdlcodec.cdl.train import TrainConfig, run_task

    runs = [("fp", 4, 0.0), ("cdl", 4, 0.0), ("rcdl", 4, 0.0), ("cdl", 2, 0.0), ("rcdl", 2, 0.0)]
    runs += [("rcdl", 4, float(lam)) for lam in args.lambdas.split(",")]
    results = []
    start = time.perf_counter()
    for mode, bits, lam in runs:
        config = TrainConfig(mode=mode, bits=bits, lam=lam, gamma=lam, epochs=args.epochs, seed=args.seed,
                             quiet=True)
        report = run_task("lenet5-mnist", config, None)
        report.pop("config", None)
        print(json.dumps(report), flush=True)
        results.append(report)
    fp = results[0]
    print(f"\nLeNet-5 / MNIST-5k, {args.epochs} epochs, Adam, {args.threads} threads, seed {args.seed}; "
          f"total {time.perf_counter() - start:.0f} s")
    print(f"{'mode':<5} {'b':>2} {'λ=γ':>7} {'acc %':>6} {'Δacc':>6} {'bits/w':>7} {'bits/act':>8} "
          f"{'H(w)/|w|':>8} {'s/step':>7} {'×FP':>5}")
    for r in results:
        ent = r["entropy_bits_per_weight"]
        print(f"{r['mode']:<5} {r['bits']:>2} {r['lambda']:>7.0e} {100 * r['test_accuracy']:>6.1f} "
              f"{100 * (r['test_accuracy'] - fp['test_accuracy']):>+6.1f} {r['bits_per_weight']:>7.2f} "
              f"{r['bits_per_activation']:>8.2f} {(f'{ent:.2f}' if ent is not None else '-'):>8} "
              f"{r['seconds_per_step']:>7.3f} {r['seconds_per_step'] / fp['seconds_per_step']:>5.2f}")


if __name__ == "__main__":
    main()
