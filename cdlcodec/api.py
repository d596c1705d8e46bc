"""The Python API: `encode` a model into a .cdl container, `decode` it to a model file, or `load` it.

    import cdlcodec
    summary = cdlcodec.encode("model.onnx", "model.cdl")     # to cosine >= 0.999, checked by running it
    cdlcodec.decode("model.cdl", "model_decoded.onnx")
    model = cdlcodec.load("lenet.cdl")          # nn.Module (eval mode) when the container has a graph
    cdlcodec.load_into(my_module, "model.cdl")  # any container: weights into your own module

`encode` takes a model file, a state_dict or an nn.Module (README, "Python API"). What `load` returns
depends on what the container carries (docs/decoders.md):
1. a torch.export program (encoded from a .pt2 file): its module, `ExportedProgram.module()`;
2. a CDL checkpoint (metadata "cdl.mode"): the CDL model rebuilt by cdlcodec.cdl, eval mode;
3. a registered architecture (metadata "architecture", e.g. from `encode --arch lenet5`): that
   module from cdlcodec.models, weights loaded with strict=True, eval mode;
4. otherwise (a plain state_dict, or an ONNX model, which has no torch module): an ordered
   state_dict {name: tensor}. Decode ONNX containers to .onnx to run them.
"""
from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .errors import CdlInputError
from .formats.container import ContainerReader, Limits
from .records import ModelFile, TensorRecord

if TYPE_CHECKING:
    from .codec import EncodeSummary


def encode(source, output, *, quantizer=None, backend: str = "auto", keep=(), target=None, calibration=None,
           example_input=None, arch: str | None = None, quiet: bool = True, lossless: bool = False):
    """Quantize and entropy-code a model into the container `output` (written atomically).

    source: a model file path (.pt/.pth/.bin/.ckpt, .safetensors, .onnx, .pt2), a state_dict
        (name -> torch tensor or numpy array), or a torch nn.Module.
    quantizer: a `cdlcodec.quantizers.base.Quantizer`, or the name of a registered one
        (`cdlcodec.quantizers.base.names()`, built with its defaults). None: a model with a graph is
        encoded to a fidelity target, any other with the data-free default (per output channel,
        step 0.02 x the channel's std; unverified).
    backend: "auto" (the smallest per tensor), "raw", "huffman" or "cabac".
    keep: name patterns (fnmatch) of tensors stored exactly.
    target: a fidelity target for a model with a graph, as ("cosine", 0.999), ("agreement", 0.99),
        ("rel_mse", 1e-3) or a `cdlcodec.fidelity.measures.Target`; None with no quantizer = cosine
        >= 0.999. The written file is decoded and run to check it; a miss writes nothing.
    calibration: inputs for the fidelity check: an .npz path (one array per graph input, samples
        first) or an iterable of example batches (a tensor or array each, or a tuple of them for a
        model with several inputs). None: inputs generated from the graph's declared shapes.
    example_input: with an nn.Module, an example input (or a tuple of them): the module is exported
        to ONNX with it (torch.onnx.export, dynamo=False; batch axis dynamic) and encoded with its
        graph, so `target` and `calibration` apply. Without it a module encodes its state_dict
        (data-free, unverified).
    arch: a registered architecture (cdlcodec.models, e.g. "lenet5") that a state_dict is the
        weights of: checked now, and its ONNX graph stored so that decode to .onnx and `load` work.
    quiet: no progress bar and no log lines.
    lossless: quantize nothing; every tensor is stored bit for bit (float tensors with the exact float
        coder where it is smaller). Refused with a quantizer, target or calibration.

    Returns a `cdlcodec.codec.EncodeSummary` (sizes, bits per parameter, time; `fidelity` holds the
    FidelityReport of a fidelity-target encode).
    """
    from .codec import EncodeOptions
    from .fidelity.encode import encode_model

    output = os.fspath(output)
    options = EncodeOptions(backend=backend, keep=tuple(keep), quiet=quiet, lossless=lossless)
    if lossless:
        if quantizer is not None or target is not None or calibration is not None:
            raise CdlInputError("lossless quantizes nothing: give no quantizer, target or calibration with it")
        return encode_with_options(source, output, options, arch=arch, example_input=example_input)
    if quantizer is not None:
        if target is not None or calibration is not None:
            raise CdlInputError("a fidelity target chooses the steps itself: give target/calibration or a quantizer, "
                                "not both")
        options.quantizer = _quantizer(quantizer)
    explicit = target is not None or calibration is not None
    if arch is not None and quantizer is None and explicit:
        raise CdlInputError("arch stores a graph for decoding; a fidelity target needs an ONNX model or a module "
                            "with example_input")
    if quantizer is not None or arch is not None:
        return encode_with_options(source, output, options, arch=arch, example_input=example_input)
    model = _model_of(source, output, example_input)
    summary, report = encode_model(model, output, options, target, calibration, explicit=explicit,
                                   what=_describe(source))
    summary.fidelity = report
    return summary


