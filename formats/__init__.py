"""The .cdl container format (installed as `cdlcodec.formats`).

- SPEC.md: the written specification of container version 1, complete enough for a second
  implementation.
- container.py: the streaming writer and the validating reader; standalone (standard library only),
  with its own error classes, which cdlcodec.errors uses as its own; `concat_containers` joins part
  containers (one per tensor group, written by separate tasks or machines) into one without re-coding.
"""
from cdlcodec.formats.container import (FORMAT_MAJOR, FORMAT_MINOR, ConcatResult, ContainerError, ContainerReader,
                                        ContainerWriter, FormatError, FormatInputError, Limits, SectionEntry,
                                        TensorEntry, concat_containers)

__all__ = ["ContainerReader", "ContainerWriter", "Limits", "SectionEntry", "TensorEntry", "concat_containers",
           "ConcatResult",
           "FORMAT_MAJOR", "FORMAT_MINOR", "ContainerError", "FormatError", "FormatInputError"]
