"""Checks every lossless backend must pass, shared by the backend test modules.

Golden streams: one file per input, layout uvarint(len(params)) || params || payload. Regenerate
only for a reviewed, deliberate format change: CDL_REGENERATE_GOLDEN=1 pytest ...
"""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from cdlcodec.backends.varint import read_uvarint, write_uvarint
from cdlcodec.errors import CdlDecodeError

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


def check_every_truncation_fails(backend, levels: np.ndarray) -> None:
    """Every cut of the payload or the params, and one extra byte on either, is a CdlDecodeError."""
    payload, params = backend.encode(levels)
    for cut in range(len(payload)):
        with pytest.raises(CdlDecodeError):
            backend.decode(payload[:cut], params, levels.size)
    for cut in range(len(params)):
        with pytest.raises(CdlDecodeError):
            backend.decode(payload, params[:cut], levels.size)
    with pytest.raises(CdlDecodeError):
        backend.decode(payload + b"\x00", params, levels.size)
    with pytest.raises(CdlDecodeError):
        backend.decode(payload, params + b"\x00", levels.size)
