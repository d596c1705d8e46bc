"""Atomic output files: write a temporary file beside the target, then rename it into place.

A failed or interrupted run therefore never leaves a half-written file, and an existing file is
replaced only by a complete one. The result gets the permissions a plain open() would give
(0666 minus the umask), not mkstemp's private 0600.
"""
from __future__ import annotations

import os

from cdlcodec.errors import CdlInputError
# The implementation lives in the standalone container module, which needs it and imports nothing
# from cdlcodec; every other writer uses the same one through here.
from cdlcodec.formats.container import atomic_open, atomic_path

__all__ = ["atomic_open", "atomic_path", "refuse_to_overwrite", "write_bytes_atomic"]


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
