"""The quantizer interface and the registry every front end builds quantizers from.

A quantizer subclasses `Quantizer` and overrides `quantize` (one float tensor -> levels + quant
params); the other hooks have defaults that do nothing, so `codec.encode_records` calls them all
unconditionally:

- prepare(model, backend) -> Quantizer: bind to one model (a records.ModelFile, with its metadata)
  before any tensor is coded, e.g. CDL checkpoints read their learned steps here.
- quantize_record(record, values64, w32, backend) -> (levels, quant, EncodeHint | None) or None:
  per-record access (name, shape, backend); None stores the tensor exactly. Default: `quantize`.
- sections() -> [(name, kind, bytes)]: extra container sections.
- finish(coded_bits {name: bits}) -> (metadata {str: str}, report dict): once every tensor is coded.
- describe() -> str: the container's "quantizer" metadata entry.

`make(name, **params)` builds a registered quantizer. Quantizers with `uses_step_rule = True` take
the step rule (exactly one of rel_step / step / bits; none = rel_step 0.1), checked here once for
the CLI, `cdlcodec.search` and `cdlcodec.evaluation`. Built-in quantizers are listed in BUILTIN
(module:class, imported on first use); `register(name, factory)` adds one from anywhere
(docs/quantization.md, "Adding a quantizer").

Errors about parameters come from `parameter_error`: the message speaks of the parameter names
(`step must be ...`) and `exc.params` lists them, so a front end can say them its own way (the CLI
prints them as flags, `--step must be ...`).
"""
from __future__ import annotations

import importlib
import inspect
from typing import Callable

import numpy as np

from ..errors import CdlInputError

STEP_RULES = ("rel_step", "step", "bits")
DEFAULT_REL_STEP = 0.1  # demo accuracy within 0.1 point of float over 3 seeds (BENCHMARKS.md)

BUILTIN = {
    "uniform": "cdlcodec.quantizers.uniform:UniformQuantizer",
    "channel": "cdlcodec.quantizers.channel:ChannelQuantizer",
    "rd": "cdlcodec.quantizers.rd:RDQuantizer",
    "trellis": "cdlcodec.quantizers.trellis:TrellisQuantizer",
    "cpmf": "cdlcodec.quantizers.cpmf:CpmfQuantizer",
    "deploy": "cdlcodec.fidelity.deploy:DeployQuantizer",
    "fidelity": "cdlcodec.fidelity.search:PlannedQuantizer",
}
_REGISTERED: dict[str, Callable] = {}


def parameter_error(message: str, *params: str) -> CdlInputError:
    """A CdlInputError about the named parameters; `message` names them as the library does."""
    exc = CdlInputError(message)
    exc.params = params
    return exc


class Quantizer:
    """Base class of quantizers: override `quantize`, and the hooks a scheme needs (module docstring)."""

    uses_step_rule = False  # True: make() passes the checked rel_step / step / bits

    def describe(self) -> str:
        return type(self).__name__

    def prepare(self, model, backend: str) -> "Quantizer":
        return self

    def quantize(self, values64: np.ndarray, w32: np.ndarray) -> tuple[np.ndarray, dict]:
        raise NotImplementedError(f"{type(self).__name__} does not quantize single tensors")

    def quantize_record(self, record, values64: np.ndarray, w32: np.ndarray, backend: str):
        levels, quant = self.quantize(values64, w32)
        return levels, quant, None

    def sections(self) -> list[tuple[str, str, bytes]]:
        return []

    def finish(self, coded_bits: dict) -> tuple[dict[str, str], dict]:
        return {}, {}


def step_rule(rel_step: float | None = None, step: float | None = None, bits: int | None = None) -> dict:
    """The step-rule keywords: at most one of the three may be given; none means rel_step 0.1."""
    chosen = [name for name, value in zip(STEP_RULES, (rel_step, step, bits)) if value is not None]
    if len(chosen) > 1:
        raise parameter_error(f"choose one of rel_step, step, bits (got {' and '.join(chosen)})", *STEP_RULES)
    if not chosen:
        return {"rel_step": DEFAULT_REL_STEP, "step": None, "bits": None}
    return {"rel_step": rel_step, "step": step, "bits": bits}


def register(name: str, factory: Callable) -> Callable:
    """Make `factory(**params)` available as make(name, **params); returns the factory."""
    _REGISTERED[name] = factory
    return factory


def names() -> list[str]:
    return [*BUILTIN, *(n for n in _REGISTERED if n not in BUILTIN)]


def factory(name: str) -> Callable:
    if name in _REGISTERED:
        return _REGISTERED[name]
    if name not in BUILTIN:
        raise CdlInputError(f"unknown quantizer {name!r} (known: {', '.join(names())})")
    module, attr = BUILTIN[name].split(":")
    return getattr(importlib.import_module(module), attr)


def make(name: str, **params) -> Quantizer:
    """The quantizer registered as `name`, built from `params` (step rule checked, see module docstring)."""
    build = factory(name)
    if getattr(build, "uses_step_rule", False):
        params.update(step_rule(*(params.pop(key, None) for key in STEP_RULES)))
    try:
        inspect.signature(build).bind(**params)
    except TypeError as exc:  # an unknown or missing parameter, said before anything is built
        raise CdlInputError(f"quantizer {name!r}: {exc}") from None
    return build(**params)
