"""CDL / R-CDL checkpoints (formats/cdl-checkpoint.md) read as model files.

A checkpoint written by `cdlcodec train` is an ordinary state_dict plus a metadata entry
(cdlcodec.cdl_format.METADATA_KEY). Reading one gives a ModelFile whose

- sections are what graph decoders need beside the tensors: the float graph of the converted model
  (CDL layers as float layers, each activation quantizer as the activation it applies; exported by
  cdlcodec.io.cdl_graph) exported to ONNX with its weights stripped ("model.onnx", as `encode --arch` stores it;
  left out with a warning where torch/onnx cannot export it) — rebuilt here from the architecture
  the checkpoint names, or taken from the checkpoint's own GRAPH_KEY entry for a model outside
  cdlcodec.models — and its activation quantizers as the json section "cdl.activations", each with
  the ONNX value it quantizes ("onnx_tensor"; formats/graph-sections.md);
- metadata says what it is: "cdl.mode" (cdl | rcdl) and "architecture", next to the graph's
  own entries. The encoder chooses the checkpoint's learned quantizers from "cdl.mode"
  (codec.encode_records), never by looking into the tensors again.

`read_model` applies `with_cdl_sections` to every state_dict it reads; code that builds records in
memory calls `cdl_model_file(records)` itself.
"""
from __future__ import annotations

import json
import warnings

import numpy as np

from ..errors import CdlInputError
from ..cdl_format import GRAPH_INFO_KEY, GRAPH_KEY, is_cdl_records, read_cdl_metadata, records_as_tensors
from ..records import ModelFile, TensorRecord

ACTIVATIONS_SECTION = "cdl.activations"
MODE_KEY = "cdl.mode"



def is_cdl_model(model: ModelFile) -> bool:
    """True for a model file read as a CDL checkpoint (its metadata says so)."""
    return MODE_KEY in model.metadata


def activations_section(meta, onnx_tensors: dict[str, str] | None = None) -> tuple[str, str, bytes]:
    """The checkpoint's activation quantizers (s_l, β_l, b) as the "cdl.activations" json section;
    `onnx_tensors` names the graph value each one quantizes (formats/graph-sections.md)."""
    items = []
    for a in meta.activations:
        item = {"module": a.module, "index": a.index, "after": a.after, "function": "relu",
                "position": "output", "s": float(np.float32(a.s)), "beta": float(a.beta), "bits": a.bits}
        if onnx_tensors and a.module in onnx_tensors:
            item["onnx_tensor"] = onnx_tensors[a.module]
        items.append(item)
    doc = {"version": 1, "activations": items}
    return ACTIVATIONS_SECTION, "json", json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def stored_graph(records) -> tuple[tuple[str, str, bytes], dict[str, str], dict[str, str]] | None:
    """The graph a checkpoint carries itself (GRAPH_KEY, a model outside cdlcodec.models, written by
    `save_checkpoint(..., example_input=...)`): (section, its metadata, {quantizer: ONNX value}), or None."""
    record = next((r for r in records if r.name == GRAPH_KEY), None)
    if record is None:
        return None
    from .onnx_model import GRAPH_SECTION_KIND, GRAPH_SECTION_NAME, _onnx

    what = f"CDL checkpoint entry {GRAPH_KEY!r}"
    if record.array.dtype != np.uint8 or record.array.ndim != 1:
        raise CdlInputError(f"{what} must be a 1-D uint8 tensor holding an ONNX graph")
    try:
        proto = _onnx().load_from_string(record.array.tobytes())
    except Exception as exc:  # protobuf's DecodeError and friends
        raise CdlInputError(f"{what} is not an ONNX model ({type(exc).__name__})") from None
    props = {p.key: p.value for p in proto.metadata_props}
    try:
        info = json.loads(props[GRAPH_INFO_KEY])
        metadata, tensors = dict(info["metadata"]), dict(info["activation_tensors"])
    except (KeyError, TypeError, ValueError, RecursionError):
        raise CdlInputError(f"{what} lacks valid {GRAPH_INFO_KEY!r} metadata") from None
    if not all(isinstance(v, str) for v in [*metadata.values(), *tensors.values(), *tensors]):
        raise CdlInputError(f"{what}: {GRAPH_INFO_KEY!r} must map strings to strings")
    keep = [p for p in proto.metadata_props if p.key != GRAPH_INFO_KEY]
    del proto.metadata_props[:]
    proto.metadata_props.extend(keep)
    return (GRAPH_SECTION_NAME, GRAPH_SECTION_KIND, proto.SerializeToString()), metadata, tensors


def graph_section(meta, records) -> tuple[tuple[str, str, bytes] | None, dict[str, str], dict[str, str]]:
    """(the float graph of the converted model as a weight-stripped ONNX section, its metadata,
    {activation quantizer: ONNX value it quantizes}); (None, {}, {}) with a warning when it cannot be
    made. A registered architecture is built and exported here (needs torch)."""
    try:
        stored = stored_graph(records)
        if stored is not None:
            return stored
        from .. import models
        from .cdl_graph import export_with_activations

        # registered architectures convert in place: each quantizer sits where its ReLU module was
        module = models.build(meta.architecture, **meta.architecture_kwargs)
        return export_with_activations(module, records, meta.architecture, [a.module for a in meta.activations])
    except Exception as exc:  # the container stays valid without a graph; say why it has none
        warnings.warn(f"CDL checkpoint: no ONNX graph stored ({type(exc).__name__}: {str(exc)[:200]}); "
                      "the container decodes to .pt / cdlcodec.load but not to .onnx")
        return None, {}, {}


def cdl_model_file(records: list[TensorRecord], metadata: dict[str, str] | None = None) -> ModelFile | None:
    """The checkpoint's records with its sections and cdl.* metadata; None when they are not a CDL checkpoint.
    A graph the checkpoint carries (GRAPH_KEY) becomes the graph section, not a tensor."""
    if not is_cdl_records(records):
        return None
    meta = read_cdl_metadata(records_as_tensors(records))
    graph, graph_metadata, onnx_tensors = graph_section(meta, records)
    activations = activations_section(meta, onnx_tensors)
    sections = [activations] if graph is None else [graph, activations]
    records = [r for r in records if r.name != GRAPH_KEY]
    return ModelFile(list(records), sections, {**(metadata or {}), **graph_metadata, MODE_KEY: meta.mode,
                                               "architecture": meta.architecture})


def with_cdl_sections(model: ModelFile) -> ModelFile:
    """`model` unchanged, or, for a CDL checkpoint without sections of its own, as `cdl_model_file` reads it."""
    if model.sections or is_cdl_model(model):
        return model
    return cdl_model_file(model.records, model.metadata) or model
