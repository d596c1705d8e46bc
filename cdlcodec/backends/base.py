"""The interface every lossless backend implements.

A backend turns a 1-D array of integer levels into payload bytes plus small parameter bytes, and
back. The container stores the backend's name and its parameter bytes verbatim; it never looks
inside them. Backends must be deterministic (same levels -> same bytes) and must decode bit-exactly
on every platform, so no floating point may influence the coded bytes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from ..errors import CdlDecodeError

# Hard ceiling on the levels any backend accepts; keeps every intermediate inside int64.
MAX_ABS_LEVEL = 2**31 - 1


@dataclass(frozen=True)
class EncodeHint:
    """Optional side information an encoder may use (it must never be needed to decode).

    pmf: a prior over levels, e.g. the MPMF learned by CDL training, as (levels, probabilities).
    shape: the tensor shape, so context models may look at the previous row of a matrix.
    """

    pmf: tuple[np.ndarray, np.ndarray] | None = None
    shape: tuple[int, ...] | None = None


class Backend(Protocol):
    name: str  # registry name, stored in the container ("raw", "huffman", "cabac")

    def encode(self, levels: np.ndarray, hint: EncodeHint | None = None) -> tuple[bytes, bytes]:
        """levels: 1-D int64 array. Returns (payload, params)."""

    def decode(self, payload: bytes, params: bytes, count: int, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """Returns exactly `count` int64 levels or raises CdlDecodeError; never reads past `payload`.

        Refuses, before allocating anything proportional to `count`, a count above `max_count`."""

    def max_count(self, payload_len: int, params: bytes) -> int | None:
        """The most levels a payload of `payload_len` bytes with these params can honestly hold, from
        the backend's least cost per level (decompression-bomb guard: checked before allocating).

        None when the params describe a constant tensor that needs no payload at all: any count is
        honest, and only Limits.max_decoded_bytes bounds it. CdlDecodeError for malformed params."""

    def estimate_bits(self, levels: np.ndarray, hint: EncodeHint | None = None) -> float:
        """Bits `encode` would spend on these levels (exact or a close estimate)."""


def check_count(backend: str, payload_len: int, count: int, bound: int | None) -> None:
    """CdlDecodeError when `count` levels exceed `bound`, the `max_count` of a `backend` payload."""
    if bound is not None and count > bound:
        raise CdlDecodeError(f"{count:,} levels cannot come from a {payload_len:,}-byte {backend} payload "
                             f"(at most {bound:,})")
