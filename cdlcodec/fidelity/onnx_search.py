"""`cdlcodec search --onnx`: the smallest container of your ONNX model whose decoded model meets a
fidelity target on your calibration data.

Two candidates, both verified by decoding the written file and running it:
1. the fidelity encoder (`search.encode_to_target`: per-tensor steps by output sensitivity, GPTQ);
2. nearest rounding at one relative step for every weight, the largest step that meets the target
   found by bisection (`cdlcodec.search.bisect`, as for LeNet-5).
The smaller one is written. Both are scored on the same inputs: the first MAX_CALIBRATION samples
of the calibration file, which the fidelity encoder also uses.
"""
from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass, field

from ..errors import CdlInputError
from .measures import Target
from .scorer import OnnxScorer
from .search import MAX_CALIBRATION, FidelityOptions, encode_to_target

NEAREST_STEP_RANGE = (0.005, 2.0)  # relative steps (x std) the nearest-rounding bisection explores


@dataclass
class Found:
    method: str               # "fidelity" or "nearest"
    path: str                 # the verified container (a temporary file until written out)
    file_bytes: int
    bits_per_param: float
    score: float              # the measure, scored on the decoded file
    params: dict = field(default_factory=dict)

    def as_dict(self) -> dict:
        return {"method": self.method, **self.params, "file_bytes": self.file_bytes,
                "bits_per_param": self.bits_per_param, "score": self.score}


def search_onnx(model_path: str, calibration: str, target: Target, output: str | None = None, *,
                backend: str = "auto", iterations: int = 6, gptq: bool = True, log=None) -> dict:
    """Find both candidates, write the smaller to `output` (when given); returns a JSON-able summary.
    CdlInputError when neither meets the target (naming the best figure reached)."""
    from ..atomic import refuse_to_overwrite

    if output is not None:
        refuse_to_overwrite(output, model_path, calibration)
    scorer = OnnxScorer.from_files(model_path, calibration, target.measure, MAX_CALIBRATION)
    log = log or (lambda msg: None)
    # Candidates live beside the output, so the winner is renamed into place (atomically).
    workdir = tempfile.mkdtemp(prefix=".cdlcodec-search-", dir=os.path.dirname(os.path.abspath(output)) if output else None)
    try:
        found, misses = [], []
        for attempt in (_fidelity_candidate, _nearest_candidate):
            result = attempt(scorer, target, workdir, backend=backend, iterations=iterations, gptq=gptq, log=log)
            (found if isinstance(result, Found) else misses).append(result)
        if not found:
            raise CdlInputError(f"no container meets {target.describe()} on {scorer.inputs.describe()}: "
                                + "; ".join(misses))
        best = min(found, key=lambda f: f.file_bytes)
        summary = {"measure": target.measure, "target": target.value, "inputs": scorer.inputs.describe(),
                   "best": best.as_dict(), "candidates": [f.as_dict() for f in found], "misses": misses}
        if output is not None:
            os.replace(best.path, output)
            summary["output"] = output
        return summary
    finally:
        shutil.rmtree(workdir, ignore_errors=True)


def _fidelity_candidate(scorer: OnnxScorer, target: Target, workdir: str, *, backend, iterations, gptq, log):
    from ..codec import EncodeOptions

    path = os.path.join(workdir, "fidelity.cdl")
    log(f"fidelity encoder: {target.describe()}")
    try:
        summary, report = encode_to_target(scorer.model, path,
                                           FidelityOptions(target, scorer.inputs, gptq=gptq, quiet=True),
                                           EncodeOptions(backend=backend, quiet=True))
    except CdlInputError as exc:
        return f"fidelity encoder: {exc}"
    return Found("fidelity", path, summary.coded_bytes, summary.bits_per_param, report.checked)


def _nearest_candidate(scorer: OnnxScorer, target: Target, workdir: str, *, backend, iterations, gptq, log):
    from ..codec import EncodeOptions, encode_records
    from ..quantizers.base import make
    from ..search import Trial, bisect

    model = scorer.model
    path = os.path.join(workdir, "nearest.cdl")
    sign = 1.0 if scorer.higher_is_better else -1.0  # bisect keeps scores >= a threshold

    def encode(rel_step: float, metadata: dict):
        return encode_records(model.records, path, EncodeOptions(make("uniform", rel_step=rel_step), backend, (), True),
                              {**model.metadata, **metadata}, model.sections)

    def run(rel_step: float) -> Trial:
        summary = encode(rel_step, {})
        score = scorer.score_container(path)
        log(f"nearest rel_step {rel_step:.4g}: {summary.bits_per_param:.3f} bits/param, {target.measure} {score:.6g}")
        return Trial({"rel_step": rel_step}, summary.bits_per_param, summary.coded_bytes, sign * score, False)

    trials: list[Trial] = []
    best = bisect(run, *NEAREST_STEP_RANGE, sign * target.value, iterations, trials)
    if best is None:  # both ends of the range were tried and missed
        closest = sign * max(t.score for t in trials)
        return f"nearest rounding: even rel_step {NEAREST_STEP_RANGE[0]} reaches only {target.measure} {closest:.6g}"
    # Write the chosen step again, with the achieved figure in the metadata, and check that file.
    rel_step = best.params["rel_step"]
    metadata = {"fidelity.target": target.describe(), "fidelity.achieved": f"{sign * best.score:.6g}",
                "fidelity.inputs": scorer.inputs.describe(), "fidelity.search": f"nearest rel_step {rel_step:.4g}"}
    summary = encode(rel_step, metadata)
    score = scorer.score_container(path)
    if not target.met(score):
        return f"nearest rounding: rel_step {rel_step:.4g} reached {target.measure} {score:.6g} when written again"
    return Found("nearest", path, summary.coded_bytes, summary.bits_per_param, score, {"rel_step": rel_step})
