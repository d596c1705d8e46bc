"""Search for the quantizer setting with the fewest bits whose accuracy stays within a tolerance.

DeepCABAC picks (Δ, λ) by a grid search over accuracy vs size (Section III, "DC-v2": first the
step range with nearest rounding, then λ). Here both are found by bisection, assuming accuracy
falls (and bits fall) monotonically as the step or λ grows:

1. `bisect`: the largest value of one parameter in [lo, hi] (geometric midpoints) whose score stays
   >= baseline - tolerance.
2. `search`: for nearest rounding, bisect the relative step; for RD / trellis, bisect the step with
   λ = 0, then for a few steps at and below it bisect λ, and keep the fewest bits.

Every trial really encodes to a container and decodes it (exact bits, exact decoded weights).
`evaluate(records) -> score` gets the decoded tensors (list of TensorRecord); higher is better.
`lenet_task(path)` is the built-in task: LeNet-5 on the bundled MNIST test split, accuracy in [0, 1].
"""
from __future__ import annotations

import math
import os
import tempfile
from dataclasses import dataclass, field
from typing import Callable

from .codec import EncodeOptions, decode_container, encode_records
from .errors import CdlInputError
from .quantizers.base import make
from .records import TensorRecord

METHODS = ("nearest", "rd", "channel", "rd-channel", "trellis")


@dataclass
class Trial:
    params: dict
    bits_per_param: float
    coded_bytes: int
    score: float
    ok: bool


@dataclass
class SearchResult:
    baseline: float
    tolerance: float
    best: Trial | None
    trials: list[Trial] = field(default_factory=list)

    def as_dict(self) -> dict:
        best = None if self.best is None else {**self.best.params, "bits_per_param": self.best.bits_per_param,
                                               "coded_bytes": self.best.coded_bytes, "score": self.best.score}
        return {"baseline": self.baseline, "tolerance": self.tolerance, "best": best, "trials": len(self.trials)}


def make_quantizer(method: str, rel_step: float, lam: float = 0.0, fisher: dict | None = None):
    """The quantizer for one search point (from the quantizer registry)."""
    if method == "nearest":
        return make("uniform", rel_step=rel_step)
    if method in ("rd", "channel", "rd-channel"):
        return make("rd", lam=lam if method != "channel" else 0.0, rel_step=rel_step, fisher=fisher,
                    granularity="channel" if method in ("channel", "rd-channel") else "tensor")
    if method == "trellis":
        return make("trellis", lam=lam, rel_step=rel_step, fisher=fisher)
    raise CdlInputError(f"unknown search method {method!r} (known: {', '.join(METHODS)})")


def trial(records: list[TensorRecord], evaluate: Callable, quantizer, params: dict, backend: str = "auto",
          keep: tuple[str, ...] = ()) -> tuple[Trial, list[TensorRecord]]:
    """Encode with `quantizer`, decode, score. Returns the trial (ok unset) and the decoded records."""
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "trial.cdl")
        summary = encode_records(records, path, EncodeOptions(quantizer, backend, keep, True))
        decoded = decode_container(path).records
    return Trial(dict(params), summary.bits_per_param, summary.coded_bytes, float(evaluate(decoded)), False), decoded


def bisect(run: Callable[[float], Trial], lo: float, hi: float, threshold: float, iterations: int = 7,
           trials: list | None = None) -> Trial | None:
    """Largest x in [lo, hi] (geometric bisection, 0 < lo < hi) whose trial scores >= threshold;
    of the passing trials, the one with the fewest bits (None when even `lo` fails)."""
    log = trials if trials is not None else []

    def go(x):
        t = run(x)
        t.ok = t.score >= threshold
        log.append(t)
        return t

    top = go(hi)
    if top.ok:
        return top
    bottom = go(lo)
    if not bottom.ok:
        return None
    best = bottom
    a, b = lo, hi
    for _ in range(iterations):
        mid = math.sqrt(a * b)
        t = go(mid)
        if t.ok:
            a = mid
            if t.bits_per_param <= best.bits_per_param:
                best = t
        else:
            b = mid
    return best


def search(records: list[TensorRecord], evaluate: Callable, *, method: str = "rd", tolerance: float = 0.005,
           backend: str = "auto", step_range: tuple[float, float] = (0.01, 2.0),
           lambda_max: float = 2.0, step_factors: tuple[float, ...] = (1.0, 0.85, 0.7),
           iterations: int = 6, fisher: dict | None = None, baseline: float | None = None,
           keep: tuple[str, ...] = ()) -> SearchResult:
    """Fewest bits with score >= baseline - tolerance (baseline: the score of the records as they are)."""
    if method not in METHODS:
        raise CdlInputError(f"unknown search method {method!r} (known: {', '.join(METHODS)})")
    if not tolerance >= 0:
        raise CdlInputError("tolerance must be >= 0")
    base = float(evaluate(records)) if baseline is None else float(baseline)
    threshold = base - tolerance
    trials: list[Trial] = []

    def run(rel_step: float, lam: float) -> Trial:
        q = make_quantizer(method, rel_step, lam, fisher)
        return trial(records, evaluate, q, {"method": method, "rel_step": rel_step, "lambda": lam}, backend, keep)[0]

    step_best = bisect(lambda s: run(s, 0.0), step_range[0], step_range[1], threshold, iterations, trials)
    best = step_best
    if step_best is not None and method in ("rd", "rd-channel", "trellis"):
        s_max = step_best.params["rel_step"]
        for factor in step_factors:
            found = bisect(lambda lam: run(s_max * factor, lam), lambda_max / 512, lambda_max, threshold, iterations, trials)
            if found is not None and found.bits_per_param < best.bits_per_param:
                best = found
    return SearchResult(base, tolerance, best, trials)


def lenet_task(path: str | None = None, records: list[TensorRecord] | None = None):
    """(records, evaluate) for the built-in task: a LeNet-5 state_dict scored on the MNIST test split."""
    import numpy as np
    import torch

    from .data.mnist import load_mnist_5k
    from .io.model_files import read_model
    from .io.torch_checkpoint import record_to_tensor
    from .models import build
    from .training import evaluate as accuracy

    if records is None:
        records = read_model(path).records
    _, (x_test, y_test) = load_mnist_5k()
    model = build("lenet5")

    def evaluate(recs: list[TensorRecord]) -> float:
        state = {r.name: record_to_tensor(r) for r in recs}
        try:
            model.load_state_dict(state, strict=True)
        except RuntimeError as exc:
            raise CdlInputError(f"the model is not a LeNet-5 state_dict: {' '.join(str(exc).split())[:300]}") from None
        return accuracy(model, x_test, y_test)

    return records, evaluate
