"""cdlcodec: compress trained neural networks into compact .cdl bitstreams and back.

Heavy modules (torch, numba kernels) are imported on first use, so `import cdlcodec` stays cheap.
"""
__version__ = "0.1.0"
