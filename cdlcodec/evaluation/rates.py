"""Rates of one compressed model: bits per weight (eq. 41a), per activation (eq. 41b), per parameter.

Definitions used everywhere in the evaluation (docs/evaluation.md):
- bits per weight (CDL paper eq. 41a): Σ_l |w_l|·b_wl / Σ_l |w_l| over the quantized weight
  tensors, where |w_l|·b_wl is what the container really spends on layer l (payload plus backend
  parameters, i.e. code tables). Biases and other tensors kept exactly are not weights here.
- bits per parameter: every bit of the file (header, index, metadata, all tensors) / all parameters.
- bits per activation (eq. 41b): Σ_l |x_l|·b_xl / Σ_l |x_l| with b_xl the Huffman-coded bits per
  element of layer l's quantized activations on a mini-batch of training inputs (Section VI-A).
  Only models that quantize activations (CDL / R-CDL) have one; float activations count as 32.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from ..quantizers.params import EXACT_SCHEMES

FLOAT_ACTIVATION_BITS = 32.0


@dataclass
class ContainerRates:
    file_bytes: int
    num_params: int
    num_weights: int
    weight_bits: int

    @property
    def bits_per_weight(self) -> float:
        return self.weight_bits / self.num_weights if self.num_weights else 0.0

    @property
    def bits_per_param(self) -> float:
        return 8.0 * self.file_bytes / self.num_params if self.num_params else 0.0


def container_rates(path: str) -> ContainerRates:
    """Sizes read from the container index (nothing is decoded)."""
    from ..codec import container_summary

    summary = container_summary(path)
    num_weights, weight_bits = 0, 0
    for t in summary["tensors"]:
        if t["backend"] == "plain" or t.get("scheme") in EXACT_SCHEMES:
            continue
        num_weights += math.prod(t["shape"])
        weight_bits += 8 * t["bytes"]
    return ContainerRates(summary["total_bytes"], summary["num_params"], num_weights, weight_bits)


def activation_bits_per_element(model, inputs) -> float:
    """eq. 41b for a model with CDL activation quantizers; FLOAT_ACTIVATION_BITS for any other."""
    if inputs is None:
        return FLOAT_ACTIVATION_BITS
    try:
        from ..cdl.convert import activation_quantizers
        from ..cdl.metrics import activation_levels, average_bits
    except ImportError:
        return FLOAT_ACTIVATION_BITS
    if not activation_quantizers(model):
        return FLOAT_ACTIVATION_BITS
    bits, _ = average_bits(activation_levels(model, inputs))
    return FLOAT_ACTIVATION_BITS if bits is None else float(bits)
