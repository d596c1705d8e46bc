"""Lossless backends for integer levels, looked up by name.

Adding a backend is one module that defines a class following `base.Backend` plus one line in
`_BUILTIN` below. Modules are imported only when a backend is first used, which keeps the command
line quick to start.
"""
from __future__ import annotations

import importlib

from ..errors import CdlFormatError, CdlInputError
from .base import Backend, EncodeHint, MAX_ABS_LEVEL

# name -> "module:ClassName". Order matters for `auto`: on a tie the earlier backend wins.
_BUILTIN = {
    "raw": "cdlcodec.backends.raw:RawBackend",
    "huffman": "cdlcodec.backends.huffman:HuffmanBackend",
    "cabac": "cdlcodec.backends.cabac:CabacBackend",
}
_instances: dict[str, Backend] = {}


def register(name: str, target: str) -> None:
    """Register a backend class given as "module:ClassName" (for plug-ins outside this package)."""
    _BUILTIN[name] = target
    _instances.pop(name, None)


def available() -> list[str]:
    """Names of the backends whose modules import on this machine."""
    names = []
    for name in _BUILTIN:
        try:
            get(name)
        except CdlInputError:
            continue
        names.append(name)
    return names


def get(name: str) -> Backend:
    """Backend instance by name; CdlInputError for an unknown or unavailable one."""
    if name in _instances:
        return _instances[name]
    if name not in _BUILTIN:
        raise CdlInputError(f"unknown backend {name!r} (known: {', '.join(_BUILTIN)}, auto)")
    module_name, _, cls_name = _BUILTIN[name].partition(":")
    try:
        cls = getattr(importlib.import_module(module_name), cls_name)
    except (ImportError, AttributeError) as exc:
        raise CdlInputError(f"backend {name!r} is not available: {exc}") from exc
    _instances[name] = cls()
    return _instances[name]


def get_for_decoding(name: str) -> Backend:
    """Like `get`, but an unknown name is a format problem of the file being read."""
    try:
        return get(name)
    except CdlInputError as exc:
        raise CdlFormatError(f"payload uses backend {name!r}, which this cdlcodec cannot decode") from exc


__all__ = ["Backend", "EncodeHint", "MAX_ABS_LEVEL", "register", "available", "get", "get_for_decoding"]
