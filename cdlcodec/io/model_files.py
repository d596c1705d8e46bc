"""Dispatch on the model file's kind: which reader opens it, which writer produces it."""
from __future__ import annotations

import os

from ..errors import CdlInputError
from ..records import ModelFile, TensorRecord

READ_KINDS = {".pt": "torch", ".pth": "torch", ".bin": "torch", ".ckpt": "torch", ".safetensors": "safetensors",
              ".onnx": "onnx", ".pt2": "torch.export"}
WRITE_KINDS = {".pt": "torch", ".pth": "torch", ".safetensors": "safetensors", ".onnx": "onnx",
               ".pt2": "torch.export"}
# Options each writer accepts (decode_file passes them through); anything else is a usage error.
WRITER_OPTIONS = {"onnx": ("weights", "int4"), "torch": (), "safetensors": (), "torch.export": ()}


def kind_of(path: str, table: dict[str, str], what: str) -> str:
    ext = os.path.splitext(path)[1].lower()
    if ext not in table:
        raise CdlInputError(f"cannot {what} {path!r}: unknown extension {ext or '(none)'!r} "
                            f"(supported: {', '.join(sorted(table))})")
    return table[ext]


def read_model(path: str) -> ModelFile:
    """All tensors of a model file as records, in the file's order, plus its graph if it has one."""
    if not os.path.exists(path):
        raise CdlInputError(f"{path}: no such file")
    if os.path.isdir(path):
        raise CdlInputError(f"{path}: is a directory, expected a model file")
    kind = kind_of(path, READ_KINDS, "read")
    if kind == "onnx":
        from .onnx_model import read_onnx

        return read_onnx(path)
    if kind == "torch.export":
        from .torch_export import read_exported_program

        return read_exported_program(path)
    if kind == "safetensors":
        from ..formats.safetensors import read_safetensors

        records = [TensorRecord(n, a, d) for n, a, d in read_safetensors(path)]
    else:
        from .torch_checkpoint import read_torch_checkpoint

        records = read_torch_checkpoint(path)
    if not records:
        raise CdlInputError(f"{path}: contains no tensors")
    return ModelFile(records, [], {"source.kind": kind})


def _need_torch(what: str) -> None:
    """A clean error instead of an ImportError where torch is absent (edge devices decode to ONNX)."""
    try:
        import torch  # noqa: F401
    except ImportError:
        raise CdlInputError(f"{what} needs torch, which is not installed here; "
                            "decode to .onnx or .safetensors instead") from None


def write_model(path: str, model: ModelFile, **options) -> None:
    """Write decoded tensors (and the graph, for kinds that need one) to `path`, atomically."""
    kind = kind_of(path, WRITE_KINDS, "write")
    options = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(options) - set(WRITER_OPTIONS[kind]))
    if unknown == ["weights"] and options["weights"] == "float":
        unknown = []  # float weights are what every other writer produces anyway
    if unknown:
        raise CdlInputError(f"option {', '.join(unknown)} does not apply to {kind} output ({path})")
    records = model.records
    if kind == "onnx":
        from .onnx_writer import write_onnx

        write_onnx(path, model, **options)
        return
    if kind in ("torch", "torch.export"):
        _need_torch(f"writing {path}")
    if kind == "torch.export":
        from .torch_export import write_exported_program

        write_exported_program(path, model)
        return
    if kind == "safetensors":
        from ..formats.safetensors import write_safetensors

        write_safetensors(path, [(r.name, r.array, r.dtype) for r in records])
    else:
        from .torch_checkpoint import write_torch_state_dict

        write_torch_state_dict(path, records)
