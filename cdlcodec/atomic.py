"""Atomic output files: write a temporary file beside the target, then rename it into place.

A failed or interrupted run therefore never leaves a half-written file, and an existing file is
replaced only by a complete one. The result gets the permissions a plain open() would give
(0666 minus the umask), not mkstemp's private 0600.
"""
from __future__ import annotations

import contextlib
import os
import tempfile
from typing import Iterator


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[str]:
    """Yield a temporary path in the target's directory; on success it becomes `path`.

    For writers that insist on a file name (torch.save, torch.export.save). `suffix` lets a writer
    that looks at the extension see the right one.
    """
    target = os.path.abspath(os.fspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".cdlcodec-", suffix=suffix, dir=os.path.dirname(target))
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, target)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, suffix: str = ".tmp"):
    """Yield a binary file handle; on success the data is flushed to disk and renamed to `path`."""
    with atomic_path(path, suffix) as tmp:
        with open(tmp, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path) as fh:
        fh.write(data)
