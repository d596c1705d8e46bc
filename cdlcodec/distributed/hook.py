"""CO3 gradient compression as a DistributedDataParallel communication hook.

    state = CO3State(fmt="fp8", gamma=0.7)
    ddp_model.register_comm_hook(state, co3_hook)
    ... train ...
    print(state.stats())

Per bucket and step, every worker u
  1. adds its decayed error memory: v = g_t + gamma * m_{t-1} (eq. 13);
  2. converts v to fp4/fp8 with the L2-optimal exponent bias of this bucket (eq. 12) and codes the
     codes with a static Huffman code (GenNorm fit, eq. 10c, or the histogram): co3_codec;
  3. keeps m_t = gamma * m_{t-1} + g_t - g^_t = v - g^_t (eq. 14);
  4. all-gathers the variable-size frames (sizes first, then buffers padded to the largest: gloo
     has no variable-size all-gather, and an empty collective fails on gloo, so there never is one);
  5. decodes every worker's frame, its own included, sums them in rank order and divides by the
     world size. Every worker therefore computes the bit-identical average, as DDP requires.

Failure behaviour: a frame that is corrupt, truncated, or describes a different bucket raises
CdlDecodeError on every worker (all of them decode all frames), so no worker goes on to wait in the
next collective. A worker that stops taking part makes the others fail after `timeout` seconds
instead of hanging (and the process group's own timeout from init_process_group applies as well).
"""
# No `from __future__ import annotations` here: DDP inspects the hook's return annotation and
# accepts only the real object torch.futures.Future[torch.Tensor], not its string.
import collections
import time
from dataclasses import dataclass, field
from datetime import timedelta

import numpy as np
from ..optional import require
require("torch", "cdlcodec.distributed")
import torch
import torch.distributed as dist

from ..errors import CdlInputError
from . import co3_codec, fpconv, wire
from .exchange import all_gather_bytes


@dataclass
class CO3Counters:
    """Running totals of one worker. `bytes_sent` counts frame bytes (header + code table + payload)
    this worker contributed; `bytes_on_wire` adds the size exchange and the padding gloo's
    fixed-size all-gather needs; `raw_bytes` is what the uncompressed gradient would have been."""

    steps: int = 0
    buckets: int = 0
    bytes_sent: int = 0
    bytes_on_wire: int = 0
    raw_bytes: int = 0
    encode_s: float = 0.0
    decode_s: float = 0.0
    step_bytes: collections.deque = field(default_factory=lambda: collections.deque(maxlen=100_000))
    _current_step_bytes: int = 0

    @property
    def compression_ratio(self) -> float:
        return self.raw_bytes / self.bytes_sent if self.bytes_sent else float("nan")

    @property
    def bytes_per_step(self) -> float:
        return self.bytes_sent / self.steps if self.steps else float("nan")

    def as_dict(self) -> dict:
        return {
            "steps": self.steps,
            "buckets": self.buckets,
            "bytes_sent": self.bytes_sent,
            "bytes_on_wire": self.bytes_on_wire,
            "raw_bytes": self.raw_bytes,
            "bytes_per_step": self.bytes_per_step,
            "compression_ratio": self.compression_ratio,
            "encode_s": self.encode_s,
            "decode_s": self.decode_s,
        }


class CO3State:
    """Options, error memories (one per bucket index) and counters of the CO3 hook.

    fmt: "fp8" ([1, 5, 2]) or "fp4" ([1, 2, 1]). gamma: memory decay of eq. 13-14 (0 disables
    error feedback). code_source: "gennorm" (static code from the GenNorm fit) or "histogram".
    bias_source: "search" (direct search over the bucket) or "gennorm" (minimise the expected error
    under the fitted GenNorm). measure_only: communicate the exact fp32 gradient with all_reduce but
    still encode every bucket and count what CO3 would have sent. timeout: seconds any collective of
    the hook may wait before failing (None: the process group's timeout).
    """

    def __init__(self, process_group=None, *, fmt: str = "fp8", gamma: float = 0.0,
                 code_source: str = "gennorm", bias_source: str = "search", measure_only: bool = False,
                 timeout: float | None = 300.0):
        self.format = fpconv.get_format(fmt)
        if not (0.0 <= float(gamma) <= 1.0):
            raise CdlInputError(f"memory decay gamma must lie in [0, 1], got {gamma}")
        if code_source not in co3_codec.CODE_SOURCES:
            raise CdlInputError(f"unknown code source {code_source!r} (known: {', '.join(co3_codec.CODE_SOURCES)})")
        if bias_source not in co3_codec.BIAS_SOURCES:
            raise CdlInputError(f"unknown bias source {bias_source!r} (known: {', '.join(co3_codec.BIAS_SOURCES)})")
        self.process_group = process_group
        self.gamma = float(gamma)
        self.code_source = code_source
        self.bias_source = bias_source
        self.measure_only = bool(measure_only)
        self.timeout = None if timeout is None else timedelta(seconds=float(timeout))
        self.memory: dict[int, np.ndarray] = {}
        self.counters = CO3Counters()

    def stats(self) -> dict:
        return self.counters.as_dict()

    # The error memory of a bucket. DDP rebuilds its buckets after the first iteration, so an
    # index may come back with a different size: the old memory then no longer lines up with the
    # parameters and is dropped (it holds one step of error at most).
    def _memory_for(self, index: int, numel: int) -> np.ndarray | None:
        mem = self.memory.get(index)
        if mem is None or mem.size != numel:
            return None
        return mem