def encode_with_options(source, output, options, *, arch: str | None = None,
                        example_input=None) -> "EncodeSummary":
    """Encode `source` (as in `encode`) exactly as the `cdlcodec.codec.EncodeOptions` say, with no
    fidelity search, and with the ONNX graph of registered architecture `arch` when given. `encode`
    and the encode command share it for explicit quantizers and --arch."""
    from .codec import encode_records

    model = _model_of(source, os.fspath(output), example_input)
    if arch is not None:
        model = _with_architecture(model, arch, source)
    return encode_records(model.records, os.fspath(output), options, model.metadata, model.sections)


def decode(path, output, *, quiet: bool = True, limits: Limits = Limits(), only=(), threads: int | None = None,
           **writer_options) -> ModelFile:
    """Decode the container at `path` into the model file `output` (written atomically); returns what
    was decoded (records, sections, metadata; the records' values are decoded again from `path` when
    their `array` is read, so the model is never held here).

    only: name patterns (fnmatch, as for keep): decode just the tensors that match one, reading only
    their payloads, to a .safetensors or .pt/.pth file; returns a `PartialDecode` (bytes read).

    The output kind follows the extension: .pt/.pth (a state_dict), .safetensors, .onnx (needs a
    graph in the container) or .pt2 (needs a torch.export program). Writer options: for .onnx,
    weights="float" (default) or "qdq" (integer initializers + DequantizeLinear), and int4=False to
    keep the model's opset. threads: tensors decoded at once (None: every core).

    .safetensors and .onnx outputs are written tensor by tensor as they are decoded (memory holds a few
    tensors, not the model; QDQ decodes the levels twice, once for their ranges); .pt and .pt2 outputs
    hold the decoded model once.
    """
    from .atomic import refuse_to_overwrite
    from .codec import open_container
    from .io.model_files import check_writable_kind

    path, output = os.fspath(path), os.fspath(output)
    kind = check_writable_kind(output)  # fail on a bad output name before decoding anything
    refuse_to_overwrite(output, path)
    if only:
        return _decode_only(path, output, kind, tuple(only), limits, writer_options)
    with open_container(path, limits) as reader:
        lazy, done = _lazily_decoded(path, reader, limits)
        try:
            return _write_decoded(reader, lazy, output, threads, quiet, writer_options)
        finally:
            done()


def _write_decoded(reader, lazy: ModelFile, output: str, threads, quiet: bool, writer_options) -> ModelFile:
    """Write `output` from `reader`: tensor by tensor where its writer takes them so, else all at once."""
    from .codec import iter_decoded
    from .io.model_files import is_folder_output, open_stream_writer, write_model

    writer = open_stream_writer(output, lazy, **writer_options)
    if writer is not None:
        with writer:
            for record in iter_decoded(reader, threads=threads, keep_levels=False, quiet=quiet):
                writer.add(record)
        return lazy
    float_onnx = writer_options.get("weights") in (None, "float") and output.lower().endswith(".onnx")
    if float_onnx or is_folder_output(output):
        write_model(output, lazy, **writer_options)  # these writers ask for each tensor as they write it
        return lazy
    if writer_options.get("weights") == "qdq":
        write_model(output, _with_lazy_levels(reader, lazy, threads, quiet), **writer_options)
        return lazy
    # the torch writers serialize a whole state_dict
    records = list(iter_decoded(reader, threads=threads, keep_levels=False, quiet=quiet))
    write_model(output, ModelFile(records, lazy.sections, lazy.metadata), **writer_options)
    return lazy


