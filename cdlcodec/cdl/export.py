"""The ONNX graph of a converted (CDL / R-CDL) model, as the container's graph section.

A CDL container stores the *float* graph of the model with its weights stripped (`cdl:<state_dict
key>` references, formats/graph-sections.md) plus the activation quantizers as the json section
"cdl.activations"; the ONNX writer fills in the decoded weights and puts QuantizeLinear /
DequantizeLinear after each quantized activation. `float_graph_module` gives that float model for
any converted model (CDL layers back to nn.Conv/nn.Linear with the same state_dict names, each
quantizer back to the activation it applies before quantizing: ReLU, or Hardtanh(0, upper) for
ReLU6 / hardtanh). `export_cdl_graph` exports it and names, per quantizer, the ONNX value its
quantization goes after. To find that value whatever the exporter calls its nodes, each activation
is exported followed by a marker node (custom domain "cdlcodec"), which is then removed.
"""
from __future__ import annotations

import copy
import json

from ..optional import require
require("torch", "CDL training")
import torch
from torch import nn

from ..errors import CdlInputError
from ..io.cdl_checkpoint import GRAPH_INFO_KEY
from .layers import WEIGHT_LAYERS, ActivationQuantizer

MARK_DOMAIN = "cdlcodec"
MARK_OP = "ActivationMark"


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    setattr(model.get_submodule(parent_path) if parent_path else model, name, module)


def _float_layer(layer: nn.Module) -> nn.Module:
    """The nn.Linear / nn.Conv1d / nn.Conv2d a CDL layer derives from, sharing weight and bias."""
    if isinstance(layer, nn.Linear):
        plain = nn.Linear(layer.in_features, layer.out_features, layer.bias is not None)
    else:
        base = nn.Conv1d if isinstance(layer, nn.Conv1d) else nn.Conv2d
        plain = base(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                     layer.dilation, layer.groups, layer.bias is not None, layer.padding_mode)
    plain.weight, plain.bias = layer.weight, layer.bias
    return plain


def float_activation(quantizer: ActivationQuantizer, index: int | None = None) -> nn.Module:
    """The float function a quantizer applies before quantizing: ReLU, or Hardtanh(0, upper); with
    `index`, followed by the marker op (the same module, so the exported node keeps its scope name)."""
    upper = getattr(quantizer, "upper", None)
    if index is None:
        return nn.ReLU() if upper is None else nn.Hardtanh(0.0, upper)
    module = _MarkedReLU() if upper is None else _MarkedHardtanh(0.0, upper)
    module.index = index
    return module


class _MarkedReLU(nn.ReLU):
    def forward(self, x):
        return _Mark.apply(super().forward(x), self.index)


class _MarkedHardtanh(nn.Hardtanh):
    def forward(self, x):
        return _Mark.apply(super().forward(x), self.index)


class _Mark(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, index):
        return x.clone()

    @staticmethod
    def symbolic(g, x, index):
        out = g.op(f"{MARK_DOMAIN}::{MARK_OP}", x, index_i=index)
        out.setType(x.type())   # same shape and type as its input (the exporter cannot infer a custom op)
        return out


def float_graph_module(model: nn.Module, *, mark: bool = False) -> tuple[nn.Module, list[str]]:
    """(a float copy of converted `model`, quantizer paths in the order of their marker indices).

    The copy's state_dict is the model's minus the quantizer parameters (q, alpha, bits, s, beta).
    With `mark`, each activation is followed by a marker op for `export_cdl_graph`.
    """
    plain = copy.deepcopy(model).cpu().eval()   # exported on the CPU, whatever device trained it
    quantizers = []
    for path, m in list(plain.named_modules()):
        if isinstance(m, WEIGHT_LAYERS):
            _set_submodule(plain, path, _float_layer(m))
        elif isinstance(m, ActivationQuantizer):
            _set_submodule(plain, path, float_activation(m, len(quantizers) if mark else None))
            quantizers.append(path)
    return plain, quantizers


def _remove_marks(proto, quantizers: list[str]) -> dict[str, str]:
    """Splice the marker nodes out of `proto`; {quantizer path: ONNX value its quantization follows}."""
    graph = proto.graph
    marks = [n for n in graph.node if n.domain == MARK_DOMAIN]
    found: dict[str, str] = {}
    outputs = {o.name for o in graph.output}
    for node in marks:
        index = next(a.i for a in node.attribute if a.name == "index")
        source, marked = node.input[0], node.output[0]
        if marked in outputs:
            raise CdlInputError(f"activation quantizer {quantizers[index]!r} is the model's output; the ONNX "
                                "writer quantizes activations between layers only")
        for other in graph.node:
            for i, name in enumerate(other.input):
                if name == marked:
                    other.input[i] = source
        if quantizers[index] in found:
            raise CdlInputError(f"activation quantizer {quantizers[index]!r} is called at several places; "
                                "give each call its own module (cdlcodec.cdl.convert does when it can trace)")
        found[quantizers[index]] = source
    keep = [n for n in graph.node if n.domain != MARK_DOMAIN]
    del graph.node[:]
    graph.node.extend(keep)
    keep_opsets = [o for o in proto.opset_import if o.domain != MARK_DOMAIN]
    del proto.opset_import[:]
    proto.opset_import.extend(keep_opsets)
    missing = [q for q in quantizers if q not in found]
    if missing:
        raise CdlInputError(f"activation quantizers {missing[:5]} are not in the exported graph (unused?)")
    return found


def export_cdl_graph(model: nn.Module, records, architecture: str, input_shape: tuple[int, ...] | None = None):
    """(graph section, its container metadata, {quantizer path: ONNX value}) of converted `model`.

    `records` are the checkpoint's TensorRecords (the graph references them by name after matching
    values); `input_shape` the example input's shape (else the model's `example_input_shape`, else
    the registry's shape for `architecture`).
    """
    import onnx

    from ..io.onnx_model import GRAPH_SECTION_KIND, GRAPH_SECTION_NAME, architecture_graph_section

    plain, quantizers = float_graph_module(model, mark=True)
    # no shape: the module's example_input_shape, or the registry's (architecture_graph_section)
    (_, _, data), meta = architecture_graph_section(architecture, records, input_shape, module=plain,
                                                    extra_records=True)
    proto = onnx.load_from_string(data)
    tensors = _remove_marks(proto, quantizers)
    return (GRAPH_SECTION_NAME, GRAPH_SECTION_KIND, proto.SerializeToString()), meta, tensors


def graph_with_info(section_bytes: bytes, meta: dict, tensors: dict[str, str]) -> bytes:
    """The stripped graph with its container metadata and activation values in metadata_props
    (how a checkpoint of a model outside cdlcodec.models carries its graph: "cdl.graph")."""
    import onnx

    proto = onnx.load_from_string(section_bytes)
    prop = proto.metadata_props.add()
    prop.key, prop.value = GRAPH_INFO_KEY, json.dumps({"metadata": meta, "activation_tensors": tensors},
                                                     sort_keys=True, separators=(",", ":"))
    return proto.SerializeToString()
