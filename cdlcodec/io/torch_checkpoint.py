"""torch checkpoints: state_dicts saved with torch.save, read with weights_only=True only.

Accepted: a flat {name: tensor} state_dict, or a checkpoint that wraps one: under one of the names
training scripts use ("state_dict", "model", "model_state", "model_state_dict", "net", ...), or as
its only entry that maps names to tensors (Resemblyzer's {"step", "model_state", "optimizer_state"}
was refused before). Untrusted pickles are never executed: weights_only=True refuses anything but tensors and
plain containers, and we never fall back to unsafe loading. Python objects beside the weights (a
Lightning checkpoint's hyper-parameters as omegaconf containers, an argparse.Namespace) are read
as inert placeholders, never imported or run, and ignored (see _load_with_placeholders).
"""
from __future__ import annotations

import io
import pickle
import re
import warnings
import zipfile
from functools import partial

import numpy as np

from ..atomic import write_bytes_atomic
from ..errors import CdlInputError
from ..records import ModelFile, TensorRecord
from .lazy import LazyTensorRecord, drop_pages

_TORCH_TO_NAME = {
    "torch.float64": "float64", "torch.float32": "float32", "torch.float16": "float16",
    "torch.bfloat16": "bfloat16", "torch.int64": "int64", "torch.int32": "int32",
    "torch.int16": "int16", "torch.int8": "int8", "torch.uint8": "uint8", "torch.bool": "bool",
}


def tensor_to_record(name: str, tensor, copy: bool = True) -> TensorRecord:
    """copy=False shares memory with the tensor (fine for a checkpoint just loaded, not for a live model)."""
    import torch

    dtype = checked_dtype(name, tensor)
    t = tensor.detach().cpu().contiguous()
    if dtype == "bfloat16":
        arr = t.view(torch.int16).numpy().view(np.uint16)
    else:
        arr = t.numpy()
    return TensorRecord(name, np.array(arr, copy=True) if copy else arr, dtype)


def checked_dtype(name: str, tensor) -> str:
    """The dtype name of a dense tensor cdlcodec can store; CdlInputError naming it otherwise."""
    import torch

    layout = str(tensor.layout).removeprefix("torch.")
    if tensor.is_nested:
        raise CdlInputError(f"tensor {name!r} is a nested tensor; save its components as separate dense tensors")
    if layout.startswith("sparse"):
        raise CdlInputError(f"tensor {name!r} is sparse ({layout}); save it dense (tensor.to_dense())")
    if tensor.layout != torch.strided:
        raise CdlInputError(f"tensor {name!r} has layout {layout}; save it as a dense tensor")
    if tensor.is_meta:
        raise CdlInputError(f"tensor {name!r} is on the meta device and holds no values")
    dtype = _TORCH_TO_NAME.get(str(tensor.dtype))
    if dtype is None:
        raise CdlInputError(f"tensor {name!r} has unsupported dtype {tensor.dtype}")
    return dtype


def record_to_tensor(record: TensorRecord):
    import torch

    if record.dtype == "bfloat16":
        return torch.from_numpy(record.array.astype(np.uint16).view(np.int16).copy()).view(torch.bfloat16)
    return torch.from_numpy(np.array(record.array, copy=True))


# Where training scripts keep the weights in a checkpoint, most usual first.
STATE_DICT_KEYS = ("state_dict", "model", "model_state", "model_state_dict", "net", "network", "module",
                   "params", "weights")


