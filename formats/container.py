"""Reader and writer for the .cdl container, version 1 (specification: SPEC.md beside this file).

The container knows offsets, lengths, checksums, metadata and opaque blobs. It knows nothing about
how a payload was coded: the tensor index carries the backend's name and its parameter bytes, and
the quantization parameters, verbatim.

Layout, all integers little-endian:

    prefix   16 bytes   magic(8) | major u16 | minor u16 | flags u32
    payloads            blobs back to back, in index order, no gaps
    index    N bytes    UTF-8 JSON object (tensors, sections, metadata)
    footer   32 bytes   index_offset u64 | index_length u64 | crc32 u32 | reserved u32 (0) | end magic(8)

The index sits at the end so that the writer can stream: one tensor in memory at a time, the index
written once every payload length is known.

This module is standalone (the standard library only), so that it can be read, tested and copied
on its own: it defines the errors it raises (`ContainerError`, `FormatError`, `FormatInputError`,
which cdlcodec.errors uses as its own `CdlError`, `CdlFormatError`, `CdlInputError`) and writes
through its own atomic-output helper (`atomic_path`, `atomic_open`).
"""
from __future__ import annotations

import base64
import contextlib
import errno
import json
import math
import operator
import os
import struct
import tempfile
import zlib
from dataclasses import dataclass, replace
from typing import Any, BinaryIO, Iterable, Iterator, Sequence

MAGIC = b"\x89CDL\r\n\x1a\n"
END_MAGIC = b"CDLEND\x00\x01"
FORMAT_MAJOR = 1
FORMAT_MINOR = 0        # what a file without `exact` tensors is written as
EXACT_MINOR = 1         # the lowest version that describes a file with `exact` tensors (SPEC.md section 6)
ZLIB_MINOR = 2          # ... with zlib-compressed sections (SPEC.md section 2, SECTION)
LATEST_MINOR = ZLIB_MINOR
PREFIX = struct.Struct("<8sHHI")
FOOTER = struct.Struct("<QQII8s")

# SPEC.md section 2, `dtype`: everything a tensor's dtype may be, with its element size in bytes.
DTYPE_SIZES = {
    "float64": 8, "float32": 4, "float16": 2, "bfloat16": 2,
    "int64": 8, "int32": 4, "int16": 2, "int8": 1, "uint8": 1, "bool": 1,
}
ENCODINGS = ("levels", "plain", "exact")
EXACT_DTYPES = ("float32", "float16", "bfloat16")  # what an `exact` coder may hold
SECTION_KINDS = ("onnx", "torch.export", "json", "bytes")
# A section whose zlib stream is this much smaller is stored compressed (stripped ONNX graphs shrink 6-12x:
# silero-vad's 58 KB graph to 7 KB, a fifth of its whole file); smaller gains are not worth a stream.
ZLIB_MIN_SAVING = 1 / 8
ZLIB_MIN_BYTES = 256
# zlib's deflate cannot expand data more than ~1032:1: a larger stated size is a lie, refused unread.
ZLIB_MAX_RATIO = 1032


class ContainerError(Exception):
    """Base class of every error reported to a user, never a bug in the code that raises it.
    (cdlcodec.errors names it CdlError and raises it, and its subclasses, everywhere.)"""


class FormatError(ContainerError):
    """A .cdl container (or a payload inside it) is malformed, truncated, corrupt or unsupported
    (cdlcodec.errors.CdlFormatError)."""


class FormatInputError(ContainerError):
    """An input, option or argument cannot be used, e.g. a tensor the writer cannot store within the
    limits, or an output path that cannot be written (cdlcodec.errors.CdlInputError)."""


# ----------------------------------------------------------------------------------------------
# Atomic output: a temporary file beside the target, renamed into place only on success
# ----------------------------------------------------------------------------------------------

def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _cannot_write(path: str | os.PathLike, exc: OSError) -> FormatInputError:
    reasons = {errno.ENOENT: f"no such directory {os.path.dirname(os.path.abspath(path))}",
               errno.ENOTDIR: "a part of its directory path is not a directory",
               errno.EACCES: "permission denied", errno.EPERM: "permission denied",
               errno.EROFS: "read-only file system", errno.EISDIR: "it is a directory"}
    return FormatInputError(f"cannot write {os.fspath(path)}: {reasons.get(exc.errno, exc.strerror or str(exc))}")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, suffix: str = ".tmp") -> Iterator[str]:
    """Yield a temporary path in the target's directory; on success it becomes `path`.

    A failed or interrupted write therefore never leaves a half-written file, and an existing file
    is replaced only by a complete one. The result gets the permissions a plain open() would give
    (0666 minus the umask), not mkstemp's private 0600. `suffix` lets a writer that looks at the
    extension see the right one.
    """
    target = os.path.abspath(os.fspath(path))
    try:
        fd, tmp = tempfile.mkstemp(prefix=".cdlcodec-", suffix=suffix, dir=os.path.dirname(target))
    except OSError as exc:  # its message would name the temporary file, which the user never chose
        raise _cannot_write(path, exc) from None
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, 0o666 & ~_umask())
        try:
            os.replace(tmp, target)
        except OSError as exc:  # e.g. the output is an existing directory
            raise _cannot_write(path, exc) from None
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_open(path: str | os.PathLike, suffix: str = ".tmp"):
    """Yield a binary file handle; on success the data is flushed to disk and renamed to `path`."""
    with atomic_path(path, suffix) as tmp:
        with open(tmp, "wb") as fh:
            yield fh
            fh.flush()
            os.fsync(fh.fileno())


