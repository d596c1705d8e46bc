"""ONNX models in: weights become tensor records, the graph (weights stripped) becomes a section.

The stripped graph is an ordinary ONNX ModelProto in which every extracted tensor keeps its name,
dims and data type but has no data: it is marked as external data whose `location` is
`cdl:<record name>`, the name of the container tensor that holds its values (formats/graph-sections.md).
Decoders fill those tensors back in (cdlcodec.io.onnx_writer) and verify dims and type before they do.

Extracted: initializers of every graph (main graph and control-flow subgraphs) whose type cdlcodec
stores (floats and the integer types of cdlcodec.dtypes), and float `Constant` nodes of at least
MIN_CONSTANT_ELEMENTS values (exporters such as spox keep all weights in Constant nodes). Anything
else (other tensor types, small constants, sparse initializers) stays in the graph verbatim, so it is
kept losslessly rather than refused.

Weights in ONNX external data files (`onnx.save(..., save_as_external_data=True)`, models over 2 GB)
are read lazily: each extracted tensor's bytes are memory-mapped from its file when the encoder
reaches it. Every external reference is checked first (a relative file name that stays inside the
model's folder, offset and length within the file and equal to what dims x type need); a tensor left
in the graph gets its bytes inline, so the stored graph references no external file.

Only numpy and onnx are needed here; torch only for
`architecture_graph_section`, which exports a registered torch architecture at encode time.
"""
from __future__ import annotations

import math
import os
import re
import warnings
from dataclasses import dataclass
from functools import partial
from typing import Iterator

import numpy as np

from ..dtypes import storage_dtype
from ..errors import CdlInputError
from ..records import ModelFile, TensorRecord
from .lazy import LazyTensorRecord, mapped_array

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


def iter_all_tensors(model) -> Iterator[object]:
    """Every TensorProto of the model: initializers, sparse initializers' values and indices, and
    tensor-valued attributes of every node, in every graph."""
    for graph, _ in iter_graphs(model.graph):
        yield from graph.initializer
        for sparse in graph.sparse_initializer:
            yield from (sparse.values, sparse.indices)
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t
                yield from attr.tensors
                for sparse in [*([attr.sparse_tensor] if attr.HasField("sparse_tensor") else []), *attr.sparse_tensors]:
                    yield from (sparse.values, sparse.indices)


# Bits per element of ONNX types a tensor may have in external data but that cdlcodec does not
# extract (they stay in the graph, their bytes inline): uint16/32/64, complex, float8, 4-bit types.
_KEPT_TYPE_BITS = {4: 16, 12: 32, 13: 64, 14: 64, 15: 128, 17: 8, 18: 8, 19: 8, 20: 8, 21: 4, 22: 4, 23: 4}
_DIGITS = re.compile(r"[0-9]{1,19}")


@dataclass(frozen=True)
class ExternalBytes:
    """Where a tensor's bytes lie in an external data file (checked: inside the model's folder,
    within the file, exactly the size its dims and type need)."""

    file: str
    offset: int
    length: int

    def array(self, shape: tuple[int, ...], dtype: np.dtype, what: str) -> np.ndarray:
        try:
            return mapped_array(self.file, self.offset, shape, dtype)
        except (OSError, ValueError) as exc:  # the file changed since it was checked
            raise CdlInputError(f"{what}: external data can no longer be read ({exc})") from None

    def read(self, what: str) -> bytes:
        try:
            with open(self.file, "rb") as fh:
                fh.seek(self.offset)
                data = fh.read(self.length)
        except OSError as exc:
            raise CdlInputError(f"{what}: external data cannot be read ({exc})") from None
        if len(data) != self.length:
            raise CdlInputError(f"{what}: external data file {self.file} is shorter than when it was checked")
        return data