def unwrap_state_dict(obj, path: str) -> dict:
    """The {name: tensor} mapping inside a loaded checkpoint."""
    import torch

    def holds_tensors(value) -> bool:
        return isinstance(value, dict) and any(isinstance(v, torch.Tensor) for v in value.values())

    if isinstance(obj, dict):
        for key in STATE_DICT_KEYS:
            if holds_tensors(obj.get(key)):
                return obj[key]
        if any(isinstance(v, torch.Tensor) for v in obj.values()):
            return obj
        # An optimizer's state keeps its tensors a level deeper ({"state": {0: {...}}}): not a candidate.
        inner = [str(k) for k, v in obj.items() if holds_tensors(v)]
        if len(inner) == 1:
            return obj[next(k for k in obj if str(k) == inner[0])]
        if inner:
            raise CdlInputError(f"{path}: the checkpoint holds several mappings of tensors ({', '.join(map(repr, inner))}); "
                                "save the one to encode on its own (torch.save(checkpoint[KEY], path))")
    if isinstance(obj, torch.nn.Module):  # unreachable with weights_only, kept for the message
        raise CdlInputError(f"{path}: holds a whole module; save its state_dict() instead")
    raise CdlInputError(f"{path}: no state_dict found (expected a mapping of names to tensors, "
                        "or a checkpoint that holds one, e.g. under 'state_dict' or 'model')")


def _looks_like_torch_file(path: str) -> bool:
    """torch.save writes a zip archive (or, in old versions, a pickle starting with protocol 2)."""
    with open(path, "rb") as fh:
        head = fh.read(4)
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def short_text(text: str, limit: int = 120) -> str:
    """`text` on one line, at most about `limit` characters, cut at a word boundary."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[:limit].rsplit(" ", 1)[0] + " ..."


def unpickling_refusal(exc: Exception) -> str:
    """What torch's weights_only loader refused, in a few whole words (never its advice to load
    unsafely): "it names <module.Class>" for a pickled object, else the first sentence of its reason."""
    text = str(exc)
    found = re.search(r"\bGLOBAL ([\w.]+)", text)
    if found:
        return f"it names {found.group(1)}"
    reasons = [line.strip().removeprefix("WeightsUnpickler error: ") for line in text.splitlines()
               if "Unsupported" in line]
    return short_text(reasons[0].split(". ")[0]) if reasons else "unsupported content"


def read_torch(path: str) -> ModelFile:
    """Every tensor of a torch checkpoint (a state_dict, or a wrapper holding one) as records."""
    records = read_torch_checkpoint(path)
    if not records:
        raise CdlInputError(f"{path}: contains no tensors")
    return ModelFile(records, [], {"source.kind": "torch"})


def read_torch_checkpoint(path: str) -> list[TensorRecord]:
    """The checkpoint's tensors as records, loaded with weights_only=True (memory-mapped where the
    file allows: then each record's pages leave memory once the encoder has written it)."""
    import torch

    if not _looks_like_torch_file(path):
        raise CdlInputError(f"{path}: not a readable torch checkpoint (neither a zip archive nor a pickle)")
    unreadable = (RuntimeError, EOFError, zipfile.BadZipFile, ValueError, AttributeError, ImportError, KeyError,
                  IndexError)
    try:
        obj, mapped = _load_weights_only(path)
    except pickle.UnpicklingError as exc:
        refusal = CdlInputError(f"{path}: refused to load: it holds a whole module or other Python objects, not only "
                                f"tensors ({unpickling_refusal(exc)}); save the model's state_dict() instead "
                                "(torch.save(model.state_dict(), path)); cdlcodec never unpickles code")
        state, mapped = _load_with_placeholders(path, unreadable)
        if state is None:
            raise refusal from None
    except unreadable as exc:
        raise CdlInputError(f"{path}: not a readable torch checkpoint ({type(exc).__name__}: {str(exc)[:200]})") from None
    else:
        state = unwrap_state_dict(obj, path)
    records, skipped = [], []
    for name, value in state.items():
        if isinstance(value, torch.Tensor):
            records.append(_lazy_record(str(name), value, mapped))
        else:
            skipped.append(str(name))
    if skipped:
        warnings.warn(f"{path}: ignored {len(skipped)} non-tensor entries: {', '.join(skipped[:5])}")
    return records


