"""Fidelity targets for torch.export programs (.pt2): the program itself is what gets checked.

The search needs a graph it can run thousands of times with swapped weights and whose layer inputs
it can capture (onnxruntime does both). So the program's module is traced once into an ONNX
*translation* whose initializers keep the program's state_dict names (no BatchNorm folding, no
constant folding). Before any search the translation is run next to the program on every
calibration sample and must give the same outputs; the plan it finds is applied to the program's
own tensors; and the written container is decoded and its program run in torch on the calibration
samples: the achieved figure is the program's, not the translation's.

Calibration arrays are named after the program's inputs (`ExportedProgram.graph_signature.user_inputs`),
samples first, as for ONNX models. The program must accept one sample at a time (export it with a
dynamic batch dimension, or with batch 1).
"""
from __future__ import annotations

import glob
import os
import time
from dataclasses import replace

import numpy as np

from ..errors import CdlInputError
from ..records import ModelFile
from .inputs import Inputs, load_calibration
from .measures import rel_mse

# The translation must reproduce the program to float rounding (relative output MSE; a real
# mistranslation is orders of magnitude above this).
TRANSLATION_REL_MSE = 1e-6


def has_program(model: ModelFile) -> bool:
    from ..io.torch_export import program_section

    return program_section(model) is not None


def _user_inputs(program) -> list:
    """(name, rank, torch dtype) of each input the user feeds, in order."""
    names = list(program.graph_signature.user_inputs)
    found = {}
    for node in program.graph.nodes:
        if node.op == "placeholder" and node.name in names:
            val = node.meta.get("val")
            if val is None or not hasattr(val, "dim"):
                raise CdlInputError(f"the program's input {node.name!r} is not a tensor; a fidelity target needs "
                                    "tensor inputs")
            found[node.name] = (node.name, val.dim(), val.dtype)
    if len(found) != len(names):
        raise CdlInputError("the program takes inputs that are not tensors; a fidelity target needs tensor inputs")
    return [found[n] for n in names]


def _declaration(specs):
    """A graph holding only the program's inputs (names, element types, ranks): what the calibration
    readers check arrays against."""
    import onnx
    from onnx import helper

    from ..io.onnx_model import DTYPE_TO_ONNX

    inputs = []
    for name, rank, dtype in specs:
        elem = DTYPE_TO_ONNX.get(str(dtype).removeprefix("torch."))
        if elem is None:
            raise CdlInputError(f"the program's input {name!r} is {dtype}, which calibration data cannot give")
        inputs.append(helper.make_tensor_value_info(name, elem, [None] * rank))
    return helper.make_model(helper.make_graph([], "inputs", inputs, []), opset_imports=[onnx.helper.make_opsetid("", 13)])


def _calibration_inputs(calibration, declared, max_samples: int) -> Inputs:
    if isinstance(calibration, (str, os.PathLike)):
        return load_calibration(os.fspath(calibration), declared, max_samples)
    return Inputs.from_batches(declared, calibration, max_samples)


def _module_of(program):
    """The program as a callable module that torch.onnx.export can trace (the exporter switches the
    module to eval mode, which an ExportedProgram's module refuses: its graph is fixed already)."""
    module = program.module()
    module.train = lambda mode=True: module
    return module


def _run_program(module, names, inputs: Inputs) -> list[list[np.ndarray]]:
    import torch
    from torch.utils._pytree import tree_leaves

    results = []
    with torch.no_grad():
        for number, sample in enumerate(inputs.samples):
            args = [torch.from_numpy(np.ascontiguousarray(sample[n])) for n in names]
            try:
                out = module(*args)
            except Exception as exc:  # torch's shape guards and kernels raise many types
                raise CdlInputError(
                    f"the program does not run on calibration sample #{number} "
                    f"({', '.join(f'{n} {tuple(sample[n].shape)}' for n in names)}): {type(exc).__name__}: "
                    f"{' '.join(str(exc).split())[:200]}. It must accept one sample at a time: export it with a "
                    "dynamic batch dimension (torch.export.Dim) or with batch 1") from None
            results.append([t.detach().cpu().numpy() for t in tree_leaves(out) if isinstance(t, torch.Tensor)])
    return results


