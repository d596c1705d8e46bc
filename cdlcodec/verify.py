"""Check a .cdl container completely without writing anything (`cdlcodec verify`).

In order, each step only after the previous one passed:
1. structure: magic, version, footer, the header/index checksum, the index against SPEC.md and
   every limit of `Limits` (the reader does this on open);
2. the CRC-32 of every payload and section (one streamed read of the file);
3. the decoded size against Limits.max_decoded_bytes, and every coded tensor's level count against
   what its payload can honestly hold (Backend.max_count) and a backend this cdlcodec has;
4. every tensor's quantization parameters (scheme known, steps finite and positive, the integer
   scheme only on integer dtypes, per-channel steps matching the shape);
5. every section parses as its kind: `json` as strict JSON, `onnx` with onnx.load_from_string,
   `torch.export` with the archive checker of cdlcodec.io.pt2_archive when it is installed;
6. unless quick: every payload is decoded and dequantized (one tensor at a time, then dropped),
   which catches corrupt coded streams and levels outside their dtype that no checksum can.
"""
from __future__ import annotations

import importlib
import json
from dataclasses import dataclass, field

from .codec import check_decodable, decode_entry
from .errors import CdlFormatError
from .formats.container import ContainerReader, Limits
from .quantizers import check_quant


@dataclass
class VerifyReport:
    path: str
    num_tensors: int
    num_sections: int
    num_params: int
    decoded_bytes: int
    decoded: bool                                   # False with quick=True: payloads were not decoded
    notes: list[str] = field(default_factory=list)  # what could not be checked, and why

    def summary(self) -> str:
        how = "payloads decoded" if self.decoded else "payloads not decoded (--quick)"
        text = (f"{self.path}: OK ({_count(self.num_tensors, 'tensor')}, {_count(self.num_sections, 'section')}, "
                f"{self.num_params:,} params, {self.decoded_bytes:,} decoded bytes; checksums verified, {how})")
        return "\n".join([text, *(f"  note: {note}" for note in self.notes)])


def verify_container(path: str, limits: Limits = Limits(), *, quick: bool = False) -> VerifyReport:
    """Every check of the module docstring; the first failure raises its CdlError."""
    with ContainerReader(path, limits) as reader:
        reader.check_checksums()
        decoded_bytes = reader.check_decoded_size()
        for entry in reader.tensors:
            check_decodable(entry, limits)
            if entry.encoding == "levels":
                check_quant(entry.quant, entry.shape, entry.dtype, entry.name)
        notes = []
        for section in reader.sections:
            note = check_section(section.name, section.kind, reader.read_section(section))
            if note:
                notes.append(note)
        if not quick:
            for entry in reader.tensors:
                decode_entry(reader, entry)  # the result is dropped: only a failure matters
        return VerifyReport(path, len(reader.tensors), len(reader.sections), sum(e.count for e in reader.tensors),
                            decoded_bytes, not quick, notes)


def check_section(name: str, kind: str, data: bytes) -> str | None:
    """CdlFormatError unless `data` parses as its kind; a note when this kind cannot be checked here."""
    what = f"section {name!r} ({kind})"
    if kind == "json":
        try:
            json.loads(data.decode("utf-8"), parse_constant=_not_json)
        except (ValueError, RecursionError) as exc:
            raise CdlFormatError(f"{what} is not valid JSON: {exc}") from None
    elif kind == "onnx":
        import onnx

        try:
            onnx.load_from_string(data)
        except Exception as exc:  # protobuf's DecodeError and whatever onnx adds around it
            raise CdlFormatError(f"{what} is not a valid ONNX model: {type(exc).__name__}: {exc}") from None
    elif kind == "torch.export":
        checker = _pt2_checker()
        if checker is None:
            return f"{what} not checked: cdlcodec.io.pt2_archive has no archive checker here"
        checker(data, what, CdlFormatError)
    return None


def _not_json(name: str):
    raise ValueError(f"{name} is not JSON")


def _pt2_checker():
    """The .pt2 archive checker (data, what, error) -> None, if this installation has one."""
    try:
        module = importlib.import_module("cdlcodec.io.pt2_archive")
    except ImportError:
        return None
    check = getattr(module, "check_pt2_archive", None)
    if check is not None:
        return check
    validate = getattr(module, "validate", None)
    if validate is None:
        return None

    def call_validate(data, what, error):
        try:
            validate(data)
        except CdlFormatError:
            raise
        except Exception as exc:
            raise error(f"{what}: {exc}") from None
    return call_validate


def _count(n: int, noun: str) -> str:
    return f"{n:,} {noun}{'' if n == 1 else 's'}"
