"""Optimizer parameter groups with the layer-wise learning rates of eq. 39.

    η_q_l = η_q / sqrt(|w_l|·2^(b-1))   (39a)      η_s_l = η_s / sqrt(|x_l|·2^b)   (39b)
    η_α_l = η_α / sqrt(|w_l|)           (39c)      η_β_l = η_β / sqrt(|x_l|)       (39d)

|x_l| is the number of activations per sample, recorded by `calibrate`. Every other parameter
(weights, biases) gets η_w.

With Adam a parameter moves about its learning rate per step, so η_α / η_β only make sense
relative to the sharpness they act on. `sharpness_reference` (a cdlcodec addition) multiplies (39c)
and (39d) by α_l / reference and β_l / reference, the layer's sharpness when the groups are built:
with reference = 500 and the paper's α0 = β0 = 500 the rates are exactly eq. 39, and with the
scale-aware initialisation (α0 = c/q0², which differs by orders of magnitude between layers) each
layer's sharpness moves by the same fraction per step as it would at α0 = 500.
"""
from __future__ import annotations

import math

from ..optional import require
require("torch", "CDL training")
from torch import nn

from .convert import activation_quantizers, weight_quantizers


def cdl_param_groups(model: nn.Module, *, lr_w: float, lr_q: float, lr_s: float, lr_alpha: float,
                     lr_beta: float, sharpness_reference: float | None = None) -> list[dict]:
    """Parameter groups for any torch optimizer (each group has its own "lr")."""
    def relative(value) -> float:
        return 1.0 if sharpness_reference is None else float(value.detach()) / sharpness_reference

    groups: list[dict] = []
    special: set[int] = set()
    for _, m in weight_quantizers(model):
        n, b = m.weight.numel(), int(m.bits)
        groups.append({"params": [m.q], "lr": lr_q / math.sqrt(n * 2 ** (b - 1))})
        groups.append({"params": [m.alpha], "lr": lr_alpha * relative(m.alpha) / math.sqrt(n)})
        special.update((id(m.q), id(m.alpha)))
    for _, a in activation_quantizers(model):
        if a.numel_per_sample is None:
            raise ValueError("activation quantizers need `calibrate(model, batch)` before eq. 39 groups")
        n, b = a.numel_per_sample, int(a.bits)
        groups.append({"params": [a.s], "lr": lr_s / math.sqrt(n * 2 ** b)})
        groups.append({"params": [a.beta], "lr": lr_beta * relative(a.beta) / math.sqrt(n)})
        special.update((id(a.s), id(a.beta)))
    rest = [p for p in model.parameters() if id(p) not in special]
    if rest:
        groups.insert(0, {"params": rest, "lr": lr_w})
    return groups
