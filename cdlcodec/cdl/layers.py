"""Drop-in CDL layers: Linear and Conv2d with a weight quantizer, and a quantized ReLU.

Every quantizer has three behaviours (Section V):
- mode "cdl", training:  forward uses a sample of Qp, backward Qd's derivatives (eq. 16-24);
- mode "rcdl", training: forward and backward through Qd (eq. 40);
- eval (either mode):    hard quantization to the most probable level, float32(k) * float32(step).

Trainable parameters are stored directly as `q`/`alpha` (weights) and `s`/`beta` (activations) so
that the state_dict is the checkpoint (formats/cdl-checkpoint.md); `project_parameters` keeps them
positive after each optimizer step. `bits` is an int64 buffer. The bias of a layer stays float.
"""
from __future__ import annotations

import math

from ..optional import require
require("torch", "CDL training")
import torch
import torch.nn.functional as F
from torch import nn

from .entropy import entropy_bits, mpmf, quantize_with_entropy_bits
from .quantizer import alphabet_bounds, hard_quantize, sample_quantize, soft_quantize

MODES = ("cdl", "rcdl")
ACTIVATION_WINDOW = 5      # Section VI-B-1: the CPMF of an activation is kept on its 5 nearest levels
MIN_POSITIVE = 1e-8


def set_plain_attribute(module: nn.Module, name: str, value) -> None:
    """module.<name> = value for an attribute that is no parameter, buffer or submodule (a tensor of
    the last forward, a count): where nn.Module.__setattr__ would put it, without its checks, which cost
    a few µs and run several times per quantizer per training step."""
    object.__setattr__(module, name, value)


def _check_mode(mode: str) -> str:
    if mode not in MODES:
        raise ValueError(f"CDL mode must be one of {MODES}, not {mode!r}")
    return mode


def initial_step(mean_abs: float, bits: int) -> float:
    """q0 = 2·mean|w| / sqrt(2^(b-1)) and s0 likewise from the first batch (Section VI-B-3)."""
    return max(2.0 * float(mean_abs) / math.sqrt(2 ** (bits - 1)), 1e-6)


def mse_step(values: torch.Tensor, bits: int, signed: bool, start: float) -> float:
    """The step s minimising mean (v - clip(round(v/s))·s)² over a log grid around `start`.

    A deviation from Section VI-B-3 (cdlcodec option step_init="mse"): the paper's
    2·mean|v|/sqrt(2^(b-1)) clips ReLU activations hard at b = 2 (4 levels); this search picks the
    step whose hard quantization of the calibration values has the least squared error.
    """
    v = values.detach().reshape(-1).float()
    if v.numel() > 262144:   # a fixed strided subsample keeps the search cheap and deterministic
        v = v[:: v.numel() // 262144 + 1]
    lo, hi = alphabet_bounds(bits, signed)
    best, best_err = float(start), math.inf
    for factor in torch.logspace(-3, 3, 49, base=2.0).tolist():
        s = max(float(start) * factor, 1e-6)
        err = float(((torch.round(v / s).clamp(lo, hi) * s - v) ** 2).mean())
        if err < best_err:
            best, best_err = s, err
    return best


def scaled_sharpness(step: float, constant: float) -> float:
    """α0 = c / q0² (or β0 = c / s0²): the CPMF has the same shape relative to the step whatever
    the weight scale. A deviation from the paper's α0 = β0 = 500 (sharpness_init="scaled")."""
    return float(constant) / max(float(step), 1e-6) ** 2


class _WeightQuantized:
    """Shared part of CDLLinear / CDLConv2d: parameters q, alpha and buffer bits for `self.weight`."""

    def _setup_quantizer(self, bits: int, mode: str, alpha0: float) -> None:
        self.mode = _check_mode(mode)
        self.generator: torch.Generator | None = None
        self.register_buffer("bits", torch.tensor(int(bits), dtype=torch.int64))
        with torch.no_grad():
            q0 = initial_step(self.weight.abs().mean().item(), bits)
        self.q = nn.Parameter(torch.tensor(q0, dtype=torch.float32))
        self.alpha = nn.Parameter(torch.tensor(float(alpha0), dtype=torch.float32))
        # With `track_entropy` set, each training forward also stores H(w_l) in bits from the same
        # pass over the CPMFs (eq. 26); the loss takes it (once) instead of a second quantizer call.
        self.track_entropy = False
        self.last_entropy_bits: torch.Tensor | None = None

    @property
    def bounds(self) -> tuple[int, int]:
        return alphabet_bounds(int(self.bits), signed=True)

    def quantized_weight(self) -> torch.Tensor:
        lo, hi = self.bounds
        if not self.training:
            return hard_quantize(self.weight, self.q, lo, hi)
        if self.track_entropy:
            w, bits = quantize_with_entropy_bits(
                self.weight, self.q, self.alpha, lo, hi, None, self.weight.numel(), sample=self.mode == "cdl",
                generator=self.generator)
            set_plain_attribute(self, "last_entropy_bits", bits)
            return w
        if self.mode == "rcdl":
            return soft_quantize(self.weight, self.q, self.alpha, lo, hi)
        return sample_quantize(self.weight, self.q, self.alpha, lo, hi, generator=self.generator)

    def weight_mpmf(self) -> torch.Tensor:
        lo, hi = self.bounds
        return mpmf(self.weight, self.q, self.alpha, lo, hi)

    def weight_entropy_bits(self) -> torch.Tensor:
        """H(w_l) = |w_l| · H(MPMF) in bits (eq. 26), differentiable in w, q and alpha."""
        return self.weight.numel() * entropy_bits(self.weight_mpmf())

    def extra_repr(self) -> str:
        return super().extra_repr() + f", bits={int(self.bits)}, mode={self.mode}"


class CDLLinear(_WeightQuantized, nn.Linear):
    def __init__(self, in_features: int, out_features: int, bias: bool = True, *, bits: int = 4,
                 mode: str = "rcdl", alpha0: float = 500.0):
        nn.Linear.__init__(self, in_features, out_features, bias=bias)
        self._setup_quantizer(bits, mode, alpha0)

    @classmethod
    def from_module(cls, linear: nn.Linear, **kwargs) -> "CDLLinear":
        layer = cls(linear.in_features, linear.out_features, linear.bias is not None, **kwargs)
        with torch.no_grad():
            layer.weight.copy_(linear.weight)
            if linear.bias is not None:
                layer.bias.copy_(linear.bias)
            layer.q.fill_(initial_step(linear.weight.abs().mean().item(), int(layer.bits)))
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.quantized_weight(), self.bias)