QDQ_DECODE_BLOCK = 1 << 18  # levels the QDQ writer holds at once while it writes a tensor (2 MB as int64)


def _with_lazy_levels(reader, lazy: ModelFile, threads, quiet: bool) -> ModelFile:
    """`lazy` with LazyLevels on every tensor QDQ can store as integers (value = level x step): QDQ
    decides the integer types of the whole model before it writes one tensor, so one pass keeps each
    tensor's level range only (nothing else), and the writer decodes each tensor's levels again, block
    by block into the chosen type, as it writes them: memory holds one block of levels, never a tensor's
    or the model's, and no values are made for the integer tensors. Values stay lazy as in `lazy` (decoded if asked for)."""
    import copy
    from functools import partial

    from .codec import bounded_level_blocks, iter_level_ranges
    from .io.lazy import LazyLevels
    from .quantizers.params import ChannelParams, UniformParams, from_json

    entries = [e for e in reader.tensors if e.encoding == "levels"
               and isinstance(from_json(e.quant, e.shape, e.dtype, e.name), (UniformParams, ChannelParams))]
    ranges = {e.name: bounds for e, bounds in iter_level_ranges(reader, entries, threads=threads, quiet=quiet,
                                                                block_size=QDQ_DECODE_BLOCK)}

    def blocks(entry, bounds):
        # one core, small blocks: with cabac's 2 M-level parallel blocks MiniLM's QDQ decode peaked 20 MB higher
        return bounded_level_blocks(entry, reader.read_payload(entry), bounds, parallel_backend=False,
                                    block_size=QDQ_DECODE_BLOCK)

    records = []
    for entry, record in zip(reader.tensors, lazy.records):
        bounds = ranges.get(entry.name)
        if bounds is not None:
            held = LazyLevels(entry.count, *bounds, partial(blocks, entry, bounds))
            record = copy.copy(record)  # the caller's lazy records stay as they are (no reader of ours)
            record.levels = held
        records.append(record)
    return ModelFile(records, lazy.sections, lazy.metadata)


def _lazily_decoded(path: str, reader, limits: Limits):
    """(model, done): the container's tensors as records that decode their values when asked, through
    `reader` until done() is called, then through a reader of their own (they may outlive it)."""
    from functools import partial

    from .codec import decode_entry
    from .io.lazy import LazyTensorRecord

    source = {"reader": reader}

    def values(entry):
        if source["reader"] is not None:
            return decode_entry(source["reader"], entry, keep_levels=False).array
        with ContainerReader(path, limits) as again:
            return decode_entry(again, entry, keep_levels=False).array

    records = [LazyTensorRecord(e.name, e.dtype, e.shape, partial(values, e), quant=e.quant) for e in reader.tensors]
    sections = [(s.name, s.kind, reader.read_section(s)) for s in reader.sections]
    return ModelFile(records, sections, dict(reader.metadata)), partial(source.__setitem__, "reader", None)


@dataclass
class PartialDecode(ModelFile):
    """What `decode(..., only=...)` decoded, with the bytes it read of the container's `file_size`."""

    bytes_read: int = 0
    file_size: int = 0


