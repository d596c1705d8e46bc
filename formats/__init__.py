"""The .cdl container format (installed as `cdlcodec.formats`).

- SPEC.md: the written specification of container version 1, complete enough for a second
  implementation.
- container.py: the streaming writer and the validating reader; standalone (standard library only),
  with its own error classes, which cdlcodec.errors uses as its own.
"""
from cdlcodec.formats.container import (FORMAT_MAJOR, FORMAT_MINOR, ContainerError, ContainerReader,
                                        ContainerWriter, FormatError, FormatInputError, Limits, SectionEntry,
                                        TensorEntry)

__all__ = ["ContainerReader", "ContainerWriter", "Limits", "SectionEntry", "TensorEntry",
           "FORMAT_MAJOR", "FORMAT_MINOR", "ContainerError", "FormatError", "FormatInputError"]
