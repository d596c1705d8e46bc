"""The float graph of a CDL model exported to ONNX, with the value each activation quantizer follows.

A CDL container stores the *float* graph of the converted model with its weights stripped
(`cdl:<state_dict key>` references, formats/graph-sections.md) and its activation quantizers as
the json section "cdl.activations"; the ONNX writer fills in the decoded weights and puts
QuantizeLinear / DequantizeLinear after each quantized activation. `export_with_activations`
exports a float model whose quantized activations are ReLU / Hardtanh modules at the quantizers'
module paths and names, per quantizer, the ONNX value to quantize. To find that value whatever
the exporter calls its nodes (nested modules are scoped "/layer1/layer1.0/relu/..."), each of those
modules is exported followed by a marker node (custom domain "cdlcodec"), which is then removed;
the module keeps its path, so the exported node keeps its usual name.

Used by cdlcodec.io.cdl_checkpoint (a registered architecture, at encode time) and by
cdlcodec.cdl.export (any converted model, when its checkpoint is saved: `graph_with_info`).
"""
from __future__ import annotations

import copy
import json

from ..optional import require
require("torch", "exporting a CDL model's graph")
import torch
from torch import nn

from ..errors import CdlInputError
from ..cdl_format import GRAPH_INFO_KEY
from .onnx_model import GRAPH_SECTION_KIND, GRAPH_SECTION_NAME, _onnx, architecture_graph_section

MARK_DOMAIN = "cdlcodec"
MARK_OP = "ActivationMark"


class _Mark(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, index):
        return x.clone()

    @staticmethod
    def symbolic(g, x, index):
        out = g.op(f"{MARK_DOMAIN}::{MARK_OP}", x, index_i=index)
        out.setType(x.type())   # same shape and type as its input (the exporter cannot infer a custom op)
        return out


class _MarkedReLU(nn.ReLU):
    def forward(self, x):
        return _Mark.apply(super().forward(x), self.index)


class _MarkedHardtanh(nn.Hardtanh):
    def forward(self, x):
        return _Mark.apply(super().forward(x), self.index)


def _marked(module: nn.Module, index: int, path: str) -> nn.Module:
    if isinstance(module, nn.ReLU):
        marked = _MarkedReLU()
    elif isinstance(module, nn.Hardtanh):          # ReLU6 included
        marked = _MarkedHardtanh(module.min_val, module.max_val)
    else:
        raise CdlInputError(f"activation quantizer {path!r}: the float model has a {type(module).__name__} "
                            "there, not a ReLU / Hardtanh module")
    marked.index = index
    return marked


def _remove_marks(proto, paths: list[str]) -> dict[str, str]:
    """Splice the marker nodes out of `proto`; {module path: ONNX value its quantization follows}."""
    graph = proto.graph
    outputs = {o.name for o in graph.output}
    found: dict[str, str] = {}
    for node in [n for n in graph.node if n.domain == MARK_DOMAIN]:
        path = paths[next(a.i for a in node.attribute if a.name == "index")]
        source, marked = node.input[0], node.output[0]
        if marked in outputs:
            raise CdlInputError(f"activation quantizer {path!r} is the model's output; the ONNX writer "
                                "quantizes activations between layers only")
        if path in found:
            raise CdlInputError(f"activation quantizer {path!r} is called at several places; give each call "
                                "its own module (cdlcodec.cdl.convert does when torch.fx can trace the model)")
        for other in graph.node:
            for i, name in enumerate(other.input):
                if name == marked:
                    other.input[i] = source
        found[path] = source
    keep = [n for n in graph.node if n.domain != MARK_DOMAIN]
    del graph.node[:]
    graph.node.extend(keep)
    opsets = [o for o in proto.opset_import if o.domain != MARK_DOMAIN]
    del proto.opset_import[:]
    proto.opset_import.extend(opsets)
    missing = [p for p in paths if p not in found]
    if missing:
        raise CdlInputError(f"activation quantizers {missing[:5]} are not in the exported graph (unused?)")
    return found


def export_with_activations(module: nn.Module, records, architecture: str, activation_paths: list[str],
                            input_shape: tuple[int, ...] | None = None):
    """(graph section, its container metadata, {activation path: ONNX value}) of float `module`.

    `records`: the checkpoint's TensorRecords, loaded into (a copy of) the module and referenced by
    the graph after matching values (`architecture_graph_section`); `activation_paths`: the modules
    (ReLU / Hardtanh) whose outputs are quantized; `input_shape`: the example input's shape (else
    the module's `example_input_shape`, else the registry's shape for `architecture`).
    """
    plain = copy.deepcopy(module).cpu().eval()    # exported on the CPU, whatever device trained it
    for index, path in enumerate(activation_paths):
        try:
            current = plain.get_submodule(path)
        except AttributeError:
            raise CdlInputError(f"activation quantizer {path!r} is not a module of the float architecture") from None
        plain.set_submodule(path, _marked(current, index, path))
    (_, _, data), meta = architecture_graph_section(architecture, records, input_shape, module=plain,
                                                    extra_records=True)
    proto = _onnx().load_from_string(data)
    tensors = _remove_marks(proto, list(activation_paths))
    return (GRAPH_SECTION_NAME, GRAPH_SECTION_KIND, proto.SerializeToString()), meta, tensors


def graph_with_info(section_bytes: bytes, meta: dict, tensors: dict[str, str]) -> bytes:
    """The stripped graph with its container metadata and activation values in metadata_props: how a
    checkpoint of a model outside cdlcodec.models carries its graph (GRAPH_KEY, read by `stored_graph`)."""
    proto = _onnx().load_from_string(section_bytes)
    prop = proto.metadata_props.add()
    prop.key, prop.value = GRAPH_INFO_KEY, json.dumps({"metadata": meta, "activation_tensors": tensors},
                                                     sort_keys=True, separators=(",", ":"))
    return proto.SerializeToString()