@dataclass(frozen=True)
class Limits:
    """Limits the reader checks before it allocates anything and the writer checks before it writes
    (SPEC.md section 4), so that every file the writer accepts is one the reader accepts.

    `max_decoded_bytes` bounds what a decoder holds for the file (`DecodedBytes`): every tensor's
    values and the int64 levels of the largest coded tensor. Decoders check it before allocating
    anything: a constant tensor honestly codes 2**32 elements in a few bytes. Raise the limits for
    exceptionally large models.
    """

    max_index_bytes: int = 64 << 20
    max_tensors: int = 1_000_000
    max_ndim: int = 8
    max_tensor_elements: int = 1 << 32
    max_total_elements: int = 1 << 36
    max_params_bytes: int = 16 << 20
    max_metadata_bytes: int = 1 << 20
    max_sections: int = 1024
    max_decoded_bytes: int = 1 << 34
    max_section_bytes: int = 1 << 30


@dataclass
class TensorEntry:
    """One tensor in the index. `quant` and `backend_params` are opaque to the container."""

    name: str
    shape: tuple[int, ...]
    dtype: str
    encoding: str  # "levels": `count` integers coded by `backend`; "plain": raw little-endian bytes;
    #                "exact": the values' bit patterns coded losslessly by the coder `backend`
    quant: dict[str, Any] | None
    backend: str | None
    backend_params: bytes
    count: int
    offset: int = 0
    length: int = 0
    crc32: int = 0

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "shape": list(self.shape), "dtype": self.dtype,
            "encoding": self.encoding, "quant": self.quant, "backend": self.backend,
            "backend_params": base64.b64encode(self.backend_params).decode("ascii"),
            "count": self.count, "offset": self.offset, "length": self.length, "crc32": self.crc32,
        }


@dataclass
class SectionEntry:
    """A non-tensor blob, e.g. the model graph with its weights stripped. `kind` is what the bytes
    are; with `compression` ("zlib") the stored bytes (offset, length, crc32) are their zlib stream
    and `size` their length once decompressed (`ContainerReader.read_section` gives them back)."""

    name: str
    kind: str
    offset: int = 0
    length: int = 0
    crc32: int = 0
    compression: str | None = None
    size: int | None = None

    def to_json(self) -> dict[str, Any]:
        if self.compression is None:
            return {"name": self.name, "kind": self.kind, "offset": self.offset,
                    "length": self.length, "crc32": self.crc32}
        # Stored as kind "zlib" with the content's kind beside it: a reader older than 1.2 refuses the
        # unknown kind instead of handing a zlib stream to a protobuf or JSON parser.
        return {"name": self.name, "kind": "zlib", "content": self.kind, "size": self.size,
                "offset": self.offset, "length": self.length, "crc32": self.crc32}


def _fail(msg: str) -> FormatError:
    return FormatError(msg)


# ----------------------------------------------------------------------------------------------
# Rules shared by the writer and the reader (the writer raises FormatInputError, the reader
# FormatError, with the same text)
# ----------------------------------------------------------------------------------------------

def check_shape(shape: Any, limits: Limits, what: str, error: type = FormatError) -> int:
    """The element count of a valid shape; `error` for a malformed shape or one over the limits.

    Besides the element count, the product of the non-zero dimensions is bounded too: numpy and
    torch refuse an empty array such as [0, 2**32, 2**32, 2**32] whose other dimensions overflow
    their index type. Products are Python integers, bounded after every factor.
    """
    if not isinstance(shape, (list, tuple)) or len(shape) > limits.max_ndim:
        got = f", got {len(shape)}" if isinstance(shape, (list, tuple)) else ""
        raise error(f"{what}: shape must be a list of at most {limits.max_ndim} dimensions (Limits.max_ndim){got}")
    numel, extent = 1, 1
    for d in shape:
        if type(d) is not int or d < 0:
            raise error(f"{what}: invalid dimension {d!r}")
        numel *= d
        extent *= max(d, 1)
        if extent > limits.max_tensor_elements:
            raise error(f"{what}: the dimensions of shape {list(shape)} exceed the limit of "
                        f"{limits.max_tensor_elements:,} elements per tensor (Limits.max_tensor_elements)")
    return numel


LEVEL_BYTES = 8  # a decoder holds a coded tensor's levels as int64 beside its values


def decoded_size(entry: TensorEntry) -> int:
    """Bytes a decoder holds while it decodes `entry`: count x the dtype's element size, plus
    LEVEL_BYTES per element of a coded tensor (its int64 levels)."""
    return entry.count * (DTYPE_SIZES[entry.dtype] + _level_bytes(entry))


def _level_bytes(entry: TensorEntry) -> int:
    return LEVEL_BYTES if entry.encoding == "levels" else 0


class DecodedBytes:
    """What Limits.max_decoded_bytes bounds for a whole file: every tensor's values, plus the int64
    levels of the largest coded tensor. Levels live only while their tensor is decoded (decoders go
    tensor by tensor), so summing them over the file would refuse large models for memory no decoder
    holds at once."""

    def __init__(self):
        self.values = 0
        self.levels = 0

    def after(self, entry: TensorEntry) -> tuple[int, int, int]:
        """(total, values, levels) once `entry` is counted too."""
        values = self.values + entry.count * DTYPE_SIZES[entry.dtype]
        levels = max(self.levels, entry.count * _level_bytes(entry))
        return values + levels, values, levels


def metadata_size(metadata: dict[str, str]) -> int:
    """Bytes of metadata keys and values in UTF-8, the measure Limits.max_metadata_bytes bounds."""
    return sum(_utf8_len(k) + _utf8_len(v) for k, v in metadata.items())


