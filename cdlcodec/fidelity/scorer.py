"""Score decoded versions of the user's own ONNX model against the original, on calibration inputs.

What `cdlcodec eval --onnx` and `cdlcodec search --onnx` measure: the original model runs once on
the calibration samples; every candidate container is decoded by the ordinary decoder, rebuilt into
an ONNX model, run with onnxruntime's default session and compared with a fidelity measure
(`measures.py`: cosine, top-1 agreement or relative output MSE).
"""
from __future__ import annotations

import os

from ..errors import CdlInputError
from ..records import ModelFile
from .measures import MEASURES, higher_is_better, score


class OnnxScorer:
    """The original model's outputs on the calibration inputs, and `score` for any decoded model."""

    def __init__(self, model_path: str, calibration: str, measure: str, max_samples: int | None = None):
        import onnx

        from ..io.model_files import read_model
        from ..io.onnx_model import graph_section
        from ..io.onnx_writer import build_onnx
        from .inputs import load_calibration
        from .runner import run_proto

        if measure not in MEASURES:
            raise CdlInputError(f"unknown fidelity measure {measure!r} (known: {', '.join(MEASURES)})")
        if os.path.splitext(model_path)[1].lower() != ".onnx":
            raise CdlInputError(f"{model_path}: expected an ONNX model file (.onnx)")
        self.model: ModelFile = read_model(model_path)
        section = graph_section(self.model)
        if section is None:
            raise CdlInputError(f"{model_path}: the model carries no ONNX graph to run")
        self.model_path = model_path
        self.measure = measure
        self.inputs = load_calibration(calibration, onnx.load_from_string(section[2]), max_samples)
        self.reference = run_proto(build_onnx(self.model, weights="float"), self.inputs)

    @property
    def higher_is_better(self) -> bool:
        return higher_is_better(self.measure)

    def score(self, decoded: ModelFile) -> float:
        """The measure of a decoded model (a ModelFile with the original graph) against the original."""
        from ..io.onnx_writer import build_onnx
        from .runner import run_proto

        return score(self.measure, self.reference, run_proto(build_onnx(decoded, weights="float"), self.inputs))

    def score_container(self, path: str) -> float:
        """Decode the container at `path` with the ordinary decoder and score it."""
        from ..codec import decode_container

        return self.score(decode_container(path))