def _decode_only(path: str, output: str, kind: str, patterns: tuple[str, ...], limits: Limits,
                 writer_options) -> PartialDecode:
    """The tensors matching `patterns` decoded to `output` (of writer `kind`): the container's index is
    read, then only their payloads (seeks, not a read of the file); sections, which belong to the whole
    model, are not."""
    from .codec import decode_entry, open_container, select_entries
    from .io.model_files import write_model

    if kind not in ("safetensors", "torch"):
        raise CdlInputError(f"a subset of the tensors is decoded to a .safetensors or .pt file, not {kind} ({output}): "
                            "a graph or a sharded folder needs every tensor")
    with open_container(path, limits) as reader:  # the same refusals as a decode of the whole file
        entries = select_entries(reader.tensors, patterns, path)
        records = [decode_entry(reader, entry) for entry in entries]
        model = PartialDecode(records, [], dict(reader.metadata), bytes_read=reader.bytes_read,
                              file_size=reader.file_size)
    write_model(output, model, **writer_options)
    return model


def _quantizer(quantizer):
    if isinstance(quantizer, str):
        from .quantizers.base import make

        return make(quantizer)
    if not callable(getattr(quantizer, "describe", None)):
        raise CdlInputError(f"quantizer must be a Quantizer or a registered name, got {type(quantizer).__name__}")
    return quantizer


def _describe(source) -> str:
    if isinstance(source, (str, os.PathLike)):
        return os.fspath(source)
    return f"the given {type(source).__name__}"


def _model_of(source, output: str, example_input) -> ModelFile:
    """The ModelFile to encode from a path, a state_dict or a module."""
    if isinstance(source, (str, os.PathLike)):
        from .atomic import refuse_to_overwrite
        from .io.model_files import read_model

        if example_input is not None:
            raise CdlInputError("example_input applies to an nn.Module; a model file is read as it is")
        refuse_to_overwrite(output, source)
        return read_model(os.fspath(source))
    if isinstance(source, Mapping):
        if example_input is not None:
            raise CdlInputError("example_input applies to an nn.Module; a state_dict has no forward() to export")
        return ModelFile(_records_of(source), [], {"source.kind": "state_dict"})
    state_dict = getattr(source, "state_dict", None)
    if not callable(state_dict):
        raise CdlInputError(f"cannot encode a {type(source).__name__}: give a model file path, a state_dict "
                            "or a torch nn.Module")
    if example_input is None:
        return ModelFile(_records_of(state_dict()), [], {"source.kind": "state_dict"})
    return _export_module(source, example_input)


def _records_of(state_dict: Mapping) -> list[TensorRecord]:
    from .dtypes import dtype_name_of_numpy

    records = []
    for name, value in state_dict.items():
        if not isinstance(name, str):
            raise CdlInputError(f"state_dict keys must be strings, got {name!r}")
        if hasattr(value, "detach"):  # a torch tensor
            from .io.torch_checkpoint import tensor_to_record

            records.append(tensor_to_record(name, value))
        elif hasattr(value, "dtype") and hasattr(value, "shape"):
            import numpy as np

            array = np.array(value, copy=True)
            try:
                records.append(TensorRecord(name, array, dtype_name_of_numpy(array)))
            except CdlInputError as exc:
                raise CdlInputError(f"tensor {name!r}: {exc}") from None
        else:
            raise CdlInputError(f"state_dict entry {name!r} is a {type(value).__name__}, not a tensor or array")
    if not records:
        raise CdlInputError("the state_dict holds no tensors")
    return records


def _export_module(module, example_input) -> ModelFile:
    """The module's ONNX graph (exported in memory with `example_input`) read like an .onnx file."""
    import torch

    from .io.onnx_model import export_onnx_bytes, read_onnx_bytes

    args = tuple(example_input) if isinstance(example_input, (tuple, list)) else (example_input,)
    was_training = module.training
    module.eval()
    try:
        graph = export_onnx_bytes(module, args)
    except CdlInputError:
        raise
    except Exception as exc:  # the module's forward or the exporter refused: say so in one line
        raise CdlInputError(f"cannot export {type(module).__name__} to ONNX with the example input: "
                            f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}") from None
    finally:
        module.train(was_training)
    model = read_onnx_bytes(graph, f"the ONNX export of {type(module).__name__}")
    model.metadata["onnx.exported_by"] = f"torch {torch.__version__}"
    return model