def _load_weights_only(path: str, placeholders=()):
    """torch.load(weights_only=True), memory-mapped where the file allows (zip checkpoints: tensors
    are paged in as they are encoded); `placeholders` are (class, "module.Name") pairs the loader may
    also build. Returns (object, mapped)."""
    import torch

    with warnings.catch_warnings(), torch.serialization.safe_globals(list(placeholders)):
        warnings.simplefilter("ignore")
        try:
            return torch.load(path, map_location="cpu", weights_only=True, mmap=True), True
        except RuntimeError as exc:
            if "mmap" not in str(exc):
                raise
            return torch.load(path, map_location="cpu", weights_only=True), False


def _placeholder(full_name: str) -> type:
    """A class standing in for the pickled global `full_name`: built from any arguments and any
    state, it keeps nothing and runs nothing (the real class is never imported)."""
    return type("Unloaded", (), {
        "__new__": lambda cls, *args, **kwargs: object.__new__(cls),
        "__init__": lambda self, *args, **kwargs: None,
        "__setstate__": lambda self, state: None,
        "__repr__": lambda self: f"<{full_name}, not loaded>",
        "__module__": __name__, "__qualname__": f"Unloaded[{full_name}]"})


def _load_with_placeholders(path: str, unreadable: tuple):
    """(state_dict, mapped) of a checkpoint whose weights are a plain state_dict next to pickled
    Python objects (a Lightning checkpoint's hyper-parameters as omegaconf containers, an
    argparse.Namespace): loaded again with weights_only=True, each global the loader refused
    standing for an inert placeholder, so that no code from the file runs and no module it names
    is imported. (None, False) when that finds no state_dict (the weights themselves are an object,
    e.g. a whole nn.Module: its parameters are in the placeholder's state, which is dropped) or
    the objects need more than a placeholder gives (appending to one)."""
    import torch

    try:
        names = torch.serialization.get_unsafe_globals_in_checkpoint(path)
        obj, mapped = _load_weights_only(path, [(_placeholder(n), n) for n in names])
        state = unwrap_state_dict(obj, path)
    except (pickle.UnpicklingError, CdlInputError, TypeError, *unreadable):
        return None, False
    if names:  # the file's own classes first (builtins a config refers to say little), in a fixed order
        names = sorted(names, key=lambda n: (n.split(".")[0] in ("builtins", "collections", "typing"), n))
        warnings.warn(f"{path}: ignored the Python objects next to the weights ({', '.join(names[:4])}"
                      f"{', ...' if len(names) > 4 else ''}): read as inert placeholders, never imported or run")
    return state, mapped


def _lazy_record(name: str, tensor, mapped: bool) -> LazyTensorRecord:
    """A record viewing `tensor` (checked now); for a memory-mapped checkpoint, releasing it drops the
    tensor's resident pages (file-backed and unmodified, so they are read again if needed)."""
    view = partial(_array_of, name, tensor)
    return LazyTensorRecord(name, checked_dtype(name, tensor), tuple(tensor.shape), view,
                            release=(lambda: drop_pages(view())) if mapped and tensor.is_contiguous() else None)


def _array_of(name: str, tensor) -> np.ndarray:
    return tensor_to_record(name, tensor, copy=False).array


def write_torch(path: str, model: ModelFile) -> None:
    """The decoded tensors as a plain torch state_dict file (sections have no place in it)."""
    write_torch_state_dict(path, model.records)


def write_torch_state_dict(path: str, records: list[TensorRecord]) -> None:
    """torch.save a plain state_dict (loadable with weights_only=True), atomically.

    Serialized in memory first: torch's file writer names the archive's folder after the (random)
    temporary file and fails on a full disk with an internal error; in memory the folder is always
    "archive", and a full disk is an OSError of the atomic write, reported and cleaned up."""
    import torch

    state = {r.name: record_to_tensor(r) for r in records}
    buf = io.BytesIO()
    torch.save(state, buf)
    write_bytes_atomic(path, buf.getbuffer())
