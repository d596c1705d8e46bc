"""Decoded containers out as runnable ONNX models: float weights or integer weights + DequantizeLinear.

Needs numpy and onnx only (never torch), so an edge device can turn a .cdl file into an .onnx file.

- weights="float": every tensor the stripped graph references (`cdl:<name>`, see onnx_model.py and
  formats/graph-sections.md) gets the decoded values, in the tensor's own ONNX data type.
- weights="qdq": a tensor that was quantized uniformly (value = level x step, per tensor or per
  output channel) is stored as its integer levels, followed by DequantizeLinear(levels, scale=step)
  whose output carries the original tensor name, so the file itself stays small. The integer type
  is the narrowest that holds the levels: int4 (opset 21, two values per byte, low nibble first),
  int8, int16 (opset 21) or int32. The model keeps its opset unless a type truly needs a newer
  one (int4 or int16: 21); then it is upgraded with onnx.version_converter and an OnnxOutputNote
  says so (keep_opset=True forbids it; a failed upgrade keeps the opset).
  Levels beyond int8 are always named in a note, with the way to int8 (encode --deploy int8).
  Tensors that DequantizeLinear cannot express at the final opset (float64 weights, float16 weights
  below opset 19, per-channel steps below opset 13, int16 levels below 21) are written as int8/int16
  -> Cast -> Mul(step): the same product with the same single rounding, at any opset; only levels
  beyond int16 (or beyond what the float type holds exactly) stay float.
- CDL activation quantizers (json section "cdl.activations") become QuantizeLinear/DequantizeLinear
  pairs on the named activations, with a Clip to [0, 2^b - 1] where b < 8, followed by Max(., 0)
  (an identity that keeps onnxruntime's default QDQ fusions from changing the arithmetic).
"""
from __future__ import annotations

import json
import math
import os
import warnings
from collections import Counter

import numpy as np

from ..atomic import atomic_open
from ..dtypes import from_float64, storage_dtype, to_float64
from ..errors import CdlFormatError, CdlInputError
from ..quantizers.params import ChannelParams, UniformParams, from_json, steps_of
from ..records import ModelFile, TensorRecord
from .cdl_checkpoint import ACTIVATIONS_SECTION
from .lazy import LazyLevels, level_array
from .onnx_model import (ONNX_TO_DTYPE, FLOAT_ONNX_TYPES, graph_section, iter_graphs,
                         reference_of, _onnx)

WEIGHT_MODES = ("float", "qdq")
INT4, INT8, INT16, INT32 = 22, 3, 5, 6
_INT_RANGES = {INT4: (-8, 7), INT8: (-128, 127), INT16: (-32768, 32767), INT32: (-(2**31), 2**31 - 1)}
_INT_MIN_OPSET = {INT4: 21, INT8: 10, INT16: 21, INT32: 10}


# ------------------------------------------------------------------------------------------------
# Entry point
# ------------------------------------------------------------------------------------------------

class OnnxOutputNote(UserWarning):
    """What the writer decided that the user should know (an opset upgrade, levels beyond int8); the
    CLI prints these as `cdlcodec: note:` lines, library callers get them as warnings."""


def _note(message: str) -> None:
    warnings.warn(message, OnnxOutputNote, stacklevel=3)


def write_onnx(path: str, model: ModelFile, weights: str = "float", int4: bool = True, keep_opset: bool = False,
               matmul_nbits: bool = False, check: bool = True, matmul_integer: bool = False) -> None:
    """Write the decoded `model` (which must carry an ONNX graph section) to `path`, atomically."""
    streamed: dict = {}
    proto = _build(model, weights, int4, keep_opset, matmul_nbits, streamed, matmul_integer)
    if check:
        try:
            _onnx().checker.check_model(_checkable(proto, streamed))
        except Exception as exc:
            raise CdlFormatError(f"the decoded ONNX model does not pass onnx.checker: {str(exc)[:300]}") from None
    data_path = None
    if _approximate_size(proto, streamed) > EXTERNAL_DATA_THRESHOLD:
        data_path = _write_external_data(path, proto, streamed)
        streamed = {}
        _note(f"the model is beyond protobuf's 2 GB limit: its large tensors are in {os.path.basename(data_path)} "
              "beside it (ONNX external data; keep the two files together)")
    try:
        with atomic_open(path) as fh:
            _write_streamed(fh, proto, streamed, external=data_path is not None)
    except BaseException:
        if data_path is not None:  # no data file without the model that reads it
            os.remove(data_path)
        raise


def build_onnx(model: ModelFile, weights: str = "float", int4: bool = True, keep_opset: bool = False,
               matmul_nbits: bool = False, matmul_integer: bool = False):
    """The decoded ModelProto (weights filled in, QDQ applied when asked; module docstring)."""
    return _build(model, weights, int4, keep_opset, matmul_nbits, None, matmul_integer)