def _utf8_len(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))  # JSON may carry lone surrogates (\ud800)


def _over(what: str, total: int, limit: int, field_name: str, unit: str) -> str:
    return f"{what} brings the {unit} to {total:,}, over the limit of {limit:,} (Limits.{field_name})"


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------

class ContainerWriter:
    """Streams payloads to a temporary file beside `path` and renames it into place on success.

    Use as a context manager; if the block raises, the temporary file is removed and `path` is
    left untouched (atomic write). Every limit the reader enforces (`limits`) is checked before the
    tensor, section or index concerned is written, so the writer never produces a file the reader
    refuses: a FormatInputError names the tensor and the limit instead.
    """

    def __init__(self, path: str | os.PathLike, metadata: dict[str, str] | None = None,
                 limits: Limits = Limits()):
        self.path = os.fspath(path)
        self.limits = limits
        self.metadata: dict[str, str] = {}
        self._metadata_bytes = 0
        for key, value in (metadata or {}).items():
            self.set_metadata(key, value)
        self._tensors: list[TensorEntry] = []
        self._sections: list[SectionEntry] = []
        self._names: set[str] = set()
        self._section_names: set[str] = set()
        self._total_elements = 0
        self._decoded_bytes = DecodedBytes()
        self._offset = 0
        self._fh: BinaryIO | None = None
        self._stack = contextlib.ExitStack()

    def set_metadata(self, key: str, value: str) -> None:
        if not isinstance(key, str) or not isinstance(value, str):
            raise FormatInputError("container metadata keys and values must be strings")
        size = self._metadata_bytes + _utf8_len(key) + _utf8_len(value)
        if key in self.metadata:
            size -= _utf8_len(key) + _utf8_len(self.metadata[key])
        if size > self.limits.max_metadata_bytes:
            raise FormatInputError(
                _over(f"metadata key {key!r} ({_utf8_len(value):,}-byte value)", size,
                      self.limits.max_metadata_bytes, "max_metadata_bytes", "container metadata bytes"))
        self.metadata[key] = value
        self._metadata_bytes = size

    def __enter__(self) -> "ContainerWriter":
        self._fh = self._stack.enter_context(atomic_open(self.path))
        self._fh.write(PREFIX.pack(MAGIC, FORMAT_MAJOR, FORMAT_MINOR, 0))
        return self

    def _write_blob(self, data: bytes) -> tuple[int, int, int]:
        assert self._fh is not None, "use ContainerWriter as a context manager"
        offset = self._offset
        self._fh.write(data)
        self._offset += len(data)
        return offset, len(data), zlib.crc32(data)

    def _check_tensor(self, entry: TensorEntry, payload_len: int) -> None:
        """Refuse, before anything is written, a tensor the reader would refuse."""
        lim = self.limits
        if not isinstance(entry.name, str):
            raise FormatInputError(f"tensor names must be strings, got {type(entry.name).__name__}")
        what = f"tensor {entry.name!r}"
        if entry.name in self._names:
            raise FormatInputError(f"duplicate tensor name {entry.name!r}")
        if len(self._tensors) >= lim.max_tensors:
            raise FormatInputError(f"{what}: more than {lim.max_tensors:,} tensors (Limits.max_tensors)")
        if entry.dtype not in DTYPE_SIZES:
            raise FormatInputError(f"{what}: unsupported dtype {entry.dtype!r}")
        if entry.encoding not in ENCODINGS:
            raise FormatInputError(f"{what}: unknown encoding {entry.encoding!r}")
        try:
            entry.shape = tuple(operator.index(d) for d in entry.shape)
            entry.count = operator.index(entry.count)
        except TypeError:
            raise FormatInputError(f"{what}: shape and count must be integers, got {entry.shape!r} and {entry.count!r}") from None
        numel = check_shape(entry.shape, lim, what, FormatInputError)
        if entry.count != numel:
            raise FormatInputError(f"{what}: {entry.count} coded elements for a shape of {numel} elements")
        entry.backend_params = bytes(entry.backend_params or b"")
        if entry.encoding == "plain":
            if payload_len != numel * DTYPE_SIZES[entry.dtype]:
                raise FormatInputError(f"{what}: plain payload of {payload_len} bytes does not hold {numel} {entry.dtype} values")
        else:
            if entry.encoding == "exact" and (entry.dtype not in EXACT_DTYPES or entry.quant is not None):
                raise FormatInputError(f"{what}: exact coding holds {', '.join(EXACT_DTYPES)} values without quant, "
                                       f"not {entry.dtype}")
            if not isinstance(entry.backend, str):
                raise FormatInputError(f"{what}: coded tensor names no backend")
            if len(entry.backend_params) > lim.max_params_bytes:
                raise FormatInputError(f"{what}: {len(entry.backend_params):,} bytes of backend parameters exceed the "
                                    f"limit of {lim.max_params_bytes:,} (Limits.max_params_bytes)")
        if entry.quant is not None and not isinstance(entry.quant, dict):
            raise FormatInputError(f"{what}: quant must be a dict or None")
        total = self._total_elements + numel
        if total > lim.max_total_elements:
            raise FormatInputError(_over(what, total, lim.max_total_elements, "max_total_elements", "model's element count"))
        decoded, values, levels = self._decoded_bytes.after(entry)
        if decoded > lim.max_decoded_bytes:
            raise FormatInputError(_over(what, decoded, lim.max_decoded_bytes, "max_decoded_bytes", "bytes a decoder holds"))
        self._total_elements = total
        self._decoded_bytes.values, self._decoded_bytes.levels = values, levels

    def add_tensor(self, entry: TensorEntry, payload: bytes) -> TensorEntry:
        """Append one tensor; fills in the entry's offset, length and crc32."""
        payload = bytes(payload)
        self._check_tensor(entry, len(payload))
        self._names.add(entry.name)
        entry.offset, entry.length, entry.crc32 = self._write_blob(payload)
        self._tensors.append(entry)
        return entry

    def _check_section(self, name: str, kind: str) -> None:
        if not isinstance(name, str):
            raise FormatInputError(f"section names must be strings, got {type(name).__name__}")
        if name in self._section_names:
            raise FormatInputError(f"duplicate section name {name!r}")
        if kind not in SECTION_KINDS:
            raise FormatInputError(f"unknown section kind {kind!r}")
        if len(self._sections) >= self.limits.max_sections:
            raise FormatInputError(f"section {name!r}: more than {self.limits.max_sections:,} sections (Limits.max_sections)")

    def add_section(self, name: str, kind: str, data: bytes, compress: bool = True) -> SectionEntry:
        """Append a section; with `compress` it is stored as a zlib stream where that saves at least
        ZLIB_MIN_SAVING of it (deterministic for one zlib build; any build reads it back exactly)."""
        self._check_section(name, kind)
        data = bytes(data)
        entry = SectionEntry(name, kind)
        if compress and ZLIB_MIN_BYTES <= len(data) <= self.limits.max_section_bytes:
            packed = zlib.compress(data, 9)
            if len(packed) <= len(data) * (1 - ZLIB_MIN_SAVING):
                entry.compression, entry.size, data = "zlib", len(data), packed
        self._section_names.add(name)
        entry.offset, entry.length, entry.crc32 = self._write_blob(data)
        self._sections.append(entry)
        return entry

    def copy_tensor(self, reader: "ContainerReader", entry: TensorEntry) -> TensorEntry:
        """Append `reader`'s tensor `entry` as it is coded (quant, backend, parameters and payload
        bytes unchanged), streaming its payload in blocks; FormatError when the payload does not
        match its checksum. The copy is checked against this writer's limits like any new tensor."""
        copied = replace(entry, offset=0, length=0, crc32=0)  # the reader's entry stays as it was
        self._check_tensor(copied, entry.length)
        self._names.add(copied.name)
        copied.offset, copied.length = self._copy_blob(reader.iter_payload(entry))
        copied.crc32 = entry.crc32  # iter_payload checked the bytes against it
        self._tensors.append(copied)
        return copied

    def copy_section(self, reader: "ContainerReader", entry: SectionEntry) -> SectionEntry:
        """Append `reader`'s section `entry`, streamed and checked as in `copy_tensor`."""
        self._check_section(entry.name, entry.kind)
        self._section_names.add(entry.name)
        copied = SectionEntry(entry.name, entry.kind, crc32=entry.crc32, compression=entry.compression, size=entry.size)
        copied.offset, copied.length = self._copy_blob(reader.iter_payload(entry))
        self._sections.append(copied)
        return copied

    def _copy_blob(self, blocks: Iterable[bytes]) -> tuple[int, int]:
        assert self._fh is not None, "use ContainerWriter as a context manager"
        offset = self._offset
        for block in blocks:
            self._fh.write(block)
            self._offset += len(block)
        return offset, self._offset - offset

    @property
    def minor_version(self) -> int:
        """The lowest minor version that describes the tensors and sections written so far."""
        if any(s.compression is not None for s in self._sections):
            return ZLIB_MINOR
        return EXACT_MINOR if any(t.encoding == "exact" for t in self._tensors) else FORMAT_MINOR

    def _finish(self) -> None:
        assert self._fh is not None
        index = {
            "format": "cdl",
            "metadata": dict(sorted(self.metadata.items())),
            "tensors": [t.to_json() for t in self._tensors],
            "sections": [s.to_json() for s in self._sections],
        }
        # allow_nan=False: a NaN step has no place in a file that must decode the same everywhere.
        try:
            index_bytes = json.dumps(index, separators=(",", ":"), allow_nan=False).encode("utf-8")
        except (TypeError, ValueError) as exc:
            raise FormatInputError(f"the container index cannot be written: {exc}") from exc
        if len(index_bytes) > self.limits.max_index_bytes:
            raise FormatInputError(f"the container index would be {len(index_bytes):,} bytes, over the limit of "
                                f"{self.limits.max_index_bytes:,} (Limits.max_index_bytes)")
        try:  # the last word: the reader's own checks on exactly these bytes
            parse_index(index_bytes, self.limits, self._offset)
        except FormatError as exc:
            raise FormatInputError(f"refusing to write a container the reader would refuse: {exc}") from exc
        index_offset = PREFIX.size + self._offset
        prefix = PREFIX.pack(MAGIC, FORMAT_MAJOR, self.minor_version, 0)
        if self.minor_version != FORMAT_MINOR:  # the prefix went out before the tensors were known
            self._fh.seek(0)
            self._fh.write(prefix)
            self._fh.seek(index_offset)
        self._fh.write(index_bytes)
        crc = zlib.crc32(prefix + index_bytes + struct.pack("<QQ", index_offset, len(index_bytes)))
        self._fh.write(FOOTER.pack(index_offset, len(index_bytes), crc, 0, END_MAGIC))

    def __exit__(self, exc_type, exc, tb) -> bool:
        if exc_type is not None:  # hand the failure to atomic_open: it deletes the temporary file
            return self._stack.__exit__(exc_type, exc, tb)
        with self._stack:  # renames into place only if the index and footer were written
            self._finish()
        return False


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------

