"""Golden backend streams: one file per input, layout uvarint(len(params)) || params || payload.

Regenerate only for a reviewed, deliberate format change: CDL_REGENERATE_GOLDEN=1 pytest ...
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from cdlcodec.backends.raw import read_uvarint, write_uvarint

GOLDEN = Path(__file__).parent / "golden"


def golden_bytes(backend, levels) -> bytes:
    payload, params = backend.encode(levels)
    return write_uvarint(len(params)) + params + payload


def check_golden_stream(backend, name: str, levels: np.ndarray) -> None:
    """The encoder still writes the stored bytes, and the stored bytes decode to `levels`."""
    path = GOLDEN / name
    if os.environ.get("CDL_REGENERATE_GOLDEN") == "1":
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(golden_bytes(backend, levels))
    stored = path.read_bytes()
    assert golden_bytes(backend, levels) == stored
    params_len, start = read_uvarint(stored, 0)
    params, payload = stored[start:start + params_len], stored[start + params_len:]
    np.testing.assert_array_equal(backend.decode(payload, params, levels.size), levels)
