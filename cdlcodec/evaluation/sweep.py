"""Run a sweep: every (method, settings) point on a task -> one result row each.

A sweep is described by plain dictionaries (a *recipe*, JSON on disk; see
benchmarks/ci_sweep.json):

    {"threads": 2,
     "sweeps": [{"task": "lenet5-mnist", "seed": 0,
                 "points": [{"method": "nearest", "rel_step": [0.05, 0.1, 0.2]},
                            {"method": "rcdl", "bits": 4, "epochs": 1}]}]}

A list value in a point expands into one point per value (the cartesian product when several
settings are lists). Every row has a stable `key` "<task>/<method>/<settings given>" by which
the CI gate matches it with the baseline.
"""
from __future__ import annotations

import itertools
import json
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from typing import Callable

from ..errors import CdlError, CdlInputError
from ..progress import Progress
from .methods import METHODS, Method, get_method
from .rates import activation_bits_per_element
from .tasks import Task, get_task

DEFAULT_THREADS = 2
RESULTS_FORMAT = "cdlcodec-rate-accuracy"
RESULTS_VERSION = 1


@dataclass(frozen=True)
class PointSpec:
    method: str
    given: tuple[tuple[str, object], ...]   # the settings as written in the recipe (sorted)

    @property
    def label(self) -> str:
        return ",".join(f"{k}={_fmt(v)}" for k, v in self.given) or "default"

    def key(self, task: str) -> str:
        return f"{task}/{self.method}/{self.label}"


def _fmt(value) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def expand(entry: dict) -> list[PointSpec]:
    """One recipe entry {"method": m, k: v | [v...]} -> its points (lists expand)."""
    if not isinstance(entry, dict) or not isinstance(entry.get("method"), str):
        raise CdlInputError(f"every point needs a \"method\" name, got {entry!r}")
    settings = {k: v for k, v in entry.items() if k != "method"}
    names = sorted(settings)
    choices = [settings[k] if isinstance(settings[k], list) else [settings[k]] for k in names]
    if any(len(c) == 0 for c in choices):
        raise CdlInputError(f"empty list of values in point {entry!r}")
    return [PointSpec(entry["method"], tuple(zip(names, combo))) for combo in itertools.product(*choices)]


def _warm_up() -> None:
    """Load numba kernels once so that the first point's encode time is not a compile time."""
    import numpy as np

    from ..codec import EncodeOptions, decode_container, encode_records
    from ..records import TensorRecord

    rng = np.random.default_rng(0)
    rec = TensorRecord("w", rng.standard_normal((16, 16)).astype(np.float32), "float32")
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "warm.cdl")
        encode_records([rec], path, EncodeOptions(quiet=True))
        decode_container(path)


def method_for(task: Task, name: str) -> Method:
    """The method `name`, refused before any work when it does not apply to the task's kind."""
    method = get_method(name)
    if task.kind not in method.kinds:
        usable = [m.name for m in METHODS.values() if task.kind in m.kinds]
        what = "an ONNX model" if task.kind == "onnx" else "a torch model"
        raise CdlInputError(f"method {name!r} does not apply to task {task.name!r} ({what}); "
                            f"methods that do: {', '.join(usable)}")
    return method


def evaluate_point(task: Task, spec: PointSpec, workdir: str, reference_accuracy: float) -> dict:
    """Run one point; a CdlError becomes an `error` field (the other points still run)."""
    row = {"key": spec.key(task.name), "task": task.name, "method": spec.method, "label": spec.label}
    try:
        method = method_for(task, spec.method)
        settings = method.settings(dict(spec.given))
        row["settings"] = settings
        point_dir = tempfile.mkdtemp(prefix="point-", dir=workdir)
        out = method.run(task, settings, point_dir)
        accuracy = float(task.evaluate(out.model))
    except CdlError as exc:
        row["error"] = str(exc)
        return row
    inputs = task.activation_inputs() if task.activation_inputs is not None else None
    row.update({
        "bits_per_weight": out.weight_bits / out.num_weights if out.num_weights else 0.0,
        "bits_per_activation": activation_bits_per_element(out.model, inputs),
        "bits_per_param": 8.0 * out.file_bytes / out.num_params if out.num_params else 0.0,
        "file_bytes": int(out.file_bytes), "num_params": int(out.num_params), "num_weights": int(out.num_weights),
    })
    if task.measure is None:  # fractions in [0, 1], like train / search (docs/measures.md)
        row.update({"accuracy": accuracy, "accuracy_drop": reference_accuracy - accuracy})
    else:  # the measure itself (cosine, agreement, rel_mse), not an accuracy
        row.update({"measure": task.measure, "fidelity": accuracy})
    row.update({"encode_ms": round(1000 * out.encode_seconds, 2), "decode_ms": round(1000 * out.decode_seconds, 2)})
    extra = {k: v for k, v in out.extra.items() if k != "path"}
    if extra:
        row["extra"] = extra
    return row