# Every integer field fits in 64 bits; a longer literal is refused before Python parses it
# (int() of a 5,000-digit string raises ValueError, and a huge one costs quadratic time).
MAX_INT_DIGITS = 40


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _fail(f"index has a duplicate key {key!r}")
        out[key] = value
    return out


def _reject_constant(name: str) -> float:
    raise _fail(f"index contains the non-finite number {name}")


def _parse_int(text: str) -> int:
    if len(text) > MAX_INT_DIGITS:
        raise _fail(f"index holds an integer of {len(text):,} digits (at most {MAX_INT_DIGITS})")
    return int(text)


def _parse_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e400 parses to inf
        raise _fail(f"index holds the number {text[:40]}, which is not finite in binary64")
    return value


def _int(obj: dict, key: str, what: str, lo: int = 0, hi: int = (1 << 63) - 1) -> int:
    value = obj.get(key)
    if type(value) is not int or not lo <= value <= hi:
        raise _fail(f"{what}: field {key!r} must be an integer in [{lo}, {hi}], got {value!r}")
    return value


def _str(obj: dict, key: str, what: str, allow_none: bool = False) -> str | None:
    value = obj.get(key)
    if value is None and allow_none:
        return None
    if not isinstance(value, str):
        raise _fail(f"{what}: field {key!r} must be a string, got {type(value).__name__}")
    _check_unicode(value, f"{what}: field {key!r}")
    return value


