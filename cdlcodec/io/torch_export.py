"""Programs saved with torch.export (.pt2) in and out.

Reading: every state_dict entry of the ExportedProgram (parameters and persistent buffers) becomes
a tensor record; the program itself, with each of those tensors replaced by a zero-stride view of a
single zero (so its data costs a few bytes), is saved with torch.export.save into section kind
"torch.export" (formats/graph-sections.md). Lifted constants and tensors of dtypes cdlcodec does not
store stay inside that program unchanged.

Writing / loading: the stored program is loaded with torch.export.load, its state_dict entries are
replaced by the decoded tensors (names, shapes and dtypes verified), and it is saved again or
returned as a module. The serialized program is tied to torch's export schema: a container made
with one torch release may not load in a much older or newer one; that case is reported as a
CdlInputError naming both versions, and the weights can still be decoded to .pt / .safetensors.

torch.export.load runs pickles and code found in an archive, so every archive, a .pt2 file given
on the command line or a section of a .cdl file, is read once into memory, checked by
pt2_archive.check_pt2_archive, and only those bytes are loaded. Output is serialized in memory and
written atomically: a full disk is an OSError of our own write, and the bytes do not depend on the
output's file name.
"""
from __future__ import annotations

import io
import logging
import warnings

from ..atomic import write_bytes_atomic
from ..errors import CdlFormatError, CdlInputError
from ..records import ModelFile, TensorRecord
from .pt2_archive import check_pt2_archive

GRAPH_SECTION_NAME = "model.pt2"
GRAPH_SECTION_KIND = "torch.export"


class _Capture(logging.Handler):
    """Keeps what torch.export logs while loading (it logs the real cause, then raises a generic error)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        text = record.getMessage()
        if record.exc_info and record.exc_info[1] is not None:
            text += "\n" + str(record.exc_info[1])
        self.lines += [line.strip() for line in text.splitlines() if line.strip()]


def _load_program(data: bytes, what: str, exported_with: str | None = None, refuse_as=CdlInputError):
    """torch.export.load of archive bytes that passed check_pt2_archive (refusals raise `refuse_as`)."""
    import torch

    check_pt2_archive(data, what, refuse_as)
    logger = logging.getLogger("torch.export")
    capture, propagate, handlers = _Capture(), logger.propagate, logger.handlers[:]
    logger.handlers = [capture]
    logger.propagate = False  # torch would print a traceback to stderr; we report one line instead
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return torch.export.load(io.BytesIO(data))
    except Exception as exc:  # torch raises many types here (schema mismatch, bad zip, KeyError ...)
        origin = f" (exported with torch {exported_with})" if exported_with else ""
        cause = capture.lines[-1] if capture.lines else (str(exc).strip().splitlines() or ["no details"])[0]
        raise CdlInputError(
            f"{what}: cannot be loaded by torch.export in torch {torch.__version__}{origin}: "
            f"{type(exc).__name__}: {cause[:240].rstrip('.')}. "
            "A .pt2 program only loads in a compatible torch release; decode the weights to .pt or "
            ".safetensors instead, or re-export the model with this torch") from None
    finally:
        logger.handlers = handlers
        logger.propagate = propagate


def read_torch_export(path: str) -> ModelFile:
    import torch

    from .torch_checkpoint import tensor_to_record

    with open(path, "rb") as fh:
        data = fh.read()  # once: what is checked is what is loaded
    program = _load_program(data, path)
    records: list[TensorRecord] = []
    for name, value in list(program.state_dict.items()):
        if not isinstance(value, torch.Tensor):
            continue
        try:
            records.append(tensor_to_record(name, value))
        except CdlInputError:
            continue  # unsupported dtype: stays in the stored program as it is
        stub = torch.zeros((), dtype=value.dtype).expand(value.shape)
        program.state_dict[name] = torch.nn.Parameter(stub, requires_grad=value.requires_grad) \
            if isinstance(value, torch.nn.Parameter) else stub
    if not any(r.is_float for r in records):
        raise CdlInputError(f"{path}: the exported program has no float parameters or buffers to compress")
    buf = io.BytesIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.export.save(program, buf)
    metadata = {"source.kind": "torch.export", "graph": GRAPH_SECTION_KIND, "torch.version": torch.__version__}
    return ModelFile(records, [(GRAPH_SECTION_NAME, GRAPH_SECTION_KIND, buf.getvalue())], metadata)


def program_section(model: ModelFile):
    for section in model.sections:
        if section[1] == GRAPH_SECTION_KIND:
            return section
    return None


def program_from_model(model: ModelFile):
    """The ExportedProgram stored in a decoded container, with the decoded weights in place."""
    import torch

    from .torch_checkpoint import record_to_tensor

    section = program_section(model)
    if section is None:
        raise CdlInputError("this container carries no torch.export program (it was not encoded from a .pt2 file)")
    program = _load_program(section[2], f"section {section[0]!r}", model.metadata.get("torch.version"),
                            refuse_as=CdlFormatError)
    records = {r.name: r for r in model.records}
    for name, stub in list(program.state_dict.items()):
        rec = records.get(name)
        if rec is None:
            if isinstance(stub, torch.Tensor) and stub.numel() > 1 and all(st == 0 for st in stub.stride()):
                raise CdlFormatError(f"the stored program needs tensor {name!r}, which the container does not hold")
            continue  # kept inside the program (a dtype cdlcodec does not store)
        tensor = record_to_tensor(rec)
        if tuple(tensor.shape) != tuple(stub.shape) or tensor.dtype != stub.dtype:
            raise CdlFormatError(f"container tensor {name!r} ({rec.dtype}, {rec.shape}) does not fit the stored "
                                 f"program ({stub.dtype}, {tuple(stub.shape)})")
        program.state_dict[name] = torch.nn.Parameter(tensor, requires_grad=stub.requires_grad) \
            if isinstance(stub, torch.nn.Parameter) else tensor
    return program


def write_torch_export(path: str, model: ModelFile) -> None:
    import torch

    program = program_from_model(model)
    buf = io.BytesIO()  # in memory first: torch's own file writer aborts the process on a full disk
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.export.save(program, buf)
    write_bytes_atomic(path, buf.getbuffer())