class CDLConv2d(_WeightQuantized, nn.Conv2d):
    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros", *,
                 bits: int = 4, mode: str = "rcdl", alpha0: float = 500.0):
        nn.Conv2d.__init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation,
                           groups, bias, padding_mode)
        self._setup_quantizer(bits, mode, alpha0)

    @classmethod
    def from_module(cls, conv: nn.Conv2d, **kwargs) -> "CDLConv2d":
        layer = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode, **kwargs)
        with torch.no_grad():
            layer.weight.copy_(conv.weight)
            if conv.bias is not None:
                layer.bias.copy_(conv.bias)
            layer.q.fill_(initial_step(conv.weight.abs().mean().item(), int(layer.bits)))
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self._conv_forward(x, self.quantized_weight(), self.bias)


class ActivationQuantizer(nn.Module):
    """y = Q(relu(x)) on the unsigned alphabet B (eq. 10b, 13) with step s and sharpness beta.

    Replaces an `nn.ReLU`. The CPMF is restricted to the ACTIVATION_WINDOW nearest levels. With
    `track_entropy` set, each training forward stores `last_entropy_bits` = |x_l| · H(MPMF over the
    mini-batch) (eq. 28), |x_l| counted per sample so the term sits on the same scale as the
    per-sample cross-entropy.
    """

    def __init__(self, bits: int = 4, *, mode: str = "rcdl", beta0: float = 500.0, s0: float = 1.0):
        super().__init__()
        self.mode = _check_mode(mode)
        self.generator: torch.Generator | None = None
        self.register_buffer("bits", torch.tensor(int(bits), dtype=torch.int64))
        self.s = nn.Parameter(torch.tensor(float(s0), dtype=torch.float32))
        self.beta = nn.Parameter(torch.tensor(float(beta0), dtype=torch.float32))
        self.window = ACTIVATION_WINDOW
        self.track_entropy = False
        self.last_entropy_bits: torch.Tensor | None = None
        self.numel_per_sample: int | None = None   # |x_l|, learnt at calibration (eq. 39b/d)
        self._calibrating = False
        self._keep_values = False
        self._values: torch.Tensor | None = None
        self._mean_abs = 0.0

    @property
    def bounds(self) -> tuple[int, int]:
        return alphabet_bounds(int(self.bits), signed=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() > 0:
            per_sample = x.shape[1:].numel()      # 1 for a 1-d input
            if per_sample != self.numel_per_sample:
                set_plain_attribute(self, "numel_per_sample", per_sample)
        lo, hi = self.bounds
        if self._calibrating or not self.training:
            x = F.relu(x)
            if not self._calibrating:
                return hard_quantize(x, self.s, lo, hi)
            self._mean_abs = float(x.detach().abs().mean())
            self._values = x.detach().clone() if self._keep_values else None
            return x
        # Training: the ReLU runs inside the quantizer (relu=True: the same values and gradients as
        # F.relu followed by the quantizer, without a pass and a tensor of its own).
        if self.track_entropy:
            # One pass over the CPMFs gives both the quantized values and the MPMF (eq. 28).
            y, bits = quantize_with_entropy_bits(
                x, self.s, self.beta, lo, hi, self.window, self.numel_per_sample, sample=self.mode == "cdl",
                generator=self.generator, relu=True)
            set_plain_attribute(self, "last_entropy_bits", bits)
            return y
        if self.mode == "rcdl":
            return soft_quantize(x, self.s, self.beta, lo, hi, self.window, relu=True)
        return sample_quantize(x, self.s, self.beta, lo, hi, self.window, generator=self.generator, relu=True)

    def extra_repr(self) -> str:
        return f"bits={int(self.bits)}, mode={self.mode}, window={self.window}"


class CDLConv1d(_WeightQuantized, nn.Conv1d):
    """CDLConv2d's weight quantizer on an nn.Conv1d (same constructor, from_module and forward)."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros", *,
                 bits: int = 4, mode: str = "rcdl", alpha0: float = 500.0):
        nn.Conv1d.__init__(self, in_channels, out_channels, kernel_size, stride, padding, dilation,
                           groups, bias, padding_mode)
        self._setup_quantizer(bits, mode, alpha0)

    from_module = CDLConv2d.__dict__["from_module"]
    forward = CDLConv2d.forward


WEIGHT_LAYERS = (CDLLinear, CDLConv2d, CDLConv1d)