def _build(model: ModelFile, weights: str, int4: bool, keep_opset: bool, matmul_nbits: bool, streamed: dict | None,
           matmul_integer: bool = False):
    """build_onnx; with `streamed` (a dict), the main graph's large tensors are left without data and
    registered there as name -> (byte count, function giving the bytes) for _write_streamed."""
    if weights not in WEIGHT_MODES:
        raise CdlInputError(f"weights must be one of {', '.join(WEIGHT_MODES)}, got {weights!r}")
    if matmul_nbits and weights != "qdq":
        raise CdlInputError("matmul_nbits applies to integer weights (weights='qdq')")
    if matmul_integer and (weights != "qdq" or matmul_nbits):
        raise CdlInputError("matmul_integer applies to integer weights (weights='qdq'), without matmul_nbits")
    if model.metadata.get("deploy.grid") == "int8":
        int4 = False  # encoded for int8 deployment: levels that happen to fit int4 stay int8, opset kept
    section = graph_section(model)
    if section is None:
        raise CdlInputError("this container carries no ONNX graph (it was encoded from a state_dict); "
                            "decode it to .pt or .safetensors, or re-encode it with --arch NAME")
    onnx = _onnx()
    try:
        proto = onnx.load_from_string(section[2])
    except Exception as exc:
        raise CdlFormatError(f"ONNX graph section {section[0]!r} is not a valid ONNX model ({str(exc)[:200]})") from None
    records = {r.name: r for r in model.records}
    if weights == "qdq":
        if matmul_nbits:
            _apply_matmul_nbits(proto, records, int4, streamed)
        if matmul_integer:
            _apply_matmul_integer(proto, records, streamed)
        proto = _qdq_opset(proto, records, int4 and not keep_opset, keep_opset)
        _apply_qdq(proto, records, int4 and not keep_opset, streamed)
    _fill_float(proto, records, streamed=streamed)
    activations = _activation_section(model)
    if activations:
        _apply_activation_qdq(proto, activations)
    return proto


# ------------------------------------------------------------------------------------------------
# Streaming: the big tensors go from the decoded arrays to the file, never through the proto
# ------------------------------------------------------------------------------------------------

# Main-graph tensors of this many elements or more are written by _write_streamed. Shape constants
# (which checks and shape inference need as values) are far smaller.
STREAM_MIN_ELEMENTS = 4096
PROTOBUF_LIMIT = 2**31 - 1  # protobuf (and so onnx.load) cannot read a larger message
# Above this the streamed tensors go to ONNX external data, "<model file>.data" beside the model.
EXTERNAL_DATA_THRESHOLD = PROTOBUF_LIMIT
EXTERNAL_DATA_ALIGNMENT = 4096  # each tensor starts on a page, so runtimes can memory-map it
_GRAPH_FIELD, _INITIALIZER_FIELD, _RAW_DATA_FIELD = b"\x3a", b"\x2a", b"\x4a"  # keys: fields 7, 5, 9, length-delimited


def _stream_later(tensor, streamed: dict, nbytes: int, produce) -> None:
    """Leave `tensor` without data (name, type and dims only); its bytes come from produce() when written:
    an array, or an iterator of arrays whose bytes follow each other (one piece held at a time)."""
    if tensor.HasField("data_location"):  # a container reference: what _set_data leaves, without the data
        del tensor.external_data[:]
        tensor.data_location = 0
    streamed[tensor.name] = (nbytes, produce)


def _write_produced(fh, name: str, nbytes: int, produce) -> None:
    """Write what produce() gives (an array or arrays in pieces), exactly the `nbytes` announced."""
    produced = produce()
    written = 0
    for piece in ((produced,) if isinstance(produced, np.ndarray) else produced):
        data = memoryview(np.ascontiguousarray(piece)).cast("B")
        written += data.nbytes
        if written > nbytes:
            break
        fh.write(data)
    if written != nbytes:  # a bug, never input: the recorded lengths would be wrong (the file is discarded)
        raise AssertionError(f"tensor {name!r}: {written} bytes or more, {nbytes} announced")


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        low, n = n & 0x7F, n >> 7
        out.append(low | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _approximate_size(proto, streamed: dict) -> int:
    """The serialized model's size to within a few bytes per streamed tensor (field keys and lengths)."""
    return proto.ByteSize() + sum(nbytes + 16 for nbytes, _ in streamed.values())


def _write_external_data(path: str, proto, streamed: dict) -> str:
    """Write the streamed tensors' bytes (atomically) to "<path>.data" and point the tensors at it."""
    data_path = path + ".data"
    location = os.path.basename(data_path)
    offset = 0
    with atomic_open(data_path) as fh:
        for tensor in proto.graph.initializer:
            if tensor.name not in streamed:
                continue
            padding = -offset % EXTERNAL_DATA_ALIGNMENT
            fh.write(b"\0" * padding)
            offset += padding
            nbytes, produce = streamed[tensor.name]
            _write_produced(fh, tensor.name, nbytes, produce)
            del tensor.external_data[:]
            tensor.data_location = 1  # TensorProto.EXTERNAL
            for key, value in (("location", location), ("offset", str(offset)), ("length", str(nbytes))):
                entry = tensor.external_data.add()
                entry.key, entry.value = key, value
            offset += nbytes
    return data_path


def _write_streamed(fh, proto, streamed: dict, external: bool = False) -> None:
    """Serialize `proto` to `fh`, the streamed tensors' data straight from their arrays.

    Protobuf readers accept fields in any order, so the model is written as its other fields, then its
    graph: the graph's other fields, then every initializer in its order. Each length is known before
    it is written; peak memory is the proto without its big tensors plus one tensor's bytes. The bytes
    are deterministic (the same model gives the same file)."""
    graph = proto.graph
    initializers = list(graph.initializer)
    del graph.initializer[:]
    graph_head = graph.SerializeToString()
    proto.ClearField("graph")
    model_head = proto.SerializeToString()
    pieces = []  # (tensor, head bytes or None, size of the serialized TensorProto)
    for tensor in initializers:
        if tensor.name in streamed:
            nbytes = streamed[tensor.name][0]
            head = tensor.SerializeToString()
            pieces.append((tensor, head, len(head) + 1 + len(_varint(nbytes)) + nbytes))
        else:
            pieces.append((tensor, None, tensor.ByteSize()))
    graph_size = len(graph_head) + sum(1 + len(_varint(size)) + size for _, _, size in pieces)
    total = len(model_head) + 1 + len(_varint(graph_size)) + graph_size
    if total > PROTOBUF_LIMIT:
        raise CdlInputError(f"the decoded ONNX model would be {total:,} bytes, beyond protobuf's 2 GB limit, which "
                            "onnx and onnxruntime cannot read" + (" (even with its large tensors as external "
                            "data)" if external else "") + "; decode to .safetensors instead")
    fh.write(model_head)
    fh.write(_GRAPH_FIELD + _varint(graph_size))
    fh.write(graph_head)
    for tensor, head, size in pieces:
        fh.write(_INITIALIZER_FIELD + _varint(size))
        if head is None:
            fh.write(tensor.SerializeToString())
            continue
        nbytes, produce = streamed[tensor.name]
        fh.write(head)
        fh.write(_RAW_DATA_FIELD + _varint(nbytes))
        _write_produced(fh, tensor.name, nbytes, produce)


def _checkable(proto, streamed: dict):
    """A copy for onnx.checker: the streamed tensors (which have no data yet) become graph inputs of
    their type and shape, so every node input is still defined. Small: the big tensors carry no data."""
    from onnx import helper

    probe = type(proto)()
    probe.CopyFrom(proto)
    graph = probe.graph
    declared = {v.name for v in graph.input}
    moved = [t for t in graph.initializer if t.name in streamed]
    kept = [t for t in graph.initializer if t.name not in streamed]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    graph.input.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                       for t in moved if t.name not in declared)
    return probe