def _check_unicode(text: str, what: str) -> None:
    """JSON can escape a lone surrogate (\\ud800), which no UTF-8 output (a terminal, a safetensors
    header, a file name) can carry: such a string is refused here rather than crashing a writer later."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise _fail(f"{what} holds an unpaired surrogate {text.encode('utf-8', 'backslashreplace')[:60]!r}") from None


def parse_index(index_bytes: bytes, limits: Limits, payload_area: int
                ) -> tuple[dict[str, str], list[TensorEntry], list[SectionEntry]]:
    """Validate the index JSON of a file whose payload area holds `payload_area` bytes.

    Returns (metadata, tensors, sections); FormatError for anything SPEC.md refuses. Used by the
    reader and, on the bytes it is about to write, by the writer.
    """
    try:
        index = json.loads(index_bytes.decode("utf-8"), object_pairs_hook=_no_duplicate_keys,
                           parse_constant=_reject_constant, parse_int=_parse_int, parse_float=_parse_float)
    except (ValueError, RecursionError) as exc:  # JSONDecodeError and UnicodeDecodeError are ValueErrors
        raise _fail(f"index is not valid JSON: {exc}") from exc
    if not isinstance(index, dict) or index.get("format") != "cdl":
        raise _fail("index is not a cdl index object")
    metadata = _parse_metadata(index.get("metadata", {}), limits)
    tensors = _parse_tensors(index.get("tensors"), limits)
    sections = _parse_sections(index.get("sections", []), limits)
    _check_coverage(tensors, sections, payload_area)
    return metadata, tensors, sections


def _parse_metadata(meta: Any, limits: Limits) -> dict[str, str]:
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise _fail("metadata must be an object of string keys and string values")
    for key, value in meta.items():
        _check_unicode(key, "metadata key")
        _check_unicode(value, f"metadata {key!r}")
    size = metadata_size(meta)
    if size > limits.max_metadata_bytes:
        raise _fail(f"metadata of {size:,} bytes exceeds its limit of {limits.max_metadata_bytes:,} (Limits.max_metadata_bytes)")
    return meta


def _parse_tensors(raw: Any, lim: Limits) -> list[TensorEntry]:
    if not isinstance(raw, list):
        raise _fail("index has no tensor list")
    if len(raw) > lim.max_tensors:
        raise _fail(f"{len(raw):,} tensors exceed the limit of {lim.max_tensors:,} (Limits.max_tensors)")
    entries, names, total = [], set(), 0
    for i, t in enumerate(raw):
        if not isinstance(t, dict):
            raise _fail(f"tensor #{i} is not an object")
        name = _str(t, "name", f"tensor #{i}")
        what = f"tensor {name!r}"
        if name in names:
            raise _fail(f"duplicate tensor name {name!r}")
        names.add(name)
        shape = t.get("shape")
        numel = check_shape(shape, lim, what)
        total += numel
        if total > lim.max_total_elements:
            raise _fail(_over(what, total, lim.max_total_elements, "max_total_elements", "model's element count"))
        dtype = _str(t, "dtype", what)
        if dtype not in DTYPE_SIZES:
            raise _fail(f"{what}: unknown dtype {dtype!r}")
        encoding = _str(t, "encoding", what)
        if encoding not in ENCODINGS:
            raise _fail(f"{what}: unknown encoding {encoding!r}")
        count = _int(t, "count", what, 0, lim.max_tensor_elements)
        offset = _int(t, "offset", what)
        length = _int(t, "length", what)
        crc = _int(t, "crc32", what, 0, 0xFFFFFFFF)
        quant = t.get("quant")
        if quant is not None and not isinstance(quant, dict):
            raise _fail(f"{what}: quant must be an object or null")
        backend = _str(t, "backend", what, allow_none=True)
        params_b64 = _str(t, "backend_params", what)
        too_long = f"{what}: backend parameters exceed the limit of {lim.max_params_bytes:,} bytes (Limits.max_params_bytes)"
        if len(params_b64) > lim.max_params_bytes * 4 // 3 + 4:
            raise _fail(too_long)
        try:
            params = base64.b64decode(params_b64, validate=True)
        except (ValueError, TypeError) as exc:
            raise _fail(f"{what}: backend parameters are not valid base64") from exc
        if len(params) > lim.max_params_bytes:
            raise _fail(too_long)
        if encoding == "plain":
            if length != numel * DTYPE_SIZES[dtype] or count != numel:
                raise _fail(f"{what}: plain payload of {length} bytes does not hold {numel} {dtype} values")
        else:
            if encoding == "exact" and (dtype not in EXACT_DTYPES or quant is not None):
                raise _fail(f"{what}: exact coding holds {', '.join(EXACT_DTYPES)} values without quant, not {dtype}")
            if backend is None:
                raise _fail(f"{what}: coded tensor names no backend")
            if count != numel:
                raise _fail(f"{what}: {count} coded levels for a tensor of {numel} elements")
        entries.append(TensorEntry(name, tuple(shape), dtype, encoding, quant, backend, params,
                                   count, offset, length, crc))
    return entries


def _parse_sections(raw: Any, limits: Limits) -> list[SectionEntry]:
    if not isinstance(raw, list) or len(raw) > limits.max_sections:
        raise _fail(f"sections must be a list of at most {limits.max_sections:,} entries (Limits.max_sections)")
    out, names = [], set()
    for i, s in enumerate(raw):
        if not isinstance(s, dict):
            raise _fail(f"section #{i} is not an object")
        name = _str(s, "name", f"section #{i}")
        if name in names:
            raise _fail(f"duplicate section name {name!r}")
        names.add(name)
        kind = _str(s, "kind", f"section {name!r}")
        compression = size = None
        if kind == "zlib":
            compression, kind = "zlib", _str(s, "content", f"section {name!r}")
        if kind not in SECTION_KINDS:
            raise _fail(f"section {name!r}: unknown kind {kind!r}")
        entry = SectionEntry(name, kind, _int(s, "offset", name), _int(s, "length", name),
                             _int(s, "crc32", name, 0, 0xFFFFFFFF), compression)
        if compression is not None:
            entry.size = _int(s, "size", f"section {name!r}", 0, limits.max_section_bytes)
            if entry.size > ZLIB_MAX_RATIO * entry.length + 64:
                raise _fail(f"section {name!r}: {entry.length:,} bytes of zlib data cannot hold the stated "
                            f"{entry.size:,}: the file is corrupt")
        out.append(entry)
    return out


def _check_coverage(tensors: list[TensorEntry], sections: list[SectionEntry], payload_area: int) -> None:
    """Blobs must tile the payload area exactly: contiguous, non-overlapping, nothing trailing."""
    blobs = sorted(((e.offset, e.length, e.name) for e in [*tensors, *sections]))
    position = 0
    for offset, length, name in blobs:
        if offset != position:
            kind = "overlaps another payload" if offset < position else "leaves a gap before it"
            raise _fail(f"payload of {name!r} at offset {offset} {kind}")
        position = offset + length
    if position != payload_area:
        raise _fail(f"payloads end at {position} but the payload area holds {payload_area} bytes")


class ContainerReader:
    """Validates a whole .cdl file's structure on open; payloads are read (and checksummed) on demand.

    Every length, offset, count and shape is checked against the file size and `limits` before
    anything proportional to it is allocated.
    """

    def __init__(self, path: str | os.PathLike, limits: Limits = Limits()):
        self.path = os.fspath(path)
        self.limits = limits
        self.bytes_read = 0
        try:
            self._fh: BinaryIO = open(self.path, "rb")
        except IsADirectoryError as exc:
            raise FormatInputError(f"{self.path} is a directory, not a .cdl file") from exc
        try:
            self._parse()
        except BaseException:
            self._fh.close()
            raise

    def _read(self, size: int) -> bytes:
        data = self._fh.read(size)
        self.bytes_read += len(data)  # what a partial decode (decode --only) reports against the file size
        return data

    # -- context manager -----------------------------------------------------------------------
    def __enter__(self) -> "ContainerReader":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._fh.close()

    # -- structure -------------------------------------------------------------------------------
    def _parse(self) -> None:
        fh = self._fh
        size = os.fstat(fh.fileno()).st_size
        self.file_size = size
        head = self._read(PREFIX.size)
        if not MAGIC.startswith(head[:8]) or (len(head) >= 8 and head[:8] != MAGIC):
            raise _fail("not a .cdl file (bad magic number)")
        if len(head) < PREFIX.size:
            raise _fail("file is truncated (shorter than the 16-byte prefix)")
        _, major, minor, flags = PREFIX.unpack(head)
        if major != FORMAT_MAJOR:
            raise _fail(f"unsupported .cdl format version {major}.{minor} (this cdlcodec reads {FORMAT_MAJOR}.x)")
        if flags != 0:
            raise _fail(f"unsupported .cdl flags 0x{flags:08x}")
        self.version = (major, minor)
        if size < PREFIX.size + FOOTER.size:
            raise _fail("file is truncated (no room for the footer)")
        fh.seek(size - FOOTER.size)
        index_offset, index_length, crc, reserved, end_magic = FOOTER.unpack(self._read(FOOTER.size))
        if end_magic != END_MAGIC:
            raise _fail("file is truncated or damaged (footer end marker missing)")
        if index_length > self.limits.max_index_bytes:
            raise _fail(f"index length {index_length:,} exceeds the limit of {self.limits.max_index_bytes:,} bytes "
                        "(Limits.max_index_bytes)")
        if index_offset < PREFIX.size or index_offset + index_length + FOOTER.size != size:
            raise _fail(f"index offset {index_offset} + length {index_length} does not match the file size {size}")
        fh.seek(index_offset)
        index_bytes = self._read(index_length)
        if len(index_bytes) != index_length:
            raise _fail("file is truncated inside the index")
        expect = zlib.crc32(head + index_bytes + struct.pack("<QQ", index_offset, index_length))
        if expect != crc or reserved != 0:
            raise _fail("header/index checksum mismatch: the file is corrupt")
        self._payload_area = index_offset - PREFIX.size
        self.metadata, self.tensors, self.sections = parse_index(index_bytes, self.limits, self._payload_area)

    def check_decoded_size(self) -> int:
        """The bytes a decoder of the whole file holds (`DecodedBytes`); FormatError naming the tensor
        that crosses Limits.max_decoded_bytes. Decoders call it before allocating anything."""
        counted = DecodedBytes()
        total = 0
        for entry in self.tensors:
            total, counted.values, counted.levels = counted.after(entry)
            if total > self.limits.max_decoded_bytes:
                raise _fail(_over(f"tensor {entry.name!r} ({entry.count:,} x {entry.dtype})", total,
                                  self.limits.max_decoded_bytes, "max_decoded_bytes", "bytes a decoder holds"))
        return total

    # -- access ----------------------------------------------------------------------------------
    def tensor(self, name: str) -> TensorEntry:
        for entry in self.tensors:
            if entry.name == name:
                return entry
        raise FormatInputError(f"no tensor named {name!r} in {self.path}")

    def section(self, name: str) -> SectionEntry | None:
        return next((s for s in self.sections if s.name == name), None)

    def _read_blob(self, offset: int, length: int, crc: int, what: str) -> bytes:
        self._fh.seek(PREFIX.size + offset)
        data = self._read(length)
        if len(data) != length:
            raise _fail(f"file is truncated inside the payload of {what}")
        if zlib.crc32(data) != crc:
            raise _fail(f"checksum mismatch in the payload of {what}: the file is corrupt")
        return data

    def iter_payload(self, entry: TensorEntry | SectionEntry, block: int = 1 << 20) -> Iterator[bytes]:
        """The payload of a tensor or section in `block`-sized pieces (nothing proportional to the
        payload is held); FormatError, after the last piece, when the bytes do not match the checksum."""
        what = f"{'tensor' if isinstance(entry, TensorEntry) else 'section'} {entry.name!r}"
        position, left, crc = PREFIX.size + entry.offset, entry.length, 0
        while left:
            self._fh.seek(position)  # the caller may use this reader between pieces
            data = self._read(min(block, left))
            if not data:
                raise _fail(f"file is truncated inside the payload of {what}")
            crc = zlib.crc32(data, crc)
            position += len(data)
            left -= len(data)
            yield data
        if crc != entry.crc32:
            raise _fail(f"checksum mismatch in the payload of {what}: the file is corrupt")

    def read_payload(self, entry: TensorEntry) -> bytes:
        return self._read_blob(entry.offset, entry.length, entry.crc32, f"tensor {entry.name!r}")

    def read_section(self, entry: SectionEntry) -> bytes:
        """The section's bytes (decompressed if stored as zlib: never more than its stated size)."""
        data = self._read_blob(entry.offset, entry.length, entry.crc32, f"section {entry.name!r}")
        if entry.compression is None:
            return data
        stream = zlib.decompressobj()
        try:
            out = stream.decompress(data, entry.size + 1)
        except zlib.error as exc:
            raise _fail(f"section {entry.name!r}: its zlib data is corrupt ({exc})") from None
        if len(out) != entry.size or not stream.eof or stream.unused_data or stream.unconsumed_tail:
            raise _fail(f"section {entry.name!r}: its zlib data does not hold exactly the stated "
                        f"{entry.size:,} bytes: the file is corrupt")
        return out

    def check_checksums(self, block: int = 1 << 20) -> None:
        """Compare the CRC-32 of every payload and section with the index, reading the file once in
        `block`-sized pieces (nothing proportional to a payload is held)."""
        entries = [(e, f"tensor {e.name!r}") for e in self.tensors] + [(s, f"section {s.name!r}") for s in self.sections]
        self._fh.seek(PREFIX.size)
        for entry, what in sorted(entries, key=lambda pair: pair[0].offset):  # they tile the area: one pass
            crc, left = 0, entry.length
            while left:
                data = self._read(min(block, left))
                if not data:
                    raise _fail(f"file is truncated inside the payload of {what}")
                crc = zlib.crc32(data, crc)
                left -= len(data)
            if crc != entry.crc32:
                raise _fail(f"checksum mismatch in the payload of {what}: the file is corrupt")


