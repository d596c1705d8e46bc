"""cdlcodec: compress trained neural networks into compact .cdl bitstreams and back.

    import cdlcodec
    cdlcodec.encode("model.onnx", "model.cdl")         # or a state_dict, or an nn.Module
    cdlcodec.decode("model.cdl", "decoded.onnx")
    module_or_state_dict = cdlcodec.load("model.cdl")

Heavy modules (torch, numba kernels) are imported on first use, so `import cdlcodec` stays cheap.
"""
__version__ = "0.1.0"

_API = ("encode", "decode", "load", "load_into")
__all__ = [*_API, "__version__"]


def __getattr__(name):
    # The API lives in cdlcodec.api and imports torch when called, not when cdlcodec is imported.
    if name in _API:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'cdlcodec' has no attribute {name!r}")