def _with_architecture(model: ModelFile, arch: str, source) -> ModelFile:
    """`model` with the ONNX graph of registered architecture `arch`, checked against its tensors."""
    from .cdl_format import is_cdl_records
    from .io.cdl_checkpoint import is_cdl_model
    from .io.onnx_model import architecture_graph_section
    from .quantizers.base import parameter_error  # errors naming `arch`, which the CLI calls --arch

    if is_cdl_model(model) or is_cdl_records(model.records):  # a file read as one, or a state_dict in memory
        raise parameter_error("this is a CDL checkpoint: it names its own architecture and its ONNX graph is "
                              "stored without arch", "arch")
    if model.sections:
        raise parameter_error(f"arch applies to state_dicts; {_describe(source)} already carries its own graph",
                              "arch")
    section, meta = architecture_graph_section(arch, model.records)
    return ModelFile(model.records, [*model.sections, section], {**model.metadata, **meta})


def _state_dict(model: ModelFile) -> "OrderedDict":
    from .io.torch_checkpoint import record_to_tensor

    return OrderedDict((r.name, record_to_tensor(r)) for r in model.records)


def load(path: str, *, limits: Limits = Limits()):
    """Decode the container at `path` into an nn.Module where it says how to build one, else a state_dict."""
    from .codec import decode_container
    from .io.torch_export import program_from_model, program_section
    from .optional import require

    require("torch", "cdlcodec.load (torch modules and tensors)")  # decode() writes .onnx/.safetensors without it

    model = decode_container(path, limits=limits)
    if program_section(model) is not None:
        return program_from_model(model).module()
    from .cdl_format import is_cdl_checkpoint

    state = _state_dict(model)
    if is_cdl_checkpoint(state):
        from .cdl.checkpoint import build_model_from_checkpoint

        return build_model_from_checkpoint(state).eval()
    arch = model.metadata.get("architecture")
    if arch:
        from . import models

        module = models.build(arch, shapes={name: tuple(t.shape) for name, t in state.items()})
        _strict_load(module, state, path)
        return module.eval()
    return state


def load_into(module, path: str, *, strict: bool = True, limits: Limits = Limits(), threads: int | None = None):
    """Load the container's tensors into `module` (as load_state_dict with `strict`); returns `module`.

    Tensor by tensor: each one is copied into its parameter or buffer as soon as it is decoded and
    then dropped, so the decoded model is never held beside the module. With `strict` the names and
    shapes are checked against the container's index before anything is decoded or changed.
    threads: tensors decoded at once (None: every core)."""
    from .codec import iter_decoded, open_container
    from .io.torch_checkpoint import record_to_tensor

    with open_container(path, limits) as reader:
        if strict:
            _check_fits(module, reader.tensors, path)
        for record in iter_decoded(reader, threads=threads, keep_levels=False):
            try:
                module.load_state_dict({record.name: record_to_tensor(record)}, strict=False)
            except RuntimeError as exc:  # a shape that does not fit (strict checked it already)
                raise _misfit(path, " ".join(str(exc).split())) from None
    return module


def _check_fits(module, entries, path: str) -> None:
    """CdlInputError unless the container's tensors are exactly the module's state_dict (names, shapes)."""
    state = module.state_dict()
    shapes = {e.name: tuple(e.shape) for e in entries}
    problems = []
    missing = [name for name in state if name not in shapes]
    unexpected = [name for name in shapes if name not in state]
    wrong = [f"{name} {shapes[name]} for {tuple(state[name].shape)}" for name in shapes
             if name in state and shapes[name] != tuple(state[name].shape)]
    for what, names in (("missing key(s)", missing), ("unexpected key(s)", unexpected), ("size mismatch", wrong)):
        if names:
            problems.append(f"{what}: {', '.join(names[:8])}{' ...' if len(names) > 8 else ''}")
    if problems:
        raise _misfit(path, "; ".join(problems))


def _misfit(path: str, why: str) -> CdlInputError:
    return CdlInputError(f"{path}: the decoded tensors do not fit the module: {why[:400]}")


def _strict_load(module, state, path: str) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise _misfit(path, " ".join(str(exc).split())) from None