# ------------------------------------------------------------------------------------------------
# Float weights
# ------------------------------------------------------------------------------------------------

def _record_for(tensor, records: dict[str, TensorRecord]) -> TensorRecord | None:
    ref = reference_of(tensor)
    if ref is None:
        return None
    rec = records.get(ref)
    if rec is None:
        raise CdlFormatError(f"the ONNX graph references tensor {ref!r}, which the container does not hold")
    if tuple(tensor.dims) != rec.shape:
        raise CdlFormatError(f"ONNX tensor {tensor.name!r} has dims {tuple(tensor.dims)} but container tensor "
                             f"{ref!r} has shape {rec.shape}")
    want = ONNX_TO_DTYPE.get(tensor.data_type)
    if want is None or (want != rec.dtype and not (tensor.data_type in FLOAT_ONNX_TYPES and rec.is_float)):
        raise CdlFormatError(f"ONNX tensor {tensor.name!r} of type {tensor.data_type} cannot take the values of "
                             f"container tensor {ref!r} ({rec.dtype})")
    return rec


def _set_data(tensor, raw: bytes) -> None:
    del tensor.external_data[:]
    tensor.data_location = 0
    tensor.raw_data = raw


def _fill_float(proto, records: dict[str, TensorRecord], max_elements: int | None = None,
                streamed: dict | None = None) -> None:
    """Decoded values into every referenced tensor (only those of at most `max_elements` if given;
    the main graph's large ones registered in `streamed` instead, when given)."""
    if streamed is not None:
        for tensor in proto.graph.initializer:
            rec = _record_for(tensor, records)
            if rec is not None and rec.numel >= STREAM_MIN_ELEMENTS:
                data_type = tensor.data_type
                _stream_later(tensor, streamed, rec.numel * storage_dtype(ONNX_TO_DTYPE[data_type]).itemsize,
                              lambda rec=rec, data_type=data_type: _float_array(rec, data_type))
    for tensor in _all_tensors(proto):
        rec = _record_for(tensor, records)  # None for the streamed ones: they no longer reference the container
        if rec is None or (max_elements is not None and rec.numel > max_elements):
            continue
        _set_data(tensor, _float_array(rec, tensor.data_type).tobytes())


def _float_array(rec: TensorRecord, data_type: int) -> np.ndarray:
    """The record's decoded values in ONNX type `data_type`, contiguous little-endian (no copy if already)."""
    want = ONNX_TO_DTYPE[data_type]
    array = rec.array if want == rec.dtype else from_float64(to_float64(rec.array, rec.dtype), want)
    return np.ascontiguousarray(array).astype(array.dtype.newbyteorder("<"), copy=False)


def _all_tensors(proto):
    for graph, _ in iter_graphs(proto.graph):
        yield from graph.initializer
        for node in graph.node:
            for attr in node.attribute:
                if attr.HasField("t"):
                    yield attr.t


# ------------------------------------------------------------------------------------------------
# Integer weights + DequantizeLinear
# ------------------------------------------------------------------------------------------------

def _opset(proto) -> int:
    for o in proto.opset_import:
        if o.domain in ("", "ai.onnx"):
            return o.version
    return 0


def _upgrade_opset(proto, records, target: int, why: str):
    """Convert to opset `target`; on failure keep the model as it is (narrower types then fall back)."""
    try:
        from onnx import version_converter

        upgraded = version_converter.convert_version(proto, target)
        if _opset(upgraded) != target:
            raise ValueError("opset unchanged")
        if target >= 21 and upgraded.ir_version < 10:
            upgraded.ir_version = 10  # int4 / int16 DequantizeLinear needs IR 10
        _reconcile_output_shapes(upgraded, records)
        return upgraded  # checked as a whole by write_onnx once the weights are in
    except Exception as exc:
        _note(f"could not upgrade the ONNX graph from opset {_opset(proto)} to {target} for {why} "
              f"({str(exc)[:120]}); keeping opset {_opset(proto)} (those weights use a wider type or stay float)")
        return proto


SHAPE_CONSTANT_ELEMENTS = 1024  # tensors this small may be the shapes Reshape & co. read


