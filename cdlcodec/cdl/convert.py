"""Turn an ordinary model into a CDL / R-CDL model, and helpers that act on all its quantizers."""
from __future__ import annotations

from ..optional import require
require("torch", "CDL training")
import torch
from torch import nn

from .layers import (ActivationQuantizer, CDLConv2d, CDLLinear, MIN_POSITIVE, WEIGHT_LAYERS,
                     _check_mode, initial_step, mse_step, scaled_sharpness)


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, module)


def convert(model: nn.Module, bits: int = 4, first_last_bits: int | None = 8, mode: str = "rcdl", *,
            alpha0: float = 500.0, beta0: float = 500.0, activation_bits: int | None = None,
            quantize_activations: bool = True) -> nn.Module:
    """Replace, in place, every nn.Linear / nn.Conv2d by its CDL version and every nn.ReLU by an
    ActivationQuantizer; returns the model.

    The first and the last weight layer (in registration order) get `first_last_bits` (8 in the
    paper, Section VI-B-2; None = same as `bits`). Activations use `activation_bits` (default
    `bits`). α0 = β0 = 500 and q0 = 2·mean|w|/sqrt(2^(b-1)) as in Section VI-B-3; call `calibrate`
    with a first batch to set s0. A ReLU module used at several places would share one quantizer:
    give each use its own module before converting.
    """
    _check_mode(mode)
    activation_bits = bits if activation_bits is None else activation_bits
    weight_paths = [name for name, m in model.named_modules()
                    if isinstance(m, (nn.Linear, nn.Conv2d)) and not isinstance(m, WEIGHT_LAYERS)]
    relu_paths = [name for name, m in model.named_modules() if isinstance(m, nn.ReLU)]
    for i, path in enumerate(weight_paths):
        layer_bits = bits
        if first_last_bits is not None and i in (0, len(weight_paths) - 1):
            layer_bits = first_last_bits
        old = model.get_submodule(path)
        cls = CDLConv2d if isinstance(old, nn.Conv2d) else CDLLinear
        _set_submodule(model, path, cls.from_module(old, bits=layer_bits, mode=mode, alpha0=alpha0))
    if quantize_activations:
        for path in relu_paths:
            _set_submodule(model, path, ActivationQuantizer(activation_bits, mode=mode, beta0=beta0))
    return model


def weight_quantizers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, WEIGHT_LAYERS)]


def activation_quantizers(model: nn.Module) -> list[tuple[str, ActivationQuantizer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ActivationQuantizer)]


STEP_INITS = ("paper", "mse")


@torch.no_grad()
def calibrate(model: nn.Module, first_batch: torch.Tensor, *, step_init: str = "paper") -> None:
    """s0 from the activations of the first batch; records |x_l| per sample for eq. 39.

    step_init "paper": s0 = 2·mean|x|/sqrt(2^(b-1)) (Section VI-B-3). "mse": the step minimising
    the squared error of hard quantization of those activations (`mse_step`), and the weight steps
    q0 likewise re-chosen from each layer's weights. Runs the batch with activation quantizers
    passing values through (weights hard-quantized).
    """
    if step_init not in STEP_INITS:
        raise ValueError(f"step_init must be one of {STEP_INITS}, not {step_init!r}")
    if step_init == "mse":
        for _, m in weight_quantizers(model):
            m.q.fill_(mse_step(m.weight, int(m.bits), True, m.q.item()))
    acts = activation_quantizers(model)
    was_training = model.training
    model.eval()
    for _, a in acts:
        a._calibrating = True
        a._keep_values = step_init == "mse"
    try:
        model(first_batch)
    finally:
        for _, a in acts:
            a._calibrating = False
        model.train(was_training)
    for _, a in acts:
        s0 = initial_step(a._mean_abs, int(a.bits))
        if step_init == "mse" and a._values is not None:
            s0 = mse_step(a._values, int(a.bits), False, s0)
        a.s.fill_(s0)
        a._values, a._keep_values = None, False


@torch.no_grad()
def rescale_sharpness(model: nn.Module, constant: float) -> None:
    """α = c/q² and β = c/s² for every quantizer (call after `calibrate`): see `scaled_sharpness`."""
    for m in model.modules():
        if isinstance(m, WEIGHT_LAYERS):
            m.alpha.fill_(scaled_sharpness(m.q.item(), constant))
        elif isinstance(m, ActivationQuantizer):
            m.beta.fill_(scaled_sharpness(m.s.item(), constant))


def set_mode(model: nn.Module, mode: str) -> None:
    """Switch every quantizer between "cdl" (sampled forward) and "rcdl" (soft forward)."""
    _check_mode(mode)
    for m in model.modules():
        if isinstance(m, WEIGHT_LAYERS + (ActivationQuantizer,)):
            m.mode = mode


def set_generator(model: nn.Module, generator: torch.Generator | None) -> None:
    """Make the Qp samples of CDL mode reproducible: every quantizer draws from `generator`."""
    for m in model.modules():
        if isinstance(m, WEIGHT_LAYERS + (ActivationQuantizer,)):
            m.generator = generator


@torch.no_grad()
def project_parameters(model: nn.Module) -> None:
    """Keep steps and sharpnesses positive after an optimizer step (projected gradient descent)."""
    for m in model.modules():
        if isinstance(m, WEIGHT_LAYERS):
            m.q.clamp_(min=MIN_POSITIVE)
            m.alpha.clamp_(min=MIN_POSITIVE)
        elif isinstance(m, ActivationQuantizer):
            m.s.clamp_(min=MIN_POSITIVE)
            m.beta.clamp_(min=MIN_POSITIVE)


def set_entropy_tracking(model: nn.Module, enabled: bool) -> None:
    for _, a in activation_quantizers(model):
        a.track_entropy = enabled
        a.last_entropy_bits = None
