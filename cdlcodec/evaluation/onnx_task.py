"""Your own ONNX model as an evaluation task: fidelity of the decoded model instead of accuracy.

    from cdlcodec.evaluation import run_sweep
    from cdlcodec.evaluation.onnx_task import onnx_task
    task = onnx_task("model.onnx", "calibration.npz", measure="cosine")
    results = run_sweep(task, [{"method": "nearest", "rel_step": [0.05, 0.1]},
                               {"method": "fidelity", "target": [0.99, 0.999]}])

Every point's container is decoded by the ordinary decoder, the decoded ONNX model runs with
onnxruntime on the calibration inputs and is scored against the original model's outputs with the
measure (`cdlcodec.fidelity.measures`). The post-training methods nearest / rd / trellis and the
fidelity encoder (`fidelity`, at a target of the same measure) apply.
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from ..fidelity.scorer import OnnxScorer
from .tasks import Task

DEFAULT_TARGETS = {"cosine": (0.99, 0.999), "agreement": (0.99, 0.999), "rel_mse": (1e-2, 1e-3)}


@dataclass
class OnnxTask(Task):
    """A Task of kind "onnx": `model_file()` is what the methods encode, `calibration` the .npz the
    fidelity method calibrates on, and `evaluate(decoded ModelFile)` the measure."""

    scorer: OnnxScorer | None = None
    calibration: str | None = None

    def model_file(self):
        return self.scorer.model

    def reference_model(self):
        return self.scorer.model


def onnx_task(model_path: str, calibration: str, measure: str = "cosine") -> OnnxTask:
    """Read the model and the calibration data and run the original model once (errors surface here)."""
    scorer = OnnxScorer.from_files(model_path, calibration, measure)
    return OnnxTask(os.path.basename(model_path), reference=lambda: scorer.model, evaluate=scorer.score,
                    description=f"ONNX model {model_path}, run on {scorer.inputs.describe()}",
                    kind="onnx", measure=measure, scorer=scorer, calibration=calibration)
