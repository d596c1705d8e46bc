"""Optional dependencies: which install extra brings each, and one clear line when one is missing.

The core install (numpy, onnx, click) decodes to ONNX and safetensors, reads and verifies
containers; everything else comes with an extra (pyproject.toml). A module that cannot work without
an optional package calls `require` before importing it, so a user sees
`... needs torch: pip install "cdlcodec[torch]"` instead of an ImportError traceback.
"""
from __future__ import annotations

import importlib

from .errors import CdlInputError

# import name -> the extra that installs it
EXTRA_FOR = {
    "torch": "torch",
    "numba": "fast",
    "onnxruntime": "onnx",
    "mlxtend": "demo",
    "sklearn": "train",
    "matplotlib": "plot",
}


class MissingDependency(CdlInputError, ImportError):
    """An optional package is not installed. Also an ImportError, so `except ImportError` around an
    optional import keeps working."""


def missing_message(module: str, what: str) -> str:
    root = module.split(".")[0]
    extra = EXTRA_FOR.get(root, "all")
    return f'{what} needs {root}, which is not installed here: pip install "cdlcodec[{extra}]"'


def require(module: str, what: str):
    """Import `module` and return it, or raise MissingDependency naming `what` needs it."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        if (exc.name or "").split(".")[0] != module.split(".")[0]:
            raise  # the package is there but broken: not a missing dependency, show the real error
        raise MissingDependency(missing_message(module, what)) from None


def as_missing_dependency(exc: ImportError, what: str) -> MissingDependency | None:
    """The one-line error for an ImportError of an optional package (None for anything else)."""
    root = (getattr(exc, "name", None) or "").split(".")[0]
    if isinstance(exc, MissingDependency):
        return exc
    if root in EXTRA_FOR:
        return MissingDependency(missing_message(root, what))
    return None
