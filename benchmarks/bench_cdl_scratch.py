"""CDL / R-CDL trained from scratch on LeNet-5 / MNIST-5k, over several seeds (issue 17, points 3 and 5).

For every seed the same randomly initialised LeNet-5 is trained three ways for the same number of
epochs, with no warm start: full precision (FP), CDL and R-CDL at b bits (first/last layer 8 bits,
λ = γ = 0 unless given, the `cdlcodec train` defaults otherwise). Prints one JSON line per run, then
per-seed accuracies, mean and spread (sample standard deviation, min..max) of each mode, the gaps to
FP against the targets (R-CDL within 1 point of FP, CDL within 2) and R-CDL − CDL per seed (the
paper's claim that R-CDL is above CDL).

    python benchmarks/bench_cdl_scratch.py [--seeds 0,1,2] [--epochs 8] [--bits 4] [--lam 0] [--gamma 0]
                                           [--set sharpness_schedule=constant] [--train-samples N]

A collapsed run (cdlcodec.cdl.train.TrainingCollapsed) is recorded with its diagnosis, not dropped.
Seeds may run as separate processes (one per seed, in parallel) and be summarised together:

    python benchmarks/bench_cdl_scratch.py --summarize seed0.log seed1.log seed2.log
"""
from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

TARGETS = {"rcdl": 1.0, "cdl": 2.0}   # points below FP allowed (issue 17, point 3)


def _spread(values: list[float]) -> str:
    mean = statistics.fmean(values)
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{mean:6.2f} ± {sd:4.2f} ({min(values):.1f}..{max(values):.1f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--epochs", type=int, default=8)
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--modes", default="fp,cdl,rcdl")
    parser.add_argument("--lam", type=float, default=0.0)
    parser.add_argument("--gamma", type=float, default=0.0)
    parser.add_argument("--train-samples", type=int, default=None, help="first N training digits only (quick trials)")
    parser.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                        help="override a TrainConfig field of the CDL / R-CDL runs (repeatable)")
    parser.add_argument("--threads", type=int, default=1, help="torch and numba threads per process")
    parser.add_argument("--summarize", nargs="+", metavar="LOG", help="only summarise the JSON lines of earlier runs")
    args = parser.parse_args()
    if args.summarize:
        rows = []
        for path in args.summarize:
            with open(path) as f:
                rows += [json.loads(line) for line in f if line.startswith("{")]
        summarize(rows)
        return
    torch.set_num_threads(args.threads)
    try:   # numba's parallel kernels too: on a loaded machine two threads wait on each other
        import numba
        numba.set_num_threads(min(args.threads, numba.config.NUMBA_NUM_THREADS))
    except ImportError:
        pass

    from cdlcodec.cdl.train import TrainConfig, train_model
    from cdlcodec.data.mnist import load_mnist_5k
    from cdlcodec.models import build

    overrides = {}
    for item in args.set:
        key, _, value = item.partition("=")
        default = getattr(TrainConfig, key)
        if isinstance(default, bool):
            overrides[key] = value.lower() in ("1", "true", "yes")
        elif isinstance(default, str):
            overrides[key] = value
        else:
            overrides[key] = type(default)(float(value)) if default is not None else float(value)
    (x, y), (xt, yt) = load_mnist_5k()
    if args.train_samples:
        x, y = x[:args.train_samples], y[:args.train_samples]
    seeds = [int(s) for s in args.seeds.split(",") if s]
    modes = [m for m in args.modes.split(",") if m]
    start = time.perf_counter()
    rows = []
    for seed in seeds:
        for mode in modes:
            extra = overrides if mode != "fp" else {}
            config = TrainConfig(mode=mode, bits=args.bits, lam=args.lam if mode != "fp" else 0.0,
                                 gamma=args.gamma if mode != "fp" else 0.0, epochs=args.epochs, seed=seed,
                                 quiet=True, allow_collapse=True, **extra)
            torch.manual_seed(seed)                     # the same initial weights for every mode
            result = train_model(build("lenet5"), x, y, xt, yt, config)
            rows.append({"seed": seed, "mode": mode, "bits": args.bits if mode != "fp" else 32,
                              "epochs": args.epochs, "lambda": config.lam, "gamma": config.gamma,
                              "test_accuracy": result.test_accuracy, "train_accuracy": result.train_accuracy,
                              "collapse": result.collapse, "seconds_per_step": round(result.seconds_per_step, 4),
                              "overrides": extra})
            print(json.dumps(rows[-1]), flush=True)

    print(f"\ntotal {time.perf_counter() - start:.0f} s")
    summarize(rows)


def summarize(rows: list[dict]) -> None:
    """Per-seed table, mean and spread per mode, gaps to FP against the targets, R-CDL − CDL."""
    seeds = sorted({r["seed"] for r in rows})
    modes = [m for m in ("fp", "cdl", "rcdl") if any(r["mode"] == m for r in rows)]
    acc = {m: {r["seed"]: 100 * r["test_accuracy"] for r in rows if r["mode"] == m} for m in modes}
    if any(len(acc[m]) != len(seeds) for m in modes):
        raise SystemExit("every mode needs every seed")
    q = next((r for r in rows if r["mode"] != "fp"), rows[0])
    print(f"\nLeNet-5 / MNIST-5k from scratch (no warm start), {q['epochs']} epochs, b = {q['bits']} "
          f"(first/last 8), λ = {q['lambda']:g}, γ = {q['gamma']:g}"
          f"{', ' + json.dumps(q['overrides']) if q.get('overrides') else ''}, seeds {seeds}")
    print(f"{'seed':>4} " + " ".join(f"{m:>7}" for m in modes)
          + (f" {'RCDL-CDL':>8}" if {"cdl", "rcdl"} <= set(modes) else ""))
    for seed in seeds:
        row = f"{seed:>4} " + " ".join(f"{acc[m][seed]:7.1f}" for m in modes)
        if {"cdl", "rcdl"} <= set(modes):
            row += f" {acc['rcdl'][seed] - acc['cdl'][seed]:+8.1f}"
        print(row)
    print("mode  accuracy %: mean ± sd (min..max)   gap to FP: mean ± sd (worst)   target   met")
    for mode in modes:
        line = f"{mode:<5} {_spread(list(acc[mode].values()))}"
        if mode in TARGETS and "fp" in modes:
            gaps = [acc[mode][s] - acc["fp"][s] for s in seeds]
            mean_gap = statistics.fmean(gaps)
            sd = statistics.stdev(gaps) if len(gaps) > 1 else 0.0
            met = mean_gap >= -TARGETS[mode]
            line += f"   {mean_gap:+6.2f} ± {sd:4.2f} ({min(gaps):+.1f})   ≥ -{TARGETS[mode]:.0f}   {'yes' if met else 'NO'}"
        print(line)
    if {"cdl", "rcdl"} <= set(modes):
        diffs = [acc["rcdl"][s] - acc["cdl"][s] for s in seeds]
        print(f"R-CDL − CDL: {_spread(diffs)} points; R-CDL above CDL in "
              f"{sum(d > 0 for d in diffs)} of {len(diffs)} seeds")


if __name__ == "__main__":
    main()