def _reconcile_output_shapes(proto, records) -> None:
    """Some exported models declare an output shape their graph does not compute (ddddocr's recogniser:
    rank 2 declared, rank 3 computed and returned by onnxruntime). Older opsets hide it from shape
    inference; after an upgrade the checker's full check fails on it. The inferred shape replaces a
    declared one whose rank or fixed sizes it contradicts."""
    onnx = _onnx()
    probe = type(proto)()
    probe.CopyFrom(proto)  # the stripped graph: no weights, small; its shape constants filled in
    _fill_float(probe, records, SHAPE_CONSTANT_ELEMENTS)
    for out in probe.graph.output:
        out.type.tensor_type.ClearField("shape")
    inferred = {o.name: o for o in onnx.shape_inference.infer_shapes(probe).graph.output}
    for out in proto.graph.output:
        got = inferred.get(out.name)
        if got is None or not out.type.tensor_type.HasField("shape") or not got.type.tensor_type.HasField("shape"):
            continue
        declared, computed = out.type.tensor_type.shape.dim, got.type.tensor_type.shape.dim
        if len(declared) != len(computed) or any(
                a.HasField("dim_value") and b.HasField("dim_value") and a.dim_value != b.dim_value
                for a, b in zip(declared, computed)):
            was = _dims(declared)
            out.type.tensor_type.shape.CopyFrom(got.type.tensor_type.shape)
            for dim in out.type.tensor_type.shape.dim:
                if dim.HasField("dim_param"):
                    dim.ClearField("dim_param")  # inference's made-up names ("unk__80") say nothing
            _note(f"graph output {out.name!r} is declared with shape {was} but the graph computes {_dims(declared)}; "
                  "the declaration was corrected so that the upgraded model passes the checker")


def _dims(dims) -> str:
    return "[" + ", ".join(str(d.dim_value) if d.HasField("dim_value") else (d.dim_param or "?") for d in dims) + "]"


def _quant_params(rec: TensorRecord):
    """The decoded tensor's typed quantization parameters (validated when it was dequantized)."""
    return from_json(rec.quant, rec.shape, rec.dtype, rec.name)


def _quantized(rec: TensorRecord | None) -> bool:
    """Value = level x step (per tensor or per channel): expressible as DequantizeLinear."""
    return rec is not None and rec.levels is not None and isinstance(_quant_params(rec), (UniformParams, ChannelParams))


def _qdq_opset(proto, records, int4: bool, keep_opset: bool):
    """The model at the opset its narrowest weight types need: kept unless int4 / int16 levels (21) truly
    need more and keep_opset allows it; each decision is said in a note. Per-channel steps below opset
    13 need no upgrade: _qdq_plan writes them as int8 -> Cast -> Mul."""
    opset = _opset(proto)
    needs: dict[int, list[str]] = {}   # opset -> the reasons that need it
    wide: list[tuple[int, str]] = []   # (largest |level|, name) of tensors beyond int8
    for tensor in _all_tensors(proto):
        rec = records.get(reference_of(tensor) or "")
        if not (_quantized(rec) and rec.levels.size) or tensor.data_type == 11:
            continue
        kind = _integer_type(rec.levels, 21, int4)
        if kind in (INT16, INT32):
            wide.append((max(-int(rec.levels.min()), int(rec.levels.max())), rec.name))  # no |levels| copy
        if kind in (INT4, INT16):
            needs.setdefault(21, []).append("int4 levels" if kind == INT4 else "int16 levels")
    target = max(needs, default=opset)
    if target > opset and not keep_opset:
        reasons = Counter(reason for need, why in needs.items() if need > opset for reason in why)
        why = "; ".join(f"{n} tensor(s) with {reason}" for reason, n in reasons.items())
        upgraded = _upgrade_opset(proto, records, target, why)
        if _opset(upgraded) == target:
            _note(f"the model was moved from opset {opset} to {target} (IR {upgraded.ir_version}) for {why}; "
                  f"decode with --keep-opset to keep opset {opset}")
        proto = upgraded
    if wide:
        peak, name = max(wide)
        fate = "int16/int32 DequantizeLinear" if _opset(proto) >= 21 else "int16 + Cast/Mul (float beyond int16)"
        _note(f"{len(wide)} weight tensor(s) have levels beyond int8 (largest |level| {peak}, in {name!r}) and are "
              f"written as {fate}; for int8 weights that keep the opset, encode with --deploy int8")
    return proto


def _integer_type(levels: np.ndarray, opset: int, int4: bool) -> int | None:
    lo, hi = (int(levels.min()), int(levels.max())) if levels.size else (0, 0)
    for kind in (INT4, INT8, INT16, INT32):
        if kind == INT4 and not int4:
            continue
        if _INT_MIN_OPSET[kind] <= opset and _INT_RANGES[kind][0] <= lo and hi <= _INT_RANGES[kind][1]:
            return kind
    return None


def _pack_int4(levels: np.ndarray) -> np.ndarray:
    """Two signed 4-bit values per byte, the first in the low nibble (ONNX INT4 layout)."""
    nibbles = (levels.astype(np.int8) & 0xF).astype(np.uint8)  # int4 levels: exact in int8
    if nibbles.size % 2:
        nibbles = np.concatenate([nibbles, np.zeros(1, np.uint8)])
    return nibbles[0::2] | (nibbles[1::2] << 4)


def _integer_array(levels: np.ndarray, kind: int) -> np.ndarray:
    """The levels as ONNX stores integer type `kind` (little-endian; int4 packed): the kept levels
    themselves, not a copy, when they already have that type (the streamed writer reads them as they are);
    LazyLevels are decoded straight into that type."""
    if kind == INT4:
        return _pack_int4(level_array(levels, np.int8))
    return level_array(levels, {INT8: "i1", INT16: "<i2", INT32: "<i4"}[kind])


_INT_DTYPES = {INT4: np.int8, INT8: np.dtype("i1"), INT16: np.dtype("<i2"), INT32: np.dtype("<i4")}


