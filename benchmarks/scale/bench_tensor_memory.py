"""Peak memory of decoding (and encoding) one big tensor: before/after side by side (issues 14 and 15).

Usage: python benchmarks/scale/bench_tensor_memory.py [--baseline DIR] [--current DIR] [--minilm minilm.onnx]
           [--lenet lenet5.onnx] [--minilm-encode "--rel-step 0.05"]... [--rows 32000] [--cols 4096]
           [--skip-synthetic] [--markdown out.md]

Every measurement is a `cdlcodec` subprocess under /usr/bin/time -v (maximum resident set size),
once with this checkout and, with --baseline, once with another tree of the package (e.g. an older
commit unpacked with `git archive COMMIT cdlcodec formats cli | tar -x -C DIR`, plus the links
DIR/cdlcodec/formats -> ../formats and DIR/cdlcodec/cli -> ../cli), the two taking turns:

- LeNet-5 `decode -o x.onnx` (and `--weights qdq`): the interpreter, the imports and the numba
  kernels (the baseline that the model-dependent part is measured from);
- MiniLM (`encode --rel-step 0.05`, or each --minilm-encode's options, e.g. "--deploy int8 --rel-step
  0.01"; then `decode -o x.onnx` and `--weights qdq`): the peak, the peak minus the LeNet-5 baseline of
  the same kind, and that increment over the decoded file's size and over the fp32 model's (#14:
  <= 1.3x the decoded model);
- a synthetic .safetensors with one rows x cols bfloat16 tensor (Laplace weights, written to a temporary
  folder and deleted at the end): `encode` (data-free default) and `decode -o x.safetensors`, against
  500 MB + 3 x the tensor (#15).

Each command runs once unmeasured first (numba's caches of that tree get filled), then measured.
Outputs of the two trees are compared byte for byte.
"""
from __future__ import annotations

import argparse
import filecmp
import os
import re
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_scale import BOUND_BASE, write_checkpoint  # noqa: E402  (the same synthetic weights)


def peak_rss(cmd: list[str], tree: str | None) -> int:
    """Peak resident bytes of `cmd` (a cdlcodec command line) run with the package from `tree`."""
    env = dict(os.environ)
    if tree:
        env["PYTHONPATH"] = tree
    proc = subprocess.run(["/usr/bin/time", "-v", sys.executable, "-m", "cdlcodec", *cmd], capture_output=True,
                          text=True, env=env, cwd=tempfile.gettempdir())
    if proc.returncode != 0:
        sys.exit(f"failed ({proc.returncode}): cdlcodec {' '.join(cmd)}\n{proc.stderr[-2000:]}")
    return int(re.search(r"Maximum resident set size \(kbytes\): (\d+)", proc.stderr).group(1)) * 1024


