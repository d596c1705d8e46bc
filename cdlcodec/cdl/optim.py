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
import torch
from torch import nn
from torch.optim.optimizer import _get_scalar_dtype

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


class CDLAdam(torch.optim.Adam):
    """torch.optim.Adam whose one-value (0-dim) parameter groups (eq. 39 gives every step and sharpness a
    group of its own: 18 in LeNet-5) are updated as one vector: a handful of tensor operations per
    step instead of a dozen per group. The values are Adam's bit for bit (the same float32
    operations elementwise; the bias corrections per parameter in Python floats, as Adam computes
    them), the state is Adam's (per parameter `step`, `exp_avg`, `exp_avg_sq`, so `state_dict`
    loads into torch.optim.Adam and back; here they are 0-dim views of three vectors the update
    runs on in place, see `_flat_state`), and every other group — or any option this vector form
    does not cover (amsgrad, weight decay, maximize, foreach/fused/capturable/differentiable, a
    tensor lr, other dtypes or devices) — goes through torch.optim.Adam itself."""

    def _fusable(self, group, dtype, device) -> bool:
        params = group["params"]
        if len(params) != 1:
            return False
        p = params[0]
        return (p.grad is not None and p.dim() == 0 and p.grad.dim() == 0 and p.dtype == dtype and p.device == device
                and not p.grad.is_sparse and not torch.is_complex(p) and not isinstance(group["lr"], torch.Tensor)
                and not group["amsgrad"] and not group["maximize"] and group["weight_decay"] == 0
                and not group.get("foreach") and not group.get("fused") and not group["capturable"]
                and not group["differentiable"] and not group.get("decoupled_weight_decay", False))

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        first = next((g for g in self.param_groups if len(g["params"]) == 1), None)
        fused, rest = [], []
        if first is not None:
            ref = first["params"][0]
            key = (first["betas"], first["eps"])
            plain = all(isinstance(b, float) for b in key[0]) and isinstance(key[1], float)
            for g in self.param_groups:
                ok = plain and (g["betas"], g["eps"]) == key and self._fusable(g, ref.dtype, ref.device)
                (fused if ok else rest).append(g)
        if len(fused) < 2:
            rest, fused = self.param_groups, []
        if fused:
            self._fused_step(fused)
        if any(p.grad is not None for g in rest for p in g["params"]):
            groups = self.param_groups
            self.param_groups = rest
            try:
                super().step()
            finally:
                self.param_groups = groups
        return loss

    def _fused_step(self, groups) -> None:
        params = [g["params"][0] for g in groups]
        beta1, beta2 = groups[0]["betas"]
        eps = groups[0]["eps"]
        steps, m, v = self._flat_state(params)
        steps.add_(1)                       # every parameter's state["step"] (views of `steps`)
        counts = steps.tolist()
        grad = torch.stack([p.grad for p in params])
        m.lerp_(grad, 1 - beta1)
        v.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
        neg_step = [-(g["lr"] / (1 - beta1 ** n)) for g, n in zip(groups, counts)]
        bc2_sqrt = [(1 - beta2 ** n) ** 0.5 for n in counts]
        denom = (v.sqrt() / torch.tensor(bc2_sqrt, dtype=v.dtype, device=v.device)).add_(eps)
        # addcdiv_(exp_avg, denom, value=-step_size) computes self + (value · exp_avg) / denom
        update = (torch.tensor(neg_step, dtype=m.dtype, device=m.device) * m) / denom
        torch._foreach_add_(params, update.unbind())

    def _flat_state(self, params) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(step, exp_avg, exp_avg_sq) of `params` as three vectors whose elements *are* the parameters'
        Adam state (state[p]["exp_avg"] is a 0-dim view of the vector): the update runs in place on
        them, with no stacking and copying back per step. Rebuilt (values copied) when the set of
        parameters changes or a state tensor was replaced (load_state_dict, a fresh parameter)."""
        key = tuple(map(id, params))
        cached = getattr(self, "_flat_cache", None)
        if cached is not None and cached[0] == key and all(
                self.state[p].get("exp_avg") is view for p, view in zip(params, cached[2])):
            return cached[1]
        states = []
        for p in params:
            state = self.state[p]
            if len(state) == 0:     # as Adam's _init_group (not capturable, not fused)
                state["step"] = torch.tensor(0.0, dtype=_get_scalar_dtype())
                state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                state["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            states.append(state)
        flat = tuple(torch.stack([s[name] for s in states]) for name in ("step", "exp_avg", "exp_avg_sq"))
        for i, state in enumerate(states):
            for name, vector in zip(("step", "exp_avg", "exp_avg_sq"), flat):
                state[name] = vector[i]
        self._flat_cache = (key, flat, [s["exp_avg"] for s in states])
        return flat