def _integer_pieces(levels, kind: int):
    """_integer_array's bytes in pieces: LazyLevels block by block as they are decoded (int4: packed
    across the blocks' ends), an array whole."""
    if not isinstance(levels, LazyLevels):
        yield _integer_array(levels, kind)
        return
    odd = np.zeros(0, np.int8)  # int4: a level waiting for the next block's first one (its high nibble)
    for block in levels.blocks():
        block = block.astype(_INT_DTYPES[kind])  # within the levels' range, which fits `kind`
        if kind == INT4:
            block = np.concatenate([odd, block]) if odd.size else block
            even = block.size - block.size % 2
            odd = block[even:]
            block = _pack_int4(block[:even])
        yield block
    if odd.size:
        yield _pack_int4(odd)


def _scale_tensor(helper, name: str, rec: TensorRecord, scale_type: int, broadcast_rank: int | None = None):
    """The step(s) in `scale_type`: a scalar, DequantizeLinear's 1-D per-channel scales, or (broadcast_rank)
    per-channel scales shaped to broadcast against the tensor in a Mul."""
    params = _quant_params(rec)
    steps = np.asarray(steps_of(params), dtype=np.float64)
    values = from_float64(steps, ONNX_TO_DTYPE[scale_type])
    dims = [len(steps)] if isinstance(params, ChannelParams) else []
    if dims and broadcast_rank is not None:
        dims = [len(steps) if i == params.axis else 1 for i in range(broadcast_rank)]
    return _raw_tensor(name, scale_type, dims, np.ascontiguousarray(values).tobytes())


def _raw_tensor(name: str, data_type: int, dims, raw: bytes):
    from onnx import TensorProto

    t = TensorProto(name=name, data_type=data_type, dims=list(dims))
    t.raw_data = raw
    return t


class _Names:
    """Fresh value names that collide with nothing already in the model."""

    def __init__(self, proto):
        self.used = set()
        for graph, _ in iter_graphs(proto.graph):
            self.used.update(t.name for t in graph.initializer)
            self.used.update(v.name for v in list(graph.input) + list(graph.output) + list(graph.value_info))
            for node in graph.node:
                self.used.update(node.output)
                self.used.update(node.input)
                self.used.add(node.name)

    def fresh(self, base: str) -> str:
        name, n = base, 1
        while name in self.used:
            n += 1
            name = f"{base}_{n}"
        self.used.add(name)
        return name


# Integers up to this magnitude are exact in each float type (float32, float16, bfloat16, float64).
_EXACT_INTEGERS = {1: 2**24, 10: 2**11, 16: 2**8, 11: 2**53}


def _qdq_plan(tensor, rec: TensorRecord, opset: int, int4: bool):
    """(integer type, scale type, axis or None, cast) for one tensor, or None to keep it float.

    DequantizeLinear where the opset has it for this tensor (no float64 output; float16/bfloat16
    scales from opset 19; per-channel from 13; int16 from 21). Otherwise, and instead of int32,
    cast=True: Cast(int8/int16 -> float type) -> Mul(step), the same product with the same single
    rounding, at any opset (bfloat16 from 13), so a kept opset still stores integers."""
    target, axis = tensor.data_type, _quant_params(rec).axis
    dequantize = target != 11 and not (target in (10, 16) and opset < 19) and not (axis is not None and opset < 13)
    kind = _integer_type(rec.levels, opset, int4) if dequantize else None
    if kind is not None and kind != INT32:
        return kind, target, axis, False
    lo, hi = int(rec.levels.min()), int(rec.levels.max())
    narrow = next((k for k in (INT8, INT16) if _INT_RANGES[k][0] <= lo and hi <= _INT_RANGES[k][1]), None)
    if narrow is not None and max(-lo, hi) <= _EXACT_INTEGERS[target] and not (target == 16 and opset < 13):
        return narrow, target, axis, True
    return (kind, target, axis, False) if kind is not None else None


# Measured with onnxruntime 1.32: its default optimisations fuse DequantizeLinear -> MatMul (int4 and
# per-channel int8) into MatMulNBits, which at accuracy level 4 also quantizes the activations to int8
# (MiniLM: max logit difference 0.02). A graph-side barrier would also cost the int8 kernel, so the
# session option that keeps both is said instead (docs/decoders.md).
ORT_MATMUL_NOTE = ("{n} MatMul node(s) read integer weights: onnxruntime's default optimisations fuse them into "
                   "MatMulNBits with int8 activations (slightly different outputs); for this model's float "
                   "arithmetic set the session option session.qdq_matmulnbits_accuracy_level=0")


def _apply_qdq(proto, records: dict[str, TensorRecord], int4: bool, streamed: dict | None = None) -> None:
    from onnx import helper

    opset = _opset(proto)
    names = _Names(proto)
    fused_by_ort = 0
    for graph, path in iter_graphs(proto.graph):
        new_nodes, kept_inits, new_inits = [], [], []
        graph_inputs = {v.name for v in graph.input}
        dropped_inputs = set()
        for init in graph.initializer:
            rec = _record_for(init, records)
            plan = _qdq_plan(init, rec, opset, int4) if _quantized(rec) else None
            if plan is None:
                kept_inits.append(init)
                continue
            ints, scale, computed = _dequantize_node(helper, names, init.name, rec, plan,
                                                     streamed if path == "" else None)
            new_inits += [ints, scale]
            new_nodes += computed
            if init.name in graph_inputs:
                dropped_inputs.add(init.name)  # IR < 4 style: an initializer listed as an input
        nodes = []
        for node in graph.node:
            t = _constant_tensor(node)
            rec = _record_for(t, records) if t is not None else None
            plan = _qdq_plan(t, rec, opset, int4) if _quantized(rec) else None
            if plan is None:
                nodes.append(node)
                continue
            ints, scale, computed = _dequantize_node(helper, names, node.output[0], rec, plan)
            new_inits += [ints, scale]
            nodes += computed  # the Constant's place in topological order
        if not new_nodes and not new_inits:
            continue
        del graph.initializer[:]
        graph.initializer.extend(kept_inits + new_inits)
        del graph.node[:]
        graph.node.extend(new_nodes + nodes)
        if dropped_inputs:
            keep = [v for v in graph.input if v.name not in dropped_inputs]
            del graph.input[:]
            graph.input.extend(keep)
        dequantized = {n.output[0] for n in new_nodes + nodes if n.op_type == "DequantizeLinear"}
        fused_by_ort += sum(1 for n in graph.node if n.op_type == "MatMul" and set(n.input) & dequantized)
    if fused_by_ort:
        _note(ORT_MATMUL_NOTE.format(n=fused_by_ort))


