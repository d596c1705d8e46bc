"""Typed errors. The CLI turns every CdlError into `cdlcodec: error: <message>` and a non-zero exit."""


class CdlError(Exception):
    """Base class for every error cdlcodec reports to a user (never a bug in cdlcodec itself)."""


class CdlFormatError(CdlError):
    """A .cdl container (or a payload inside it) is malformed, truncated, corrupt or unsupported."""


class CdlInputError(CdlError):
    """An input model, option or argument cannot be used (wrong kind of file, unsupported dtype, ...)."""


class CdlDecodeError(CdlFormatError):
    """An entropy-coded payload could not be decoded (ends early, corrupt, or decodes to the wrong count)."""
