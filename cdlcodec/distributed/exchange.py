"""Moving variable-size byte strings between workers with torch.distributed collectives.

gloo has no variable-size all_gather and fails on empty tensors, so sizes travel first (one
int64 per worker) and the bytes second, padded to the largest; when every string is empty the
second collective is skipped, a decision every worker takes identically from the same sizes.
Each collective waits at most `timeout`; a stalled, dead or lying peer becomes a CdlDecodeError.
"""
from __future__ import annotations

from datetime import timedelta

from ..optional import require
require("torch", "cdlcodec.distributed")
import torch
import torch.distributed as dist

from ..errors import CdlDecodeError, CdlError


def _wait(work, timeout: timedelta | None, what: str) -> None:
    try:
        if timeout is None:
            work.wait()
        else:
            work.wait(timeout)
    except CdlError:
        raise
    except Exception as exc:  # gloo reports timeouts and dead peers as RuntimeError
        raise CdlDecodeError(f"{what} failed (peer gone, stalled or timed out): {exc}") from exc


def all_gather_bytes(data: bytes, group=None, timeout: timedelta | None = None,
                     max_size: int | None = None) -> tuple[list[bytes], int]:
    """Every worker's byte string, in rank order, plus the bytes this worker put on the wire.

    Two collectives: the sizes (int64, one each), then the buffers padded to the largest size.
    When every buffer is empty the second collective is skipped (gloo fails on empty tensors);
    all workers see the same sizes, so they all make the same decision. Sizes above max_size are
    rejected by every worker before anything is allocated.
    """
    world = dist.get_world_size(group)
    size = torch.tensor([len(data)], dtype=torch.int64)
    sizes = [torch.zeros(1, dtype=torch.int64) for _ in range(world)]
    _wait(dist.all_gather(sizes, size, group=group, async_op=True), timeout, "exchanging frame sizes")
    sizes_i = [int(s.item()) for s in sizes]
    for rank, s in enumerate(sizes_i):
        if s < 0 or (max_size is not None and s > max_size):
            raise CdlDecodeError(f"worker {rank} announces a frame of {s} bytes (allowed 0..{max_size})")
    longest = max(sizes_i)
    if longest == 0:
        return [b"" for _ in range(world)], 8
    buf = torch.zeros(longest, dtype=torch.uint8)
    if data:
        buf[: len(data)] = torch.frombuffer(bytearray(data), dtype=torch.uint8)
    outs = [torch.empty(longest, dtype=torch.uint8) for _ in range(world)]
    _wait(dist.all_gather(outs, buf, group=group, async_op=True), timeout, "exchanging frames")
    return [outs[r][: sizes_i[r]].numpy().tobytes() for r in range(world)], 8 + longest


def broadcast_bytes(data: bytes | None, src: int = 0, group=None, timeout: timedelta | None = None,
                    max_size: int | None = None) -> bytes:
    """`data` from rank `src` on every worker (other ranks pass None): size first, then bytes."""
    rank = dist.get_rank(group)
    size = torch.tensor([len(data) if rank == src else 0], dtype=torch.int64)
    _wait(dist.broadcast(size, src, group=group, async_op=True), timeout, "broadcasting a size")
    n = int(size.item())
    if n < 0 or (max_size is not None and n > max_size):
        raise CdlDecodeError(f"worker {src} announces {n} bytes (allowed 0..{max_size})")
    if n == 0:
        return b""
    buf = torch.empty(n, dtype=torch.uint8)
    if rank == src:
        buf.copy_(torch.frombuffer(bytearray(data), dtype=torch.uint8))
    _wait(dist.broadcast(buf, src, group=group, async_op=True), timeout, "broadcasting bytes")
    return buf.numpy().tobytes()
