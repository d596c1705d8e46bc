"""Cold versus warm start of the command line (issue 18).

"Cold" is the first run after an install: numba has no cached kernels (a fresh, empty
NUMBA_CACHE_DIR, so nothing compiled earlier is found); "warm" is the same command run again with
that cache. Each row runs `cdlcodec encode` of a LeNet-5 state_dict (61,706 parameters) with one
backend, `cdlcodec decode` of the result to .safetensors (with its own fresh cache: a device that
only decodes never ran the encoder), and `cdlcodec demo`. Wall time and CPU time (user + system of
the child) are both shown: on a shared machine the CPU time is what the command costs on idle cores.

    python benchmarks/cold_start.py                       # this interpreter's cdlcodec
    python benchmarks/cold_start.py --python core/bin/python --no-demo --format safetensors   # a core venv
    python benchmarks/cold_start.py --backends cabac --trellis --no-demo --before-tree DIR    # A/B

--trellis adds `encode --backend cabac --trellis` without and with `--lambda 0.05`. --before-tree
runs every command also with an older source tree first on the path (laid out as installed:
`mkdir DIR && git archive REV cdlcodec formats cli | tar -x -C DIR && mv DIR/formats DIR/cli
DIR/cdlcodec/`), each with its own fresh cache, before and after side by side under the same load.
"""
from __future__ import annotations

import argparse
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


# Run by this interpreter (which has torch): LeNet-5 with seed 0, as a torch or a safetensors file.
_WRITE_MODEL = """
import torch
from cdlcodec.models import build
from cdlcodec.io.safetensors_file import write_safetensors_tensors
from cdlcodec.io.torch_checkpoint import tensor_to_record
torch.manual_seed(0)
state = build("lenet5").state_dict()
path = {path!r}
if path.endswith(".pt"):
    torch.save(state, path)
else:
    write_safetensors_tensors(path, [(r.name, r.array, r.dtype) for r in (tensor_to_record(k, v) for k, v in state.items())])
"""


def timed(python: str, args: list[str], cache: str, cwd: str, tree: str | None = None) -> tuple[float, float]:
    """(wall seconds, CPU seconds) of `python -m cdlcodec ARGS` with numba's cache in `cache` (and
    the source tree `tree` first on the path)."""
    env = dict(os.environ, NUMBA_CACHE_DIR=cache)
    if tree:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [tree, env.get("PYTHONPATH")]))
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    proc = subprocess.run([python, "-m", "cdlcodec", *args], capture_output=True, text=True, env=env, cwd=cwd)
    wall = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    if proc.returncode != 0:
        sys.exit(f"cdlcodec {' '.join(args)} failed:\n{proc.stderr[-2000:]}")
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def cold_and_warm(python: str, args: list[str], work: str, tree: str | None = None) -> list[float]:
    with tempfile.TemporaryDirectory() as cache:
        return [*timed(python, args, cache, work, tree), *timed(python, args, cache, work, tree)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--python", default=sys.executable, help="interpreter whose cdlcodec to time")
    parser.add_argument("--backends", default="raw,huffman,cabac")
    parser.add_argument("--no-demo", action="store_true", help="skip `cdlcodec demo` (needs torch)")
    parser.add_argument("--format", choices=("pt", "safetensors"), default="pt",
                        help="the model file to encode (a core install without torch reads only safetensors)")
    parser.add_argument("--trellis", action="store_true", help="also time first --trellis encodes (cabac)")
    parser.add_argument("--before-tree", help="an older source tree to time side by side (see above)")
    opts = parser.parse_args()
    rows = []
    trees = [("before", os.path.abspath(opts.before_tree)), ("after", None)] if opts.before_tree else [("", None)]

    def measure(name, args, work):
        for label, tree in trees:  # before and after back to back, under the same load
            rows.append((name, label, cold_and_warm(opts.python, args, work, tree)))

    with tempfile.TemporaryDirectory() as work:
        model = Path(work, f"lenet.{opts.format}")
        subprocess.run([sys.executable, "-c", _WRITE_MODEL.format(path=str(model))], check=True)
        for backend in opts.backends.split(","):
            cdl = f"{backend}.cdl"
            measure(f"encode --backend {backend}", ["encode", str(model), "-o", cdl, "--backend", backend, "-q"], work)
            measure(f"decode ({backend}) to .safetensors", ["decode", cdl, "-o", f"{backend}.safetensors", "-q"], work)
        if opts.trellis:
            for extra in ([], ["--lambda", "0.05"]):
                measure(" ".join(["encode --backend cabac --trellis", *extra]),
                        ["encode", str(model), "-o", "trellis.cdl", "--backend", "cabac", "--trellis", *extra, "-q"],
                        work)
        if not opts.no_demo:
            measure("demo", ["demo", "--quiet"], work)

    print(f"{os.cpu_count()} cores, load average {os.getloadavg()[0]:.1f} at the end\n")
    tree_column = bool(opts.before_tree)
    print("| command |" + (" tree |" if tree_column else "") + " cold wall | cold CPU | warm wall | warm CPU |")
    print("|---|" + ("---|" if tree_column else "") + "---:|---:|---:|---:|")
    for name, label, (cold_wall, cold_cpu, warm_wall, warm_cpu) in rows:
        print(f"| `cdlcodec {name}` |" + (f" {label} |" if tree_column else "")
              + f" {cold_wall:.1f} s | {cold_cpu:.1f} s | {warm_wall:.1f} s | {warm_cpu:.1f} s |")


if __name__ == "__main__":
    main()