def max_frame_size(fmt: fpconv.FpFormat, numel: int) -> int:
    """Largest frame a well-behaved worker can send for a bucket of numel elements."""
    lengths = (fmt.num_codes * wire.LENGTH_BITS + 7) // 8
    return wire.GRAD_HEADER_SIZE + lengths + (numel * wire.MAX_CODE_LENGTH + 7) // 8


def average_frames(frames: list[bytes], numel: int) -> np.ndarray:
    """Decode every worker's frame and average: (((d0 + d1) + d2) + ...) / world, in float32."""
    total = None
    for rank, frame in enumerate(frames):
        values = co3_codec.decode_bucket(frame, numel, peer=f"worker {rank}")
        total = values.copy() if total is None else total + values
    return total / np.float32(len(frames))


def _finish_step(state: CO3State, bucket) -> None:
    is_last = getattr(bucket, "is_last", None)
    if is_last is not None and is_last():
        c = state.counters
        c.steps += 1
        c.step_bytes.append(c._current_step_bytes)
        c._current_step_bytes = 0


def _completed(tensor: torch.Tensor) -> torch.futures.Future[torch.Tensor]:
    fut = torch.futures.Future()
    fut.set_result(tensor)
    return fut


def co3_hook(state: CO3State, bucket) -> torch.futures.Future[torch.Tensor]:
    """DDP communication hook: `ddp_model.register_comm_hook(state, co3_hook)`.

    Returns a completed Future holding the averaged gradient as one tensor of the bucket's shape
    and dtype. `bucket` needs `buffer()`, `index()` and optionally `is_last()` (torch's GradBucket).
    """
    buffer: torch.Tensor = bucket.buffer()
    index = int(bucket.index())
    group = state.process_group
    world = dist.get_world_size(group)
    fmt = state.format
    c = state.counters
    grad = buffer.detach().to(torch.float32).cpu().numpy().ravel()
    numel = grad.size

    t0 = time.perf_counter()
    if state.measure_only:
        frame, _ = co3_codec.encode_bucket(grad, fmt, state.code_source, state.bias_source)
    else:
        mem = state._memory_for(index, numel) if state.gamma > 0 else None
        v = grad if mem is None else grad + np.float32(state.gamma) * mem  # eq. 13
        frame, ghat = co3_codec.encode_bucket(v, fmt, state.code_source, state.bias_source)
        if state.gamma > 0:
            residual = v - ghat  # eq. 14: gamma m_{t-1} + g_t - g^_t
            state.memory[index] = residual if np.all(np.isfinite(residual)) else np.zeros_like(residual)
    c.encode_s += time.perf_counter() - t0
    c.buckets += 1
    c.bytes_sent += len(frame)
    c._current_step_bytes += len(frame)
    c.raw_bytes += numel * buffer.element_size()

    if state.measure_only:
        c.bytes_on_wire += numel * buffer.element_size()
        _finish_step(state, bucket)
        fut = dist.all_reduce(buffer, group=group, async_op=True).get_future()
        return fut.then(lambda f: f.value()[0].div_(world))

    frames, wire_bytes = all_gather_bytes(frame, group, state.timeout, max_frame_size(fmt, numel))
    c.bytes_on_wire += wire_bytes
    t0 = time.perf_counter()
    avg = average_frames(frames, numel)
    c.decode_s += time.perf_counter() - t0
    _finish_step(state, bucket)
    out = torch.from_numpy(avg).to(buffer.dtype).view(buffer.shape)
    return _completed(out)


def register(ddp_model, process_group=None, **options) -> CO3State:
    """Create a CO3State with `options` and register co3_hook on a DistributedDataParallel model."""
    state = CO3State(process_group, **options)
    ddp_model.register_comm_hook(state, co3_hook)
    return state