def _translate(program, module, names, example: dict, what: str) -> ModelFile:
    """The ONNX translation of `program`, read like an .onnx file (its records are the program's)."""
    import torch

    from ..io.onnx_model import export_onnx_bytes, read_onnx_bytes

    args = tuple(torch.from_numpy(np.ascontiguousarray(example[n])) for n in names)
    try:
        data = export_onnx_bytes(module, args, state_dict_initializers=True, input_names=names)
    except CdlInputError:
        raise
    except Exception as exc:  # the exporter refused an operator or a construct
        raise CdlInputError(f"{what}: cannot translate the program to ONNX for the fidelity search "
                            f"({type(exc).__name__}: {' '.join(str(exc).split())[:240]}); encode it without "
                            "a target or calibration (data-free), or give the model as ONNX") from None
    return read_onnx_bytes(data, f"the ONNX translation of {what}")


def _check_translation(translation: ModelFile, inputs: Inputs, reference, what: str) -> None:
    from ..io.onnx_writer import build_onnx
    from .runner import run_proto

    outs = run_proto(build_onnx(translation, weights="float"), inputs)
    shapes_ok = len(outs) == len(reference) and all(
        len(a) == len(b) and all(x.shape == y.shape for x, y in zip(a, b)) for a, b in zip(outs, reference))
    error = rel_mse(reference, outs) if shapes_ok else float("inf")
    if not error <= TRANSLATION_REL_MSE:
        raise CdlInputError(f"{what}: the program's ONNX translation does not reproduce it on the calibration "
                            f"samples (relative output MSE {error:.3g}); a fidelity target cannot be checked "
                            "for it: encode it without a target (data-free), or give the model as ONNX")


def encode_program_to_target(model: ModelFile, output: str, options, encode_options, calibration, what: str):
    """Encode a .pt2 model (records + stored program) so that its program meets `options.target`
    on `calibration`; returns (EncodeSummary, FidelityReport). `options`: a FidelityOptions whose
    calibration is filled in here."""
    from ..codec import decode_container, encode_records
    from ..io.onnx_model import stripped_graph
    from ..io.torch_export import program_from_model
    from .decisions import decision_kinds
    from .search import MAX_CALIBRATION, _score, fidelity_plan, settle

    start = time.perf_counter()
    if calibration is None:
        raise CdlInputError(f"{what}: a fidelity target for a torch.export program needs calibration data "
                            "(--calibration DATA.npz with arrays named after the program's inputs)")
    program = program_from_model(model)
    specs = _user_inputs(program)
    names = [s[0] for s in specs]
    inputs = _calibration_inputs(calibration, _declaration(specs), MAX_CALIBRATION)
    module = _module_of(program)
    reference = _run_program(module, names, inputs)
    translation = _translate(program, module, names, inputs.samples[0], what)
    _check_translation(translation, inputs, reference, what)

    own = {r.name: r for r in model.records}
    foreign = [r.name for r in translation.records
               if r.name not in own or own[r.name].array.shape != r.array.shape or own[r.name].dtype != r.dtype
               or not np.array_equal(own[r.name].array, r.array)]
    # Constants the tracer made are not the program's tensors: the plan must leave them exact.
    keep = tuple(options.keep) + tuple(glob.escape(n) for n in foreign)
    quantizer, report, _ = fidelity_plan(translation, replace(options, calibration=inputs, keep=keep))
    options = replace(options, target=report.target)  # the default's stricter target where it applied
    encode_options = replace(encode_options, quantizer=quantizer)
    summary = encode_records(model.records, output, encode_options, {**model.metadata, **report.metadata()},
                             model.sections)

    kinds = decision_kinds(stripped_graph(translation)) if options.same_decisions else {}
    decoded = _run_program(_module_of(program_from_model(decode_container(output))), names, inputs)
    return settle(output, options, _score(options.target, kinds, reference, decoded), summary, report, start,
                  "when its program runs")