def run_sweep(task: Task, points: list[PointSpec] | list[dict], *, quiet: bool = False,
              on_row: Callable[[dict], None] | None = None) -> dict:
    """Evaluate every point on `task`; returns {"task", "reference_accuracy", "rows"}.

    `points` may be PointSpecs or recipe entries (dicts, expanded here).
    """
    specs: list[PointSpec] = []
    for p in points:
        specs.extend(expand(p) if isinstance(p, dict) else [p])
    for spec in specs:                      # reject a typo before spending minutes on training
        method = method_for(task, spec.method)
        method.settings(dict(spec.given))
    keys = [s.key(task.name) for s in specs]
    if len(set(keys)) != len(keys):
        raise CdlInputError(f"the sweep lists a point twice: {sorted(k for k in keys if keys.count(k) > 1)[0]}")
    rows = []
    with Progress(len(specs) + 1, f"eval {task.name}", quiet=quiet) as bar:
        if task.measure is None:
            bar.update(0, note="training the reference model")
            reference_accuracy = float(task.evaluate(task.reference_model()))
        else:  # measured against the original model's outputs: nothing to evaluate on the reference
            reference_accuracy = None
        _warm_up()
        bar.update(1)
        with tempfile.TemporaryDirectory(prefix="cdlcodec-eval-") as workdir:
            for spec in specs:
                bar.update(0, note=f"{spec.method} {spec.label}")
                row = evaluate_point(task, spec, workdir, reference_accuracy)
                rows.append(row)
                if on_row is not None:
                    on_row(row)
                bar.update(1)
    if task.measure is not None:
        return {"task": task.name, "description": task.description, "measure": task.measure, "rows": rows}
    return {"task": task.name, "description": task.description, "reference_accuracy": reference_accuracy,
            "rows": rows}


def load_recipe(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            recipe = json.load(fh)
    except json.JSONDecodeError as exc:
        raise CdlInputError(f"{path}: not valid JSON ({exc})") from None
    if not isinstance(recipe, dict) or not isinstance(recipe.get("sweeps"), list) or not recipe["sweeps"]:
        raise CdlInputError(f"{path}: a recipe is a JSON object with a non-empty \"sweeps\" list")
    return recipe


def run_recipe(recipe: dict, *, quiet: bool = False, threads: int | None = None,
               task_factory: Callable[[str, int, int | None], Task] | None = None,
               on_row: Callable[[dict], None] | None = None) -> dict:
    """Run every sweep of a recipe; returns the results document (report.py writes it out)."""
    import torch

    threads = int(threads or recipe.get("threads") or DEFAULT_THREADS)
    torch.set_num_threads(threads)          # results depend on it: fixed, and recorded below
    make_task = task_factory or (lambda name, seed, epochs: get_task(name, seed=seed, fp_epochs=epochs))
    start = time.perf_counter()
    sweeps = []
    for sweep in recipe["sweeps"]:
        if not isinstance(sweep, dict) or "task" not in sweep or not isinstance(sweep.get("points"), list):
            raise CdlInputError("every sweep needs a \"task\" and a \"points\" list")
        task = make_task(sweep["task"], int(sweep.get("seed", 0)), sweep.get("fp_epochs"))
        sweeps.append(run_sweep(task, sweep["points"], quiet=quiet, on_row=on_row))
    return {
        "format": RESULTS_FORMAT, "version": RESULTS_VERSION,
        "recipe": recipe,
        "environment": environment(threads),
        "seconds": round(time.perf_counter() - start, 1),
        "sweeps": sweeps,
    }


def environment(threads: int) -> dict:
    import numpy
    import torch

    from .. import __version__

    return {"cdlcodec": __version__, "torch": torch.__version__, "numpy": numpy.__version__,
            "python": platform.python_version(), "machine": platform.machine(), "threads": threads}


def all_rows(results: dict) -> list[dict]:
    return [row for sweep in results.get("sweeps", []) for row in sweep.get("rows", [])]