def _constant_tensor(node):
    if node.op_type != "Constant" or node.domain not in ("", "ai.onnx"):
        return None
    for attr in node.attribute:
        if attr.name == "value" and attr.HasField("t"):
            return attr.t
    return None


def _integer_tensor(name: str, rec: TensorRecord, kind: int, streamed: dict | None = None):
    """The record's levels as an initializer of integer type `kind` (streamed when large and `streamed` is given)."""
    if streamed is not None and rec.numel >= STREAM_MIN_ELEMENTS:
        ints = _raw_tensor(name, kind, rec.shape, b"")
        ints.ClearField("raw_data")  # no data until _write_streamed asks for it
        nbytes = (rec.numel + 1) // 2 if kind == INT4 else rec.numel * {INT8: 1, INT16: 2, INT32: 4}[kind]
        _stream_later(ints, streamed, nbytes, lambda: _integer_pieces(rec.levels, kind))
        return ints
    return _raw_tensor(name, kind, rec.shape, _integer_array(rec.levels, kind).tobytes())


def _dequantize_node(helper, names: _Names, output: str, rec: TensorRecord, plan, streamed: dict | None = None):
    """(integer tensor, scale tensor, [nodes computing `output` from them]) for one planned tensor."""
    kind, scale_type, axis, cast = plan
    ints = _integer_tensor(names.fresh(f"{output}_quantized"), rec, kind, streamed)
    scale = _scale_tensor(helper, names.fresh(f"{output}_scale"), rec, scale_type, len(rec.shape) if cast else None)
    if cast:
        floats = names.fresh(f"{output}_levels")
        return ints, scale, [helper.make_node("Cast", [ints.name], [floats], to=scale_type,
                                              name=names.fresh(f"{output}_Cast")),
                             helper.make_node("Mul", [floats, scale.name], [output], name=names.fresh(f"{output}_Mul"))]
    attrs = {"axis": int(axis)} if axis is not None else {}
    node = helper.make_node("DequantizeLinear", [ints.name, scale.name], [output],
                            name=names.fresh(f"{output}_DequantizeLinear"), **attrs)
    return ints, scale, [node]


# ------------------------------------------------------------------------------------------------
# onnxruntime's MatMulNBits (com.microsoft) for MatMul weights
# ------------------------------------------------------------------------------------------------

NBITS_BLOCKS = (256, 128, 64, 32, 16)  # block sizes onnxruntime's MatMulNBits kernels support


def _coded_matmul_weight(node, inits: dict, uses: Counter, records: dict[str, TensorRecord]):
    """(initializer, record) when `node` is a MatMul(A, W) whose W is a coded float32 [K, N] initializer
    (one step, or one per output column) used by nothing else: what MatMulNBits and MatMulInteger can
    take over; (None, None) otherwise."""
    if node.op_type != "MatMul" or node.domain not in ("", "ai.onnx") or len(node.input) != 2:
        return None, None
    init = inits.get(node.input[1])
    if init is None or uses[init.name] != 1 or init.data_type != 1 or len(init.dims) != 2:
        return None, None
    rec = _record_for(init, records)
    if not (_quantized(rec) and rec.levels.size) or _quant_params(rec).axis not in (None, 1):
        return None, None
    return init, rec