# ----------------------------------------------------------------------------------------------
# Concatenation: part containers written independently (one task per tensor group) -> one file
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ConcatResult:
    path: str
    num_parts: int
    num_tensors: int
    num_sections: int
    size: int


def concat_containers(parts: Sequence[str | os.PathLike], output: str | os.PathLike, *,
                      metadata: dict[str, str] | None = None, limits: Limits = Limits()) -> ConcatResult:
    """Join the containers `parts` into one container `output`, without re-coding anything.

    Tensors keep their coding, parameters, payload bytes and checksums, in part order; sections
    come first (part order too), as a single writer emits them. Payloads are streamed in blocks
    and checked against their checksums on the way; the header/index checksum is computed anew.
    Refused, before anything is written: a tensor name in two parts; a section name in two parts
    with different contents (identical copies, such as a config every part carries, are kept
    once); a part of a newer minor format version than this writer knows (its optional fields
    would be lost); a metadata key with different values in two parts, unless `metadata` gives
    the value to use (it may also add keys). The output is written atomically and is never one of
    the parts. Parts are opened one at a time: any number of them uses a bounded number of files.
    """
    paths = [os.fspath(p) for p in parts]
    output = os.fspath(output)
    if not paths:
        raise FormatInputError("concatenation needs at least one part container")
    for path in paths:
        if os.path.exists(output) and os.path.exists(path) and os.path.samefile(path, output):
            raise FormatInputError(f"the output {output} is the part {path}; choose another output name")
    plan = _plan_concat(paths, limits)
    merged = _merge_metadata(plan, metadata or {})
    with ContainerWriter(output, merged, limits) as writer:
        for path, layout in plan:  # sections first, as a single writer emits them
            if layout.keep_sections:
                with _open_part(path, limits, layout) as reader:
                    for entry in reader.sections:
                        if entry.name in layout.keep_sections:
                            writer.copy_section(reader, entry)
        for path, layout in plan:
            with _open_part(path, limits, layout) as reader:
                for entry in reader.tensors:
                    writer.copy_tensor(reader, entry)
    return ConcatResult(output, len(paths), len(writer._tensors), len(writer._sections), os.path.getsize(output))


