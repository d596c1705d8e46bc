"""The .cdl container format (installed as `cdlcodec.formats`).

- SPEC.md: the written specification of container version 1, complete enough for a second
  implementation.
- container.py: the streaming writer and the validating reader.
- safetensors.py: a small, pickle-free reader/writer for .safetensors model files.
"""
from .container import (ContainerReader, ContainerWriter, Limits, SectionEntry, TensorEntry,
                        FORMAT_MAJOR, FORMAT_MINOR)

__all__ = ["ContainerReader", "ContainerWriter", "Limits", "SectionEntry", "TensorEntry",
           "FORMAT_MAJOR", "FORMAT_MINOR"]
