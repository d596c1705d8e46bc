"""Typed errors. The CLI turns every CdlError into `cdlcodec: error: <message>` and a non-zero exit.

The container module (cdlcodec.formats.container) is standalone and defines the root classes it
raises; cdlcodec's names are those very classes, so `except CdlFormatError` catches a container's
error and a container error is a CdlError. (An `except` clause matches by real inheritance only,
so a subclass defined here could not catch what the container raises.)
"""
from cdlcodec.formats.container import ContainerError as CdlError
from cdlcodec.formats.container import FormatError as CdlFormatError
from cdlcodec.formats.container import FormatInputError as CdlInputError


class CdlDecodeError(CdlFormatError):
    """An entropy-coded payload could not be decoded (ends early, corrupt, or decodes to the wrong count)."""


__all__ = ["CdlError", "CdlFormatError", "CdlInputError", "CdlDecodeError"]