def measure(trees: dict[str, str | None], make_cmd, warm: bool = True) -> dict[str, int]:
    """{tree label: peak bytes} of make_cmd(label), the trees taking turns (each warmed up once first)."""
    if warm:
        for label, tree in trees.items():
            peak_rss(make_cmd(label), tree)
    return {label: peak_rss(make_cmd(label), tree) for label, tree in trees.items()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--baseline", default=None, help="another tree of the package to compare with")
    ap.add_argument("--current", default=None, help="a tree for 'current' (default: this checkout); a copy keeps "
                                                    "numba's caches steady while others edit the checkout")
    ap.add_argument("--minilm", default="/work/bench/models/minilm.onnx")
    ap.add_argument("--lenet", default="/work/bench/models/lenet5.onnx")
    ap.add_argument("--minilm-encode", action="append", default=None,
                    help='encode options for MiniLM (repeatable; default "--rel-step 0.05")')
    ap.add_argument("--rows", type=int, default=32000)
    ap.add_argument("--cols", type=int, default=4096)
    ap.add_argument("--skip-synthetic", action="store_true")
    ap.add_argument("--markdown", default=None)
    a = ap.parse_args()
    trees = {"current": a.current}
    if a.baseline:
        trees = {"baseline": a.baseline, "current": a.current}
    work = tempfile.mkdtemp(prefix="cdl_tensor_memory_")
    lines = ["| case | " + " | ".join(f"{t} peak MB" for t in trees) + " | note |",
             "|---|" + "---|" * len(trees) + "---|"]
    same = []

    def row(case: str, peaks: dict[str, int], note: str = "") -> None:
        lines.append(f"| {case} | " + " | ".join(f"{peaks[t] / 1e6:.0f}" for t in trees) + f" | {note} |")
        print(lines[-1], flush=True)

    def path(label: str, name: str) -> str:
        return os.path.join(work, f"{label}_{name}")

    try:
        base = None
        if os.path.exists(a.lenet):
            for label, tree in trees.items():
                peak_rss(["encode", a.lenet, "--rel-step", "0.05", "-q", "-o", path(label, "lenet.cdl")], tree)
            base = {}
            for weights in ("float", "qdq"):
                base[weights] = measure(trees, lambda t: ["decode", path(t, "lenet.cdl"), "-o", path(t, "lenet.onnx"),
                                                          "-q", "--weights", weights])
                row(f"LeNet-5 decode --weights {weights} (import baseline)", base[weights])
        if os.path.exists(a.minilm):
            model_bytes = os.path.getsize(a.minilm)
            for k, options in enumerate(a.minilm_encode or ["--rel-step 0.05"]):
                tag = f"minilm{k}"
                for label, tree in trees.items():
                    peak_rss(["encode", a.minilm, *options.split(), "-q", "-o", path(label, f"{tag}.cdl")], tree)
                for weights in ("float", "qdq"):
                    peaks = measure(trees, lambda t: ["decode", path(t, f"{tag}.cdl"), "-o",
                                                      path(t, f"{tag}_{weights}.onnx"), "-q", "--weights", weights])
                    note = ""
                    if base:  # the increment over LeNet-5's decode, against the decoded file (and the fp32 model)
                        out_bytes = os.path.getsize(path(next(iter(trees)), f"{tag}_{weights}.onnx"))
                        note = ", ".join(f"{t}: +{(peaks[t] - base[weights][t]) / 1e6:.0f} MB = "
                                         f"{(peaks[t] - base[weights][t]) / out_bytes:.2f}x the {out_bytes / 1e6:.0f} MB "
                                         f"decoded file ({(peaks[t] - base[weights][t]) / model_bytes:.2f}x the fp32 model)"
                                         for t in trees)
                    row(f"MiniLM `encode {options}`, decode --weights {weights}", peaks, note)
                    same.append((f"MiniLM ({options}) {weights} .onnx", [path(t, f"{tag}_{weights}.onnx") for t in trees]))
                same.append((f"MiniLM ({options}) .cdl", [path(t, f"{tag}.cdl") for t in trees]))
        if not a.skip_synthetic:
            src = os.path.join(work, "big.safetensors")
            write_checkpoint(src, 1, a.rows, a.cols, "bfloat16")
            tensor = a.rows * a.cols * 2
            bound = BOUND_BASE + 3 * tensor
            note = f"bound 500 MB + 3 x {tensor / 1e6:.0f} MB = {bound / 1e6:.0f} MB"
            peaks = measure(trees, lambda t: ["encode", src, "-q", "--threads", "1", "-o", path(t, "big.cdl")],
                            warm=False)
            row(f"encode 1 x {a.rows}x{a.cols} bf16", peaks, note)
            peaks = measure(trees, lambda t: ["decode", path(t, "big.cdl"), "-q", "--threads", "1",
                                              "-o", path(t, "big_out.safetensors")], warm=False)
            row(f"decode 1 x {a.rows}x{a.cols} bf16 -o x.safetensors", peaks, note)
            same.append(("synthetic .cdl", [path(t, "big.cdl") for t in trees]))
            same.append(("synthetic decoded .safetensors", [path(t, "big_out.safetensors") for t in trees]))
    finally:
        identical = [(name, all(filecmp.cmp(files[0], f, shallow=False) for f in files[1:]))
                     for name, files in same if all(os.path.exists(f) for f in files)]
        shutil.rmtree(work, ignore_errors=True)
    if len(trees) > 1:
        lines += ["", "Byte-identical between the trees: " + ", ".join(f"{n} {'yes' if ok else 'NO'}" for n, ok in identical)]
    print("\n".join(lines[-2:]))
    if a.markdown:
        with open(a.markdown, "w") as fh:
            fh.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
