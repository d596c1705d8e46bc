"""Dispatch on the model file's kind: which adapter reads it, which writes it.

Every adapter follows one naming scheme: module `cdlcodec.io.<module>` defines `read_<kind>(path) ->
ModelFile` and/or `write_<kind>(path, model, **options) -> None`. `ADAPTERS` maps each kind to them,
and a kind whose file can be written tensor by tensor to its streaming writer class (imported on
first use, so reading a .safetensors file never imports torch or onnx); adding a kind of model file
is one adapter module plus one line here. Readers return lazy records where the file allows
(cdlcodec.io.lazy): a tensor's values are read when the encoder reaches it.
"""
from __future__ import annotations

import importlib
import os
from dataclasses import dataclass

from ..errors import CdlInputError
from ..optional import MissingDependency, missing_message
from ..records import ModelFile
from .cdl_checkpoint import with_cdl_sections


FOLDER_KIND = "safetensors.sharded"


@dataclass(frozen=True)
class Adapter:
    reader: str | None         # "module:function" reading a path into a ModelFile
    writer: str | None         # "module:function" writing a ModelFile to a path
    options: tuple[str, ...] = ()  # keyword options the writer accepts (decode passes them through)
    needs_torch: bool = False  # the writer imports torch: a clean error where it is absent
    # "module:Class" taking (path, [(name, dtype, shape)], **options), then add(record) per tensor and
    # close(): output written as the tensors are decoded (open_stream_writer)
    stream_writer: str | None = None


ADAPTERS = {
    "torch": Adapter("torch_checkpoint:read_torch", "torch_checkpoint:write_torch", needs_torch=True),
    "safetensors": Adapter("safetensors_file:read_safetensors", "safetensors_file:write_safetensors",
                           stream_writer="safetensors_file:SafetensorsWriter"),
    "onnx": Adapter("onnx_model:read_onnx", "onnx_writer:write_onnx",
                    options=("weights", "int4", "keep_opset", "matmul_nbits", "matmul_integer")),
    "torch.export": Adapter("torch_export:read_torch_export", "torch_export:write_torch_export", needs_torch=True),
    # a folder of safetensors shards with its *.safetensors.index.json (read from the folder or the index file)
    FOLDER_KIND: Adapter("sharded:read_sharded", "sharded:write_sharded"),
}
READ_KINDS = {".pt": "torch", ".pth": "torch", ".bin": "torch", ".ckpt": "torch", ".safetensors": "safetensors",
              ".onnx": "onnx", ".pt2": "torch.export", ".json": FOLDER_KIND}
WRITE_KINDS = {".pt": "torch", ".pth": "torch", ".safetensors": "safetensors", ".onnx": "onnx",
               ".pt2": "torch.export"}


def kind_of(path: str, table: dict[str, str], what: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext not in table:
        raise CdlInputError(f"cannot {what} {path!r}: unknown extension {ext or '(none)'!r} "
                            f"(supported: {', '.join(sorted(table))})")
    return table[ext]


def _function(target: str):
    module, _, name = target.partition(":")
    return getattr(importlib.import_module(f"{__package__}.{module}"), name)


def read_model(path: str) -> ModelFile:
    """All tensors of a model file as records, in the file's order, plus its graph if it has one."""
    if not os.path.exists(path):
        raise CdlInputError(f"{path}: no such file")
    kind = FOLDER_KIND if os.path.isdir(path) else kind_of(path, READ_KINDS, "read")
    model = _function(ADAPTERS[kind].reader)(path)
    return with_cdl_sections(model)  # a CDL checkpoint: its graph, activation sections and cdl.* metadata


def _need_torch(what: str) -> None:
    """A clean error instead of an ImportError where torch is absent (edge devices decode to ONNX)."""
    try:
        import torch  # noqa: F401
    except ImportError:
        raise MissingDependency(f"{missing_message('torch', what)} (or decode to .onnx or .safetensors, "
                                "which need no torch)") from None


def check_writable_kind(path: str) -> str:
    """The kind `path` would be written as; CdlInputError for an unknown extension (checked before
    any decoding work). A folder (an existing one, a path ending in a separator, or a name without
    an extension) is a sharded safetensors checkpoint."""
    if is_folder_output(path):
        return FOLDER_KIND
    return kind_of(path, WRITE_KINDS, "write")


def is_folder_output(path: str) -> bool:
    return path.endswith(("/", os.sep)) or os.path.isdir(path) or not os.path.splitext(path)[1]


def _writer_options(path: str, options: dict) -> tuple[str, Adapter, dict]:
    """(kind, adapter, options) for writing `path`; CdlInputError for an option its writer lacks."""
    kind = check_writable_kind(path)
    adapter = ADAPTERS[kind]
    options = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(options) - set(adapter.options))
    if unknown == ["weights"] and options["weights"] == "float":
        unknown, options = [], {}  # float weights are what every other writer produces anyway
    if unknown:
        raise CdlInputError(f"option {', '.join(unknown)} does not apply to {kind} output ({path})")
    if adapter.needs_torch:
        _need_torch(f"writing {path}")
    return kind, adapter, options


def write_model(path: str, model: ModelFile, **options) -> None:
    """Write decoded tensors (and the graph, for kinds that need one) to `path`, atomically."""
    _, adapter, options = _writer_options(path, options)
    _function(adapter.writer)(path, model, **options)


def open_stream_writer(path: str, plan: ModelFile, **options):
    """A writer that takes the tensors of `plan` (names, dtypes and shapes, in order; their values are
    not read) one at a time, `add(record)` each then `close()` (or use it as a context manager; an
    exception leaves no file), for kinds whose file can be written so; None for the others (write_model
    then). Options are checked as write_model checks them."""
    kind, adapter, options = _writer_options(path, options)
    if adapter.stream_writer is None:
        return None
    return _function(adapter.stream_writer)(path, [(r.name, r.dtype, r.shape) for r in plan.records], **options)
