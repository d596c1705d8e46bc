"""Typed quantization parameters: the `quant` object of a coded tensor, validated once.

The container index stores quant objects as JSON (formats/SPEC.md section 3); every reader of them
outside the quantizers (dequantize, `cdlcodec info`, the ONNX writer, evaluation rates) goes through
`from_json`, which refuses what the decoder cannot use with CdlFormatError, and every quantizer writes
them with `to_json`, whose key order is the bytes the golden files pin.

- UniformParams(step)              {"scheme": "uniform", "step": s}           value = level * s
- ChannelParams(axis, steps)       {"scheme": "uniform", "axis": a, "steps": [..]}
- IntegerParams()                  {"scheme": "integer"}                      value = level
- DependentParams(states, step | axis + steps)  {"scheme": "dependent", ..., "states": n}
`extra` keeps informational fields (e.g. CDL's "bits", "alpha", "source") verbatim and in order;
the decoder ignores them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Union

import numpy as np

from ..dtypes import FLOATS, INTEGERS
from ..errors import CdlFormatError

QUANTIZED_SCHEMES = ("uniform", "dependent")   # level x step: lossy
EXACT_SCHEMES = ("plain", "integer")           # the stored values are the tensor's values
_FIELDS = {"scheme", "step", "axis", "steps", "states"}
# The dependent scheme's state machines (next state by level parity, quantizer id per state): part of
# what a "dependent" quant object means, so they live here, where from_json validates "states".
# states -> (NEXT[state][parity], Q[state])
STATE_MACHINES = {
    4: (np.array([[0, 2], [2, 0], [1, 3], [3, 1]], dtype=np.int64), np.array([0, 0, 1, 1], dtype=np.int64)),
    8: (np.array([[0, 4], [4, 0], [1, 5], [5, 1], [2, 6], [6, 2], [3, 7], [7, 3]], dtype=np.int64),
        np.array([0, 0, 0, 0, 1, 1, 1, 1], dtype=np.int64)),
}


def state_machine(states: int):
    if states not in STATE_MACHINES:
        raise CdlFormatError(f"dependent quantization with {states!r} states is not defined (4 or 8)")
    return STATE_MACHINES[states]


def _finite_positive(value, what: str) -> float:
    if not isinstance(value, (int, float)) or isinstance(value, bool):
        raise CdlFormatError(f"{what} must be a finite positive number, got {value!r}")
    try:
        number = float(value)
    except OverflowError:  # an int beyond binary64
        number = math.inf
    if not math.isfinite(number) or number <= 0:
        raise CdlFormatError(f"{what} must be a finite positive number, got {value!r}")
    return number


def _extra(quant: dict) -> tuple:
    return tuple((k, v) for k, v in quant.items() if k not in _FIELDS)


@dataclass(frozen=True)
class UniformParams:
    """One step for the whole tensor."""

    step: float
    extra: tuple = ()

    scheme = "uniform"
    axis = None

    def to_json(self) -> dict:
        return {"scheme": "uniform", "step": self.step, **dict(self.extra)}

    def step_array(self):
        return self.step


@dataclass(frozen=True)
class ChannelParams:
    """One step per index along `axis` (value = level * steps[i])."""

    axis: int
    steps: tuple[float, ...]
    extra: tuple = ()

    scheme = "uniform"

    def to_json(self) -> dict:
        return {"scheme": "uniform", "axis": self.axis, "steps": list(self.steps), **dict(self.extra)}

    def step_array(self) -> np.ndarray:
        return np.array(self.steps, dtype=np.float64)


@dataclass(frozen=True)
class IntegerParams:
    """Integer and bool tensors: the levels are the values."""

    scheme = "integer"
    axis = None

    def to_json(self) -> dict:
        return {"scheme": "integer"}


@dataclass(frozen=True)
class DependentParams:
    """Dependent (trellis-coded) quantization with `states` states; one step or per-channel steps."""

    states: int
    step: float | None = None
    axis: int | None = None
    steps: tuple[float, ...] | None = None
    extra: tuple = ()

    scheme = "dependent"

    def to_json(self) -> dict:
        where = {"step": self.step} if self.steps is None else {"axis": self.axis, "steps": list(self.steps)}
        return {"scheme": "dependent", **where, "states": self.states, **dict(self.extra)}

    def step_array(self):
        return self.step if self.steps is None else np.array(self.steps, dtype=np.float64)


QuantParams = Union[UniformParams, ChannelParams, IntegerParams, DependentParams]


def uniform(step: float, axis: int | None = None, steps=None, states: int | None = None) -> QuantParams:
    """The params a quantizer writes: one step or per-channel steps, uniform or dependent (`states`)."""
    if states is not None:
        return DependentParams(states, step, axis, None if steps is None else tuple(float(s) for s in steps))
    if steps is not None:
        return ChannelParams(axis, tuple(float(s) for s in steps))
    return UniformParams(step)


def from_json(quant: dict | None, shape: tuple[int, ...], dtype: str, name: str = "") -> QuantParams:
    """Validate the quant object of a coded tensor of this shape and dtype; CdlFormatError if unusable."""
    what = f"tensor {name!r}"
    if not isinstance(quant, dict):
        raise CdlFormatError(f"{what}: a coded tensor needs a quant object, got {quant!r}")
    scheme = quant.get("scheme")
    if scheme == "integer":
        if dtype not in INTEGERS:
            raise CdlFormatError(f"{what}: the integer scheme needs an integer or bool dtype, not {dtype}")
        return IntegerParams()
    if scheme not in QUANTIZED_SCHEMES:
        raise CdlFormatError(f"{what}: unknown quantization scheme {scheme!r}")
    if dtype not in FLOATS:
        raise CdlFormatError(f"{what}: {scheme} quantization of a {dtype} tensor")
    states = None
    if scheme == "dependent":
        states = quant.get("states")
        if type(states) is not int:
            raise CdlFormatError(f"{what}: dependent quantization needs an integer 'states'")
        state_machine(states)  # 4 or 8, else CdlFormatError
    extra = _extra(quant)
    if "steps" in quant:
        axis, steps = quant.get("axis"), quant.get("steps")
        if type(axis) is not int or not 0 <= axis < len(shape) or not isinstance(steps, list) or len(steps) != shape[axis]:
            raise CdlFormatError(f"{what}: per-channel steps do not match the shape {shape}")
        checked = tuple(_finite_positive(s, f"{what} step") for s in steps)
        if states is not None:
            return DependentParams(states, None, axis, checked, extra)
        return ChannelParams(axis, checked, extra)
    step = _finite_positive(quant.get("step"), f"{what} step")
    return DependentParams(states, step, extra=extra) if states is not None else UniformParams(step, extra)


def steps_of(params: QuantParams) -> tuple[float, ...]:
    """Every step of a quantized tensor (one for a per-tensor step); () for the integer scheme."""
    if isinstance(params, IntegerParams):
        return ()
    steps = getattr(params, "steps", None)
    return tuple(steps) if steps is not None else (params.step,)
