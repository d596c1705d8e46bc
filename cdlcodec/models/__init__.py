"""Built-in architectures, by name, so that checkpoints and containers can name what they hold.

`build(name)` returns a fresh torch module. Add an architecture with one entry in `_REGISTRY`.
"""
from __future__ import annotations

import importlib

from ..errors import CdlInputError

# name -> "module:factory"; factories take keyword arguments and return an nn.Module.
_REGISTRY = {
    "lenet5": "cdlcodec.models.lenet:LeNet5",
}


def names() -> list[str]:
    return list(_REGISTRY)


def register(name: str, target: str) -> None:
    _REGISTRY[name] = target


def build(name: str, **kwargs):
    if name not in _REGISTRY:
        raise CdlInputError(f"unknown architecture {name!r} (known: {', '.join(_REGISTRY)})")
    module_name, _, factory = _REGISTRY[name].partition(":")
    return getattr(importlib.import_module(module_name), factory)(**kwargs)
