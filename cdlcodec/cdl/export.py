"""The float graph of a converted (CDL / R-CDL) model, for the container's graph section.

`float_graph_module` turns any converted model back into the float model the container's ONNX
graph describes: CDL layers back to nn.Linear / nn.Conv1d / nn.Conv2d with the same state_dict
names, each activation quantizer back to the activation it applies before quantizing (ReLU, or
Hardtanh(0, upper) for ReLU6 / hardtanh). `export_cdl_graph` exports it with
cdlcodec.io.cdl_graph, which also names the ONNX value each quantizer follows.
"""
from __future__ import annotations

import copy

from ..optional import require
require("torch", "CDL training")
from torch import nn

from ..io.cdl_graph import export_with_activations
from .layers import WEIGHT_LAYERS, ActivationQuantizer


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


def float_activation(quantizer: ActivationQuantizer) -> nn.Module:
    """The float function a quantizer applies before quantizing: ReLU, or Hardtanh(0, upper)."""
    upper = getattr(quantizer, "upper", None)
    return nn.ReLU() if upper is None else nn.Hardtanh(0.0, upper)


def float_graph_module(model: nn.Module) -> tuple[nn.Module, list[str]]:
    """(a float copy of converted `model`, the module paths of its activation quantizers).

    The copy's state_dict is the model's minus the quantizer parameters (q, alpha, bits, s, beta).
    """
    plain = copy.deepcopy(model).cpu().eval()
    quantizers = []
    for path, m in list(plain.named_modules()):
        if isinstance(m, WEIGHT_LAYERS):
            plain.set_submodule(path, _float_layer(m))
        elif isinstance(m, ActivationQuantizer):
            plain.set_submodule(path, float_activation(m))
            quantizers.append(path)
    return plain, quantizers


def export_cdl_graph(model: nn.Module, records, architecture: str, input_shape: tuple[int, ...] | None = None):
    """(graph section, its container metadata, {quantizer path: ONNX value}) of converted `model`;
    `records` are its checkpoint's TensorRecords (see cdlcodec.io.cdl_graph.export_with_activations)."""
    plain, quantizers = float_graph_module(model)
    return export_with_activations(plain, records, architecture, quantizers, input_shape)
