"""The interface every lossless backend implements.

A backend turns a 1-D array of integer levels into payload bytes plus small parameter bytes, and
back. The container stores the backend's name and its parameter bytes verbatim; it never looks
inside them. Backends must be deterministic (same levels -> same bytes) and must decode bit-exactly
on every platform, so no floating point may influence the coded bytes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator, Protocol

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
    # Optional, False if absent: encode also takes int8/int16/int32 levels (a big tensor's levels held
    # narrow) and reads them in int64 blocks; other backends are given int64 levels.
    narrow_levels: bool

    def encode(self, levels: np.ndarray, hint: EncodeHint | None = None) -> tuple[bytes, bytes]:
        """levels: 1-D int64 array. Returns (payload, params)."""

    def decode(self, payload: bytes, params: bytes, count: int, shape: tuple[int, ...] | None = None) -> np.ndarray:
        """Returns exactly `count` int64 levels or raises CdlDecodeError; never reads past `payload`.

        Refuses, before allocating anything proportional to `count`, a count above `max_count`."""

    def decode_blocks(self, payload: bytes, params: bytes, count: int, shape: tuple[int, ...] | None = None,
                      block: int | None = None) -> Iterator[np.ndarray]:
        """Optional: the levels `decode` returns, as consecutive int64 arrays of about `block` levels
        each (None: one array), so that a decoder never holds a big tensor's levels at once. Checks
        as `decode`; an error may come after some blocks were given (the caller then discards them)."""

    def max_count(self, payload_len: int, params: bytes) -> int | None:
        """The most levels a payload of `payload_len` bytes with these params can honestly hold, from
        the backend's least cost per level (decompression-bomb guard: checked before allocating).

        None when the params describe a constant tensor that needs no payload at all: any count is
        honest, and only Limits.max_decoded_bytes bounds it. CdlDecodeError for malformed params."""

    def estimate_bits(self, levels: np.ndarray, hint: EncodeHint | None = None) -> float:
        """Bits `encode` would spend on these levels (exact or a close estimate)."""


# Levels a decoder holds at once when it asks a backend for blocks (8 MB of int64).
DECODE_BLOCK = 1 << 20


def level_blocks(backend, payload: bytes, params: bytes, count: int, shape=None,
                 block: int = DECODE_BLOCK) -> Iterator[np.ndarray]:
    """`backend`'s levels in blocks of about `block`; a whole array from a (plug-in) backend
    without decode_blocks."""
    blocks = getattr(backend, "decode_blocks", None)
    if blocks is None:
        yield backend.decode(payload, params, count, shape)
    else:
        yield from blocks(payload, params, count, shape, block)


def gathered(blocks: Iterator[np.ndarray], count: int) -> np.ndarray:
    """The `count` levels of `blocks` as one int64 array (decode() from decode_blocks(block=None):
    a single block is handed back as it is)."""
    parts = list(blocks)
    if len(parts) == 1 and parts[0].size == count:
        return parts[0]
    out = np.empty(count, dtype=np.int64)
    done = 0
    for part in parts:
        if done + part.size > count:
            raise CdlDecodeError(f"decoded more than the {count} levels asked for")
        out[done:done + part.size] = part
        done += part.size
    if done != count:
        raise CdlDecodeError(f"decoded {done} of {count} levels")
    return out


def check_count(backend: str, payload_len: int, count: int, bound: int | None) -> None:
    """CdlDecodeError when `count` levels exceed `bound`, the `max_count` of a `backend` payload."""
    if bound is not None and count > bound:
        raise CdlDecodeError(f"{count:,} levels cannot come from a {payload_len:,}-byte {backend} payload "
                             f"(at most {bound:,})")
