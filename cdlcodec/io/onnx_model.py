"""ONNX models in: weights become tensor records, the graph (weights stripped) becomes a section.

The stripped graph is an ordinary ONNX ModelProto in which every extracted tensor keeps its name,
dims and data type but has no data: it is marked as external data whose `location` is
`cdl:<record name>`, the name of the container tensor that holds its values (formats/graph-sections.md).
Decoders fill those tensors back in (cdlcodec.io.onnx_writer) and verify dims and type before they do.

Extracted: initializers of every graph (main graph and control-flow subgraphs) whose type cdlcodec
stores (floats and the integer types of cdlcodec.dtypes), and float `Constant` nodes of at least
MIN_CONSTANT_ELEMENTS values (exporters such as spox keep all weights in Constant nodes). Anything
else (other tensor types, small constants, sparse initializers) stays in the graph verbatim, so it is
kept losslessly rather than refused. Only numpy and onnx are needed here; torch only for
`architecture_graph_section`, which exports a registered torch architecture at encode time.
"""
from __future__ import annotations

import warnings
from typing import Iterator

import numpy as np

from ..errors import CdlInputError
from ..records import ModelFile, TensorRecord

GRAPH_SECTION_NAME = "model.onnx"
GRAPH_SECTION_KIND = "onnx"
REFERENCE_PREFIX = "cdl:"
MIN_CONSTANT_ELEMENTS = 16

# ONNX TensorProto.DataType -> cdlcodec dtype name (types not listed stay in the graph verbatim).
ONNX_TO_DTYPE = {1: "float32", 11: "float64", 10: "float16", 16: "bfloat16", 7: "int64", 6: "int32",
                 5: "int16", 3: "int8", 2: "uint8", 9: "bool"}
DTYPE_TO_ONNX = {v: k for k, v in ONNX_TO_DTYPE.items()}
FLOAT_ONNX_TYPES = (1, 11, 10, 16)


def _onnx():
    try:
        import onnx
    except ImportError as exc:  # pragma: no cover - onnx is a dependency
        raise CdlInputError("reading or writing ONNX needs the 'onnx' package") from exc
    return onnx


# ------------------------------------------------------------------------------------------------
# Walking every tensor of a model
# ------------------------------------------------------------------------------------------------

def iter_graphs(graph, path: str = "") -> Iterator[tuple[object, str]]:
    """(graph, path) for `graph` and every subgraph below it; path names the subgraph uniquely."""
    yield graph, path
    for i, node in enumerate(graph.node):
        for attr in node.attribute:
            label = f"{path}/{node.name or f'{node.op_type}_{i}'}.{attr.name}"
            if attr.HasField("g"):
                yield from iter_graphs(attr.g, label)
            for j, sub in enumerate(attr.graphs):
                yield from iter_graphs(sub, f"{label}[{j}]")


def iter_weight_slots(model) -> Iterator[tuple[str, object, str]]:
    """(where, tensor, path) for every TensorProto that may hold weights: initializers and Constant values.

    where is "initializer" or "constant"; `path` is the graph path from `iter_graphs`.
    """
    for graph, path in iter_graphs(model.graph):
        for init in graph.initializer:
            yield "initializer", init, path
        for node in graph.node:
            if node.op_type == "Constant" and node.domain in ("", "ai.onnx"):
                for attr in node.attribute:
                    if attr.name == "value" and attr.HasField("t"):
                        if not attr.t.name:
                            attr.t.name = node.output[0]  # Constant tensors are nameless; the output names them
                        yield "constant", attr.t, path


def _has_external_data(model) -> bool:
    for graph, _ in iter_graphs(model.graph):
        for t in graph.initializer:
            if t.data_location == 1:
                return True
        for sp in graph.sparse_initializer:
            if sp.values.data_location == 1:
                return True
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("t") and attr.t.data_location == 1:
                    return True
    return False


def tensor_to_array(tensor) -> np.ndarray:
    """Values of a TensorProto in cdlcodec's storage form (bfloat16 as uint16 bit patterns)."""
    from onnx import numpy_helper

    arr = numpy_helper.to_array(tensor)
    if tensor.data_type == 16:
        arr = np.ascontiguousarray(arr).view(np.uint16)
    return np.array(arr, copy=True, order="C")


def strip_tensor(tensor, record_name: str) -> None:
    """Remove a tensor's data in place and point it at the container tensor `record_name`."""
    for field in ("raw_data", "float_data", "int32_data", "int64_data", "double_data", "uint64_data", "string_data"):
        tensor.ClearField(field)
    del tensor.external_data[:]
    tensor.data_location = 1  # EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", REFERENCE_PREFIX + record_name


