"""File-level entry for the fidelity target: read a model once, then encode it to a target when it has
a graph to run, or with the data-free default when it does not (what `cdlcodec encode` does)."""
from __future__ import annotations

from ..atomic import refuse_to_overwrite
from ..codec import EncodeOptions, EncodeSummary, encode_records
from ..errors import CdlInputError
from .measures import Target
from .search import DEFAULT_TARGET, FidelityOptions, FidelityReport, encode_to_target


def has_onnx_graph(model) -> bool:
    from ..io.onnx_model import graph_section

    return graph_section(model) is not None


def onnxruntime_available() -> bool:
    try:
        import onnxruntime  # noqa: F401
    except ImportError:
        return False
    return True


def encode_path(source: str, output: str, options: EncodeOptions, target: tuple[str, float] | None,
                calibration: str | None, *, gptq: bool = True,
                explicit: bool = False) -> tuple[EncodeSummary, FidelityReport | None]:
    """Encode `source` to `output`: to `target` (or the default cosine >= 0.999) when it has an ONNX
    graph; otherwise with `options` as they are. `explicit`: the user asked for a target or gave
    calibration data, so a model without a graph is an error rather than a fallback."""
    from ..io.model_files import read_model

    refuse_to_overwrite(output, source)
    model = read_model(source)
    if not has_onnx_graph(model) or not onnxruntime_available():
        if explicit:
            why = ("it has no graph to run (give an ONNX model, or use the Python API with your torch module)"
                   if not has_onnx_graph(model) else "onnxruntime is not installed (pip install 'cdlcodec[onnx]')")
            raise CdlInputError(f"cannot check a fidelity target for {source}: {why}")
        return encode_records(model.records, output, options, model.metadata, model.sections), None
    fidelity = FidelityOptions(Target(*target) if target else DEFAULT_TARGET, calibration, gptq=gptq,
                               quiet=options.quiet, keep=options.keep)
    return encode_to_target(model, output, fidelity, options)
