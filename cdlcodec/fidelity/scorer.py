"""Score decoded versions of the user's own ONNX model against the original, on calibration inputs.

What `cdlcodec eval --onnx` and `cdlcodec search --onnx` measure: the original model runs once on
the calibration samples; every candidate container is decoded by the ordinary decoder, rebuilt into
an ONNX model, run with onnxruntime's default session and compared with a fidelity measure
(`measures.py`: cosine, top-1 agreement or relative output MSE) on the values the encoder measures
(an output assembled by Concat: its pieces, `pieces.py`).
"""
from __future__ import annotations

import os

from ..errors import CdlInputError
from ..records import ModelFile
from .measures import MEASURES, higher_is_better, score


class OnnxScorer:
    """The original model's outputs on the calibration inputs, and `score` for any decoded model."""

    def __init__(self, model: ModelFile, inputs, measure: str):
        """`model`: records + ONNX graph section; `inputs`: a fidelity.inputs.Inputs."""
        from ..io.onnx_model import stripped_graph
        from ..io.onnx_writer import build_onnx
        from .pieces import output_parts

        if measure not in MEASURES:
            raise CdlInputError(f"unknown fidelity measure {measure!r} (known: {', '.join(MEASURES)})")
        self.model, self.inputs, self.measure = model, inputs, measure
        self.parts = output_parts(stripped_graph(model))
        self.reference = self.run(build_onnx(model, weights="float"))

    @classmethod
    def from_files(cls, model_path: str, calibration: str, measure: str, max_samples: int | None = None):
        """The scorer of an .onnx file on the calibration .npz (what `eval --onnx` and `search --onnx` use)."""
        from ..io.model_files import read_model
        from ..io.onnx_model import stripped_graph
        from .inputs import load_calibration

        if measure not in MEASURES:
            raise CdlInputError(f"unknown fidelity measure {measure!r} (known: {', '.join(MEASURES)})")
        if os.path.splitext(model_path)[1].lower() != ".onnx":
            raise CdlInputError(f"{model_path}: expected an ONNX model file (.onnx)")
        model = read_model(model_path)
        graph = stripped_graph(model)
        if graph is None:
            raise CdlInputError(f"{model_path}: the model carries no ONNX graph to run")
        return cls(model, load_calibration(calibration, graph, max_samples), measure)

    @property
    def higher_is_better(self) -> bool:
        return higher_is_better(self.measure)

    def run(self, proto):
        """Outputs of a complete ModelProto on the inputs (onnxruntime's default session)."""
        from .runner import add_outputs, run_proto

        add_outputs(proto, self.parts.probes)
        return run_proto(proto, self.inputs)

    def outputs(self, decoded: ModelFile):
        """Outputs of a decoded model (a ModelFile with the original graph)."""
        from ..io.onnx_writer import build_onnx

        return self.run(build_onnx(decoded, weights="float"))

    def score(self, decoded: ModelFile) -> float:
        """The measure of a decoded model against the original."""
        positions = self.parts.positions(self.measure)
        return score(self.measure, self.parts.view(self.reference, positions),
                     self.parts.view(self.outputs(decoded), positions))

    def score_container(self, path: str) -> float:
        """Decode the container at `path` with the ordinary decoder and score it."""
        from ..codec import decode_container

        return self.score(decode_container(path))