def _external_nbytes(tensor) -> int | None:
    """Bytes a tensor's dims and type take in external data (raw little-endian), None for a type
    that cannot be stored there (strings, unknown types)."""
    numel = math.prod(tensor.dims)
    dtype = ONNX_TO_DTYPE.get(tensor.data_type)
    if dtype is not None:
        return numel * storage_dtype(dtype).itemsize
    bits = _KEPT_TYPE_BITS.get(tensor.data_type)
    return None if bits is None else -(-numel * bits // 8)


def external_bytes(tensor, folder: str, what: str) -> ExternalBytes:
    """The checked location of an external tensor's bytes; CdlInputError naming the tensor for a
    location outside `folder` (absolute, '..', a link leading out), a missing file, or an offset and
    length that do not fit the file or the tensor's dims x type."""
    entries = {entry.key: entry.value for entry in tensor.external_data}
    location = entries.get("location", "")
    where = f"{what}: tensor {tensor.name!r}: external data {location!r}"
    if not location or "\0" in location:
        raise CdlInputError(f"{what}: tensor {tensor.name!r}: external data without a file name")
    if location.startswith(REFERENCE_PREFIX):
        raise CdlInputError(f"{where}: names starting with {REFERENCE_PREFIX!r} are reserved for cdlcodec's references")
    parts = re.split(r"[/\\]", location)
    if os.path.isabs(location) or location.startswith(("/", "\\")) or ".." in parts or re.match(r"[A-Za-z]:", location):
        raise CdlInputError(f"{where}: must be a relative file name inside the model's folder")
    root = os.path.realpath(folder)
    file = os.path.realpath(os.path.join(root, location))
    if os.path.commonpath([root, file]) != root:
        raise CdlInputError(f"{where}: leads outside the model's folder (a symbolic link?)")
    if not os.path.isfile(file):
        raise CdlInputError(f"{where}: no such file beside the model")
    for dim in tensor.dims:
        if dim < 0:
            raise CdlInputError(f"{where}: negative dimension in {list(tensor.dims)}")
    needed = _external_nbytes(tensor)
    if needed is None:
        raise CdlInputError(f"{where}: tensors of ONNX type {tensor.data_type} cannot be held in external data")
    size = os.path.getsize(file)
    numbers = {}
    for key in ("offset", "length"):
        if key in entries:
            if not _DIGITS.fullmatch(entries[key]):
                raise CdlInputError(f"{where}: {key} {entries[key][:40]!r} is not a non-negative integer")
            numbers[key] = int(entries[key])
    offset = numbers.get("offset", 0)
    length = numbers.get("length", size - offset)  # ONNX: no length, the rest of the file
    if offset + length > size or length < 0:
        raise CdlInputError(f"{where}: bytes {offset:,}..{offset + length:,} lie beyond the file's {size:,} bytes")
    if length != needed:
        raise CdlInputError(f"{where}: holds {length:,} bytes, its dims {list(tensor.dims)} and type need {needed:,}")
    return ExternalBytes(file, offset, length)


def _check_external_data(model, path: str, in_memory: bool) -> int:
    """Every external tensor of the model checked up front, before any tensor is read; how many."""
    count = 0
    for tensor in iter_all_tensors(model):
        if tensor.data_location == 1:
            if in_memory:
                raise CdlInputError(f"{path}: tensor {tensor.name!r} is in an external data file, which a model "
                                    "given as bytes cannot have (save it as a file beside its data)")
            _external_bytes_of(tensor, path)
            count += 1
    return count


def _external_bytes_of(tensor, path: str) -> ExternalBytes:
    return external_bytes(tensor, os.path.dirname(os.path.abspath(path)), path)


def _inline_external(model, path: str) -> int:
    """Tensors still in external data files (kept in the graph) get their bytes inline; how many. (The
    extracted ones point at container tensors by now: `cdl:` names, which no input may use.)"""
    inlined = 0
    for tensor in iter_all_tensors(model):
        if tensor.data_location == 1 and reference_of(tensor) is None:
            data = _external_bytes_of(tensor, path).read(f"{path}: tensor {tensor.name!r}")
            del tensor.external_data[:]
            tensor.ClearField("data_location")  # DEFAULT, as in a model saved without external data
            tensor.raw_data = data
            inlined += 1
    return inlined


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
    """The ModelProto of the file at `path`, or of `data` (serialized in memory; `path` then only names it);
    external data is not loaded (read_onnx maps it tensor by tensor)."""
    onnx = _onnx()
    from google.protobuf.message import DecodeError

    try:
        model = onnx.load(path, load_external_data=False) if data is None else onnx.load_from_string(data)
    except (DecodeError, ValueError, RuntimeError, UnicodeDecodeError) as exc:
        raise CdlInputError(f"{path}: not a valid ONNX model ({type(exc).__name__}: {str(exc)[:200]})") from None
    if not model.HasField("graph"):
        raise CdlInputError(f"{path}: not a valid ONNX model (no graph)")
    return model


def read_onnx_bytes(data: bytes, what: str) -> ModelFile:
    """`read_onnx` of a model serialized in memory (e.g. just exported by torch); `what` names it in errors."""
    return read_onnx(what, data)


def read_onnx(path: str, data: bytes | None = None) -> ModelFile:
    """Records for every extractable weight of an ONNX file plus the stripped graph as section "onnx"."""
    model = load_onnx_proto(path, data)
    external = _check_external_data(model, path, data is not None)
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
        name = _unique_name(tensor.name if not gpath else f"{gpath}/{tensor.name}", used)
        if tensor.data_location == 1:  # mapped when the encoder reaches it
            source = _external_bytes_of(tensor, path)
            shape = tuple(int(d) for d in tensor.dims)
            load = partial(source.array, shape, storage_dtype(dtype), f"{path}: tensor {tensor.name!r}")
            records.append(LazyTensorRecord(name, dtype, shape, load))
        else:
            try:
                array = tensor_to_array(tensor)
            except Exception as exc:  # malformed tensor data: name it instead of crashing
                raise CdlInputError(f"{path}: tensor {tensor.name!r} cannot be read ({exc})") from None
            records.append(TensorRecord(name, array, dtype))
        strip_tensor(tensor, name)
    inlined = _inline_external(model, path)
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
    if external:
        metadata["onnx.external_data"] = f"{external} tensors read from external data ({inlined} kept inline in the graph)"
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

