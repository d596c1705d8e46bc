"""Fine-tune your own converted model with CDL / R-CDL, with your data loader and your loss.

    from cdlcodec.cdl.convert import convert
    from cdlcodec.cdl.finetune import finetune
    from cdlcodec.cdl.checkpoint import save_checkpoint
    model = convert(my_trained_model, bits=4, mode="rcdl")          # use the returned module
    result = finetune(model, train_loader, torch.nn.functional.cross_entropy, epochs=2, lam=1e-6)
    save_checkpoint(result.model, "mine.pt", architecture="mynet", bits=4, first_last_bits=8,
                    example_input=torch.zeros(1, 3, 32, 32))          # then: cdlcodec encode mine.pt

The objective is `cdl_loss` with your loss in place of the cross-entropy (eq. 30/40):
loss_fn(model(x), y) + λ·H(w) + γ·H(x), H(w) the whole model's weight entropy in bits and H(x) one
sample's activation entropy. Steps and sharpnesses get the layer-wise learning rates of eq. 39
(`cdl_param_groups`), Adam by default, and are kept positive after every step. A model whose
quantizers have not been calibrated is calibrated on the loader's first batch, as
`cdlcodec train` does (least-squared-error steps, α·q² = β·s² = `sharpness_constant`).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from ..optional import require
require("torch", "CDL training")
import torch
from torch import nn

from ..errors import CdlInputError
from .convert import (activation_quantizers, calibrate, project_parameters, rescale_sharpness,
                      set_entropy_tracking, weight_quantizers)
from .loss import cdl_loss
from .optim import CDLAdam, cdl_param_groups


@dataclass
class FinetuneResult:
    model: nn.Module                 # the fine-tuned model, in eval mode
    steps: int
    seconds: float
    history: list = field(default_factory=list)   # per epoch: mean task loss, H(w) and H(x) per element


def _split(batch) -> tuple:
    """(inputs, targets) of a loader batch: a (x, y) pair or list (extra items are ignored)."""
    if isinstance(batch, (tuple, list)) and len(batch) >= 2:
        return batch[0], batch[1]
    raise CdlInputError(f"finetune expects the loader to yield (inputs, targets) pairs, got a {type(batch).__name__}")


def _to(value, device):
    return value.to(device) if hasattr(value, "to") else value


def finetune(model: nn.Module, loader: Iterable, loss_fn: Callable, epochs: int = 1, *, lam: float = 0.0,
             gamma: float = 0.0, lr: float = 1e-3, lr_q: float = 0.003, lr_s: float = 0.003,
             lr_alpha: float = 100.0, lr_beta: float = 100.0, sharpness_constant: float | None = 8.0,
             step_init: str = "mse", optimizer: Callable | None = None,
             on_step: Callable | None = None) -> FinetuneResult:
    """Train converted `model` for `epochs` passes over `loader` ((inputs, targets) batches).

    lam, gamma: prices of one bit of H(w) and of H(x) (eq. 30). lr: the weights' rate; lr_q ...
    lr_beta: the base rates of eq. 39 (lr_q = lr_s = 0.003 as `cdlcodec train`; fine-tuning LeNet-5
    2 epochs after 2 FP epochs, 5 seeds x 3 recipes, 0.003 scored +0.09 points over 0.01 on average,
    BENCHMARKS.md "ResNet-20 fine-tune (#17)").
    sharpness_constant: α0 = c/q0², β0 = c/s0² at calibration
    (None keeps α0 = β0 from `convert`); step_init: "mse" or "paper" (`calibrate`). optimizer: a
    factory taking parameter groups (default `optim.CDLAdam`: torch.optim.Adam's values). on_step(step, parts): called after
    each step with its cdlcodec.cdl.loss.LossParts (`cross_entropy` holds your loss's value).
    Batches are moved to the device of the model's first parameter.
    """
    if not weight_quantizers(model):
        raise CdlInputError("finetune needs a converted model: call cdlcodec.cdl.convert(model) first "
                            "and pass the module it returns")
    if epochs < 1:
        raise CdlInputError(f"epochs must be at least 1, not {epochs}")
    if lam < 0 or gamma < 0 or not (math.isfinite(lam) and math.isfinite(gamma)):
        raise CdlInputError("lam and gamma must be finite and >= 0")
    device = next(model.parameters()).device
    acts = activation_quantizers(model)
    if any(a.numel_per_sample is None for _, a in acts):
        first = next(iter(loader), None)
        if first is None:
            raise CdlInputError("the loader yields no batch")
        calibrate(model, _to(_split(first)[0], device), step_init=step_init)
        if sharpness_constant is not None:
            rescale_sharpness(model, sharpness_constant)
    groups = cdl_param_groups(model, lr_w=lr, lr_q=lr_q, lr_s=lr_s, lr_alpha=lr_alpha, lr_beta=lr_beta,
                              sharpness_reference=500.0 if sharpness_constant is not None else None)
    opt = (optimizer or CDLAdam)(groups)
    set_entropy_tracking(model, gamma > 0, weights=lam > 0)
    model.train()
    steps, history, start = 0, [], time.perf_counter()
    try:
        for epoch in range(epochs):
            sums = {"task_loss": 0.0, "weight_bits_per_element": 0.0, "activation_bits_per_element": 0.0}
            batches = 0
            for batch in loader:
                x, y = _split(batch)
                x, y = _to(x, device), _to(y, device)
                parts = cdl_loss(model, model(x), y, lam=lam, gamma=gamma, task_loss=loss_fn)
                loss = float(parts.total.detach())
                if not math.isfinite(loss):   # before the step: the model keeps its last finite state
                    raise CdlInputError(f"finetune: the loss is {loss} at step {steps + 1} (lower lr, lam or gamma)")
                opt.zero_grad(set_to_none=True)
                parts.total.backward()
                opt.step()
                project_parameters(model)
                for key, value in (("task_loss", parts.cross_entropy),
                                   ("weight_bits_per_element", parts.weight_bits_per_element),
                                   ("activation_bits_per_element", parts.activation_bits_per_element)):
                    sums[key] += value or 0.0
                steps += 1
                batches += 1
                if on_step is not None:
                    on_step(steps, parts)
            history.append({"epoch": epoch + 1, **{k: v / max(batches, 1) for k, v in sums.items()}})
    finally:
        set_entropy_tracking(model, False)
    return FinetuneResult(model.eval(), steps, time.perf_counter() - start, history)