@dataclass
class _PartLayout:
    """What the first pass saw in a part: checked again when it is reopened to copy."""

    metadata: dict[str, str]
    tensors: list[TensorEntry]
    sections: list[SectionEntry]
    keep_sections: set[str]


def _reader_of(path: str, limits: Limits) -> ContainerReader:
    try:
        return ContainerReader(path, limits)
    except FileNotFoundError:
        raise FormatInputError(f"part {path}: no such file") from None
    except ContainerError as exc:
        raise type(exc)(f"part {path}: {exc}") from None


@contextlib.contextmanager
def _open_part(path: str, limits: Limits, layout: _PartLayout) -> Iterator[ContainerReader]:
    with _reader_of(path, limits) as reader:
        if (reader.metadata, reader.tensors, reader.sections) != (layout.metadata, layout.tensors, layout.sections):
            raise FormatError(f"part {path} changed while it was being concatenated")
        try:
            yield reader
        except FormatError as exc:  # a corrupt payload: say which part holds it
            raise FormatError(f"part {path}: {exc}") from None


def _plan_concat(paths: list[str], limits: Limits) -> list[tuple[str, _PartLayout]]:
    """Read every part's index once (one file open at a time) and refuse what cannot be joined."""
    plan: list[tuple[str, _PartLayout]] = []
    tensor_part: dict[str, str] = {}
    section_part: dict[str, tuple[str, SectionEntry]] = {}
    for path in paths:
        with _reader_of(path, limits) as reader:
            if reader.version[1] > LATEST_MINOR:
                raise FormatInputError(
                    f"part {path} is format {reader.version[0]}.{reader.version[1]}, newer than this writer's "
                    f"{FORMAT_MAJOR}.{LATEST_MINOR}: joining it would drop what that version adds")
            for entry in reader.tensors:
                if entry.name in tensor_part:
                    raise FormatInputError(f"tensor {entry.name!r} is in two parts: {tensor_part[entry.name]} and {path}")
                tensor_part[entry.name] = path
            keep = set()
            for entry in reader.sections:
                if entry.name not in section_part:
                    section_part[entry.name] = (path, entry)
                    keep.add(entry.name)
                elif not _same_section(section_part[entry.name], (path, entry), limits):
                    raise FormatInputError(f"section {entry.name!r} differs between parts "
                                           f"{section_part[entry.name][0]} and {path}")
            plan.append((path, _PartLayout(dict(reader.metadata), list(reader.tensors), list(reader.sections), keep)))
    return plan


