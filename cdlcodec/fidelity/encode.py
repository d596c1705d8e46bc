"""File-level entry for the fidelity target: read a model once, then encode it to a target when it has
a graph to run, or with the data-free default when it does not (what `cdlcodec encode` does)."""
from __future__ import annotations

import os
from dataclasses import replace

from ..atomic import refuse_to_overwrite
from ..codec import EncodeOptions, EncodeSummary, encode_records
from ..errors import CdlInputError
from .inputs import Inputs, UncheckableInputs, generated_inputs_vary
from .runner import ModelRunError
from .measures import Target
from .search import (DEFAULT_TARGET, MAX_CALIBRATION, UNCHECKED_DEFAULT, FidelityOptions, FidelityReport,
                     NothingToQuantize, encode_to_target)


# Nothing can be checked without a graph to run, so the default is conservative: one step per output
# channel at 0.02 x that channel's std (re-parameterised and BN-folded layers have channels of very
# different scales, which one step per tensor destroys). Measured on the seven real models of
# BENCHMARKS.md: mean output cosine >= 0.98 on all, >= 0.99 on five, at 7.6-7.9 bits/param.
DATA_FREE_REL_STEP = 0.02


def data_free_default(deploy: str | None = None):
    """The data-free rule; with `deploy` ("int8"/"int4") the same steps, floored at the grid's."""
    from ..quantizers.base import make

    if deploy is not None:
        return make("deploy", grid=deploy, rel_step=DATA_FREE_REL_STEP)
    return make("channel", rel_step=DATA_FREE_REL_STEP)


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
                calibration: str | None, *, gptq: bool = True, explicit: bool = False,
                same_decisions: bool = False, deploy: str | None = None) -> tuple[EncodeSummary, FidelityReport | None]:
    """Encode the model file `source` to `output` (see `encode_model`)."""
    from ..io.model_files import read_model

    refuse_to_overwrite(output, source)
    return encode_model(read_model(source), output, options, target, calibration, gptq=gptq, explicit=explicit,
                        same_decisions=same_decisions, what=source, deploy=deploy)


def encode_model(model, output: str, options: EncodeOptions, target: tuple[str, float] | Target | None,
                 calibration=None, *, gptq: bool = True, explicit: bool = False, same_decisions: bool = False,
                 what: str = "the model", deploy: str | None = None) -> tuple[EncodeSummary, FidelityReport | None]:
    """Encode `model` (a records.ModelFile) to `output`: to `target` (or the default cosine >= 0.999)
    when it has an ONNX graph, or a torch.export program and explicit calibration (fidelity/program.py);
    otherwise with `options` as they are. `calibration`: an .npz path, or
    an iterable of example batches (`Inputs.from_batches`). `explicit`: the user asked for a target
    or gave calibration data, so a model without a graph is an error rather than a fallback.
    `deploy` ("int8" / "int4"): every quantized weight on a per-channel symmetric grid of that width
    (fidelity/deploy.py), so QDQ decoding is exact to what was measured."""
    from ..io.cdl_checkpoint import is_cdl_model

    if is_cdl_model(model):  # its learned quantizers decide the steps: there is nothing to search
        if explicit:
            raise CdlInputError(f"a fidelity target does not apply to {what}: a CDL / R-CDL checkpoint is "
                                "quantized with its learned quantizers")
        return encode_records(model.records, output, options, model.metadata, model.sections), None
    if isinstance(target, tuple):
        target = Target(*target)
    # The default promises more than a cosine: no calibration sample's decision (a class, a
    # character, a speech/no-speech call) changes. An explicit target adds that check on request.
    fidelity = FidelityOptions(target or DEFAULT_TARGET, None, gptq=gptq, quiet=options.quiet,
                               keep=options.keep, same_decisions=same_decisions or target is None, deploy=deploy,
                               threads=options.threads, unchecked_target=None if target else UNCHECKED_DEFAULT)
    if explicit and not has_onnx_graph(model) and onnxruntime_available():
        from .program import encode_program_to_target, has_program

        if has_program(model):  # a .pt2 program: searched on its ONNX translation, checked on itself
            return encode_program_to_target(model, output, fidelity, options, calibration, what)
    if not has_onnx_graph(model) or not onnxruntime_available():
        if explicit:
            why = ("it has no graph to run (give an ONNX model or a .pt2 program, or use the Python API with your "
                   "torch module)"
                   if not has_onnx_graph(model) else "onnxruntime is not installed (pip install 'cdlcodec[onnx]')")
            raise CdlInputError(f"cannot check a fidelity target for {what}: {why}")
        if options.quantizer is None:
            options = replace(options, quantizer=data_free_default(deploy))
        return encode_records(model.records, output, options, model.metadata, model.sections), None
    from ..io.onnx_model import stripped_graph

    if calibration is None and not generated_inputs_vary(stripped_graph(model)):
        # Nothing to vary the inputs by: a check would see one input, which proves nothing (inputs.py).
        why = ("no calibration data, and no graph input can be generated at random (integers that index no table "
               "are fed as zeros), so a check would see one input")
        if explicit:
            raise CdlInputError(f"cannot check a fidelity target for {what}: {why}; give --calibration DATA.npz")
        return _unverified(model, output, options, deploy, why)
    if calibration is not None and not isinstance(calibration, (str, os.PathLike)):
        calibration = Inputs.from_batches(stripped_graph(model), calibration, MAX_CALIBRATION)
    fidelity = replace(fidelity, calibration=calibration)
    try:
        return encode_to_target(model, output, fidelity, options)
    except NothingToQuantize as exc:
        # Every tensor is stored exactly (the float coder where it pays): the decoded model is the original.
        summary = encode_records(model.records, output, replace(options, lossless=True), model.metadata, model.sections)
        summary.notes = (*summary.notes, f"{exc}: {STORED_EXACTLY}")
        return summary, None
    except ModelRunError as exc:
        if exc.source != "generated":
            raise
        # The declared shapes leave sizes open that the model cannot take as generated (an audio model
        # fed 32 samples where its first convolution needs 400): nothing to check on without data.
        why = f"the model does not run on inputs generated from its declared shapes ({exc.reason})"
        if explicit:
            raise CdlInputError(f"cannot check a fidelity target for {what}: {why}; give --calibration DATA.npz") from None
        return _unverified(model, output, options, deploy, why)
    except UncheckableInputs as exc:
        why = str(exc)
        if explicit:
            raise CdlInputError(f"cannot check a fidelity target for {what}: {why}; give --calibration DATA.npz") from None
        return _unverified(model, output, options, deploy, why)


STORED_EXACTLY = "every tensor was stored exactly, so the decoded model is the original"
UNVERIFIED = ("the data-free default was used (per output channel, step 0.02 x the channel's std) and the "
              "decoded model is unverified")


def _unverified(model, output: str, options: EncodeOptions, deploy: str | None, why: str):
    """An ONNX model encoded with the data-free rule, the reason in the summary's notes."""
    if options.quantizer is None:
        options = replace(options, quantizer=data_free_default(deploy))
    summary = encode_records(model.records, output, options, model.metadata, model.sections)
    summary.notes = (*summary.notes, f"{why}: {UNVERIFIED}; give --calibration DATA.npz for a verified fidelity")
    return summary, None
