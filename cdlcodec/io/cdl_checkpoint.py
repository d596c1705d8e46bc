"""CDL / R-CDL checkpoints (formats/cdl-checkpoint.md) read as model files.

A checkpoint written by `cdlcodec train` is an ordinary state_dict plus a metadata entry
(cdlcodec.cdl_format.METADATA_KEY). Reading one gives a ModelFile whose

- sections are what graph decoders need beside the tensors: the float architecture the checkpoint
  names, exported to ONNX with its weights stripped ("model.onnx", exactly as `encode --arch`
  stores it; left out with a warning where torch/onnx cannot export it), and its activation
  quantizers as the json section "cdl.activations" (formats/graph-sections.md);
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

from ..cdl_format import is_cdl_records, read_cdl_metadata, records_as_tensors
from ..records import ModelFile, TensorRecord

ACTIVATIONS_SECTION = "cdl.activations"
MODE_KEY = "cdl.mode"


def is_cdl_model(model: ModelFile) -> bool:
    """True for a model file read as a CDL checkpoint (its metadata says so)."""
    return MODE_KEY in model.metadata


def activations_section(meta) -> tuple[str, str, bytes]:
    """The checkpoint's activation quantizers (s_l, β_l, b) as the "cdl.activations" json section."""
    items = [{"module": a.module, "index": a.index, "after": a.after, "function": "relu",
              "position": "output", "s": float(np.float32(a.s)), "beta": float(a.beta), "bits": a.bits}
             for a in meta.activations]
    doc = {"version": 1, "activations": items}
    return ACTIVATIONS_SECTION, "json", json.dumps(doc, sort_keys=True, separators=(",", ":")).encode()


def graph_section(meta, records) -> tuple[tuple[str, str, bytes] | None, dict[str, str]]:
    """(the float architecture as a weight-stripped ONNX graph section, its metadata), or (None, {})
    with a warning when it cannot be made."""
    try:
        from .. import models
        from .onnx_model import architecture_graph_section

        module = models.build(meta.architecture, **meta.architecture_kwargs)
        return architecture_graph_section(meta.architecture, records, module=module, extra_records=True)
    except Exception as exc:  # the container stays valid without a graph; say why it has none
        warnings.warn(f"CDL checkpoint: no ONNX graph stored ({type(exc).__name__}: {str(exc)[:200]}); "
                      "the container decodes to .pt / cdlcodec.load but not to .onnx")
        return None, {}


def cdl_model_file(records: list[TensorRecord], metadata: dict[str, str] | None = None) -> ModelFile | None:
    """The checkpoint's records with its sections and cdl.* metadata; None when they are not a CDL checkpoint."""
    if not is_cdl_records(records):
        return None
    meta = read_cdl_metadata(records_as_tensors(records))
    graph, graph_metadata = graph_section(meta, records)
    sections = [activations_section(meta)] if graph is None else [graph, activations_section(meta)]
    return ModelFile(list(records), sections, {**(metadata or {}), **graph_metadata, MODE_KEY: meta.mode,
                                               "architecture": meta.architecture})


def with_cdl_sections(model: ModelFile) -> ModelFile:
    """`model` unchanged, or, for a CDL checkpoint without sections of its own, as `cdl_model_file` reads it."""
    if model.sections or is_cdl_model(model):
        return model
    return cdl_model_file(model.records, model.metadata) or model