def reference_of(tensor) -> str | None:
    """The container tensor name a stripped tensor points at, or None for a tensor with its own data."""
    if tensor.data_location != 1:
        return None
    for entry in tensor.external_data:
        if entry.key == "location" and entry.value.startswith(REFERENCE_PREFIX):
            return entry.value[len(REFERENCE_PREFIX):]
    return None


# ------------------------------------------------------------------------------------------------
# Reading an .onnx file
# ------------------------------------------------------------------------------------------------

def load_onnx_proto(path: str, data: bytes | None = None):
    """The ModelProto of the file at `path`, or of `data` (serialized in memory; `path` then only names it)."""
    onnx = _onnx()
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(path, load_external_data=False) if data is None else onnx.load_from_string(data)
    except (DecodeError, ValueError, RuntimeError, UnicodeDecodeError) as exc:
        raise CdlInputError(f"{path}: not a valid ONNX model ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not model.HasField("graph"):
        raise CdlInputError(f"{path}: not a valid ONNX model (no graph)")
    if _has_external_data(model):
        raise CdlInputError(
            f"{path}: the model keeps its weights in external data files, which cdlcodec does not read; "
            "merge them first: onnx.save(onnx.load(path), 'merged.onnx', save_as_external_data=False) "
            "(models over 2 GB cannot be merged)")
    return model


def read_onnx_bytes(data: bytes, what: str) -> ModelFile:
    """`read_onnx` of a model serialized in memory (e.g. just exported by torch); `what` names it in errors."""
    return read_onnx(what, data)


def read_onnx(path: str, data: bytes | None = None) -> ModelFile:
    """Records for every extractable weight of an ONNX file plus the stripped graph as section "onnx"."""
    model = load_onnx_proto(path, data)
    records: list[TensorRecord] = []
    used: set[str] = set()
    kept = 0
    for where, tensor, gpath in iter_weight_slots(model):
        dtype = ONNX_TO_DTYPE.get(tensor.data_type)
        if dtype is None:
            kept += 1
            continue  # unsupported type: stays in the graph, byte for byte
        if where == "constant" and (tensor.data_type not in FLOAT_ONNX_TYPES or
                                    int(np.prod(tensor.dims, dtype=np.int64)) < MIN_CONSTANT_ELEMENTS):
            continue  # shape arithmetic and scalars: cheaper and clearer left in the graph
        try:
            array = tensor_to_array(tensor)
        except Exception as exc:  # malformed tensor data: name it instead of crashing
            raise CdlInputError(f"{path}: tensor {tensor.name!r} cannot be read ({exc})") from None
        name = _unique_name(tensor.name if not gpath else f"{gpath}/{tensor.name}", used)
        records.append(TensorRecord(name, array, dtype))
        strip_tensor(tensor, name)
    if not any(r.is_float for r in records):
        raise CdlInputError(f"{path}: the ONNX graph has no float weights (initializers or Constant tensors) "
                            "to compress")
    metadata = {
        "source.kind": "onnx", "graph": GRAPH_SECTION_KIND,
        "onnx.ir_version": str(model.ir_version),
        "onnx.opset": ",".join(f"{o.domain or 'ai.onnx'}:{o.version}" for o in model.opset_import),
    }
    if model.producer_name:
        metadata["onnx.producer"] = f"{model.producer_name} {model.producer_version}".strip()
    if kept:
        metadata["onnx.kept_tensors"] = str(kept)
    return ModelFile(records, [(GRAPH_SECTION_NAME, GRAPH_SECTION_KIND, model.SerializeToString())], metadata)


def _unique_name(name: str, used: set[str]) -> str:
    candidate, n = name, 1
    while candidate in used:
        n += 1
        candidate = f"{name}#{n}"
    used.add(candidate)
    return candidate


# ------------------------------------------------------------------------------------------------
# Registered architectures: export the graph at encode time (needs torch), decode without it
# ------------------------------------------------------------------------------------------------

# Input shape used to trace each built-in architecture (batch dimension exported as dynamic). A module
# may instead say it itself: `example_input_shape`, or `example_inputs()` for non-float inputs (token ids).
EXAMPLE_INPUT_SHAPES = {"lenet5": (1, 1, 28, 28)}
EXPORT_OPSET = 17


def export_onnx_bytes(module, args: tuple, *, state_dict_initializers: bool = False,
                      input_names: list[str] | None = None) -> bytes:
    """`module` (eval mode) exported with torch.onnx.export (dynamo=False): inputs "input" or "input_0",
    "input_1", ..., outputs likewise "output" / "output_N"; dynamic axes as the module's `onnx_dynamic_axes`
    says (by those names), else the batch axis of every input and of every output that has one.
    With `state_dict_initializers`, every weight initializer is a state_dict entry as it is: BatchNorm
    not folded into the convolution before it, no constant folding (which would store transposed
    copies of MatMul weights). `input_names` replaces the default input names."""
    import io

    import torch

    with torch.no_grad():
        result = module(*args)
    results = result if isinstance(result, (tuple, list)) else (result,)
    inputs = ["input"] if len(args) == 1 else [f"input_{i}" for i in range(len(args))]
    if input_names is not None:
        inputs = list(input_names)
    outputs = ["output"] if len(results) == 1 else [f"output_{i}" for i in range(len(results))]
    declared = getattr(module, "onnx_dynamic_axes", None)
    if declared is not None:
        dynamic = {name: axes for name, axes in declared.items() if name in inputs or name in outputs}
    else:
        dynamic = {name: {0: "batch"} for name in inputs}
        if all(isinstance(r, torch.Tensor) and r.ndim for r in results):
            dynamic.update({name: {0: "batch"} for name in outputs})
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        extra = ({"training": torch.onnx.TrainingMode.PRESERVE, "do_constant_folding": False}
                 if state_dict_initializers else {})
        torch.onnx.export(module, args, buf, dynamo=False, opset_version=EXPORT_OPSET, input_names=inputs,
                          output_names=outputs, dynamic_axes=dynamic, **extra)
    return buf.getvalue()


def architecture_graph_section(arch: str, records: list[TensorRecord], input_shape: tuple[int, ...] | None = None,
                               module=None, extra_records: bool = False) -> tuple[tuple[str, str, bytes], dict[str, str]]:
    """Export registered architecture `arch` loaded with `records` to ONNX, weights stripped.

    Each ONNX initializer is matched to the state_dict entry holding bit-identical values of the
    same shape and dtype (verified by value, not trusted by name); an initializer that matches none
    or several entries stays in the graph verbatim. Returns (section, extra metadata).
    With `extra_records`, records the module has no state_dict entry for are ignored rather than
    refused (CDL checkpoints: their steps and sharpnesses sit next to the float architecture's
    tensors); every entry of the module must still be present.
    """
    import torch

    from .. import models
    from .torch_checkpoint import record_to_tensor

    if module is None:
        module = models.build(arch, shapes={r.name: r.shape for r in records})
    if extra_records:
        wanted = set(module.state_dict())
        records = [r for r in records if r.name in wanted]
    state = {r.name: record_to_tensor(r) for r in records}
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CdlInputError(f"the checkpoint does not match architecture {arch!r}: {str(exc).splitlines()[0][:300]}") from None
    module.eval()
    shape = input_shape or getattr(module, "example_input_shape", None) or EXAMPLE_INPUT_SHAPES.get(arch)
    if shape is not None:
        args = (torch.zeros(*shape),)
    elif callable(getattr(module, "example_inputs", None)):
        args = tuple(module.example_inputs())
        shape = tuple(args[0].shape)
    else:
        raise CdlInputError(f"architecture {arch!r} has no example input shape to export its graph with")
    onnx = _onnx()
    proto = onnx.load_from_string(export_onnx_bytes(module, args, state_dict_initializers=True))
    by_bytes: dict[tuple, list[TensorRecord]] = {}
    for r in records:
        by_bytes.setdefault((r.shape, r.dtype, r.array.tobytes()), []).append(r)
    matched = unmatched = 0
    for where, tensor, _ in iter_weight_slots(proto):
        dtype = ONNX_TO_DTYPE.get(tensor.data_type)
        if dtype is None:
            continue
        arr = tensor_to_array(tensor)
        candidates = by_bytes.get((arr.shape, dtype, arr.tobytes()), [])
        named = [r for r in candidates if r.name == tensor.name]
        pick = named[0] if named else (candidates[0] if len(candidates) == 1 else None)
        if pick is not None:
            strip_tensor(tensor, pick.name)
            matched += 1
        elif where == "initializer":
            unmatched += 1
    meta = {"architecture": arch, "graph": GRAPH_SECTION_KIND, "onnx.exported_by": f"torch {torch.__version__}",
            "onnx.opset": f"ai.onnx:{EXPORT_OPSET}", "onnx.input_shape": "x".join(map(str, shape))}
    if unmatched:
        warnings.warn(f"{unmatched} ONNX initializers of {arch!r} match no state_dict entry and stay in the graph "
                      "as exported (their values will not reflect quantization)")
        meta["onnx.unmatched_initializers"] = str(unmatched)
    return (GRAPH_SECTION_NAME, GRAPH_SECTION_KIND, proto.SerializeToString()), meta


def graph_section(model: ModelFile):
    """The (name, kind, bytes) ONNX section of a decoded container, or None."""
    for section in model.sections:
        if section[1] == GRAPH_SECTION_KIND:
            return section
    return None


def stripped_graph(model: ModelFile):
    """The model's ONNX graph section parsed (weights stripped: `cdl:` references), or None."""
    section = graph_section(model)
    return None if section is None else _onnx().load_from_string(section[2])

