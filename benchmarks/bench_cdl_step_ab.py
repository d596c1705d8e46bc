"""CDL training step time of this tree against another revision's, in ONE process (issue 17).

Two benchmark processes started together (bench_cdl_step.py's pairs) share two cores and the machine's
moods: on the project's VM their ratios moved by ±10 % from pair to pair. Here both trees are imported
side by side — the other revision's `cdlcodec` extracted with `git archive` and imported as
`cdlcodec_before` (absolute imports rewritten) — and the same variants of each run interleaved, a few
steps at a time, in alternating order, so that whatever slows the machine slows both alike. It is also
the measure that counts for a kernel change: kernels timed alone on captured calls ran 1.3–1.6× faster
than inside a step, and one change that was neutral alone cost 10 % in-step.

    python benchmarks/bench_cdl_step_ab.py --before a3b3657 [--mode rcdl] [--rounds 15] [--per-round 3]
                                           [--warmup 5] [--entropy 1e-7] [--workdir DIR]

Prints, per tree, the median CPU time per step of FP and of the CDL variant (λ = γ = --entropy, 0 for
none) and their ratio, then after/before. One torch and one numba thread. The extracted tree's numba
kernels compile on first use (about a minute); --workdir keeps them for the next run.
"""
from __future__ import annotations

import argparse
import os
import shutil
import statistics
import subprocess
import sys
import tempfile

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
BEFORE = "cdlcodec_before"


def extract(rev: str, workdir: str) -> None:
    """`rev`'s cdlcodec (with formats/ and cli/ mapped into it, as pyproject installs them) as package
    BEFORE under workdir, its absolute `cdlcodec` imports pointing at itself."""
    target = os.path.join(workdir, BEFORE)
    stamp = os.path.join(workdir, "REV")
    if os.path.isdir(target) and os.path.exists(stamp) and open(stamp).read() == rev:
        return
    shutil.rmtree(target, ignore_errors=True)
    raw = os.path.join(workdir, "raw")
    shutil.rmtree(raw, ignore_errors=True)
    os.makedirs(raw)
    archive = subprocess.run(["git", "-C", ROOT, "archive", rev, "cdlcodec", "formats", "cli"],
                             check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", raw], input=archive, check=True)
    for sub in ("formats", "cli"):
        if os.path.isdir(os.path.join(raw, sub)):
            shutil.move(os.path.join(raw, sub), os.path.join(raw, "cdlcodec", sub))
    shutil.move(os.path.join(raw, "cdlcodec"), target)
    shutil.rmtree(raw)
    for folder, _, files in os.walk(target):
        for name in files:
            if name.endswith(".py"):
                path = os.path.join(folder, name)
                text = open(path, encoding="utf-8").read()
                new = text.replace("from cdlcodec.", f"from {BEFORE}.").replace("import cdlcodec\n",
                                                                              f"import {BEFORE} as cdlcodec\n")
                if new != text:
                    open(path, "w", encoding="utf-8").write(new)
    open(stamp, "w").write(rev)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", required=True, help="the revision to compare against (a commit, tag or branch)")
    ap.add_argument("--mode", default="rcdl", choices=("rcdl", "cdl"))
    ap.add_argument("--entropy", type=float, default=1e-7, help="λ = γ of the CDL variant (0: no entropy terms)")
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--per-round", type=int, default=3, help="steps of each variant per round")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--workdir", default=None, help="where the other tree goes (default: a temporary folder)")
    args = ap.parse_args(argv)

    workdir = args.workdir or tempfile.mkdtemp(prefix="cdl_ab_")
    os.makedirs(workdir, exist_ok=True)
    extract(args.before, workdir)
    sys.path.insert(0, workdir)
    sys.path.insert(0, HERE)
    torch.set_num_threads(1)
    import numba
    numba.set_num_threads(1)
    import bench_cdl_step as bench
    from cdlcodec.data.mnist import load_mnist_5k

    bench.ENTROPY = args.entropy
    (x_train, y_train), _ = load_mnist_5k()
    x, y = torch.as_tensor(x_train), torch.as_tensor(y_train)
    trees = (("after", "cdlcodec"), ("before", BEFORE))
    runners = {}
    for label, package in trees:
        for mode in ("fp", args.mode):
            runners[(label, mode)] = bench.Runner("lenet5", mode, "numba", args.entropy > 0 and mode != "fp", x, y,
                                                  64, package=package)
    for runner in runners.values():
        for _ in range(args.warmup):
            runner.step()
    times = {key: [] for key in runners}
    keys = list(runners)
    for rnd in range(args.rounds):
        for key in (keys if rnd % 2 == 0 else keys[::-1]):
            times[key] += [runners[key].step()[1] for _ in range(args.per_round)]
    med = {key: statistics.median(v) * 1e3 for key, v in times.items()}
    variant = f"{args.mode}{'+H' if args.entropy > 0 else ''}"
    print(f"LeNet-5, batch 64, one thread, {args.rounds} rounds x {args.per_round} steps after {args.warmup} warm-up; "
          f"before = {args.before}")
    for label, _ in trees:
        print(f"{label:6s}  fp {med[(label, 'fp')]:7.2f} ms  {variant} {med[(label, args.mode)]:7.2f} ms  "
              f"x FP {med[(label, args.mode)] / med[(label, 'fp')]:.3f}")
    ratio = {label: med[(label, args.mode)] / med[(label, "fp")] for label, _ in trees}
    # The two FP lines run the same code: their ratio shows how far the machine moved the figures.
    print(f"after/before: {variant} {med[('after', args.mode)] / med[('before', args.mode)]:.3f}, "
          f"fp {med[('after', 'fp')] / med[('before', 'fp')]:.3f}, x FP {ratio['after'] / ratio['before']:.3f}")


if __name__ == "__main__":
    main()