def _apply_matmul_nbits(proto, records: dict[str, TensorRecord], int4: bool, streamed: dict | None = None) -> None:
    """MatMul(A, W) with W a quantized float32 [K, N] initializer (one step, or one per output column)
    whose levels fit 4 (int4 allowed) or 8 bits, used by nothing else -> MatMulNBits(A, B, scales) with
    accuracy_level 0: float activations, the same product as DequantizeLinear -> MatMul, and an
    integer kernel under onnxruntime's default options. Other weights are left to _apply_qdq. With
    `streamed`, the large B tensors are packed when written (_write_streamed), one at a time."""
    from onnx import helper

    names = _Names(proto)
    converted = 0
    graph = proto.graph
    uses = Counter(name for node in graph.node for name in node.input)
    inits = {t.name: t for t in graph.initializer}
    taken = set()
    for index, node in enumerate(graph.node):
        init, rec = _coded_matmul_weight(node, inits, uses, records)
        if rec is None:
            continue
        bits = next((b for b in ((4, 8) if int4 else (8,)) if -(1 << (b - 1)) <= rec.levels.min()
                     and rec.levels.max() < (1 << (b - 1))), None)
        if bits is None:
            continue
        k, n = rec.shape
        block, blocks = _nbits_layout(k, bits)
        scales = _nbits_scales(rec, blocks)
        dims = (n, blocks, block * bits // 8)
        if streamed is not None and rec.numel >= STREAM_MIN_ELEMENTS:
            b = _raw_tensor(names.fresh(f"{init.name}_nbits"), 2, dims, b"")
            b.ClearField("raw_data")  # no data until _write_streamed asks for it
            _stream_later(b, streamed, math.prod(dims), lambda rec=rec, bits=bits: _nbits_packed(rec, bits))
        else:
            b = _raw_tensor(names.fresh(f"{init.name}_nbits"), 2, dims, _nbits_packed(rec, bits).tobytes())
        s = _raw_tensor(names.fresh(f"{init.name}_nbits_scales"), 1, scales.shape, scales.tobytes())
        graph.node[index].CopyFrom(helper.make_node(
            "MatMulNBits", [node.input[0], b.name, s.name], list(node.output),
            name=node.name or names.fresh("MatMulNBits"), domain="com.microsoft",
            K=k, N=n, bits=bits, block_size=block, accuracy_level=0))
        graph.initializer.extend([b, s])
        taken.add(init.name)
        converted += 1
    if converted:
        keep = [t for t in graph.initializer if t.name not in taken]
        del graph.initializer[:]
        graph.initializer.extend(keep)
        if not any(o.domain == "com.microsoft" for o in proto.opset_import):
            proto.opset_import.append(helper.make_opsetid("com.microsoft", 1))
        _note(f"{converted} MatMul node(s) became com.microsoft MatMulNBits (onnxruntime only; float activations)")


def _apply_matmul_integer(proto, records: dict[str, TensorRecord], streamed: dict | None = None) -> None:
    """MatMul(A, W) with W a quantized float32 [K, N] initializer (one step, or one per output column)
    whose levels fit int8, used by nothing else -> DynamicQuantizeLinear(A) -> MatMulInteger(A_q, W_q,
    A_zero) -> Cast -> Mul(A_scale x step): the coded int8 weights exactly, the activations quantized to
    uint8 on every run (the path of onnxruntime.quantization.quantize_dynamic, which onnxruntime runs as
    one integer kernel: MiniLM 1.7-1.9x faster than fp32 on x86, one thread). Other weights are left to
    _apply_qdq."""
    from onnx import helper

    if _opset(proto) < 11:  # DynamicQuantizeLinear
        _note(f"MatMulInteger needs opset 11 (DynamicQuantizeLinear), the model has {_opset(proto)}: "
              "its MatMul weights stay DequantizeLinear")
        return
    names = _Names(proto)
    graph = proto.graph
    uses = Counter(name for node in graph.node for name in node.input)
    inits = {t.name: t for t in graph.initializer}
    nodes, added, taken = [], [], set()
    for node in graph.node:
        init, rec = _coded_matmul_weight(node, inits, uses, records)
        if rec is None or not (-128 <= rec.levels.min() and rec.levels.max() <= 127):
            nodes.append(node)
            continue
        ints = _integer_tensor(names.fresh(f"{init.name}_quantized"), rec, INT8, streamed)
        scale = _scale_tensor(helper, names.fresh(f"{init.name}_scale"), rec, 1)  # scalar or [N]: broadcasts
        q, a_scale, a_zero, y32, y, s = (names.fresh(f"{init.name}_{x}") for x in
                                         ("input_quantized", "input_scale", "input_zero_point", "int32", "float",
                                          "output_scale"))
        nodes += [helper.make_node("DynamicQuantizeLinear", [node.input[0]], [q, a_scale, a_zero],
                                   name=names.fresh(f"{init.name}_DynamicQuantizeLinear")),
                  helper.make_node("MatMulInteger", [q, ints.name, a_zero], [y32], name=names.fresh(f"{init.name}_MatMulInteger")),
                  helper.make_node("Cast", [y32], [y], to=1, name=names.fresh(f"{init.name}_Cast")),
                  helper.make_node("Mul", [a_scale, scale.name], [s], name=names.fresh(f"{init.name}_Mul")),
                  helper.make_node("Mul", [y, s], list(node.output), name=node.name or names.fresh("MatMulInteger_Mul"))]
        added += [ints, scale]
        taken.add(init.name)
    if taken:
        keep = [t for t in graph.initializer if t.name not in taken]
        del graph.initializer[:]
        graph.initializer.extend(keep + added)
        del graph.node[:]
        graph.node.extend(nodes)
        _note(f"{len(taken)} MatMul node(s) became DynamicQuantizeLinear -> MatMulInteger: the coded int8 weights, "
              "activations quantized to uint8 on every run (outputs differ from the float decode by that rounding)")


def _nbits_layout(k: int, bits: int) -> tuple[int, int]:
    """(block size, blocks per column) of MatMulNBits' B for K = k: the supported block size with the fewest bytes."""
    block = min(NBITS_BLOCKS, key=lambda bs: (-(-k // bs) * (bs * bits // 8 + 4), -bs))
    return block, -(-k // block)


def _nbits_packed(rec: TensorRecord, bits: int) -> np.ndarray:
    """MatMulNBits' B [N, blocks, block*bits/8] (uint8, level + 2^(bits-1), column n of W in row n, K padded
    with zero levels; 4 bits: low nibble first)."""
    k, n = rec.shape
    block, blocks = _nbits_layout(k, bits)
    zero = 1 << (bits - 1)
    columns = np.full((n, blocks * block), zero, np.uint8)
    columns[:, :k] = (level_array(rec.levels).reshape(k, n).T.astype(np.int16) + zero).astype(np.uint8)  # no int8 wrap
    if bits == 4:
        pairs = columns.reshape(n, blocks, block // 2, 2)
        packed = pairs[..., 0] | (pairs[..., 1] << 4)
    else:
        packed = columns.reshape(n, blocks, block)
    return np.ascontiguousarray(packed)


def _nbits_scales(rec: TensorRecord, blocks: int) -> np.ndarray:
    """MatMulNBits' scales [N * blocks] (float32; each column's step, once per block)."""
    n = rec.shape[1]
    steps = np.broadcast_to(np.asarray(steps_of(_quant_params(rec)), np.float64), (n,))
    return np.repeat(steps, blocks).astype(np.float32)


# ------------------------------------------------------------------------------------------------
# CDL activation quantizers
# ------------------------------------------------------------------------------------------------

def parse_activation_section(data: bytes) -> list[dict]:
    """Validate the "cdl.activations" json section (formats/graph-sections.md)."""
    try:
        doc = json.loads(data.decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, 4,300+ digit numbers, deep nesting
        raise CdlFormatError(f"section {ACTIVATIONS_SECTION!r} is not valid UTF-8 JSON: {str(exc)[:120]}") from None
    items = doc.get("activations") if isinstance(doc, dict) else None
    if not isinstance(items, list) or doc.get("version") != 1:
        raise CdlFormatError(f"section {ACTIVATIONS_SECTION!r}: expected {{\"version\": 1, \"activations\": [...]}}")
    out = []
    for i, item in enumerate(items):
        what = f"section {ACTIVATIONS_SECTION!r} entry #{i}"
        if not isinstance(item, dict) or not isinstance(item.get("module"), str):
            raise CdlFormatError(f"{what}: needs a string 'module'")
        s, bits = item.get("s"), item.get("bits")
        if not isinstance(s, (int, float)) or isinstance(s, bool) or not np.isfinite(s) or s <= 0:
            raise CdlFormatError(f"{what}: 's' must be a finite positive number")
        if type(bits) is not int or not 1 <= bits <= 8:
            raise CdlFormatError(f"{what}: 'bits' must be an integer in [1, 8]")
        if item.get("position", "output") not in ("output", "input"):
            raise CdlFormatError(f"{what}: 'position' must be 'output' or 'input'")
        out.append(item)
    return out


def _activation_section(model: ModelFile) -> list[dict]:
    for name, kind, data in model.sections:
        if name == ACTIVATIONS_SECTION:
            return parse_activation_section(data)
    return []


def _module_tensor(graph, module: str, position: str) -> str:
    """The ONNX value that is the output (or input) of torch module `module`, by exporter node scope."""
    scope = "/" + module.replace(".", "/") + "/"
    nodes = [n for n in graph.node if n.name.startswith(scope)]
    if not nodes:
        raise CdlFormatError(f"activation quantizer of module {module!r}: no node of that module in the ONNX graph")
    return nodes[-1].output[0] if position == "output" else nodes[0].input[0]


def _apply_activation_qdq(proto, activations: list[dict]) -> None:
    """y = clip(round(x / s), 0, 2^b - 1) * s as QuantizeLinear -> [Clip] -> DequantizeLinear (uint8)."""
    from onnx import helper

    graph = proto.graph
    names = _Names(proto)
    for item in activations:
        position = item.get("position", "output")
        value = item.get("onnx_tensor") or _module_tensor(graph, item["module"], position)
        base = item["module"].replace(".", "_") + "_act"
        scale = helper.make_tensor(names.fresh(f"{base}_scale"), 1, [], vals=[float(np.float32(item["s"]))])
        zero = helper.make_tensor(names.fresh(f"{base}_zero_point"), 2, [], vals=[0])
        graph.initializer.extend([scale, zero])
        q = names.fresh(f"{base}_q")
        chain = [helper.make_node("QuantizeLinear", [value, scale.name, zero.name], [q], name=names.fresh(f"{base}_Quantize"))]
        if item["bits"] < 8:
            lo = helper.make_tensor(names.fresh(f"{base}_min"), 2, [], vals=[0])
            hi = helper.make_tensor(names.fresh(f"{base}_max"), 2, [], vals=[(1 << item["bits"]) - 1])
            graph.initializer.extend([lo, hi])
            clipped = names.fresh(f"{base}_clipped")
            chain.append(helper.make_node("Clip", [q, lo.name, hi.name], [clipped], name=names.fresh(f"{base}_Clip")))
            q = clipped
        dq = names.fresh(f"{base}_dq")
        chain.append(helper.make_node("DequantizeLinear", [q, scale.name, zero.name], [dq], name=names.fresh(f"{base}_Dequantize")))
        # max(y, 0) = y (y >= 0). It keeps onnxruntime's QDQ transformers (on by default) from seeing
        # DequantizeLinear -> Conv/Gemm and re-quantizing weights and biases with their own scales, which
        # moved a CDL LeNet-5's logits by 0.65: with it, default sessions compute the model's arithmetic.
        floor = helper.make_tensor(names.fresh(f"{base}_floor"), 1, [], vals=[0.0])
        graph.initializer.append(floor)
        out = names.fresh(f"{base}_float")
        chain.append(helper.make_node("Max", [dq, floor.name], [out], name=names.fresh(f"{base}_KeepFloat")))
        _splice(graph, value, out, chain)


def _splice(graph, value: str, replacement: str, chain: list) -> None:
    """Insert `chain` right after the producer of `value`; every consumer of `value` reads `replacement`."""
    nodes = list(graph.node)
    for node in nodes:
        for i, name in enumerate(node.input):
            if name == value:
                node.input[i] = replacement
    for out in graph.output:
        if out.name == value:  # the activation is a graph output: rename through an Identity
            raise CdlFormatError(f"activation quantizer on graph output {value!r} is not supported")
    producer = next((i for i, n in enumerate(nodes) if value in n.output), -1)
    nodes[producer + 1:producer + 1] = chain
    del graph.node[:]
    graph.node.extend(nodes)
