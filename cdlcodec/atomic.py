"""Atomic output files: write a temporary file beside the target, then rename it into place.

A failed or interrupted run therefore never leaves a half-written file, and an existing file is
replaced only by a complete one. The result gets the permissions a plain open() would give
(0666 minus the umask), not mkstemp's private 0600.
"""
from __future__ import annotations

import contextlib
import errno
import os
import tempfile
from typing import Iterator

from .errors import CdlInputError


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
    try:
        fd, tmp = tempfile.mkstemp(prefix=".cdlcodec-", suffix=suffix, dir=os.path.dirname(target))
    except OSError as exc:  # its message would name the temporary file, which the user never chose
        raise _cannot_write(path, exc) from None
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        try:
            os.replace(tmp, target)
        except OSError as exc:  # e.g. the output is an existing directory
            raise _cannot_write(path, exc) from None
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


def _cannot_write(path: str | os.PathLike, exc: OSError) -> CdlInputError:
    reasons = {errno.ENOENT: f"no such directory {os.path.dirname(os.path.abspath(path))}",
               errno.ENOTDIR: "a part of its directory path is not a directory",
               errno.EACCES: "permission denied", errno.EPERM: "permission denied",
               errno.EROFS: "read-only file system", errno.EISDIR: "it is a directory"}
    return CdlInputError(f"cannot write {os.fspath(path)}: {reasons.get(exc.errno, exc.strerror or str(exc))}")


def refuse_to_overwrite(output: str | os.PathLike, *inputs: str | os.PathLike) -> None:
    """CdlInputError when `output` is one of `inputs` (the same file, links included): writing it
    would replace an input with the result, e.g. a model with its lossy container."""
    for source in inputs:
        try:
            same = os.path.samefile(source, output)
        except OSError:  # one of them does not exist (yet): not the same file
            continue
        if same:
            raise CdlInputError(f"the output {os.fspath(output)} is the input file {os.fspath(source)}; "
                                "choose another output name")


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    with atomic_open(path) as fh:
        fh.write(data)
