"""Built-in architectures, by name, so that checkpoints and containers can name what they hold.

`build(name)` returns a fresh torch module. Add an architecture with one entry in `_REGISTRY`.
A name may carry integer options, "bert:heads=12,layers=6" (stored as given in a container's
metadata, so `load` rebuilds the same module). `build(name, shapes=...)` also sizes the module
from a checkpoint's tensor shapes where the factory has a `config_from_shapes` (class counts,
BERT's widths and depth), so that state_dicts of other sizes than the defaults load strictly.
"""
from __future__ import annotations

import importlib

from ..errors import CdlInputError

# name -> "module:factory"; factories take keyword arguments and return an nn.Module.
_REGISTRY = {
    "lenet5": "cdlcodec.models.lenet:LeNet5",
    "resnet20": "cdlcodec.models.resnet:ResNet20",
    "resnet18": "cdlcodec.models.resnet:ResNet18",
    "mobilenetv2": "cdlcodec.models.mobilenet:MobileNetV2",
    "bert": "cdlcodec.models.bert:Bert",
}


def names() -> list[str]:
    return list(_REGISTRY)


def register(name: str, target: str) -> None:
    _REGISTRY[name] = target


def parse(spec: str) -> tuple[str, dict[str, int]]:
    """("bert", {"heads": 12}) from "bert:heads=12"; unknown names and malformed options are refused."""
    name, _, options = spec.partition(":")
    if name not in _REGISTRY:
        raise CdlInputError(f"unknown architecture {name!r} (known: {', '.join(_REGISTRY)})")
    kwargs = {}
    for option in filter(None, options.split(",")):
        key, eq, value = option.partition("=")
        if not (eq and key.isidentifier() and value.isdigit()):
            raise CdlInputError(f"architecture {spec!r}: options are KEY=INTEGER separated by commas, got {option!r}")
        kwargs[key] = int(value)
    return name, kwargs


def build(spec: str, shapes: dict | None = None, **kwargs):
    name, options = parse(spec)
    module_name, _, factory_name = _REGISTRY[name].partition(":")
    factory = getattr(importlib.import_module(module_name), factory_name)
    sized = factory.config_from_shapes(shapes) if shapes and hasattr(factory, "config_from_shapes") else {}
    try:
        return factory(**{**sized, **options, **kwargs})
    except (TypeError, ValueError) as exc:  # an option the factory does not take, or sizes that do not fit
        raise CdlInputError(f"architecture {spec!r}: {exc}") from None
