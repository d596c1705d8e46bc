"""cdlcodec: compress trained neural networks into compact .cdl bitstreams and back.

Heavy modules (torch, numba kernels) are imported on first use, so `import cdlcodec` stays cheap.
"""
__version__ = "0.1.0"

__all__ = ["load", "load_into", "__version__"]


def __getattr__(name):
    # load / load_into live in cdlcodec.api and import torch when called, not when cdlcodec is imported.
    if name in ("load", "load_into"):
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'cdlcodec' has no attribute {name!r}")