def _same_section(first: tuple[str, SectionEntry], other: tuple[str, SectionEntry], limits: Limits) -> bool:
    """Whether two parts' sections hold the same kind and bytes (compared block by block)."""
    (path_a, a), (path_b, b) = first, other
    if (a.kind, a.compression, a.size, a.length, a.crc32) != (b.kind, b.compression, b.size, b.length, b.crc32):
        return False
    with _reader_of(path_a, limits) as reader_a, _reader_of(path_b, limits) as reader_b:
        entry_a, entry_b = reader_a.section(a.name), reader_b.section(b.name)
        if entry_a != a or entry_b != b:
            raise FormatError(f"part {path_a if entry_a != a else path_b} changed while it was being concatenated")
        left, right = reader_a.iter_payload(entry_a), reader_b.iter_payload(entry_b)
        return all(x == y for x, y in zip(_rechunk(left), _rechunk(right)))  # equal lengths: same piece count


def _rechunk(blocks: Iterator[bytes], size: int = 1 << 16) -> Iterator[bytes]:
    """`blocks` as pieces of exactly `size` bytes (the last may be shorter), so two streams line up."""
    pending = b""
    for block in blocks:
        pending += block
        while len(pending) >= size:
            yield pending[:size]
            pending = pending[size:]
    if pending:
        yield pending


def _merge_metadata(plan: list[tuple[str, _PartLayout]], chosen: dict[str, str]) -> dict[str, str]:
    """The union of the parts' metadata; a key with two values needs its value in `chosen`."""
    merged: dict[str, str] = {}
    first: dict[str, str] = {}
    for path, layout in plan:
        for key, value in layout.metadata.items():
            if key in merged and merged[key] != value and key not in chosen:
                raise FormatInputError(
                    f"parts disagree on metadata {key!r}: {merged[key][:80]!r} in {first[key]}, {value[:80]!r} in "
                    f"{path}; give the value to use (concat --metadata KEY=VALUE, or metadata= in the API)")
            merged.setdefault(key, value)
            first.setdefault(key, path)
    merged.update(chosen)
    return merged
