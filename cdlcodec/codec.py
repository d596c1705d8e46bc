"""The encode and decode pipelines: records -> quantizer -> backend -> container, and back.

Records in, container out (`encode_records`) and container in, records out (`decode_container`).
Model files, state_dicts and modules are the business of `cdlcodec.api` (`encode`, `decode`), which
the CLI and the Python API share.
"""
from __future__ import annotations

import copy
import fnmatch
import glob
import math
import os
import time
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from functools import partial
from typing import Iterable, Iterator

import numpy as np

from . import __version__, backends
from .backends import EncodeHint, MAX_ABS_LEVEL
from .backends.base import DECODE_BLOCK, check_count, level_blocks
from .dtypes import storage_dtype, to_float32, to_float64
from .errors import CdlDecodeError, CdlFormatError, CdlInputError
from .formats.container import ContainerReader, ContainerWriter, Limits, TensorEntry, decoded_size
from .io.lazy import materialized, release
from .progress import Progress
from .quantizers import Dequantizer
from .quantizers.params import QUANTIZED_SCHEMES, UniformParams, from_json
from .quantizers.base import Quantizer, make, parameter_error
from .records import ModelFile, TensorRecord


@dataclass
class EncodeOptions:
    # None: the model's default, the uniform quantizer (rel_step 0.1), or for a CDL / R-CDL checkpoint
    # (metadata "cdl.mode", cdlcodec.io.cdl_checkpoint) its learned quantizers (`cdl_quantizer`).
    quantizer: Quantizer | None = None
    backend: str = "auto"
    keep: tuple[str, ...] = ()
    quiet: bool = False
    # Quantizer for CDL / R-CDL checkpoints; None = their learned quantizers with the most probable
    # level (quantizers.make("cpmf")). Refused for any other model: it would be ignored.
    cdl_quantizer: Quantizer | None = None
    # Every float tensor exact (bit for bit), coded by the exact float coder where that is smaller.
    lossless: bool = False
    # Tensors coded at once (None: every core); the container's bytes do not depend on it.
    threads: int | None = None


@dataclass
class EncodeSummary:
    output: str
    num_tensors: int
    num_params: int
    num_quantized_params: int
    original_bytes: int
    coded_bytes: int
    seconds: float
    report: dict = field(default_factory=dict)   # from the quantizer's finish() hook (CDL: bits vs H(w))
    coded_bits: dict = field(default_factory=dict)  # tensor name -> payload + params bits
    unmatched_keep: tuple[str, ...] = ()           # keep patterns that matched no tensor (likely a typo)
    notes: tuple[str, ...] = ()                    # what the quantizer decided that the user should know
    fidelity: object = None  # the fidelity.search.FidelityReport of an encode to a fidelity target (api.encode)

    @property
    def bits_per_param(self) -> float:
        return 8.0 * self.coded_bytes / max(self.num_params, 1)


def role_of(record: TensorRecord, keep: Iterable[str]) -> str:
    """'quantized', 'integer' (levels are the exact values) or 'plain' (raw bytes)."""
    if any(fnmatch.fnmatchcase(record.name, pattern) for pattern in keep):
        return "plain" if record.is_float else _integer_role(record)
    if record.is_float:
        return "quantized" if record.array.ndim >= 2 else "plain"
    return _integer_role(record)


def _integer_role(record: TensorRecord) -> str:
    a = record.array
    if a.size == 0 or a.dtype.itemsize < 8:
        return "integer"
    return "integer" if int(a.min()) >= -MAX_ABS_LEVEL and int(a.max()) <= MAX_ABS_LEVEL else "plain"


def code_levels(levels: np.ndarray, backend: str, hint: EncodeHint | None = None) -> tuple[str, bytes, bytes]:
    """Entropy-code integer levels with one backend, or with every available one for 'auto' (smallest
    wins). Narrow levels (int8/16/32) go as they are to the backends that take them (narrow_levels),
    as int64 to any other."""
    names = backends.available() if backend == "auto" else [backend]
    best, refusals = None, []
    for name in names:
        coder = backends.get(name)
        as_is = levels.dtype == np.int64 or getattr(coder, "narrow_levels", False)
        try:
            payload, params = coder.encode(levels if as_is else levels.astype(np.int64), hint)
        except CdlInputError as exc:
            if backend != "auto":
                raise
            refusals.append(f"{name}: {exc}")  # e.g. an alphabet too large for 24-bit Huffman codes
            continue
        if best is None or len(payload) + len(params) < len(best[1]) + len(best[2]):
            best = (name, payload, params)
    if best is None:
        raise CdlInputError("no lossless backend could code this tensor" + (f" ({'; '.join(refusals)})" if refusals else ""))
    return best


def default_threads() -> int:
    """Worker threads when none are asked for: every core this process may run on."""
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except AttributeError:  # not on Linux
        return max(1, os.cpu_count() or 1)


# Elements in flight at once (beyond one tensor, which is always allowed): coding or decoding holds up
# to about 18 bytes a parameter (levels, a backend's temporaries, the input or output values; less where
# levels are narrow and read in blocks), so parallel work stays within about 360 MB above one tensor's
# working set; big tensors go one at a time.
IN_FLIGHT_ELEMENTS = 20_000_000


def ordered_map(work, items: Iterable, threads: int, *, prepare=None, size=None,
                budget: int = IN_FLIGHT_ELEMENTS, ahead: int = 0) -> Iterator:
    """work(prepare(item)) for each item, results in the items' order. prepare runs in the caller's
    thread, in order (reading, quantizing: anything with state); work runs on up to `threads` threads
    at once. A bounded window: an item is started only while fewer than `threads` are in flight and
    their size(item) (elements) plus its own stays within `budget` (a lone item always starts), so
    memory holds a few tensors, never the model. `ahead` more items may wait for a free thread,
    holding only what prepare made of them (a payload): a thread that finishes takes the next at once
    instead of idling while the caller consumes a result; the budget then counts the items that can
    run together, the new one and the `threads - 1` largest in flight. An exception is raised when its
    item's turn comes, so the first failing tensor in file order is the one reported."""
    prepare = prepare or (lambda item: item)
    if threads <= 1:
        for item in items:
            yield work(prepare(item))
        return
    size = size or (lambda item: 0)
    pool = ThreadPoolExecutor(threads, thread_name_prefix="cdlcodec")
    pending: deque = deque()  # (future, size)
    try:
        for item in items:
            need = size(item)
            while pending and (len(pending) >= threads + ahead or _largest(pending, threads - 1) + need > budget):
                yield pending.popleft()[0].result()
            pending.append((pool.submit(work, prepare(item)), need))
        while pending:
            yield pending.popleft()[0].result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _largest(pending: deque, k: int) -> int:
    """The sum of the k largest sizes in flight."""
    return sum(sorted((n for _, n in pending), reverse=True)[:k])


@dataclass
class _Job:
    """One tensor between reading (the caller's thread, in file order), quantization and coding."""
    record: TensorRecord | None  # None once the levels are computed
    entry: TensorEntry
    role: str
    levels: np.ndarray | None = None
    hint: EncodeHint | None = None
    ready: bool = False  # levels (or the plain role) decided
    quantized: int = 0   # elements quantized


def encode_records(records: list[TensorRecord], output: str, options: EncodeOptions = EncodeOptions(),
                   metadata: dict[str, str] | None = None, sections: Iterable[tuple[str, str, bytes]] = ()) -> EncodeSummary:
    """Quantize and code `records` into the container `output` (written atomically).

    Tensor by tensor: each record's array is taken once (a lazy record maps it from its file then),
    quantized in file order, coded on `options.threads` threads and written in file order, then
    dropped; the container's bytes are the same whatever the thread count."""
    if options.backend != "auto":
        backends.get(options.backend)  # fail before any work on an unknown backend
    start = time.perf_counter()
    sections = list(sections)
    quantizer = _bind_quantizer(ModelFile(records, sections, dict(metadata or {})), options)
    meta = {"cdlcodec.version": __version__,
            "quantizer": "none (lossless)" if options.lossless else quantizer.describe()}
    if getattr(quantizer, "grid", None) and not options.lossless:  # --deploy: the QDQ writer keeps to this width
        meta["deploy.grid"] = quantizer.grid
    meta.update(metadata or {})
    total = sum(r.numel for r in records) or 1
    n_quant = 0
    coded_bits: dict[str, int] = {}
    report: dict = {}
    extra_sections = list(quantizer.sections())
    threads = options.threads or default_threads()
    by_name = {r.name: r for r in records}

    # A quantizer that is a pure function of one tensor quantizes on the coding threads too; any other
    # (learned CPMF draws, notes gathered in order, ...) runs here, in file order.
    anywhere = type(quantizer) in _per_tensor_quantizers()

    def prepared(rec: TensorRecord) -> _Job:
        rec = materialized(rec)
        role = "plain" if options.lossless and rec.is_float else role_of(rec, options.keep)
        job = _Job(rec, TensorEntry(rec.name, rec.shape, rec.dtype, "levels", None, None, b"", rec.numel), role,
                   hint=EncodeHint(shape=rec.shape))
        return job if anywhere else _with_levels(job, quantizer, options.backend)

    def coded(job: _Job) -> tuple[TensorEntry, bytes, int]:
        if not job.ready:
            _with_levels(job, quantizer, options.backend)
        return (*_coded(job, options.backend), job.quantized)

    with ContainerWriter(output, meta) as writer, Progress(total, "encoding", quiet=options.quiet) as bar:
        for name, kind, data in [*sections, *extra_sections]:
            writer.add_section(name, kind, data)
        for entry, payload, quantized in ordered_map(coded, records, threads, prepare=prepared, size=_numel):
            n_quant += quantized
            coded_bits[entry.name] = 8 * (len(payload) + len(entry.backend_params or b""))
            writer.add_tensor(entry, payload)
            release(by_name[entry.name])
            bar.update(entry.count)
        extra_meta, report = quantizer.finish(coded_bits)
        for key, value in extra_meta.items():
            writer.set_metadata(key, value)
    unmatched = tuple(p for p in options.keep if not any(fnmatch.fnmatchcase(r.name, p) for r in records))
    notes = tuple(report.pop("notes", ()))
    return EncodeSummary(output, len(records), sum(r.numel for r in records), n_quant,
                         sum(r.numel * storage_dtype(r.dtype).itemsize for r in records), os.path.getsize(output),
                         time.perf_counter() - start, report, coded_bits, unmatched, notes=notes)


def _per_tensor_quantizers() -> tuple[type, ...]:
    from .quantizers.channel import ChannelQuantizer
    from .quantizers.uniform import UniformQuantizer

    return UniformQuantizer, ChannelQuantizer


def _with_levels(job: _Job, quantizer, backend: str) -> _Job:
    """`job` with its levels and quantization parameters (or turned plain where the quantizer keeps
    the tensor exact)."""
    rec = job.record
    with _naming(rec.name):
        if job.role == "quantized":
            result = _quantize(quantizer, rec, backend)
            if result is None:
                job.role = "plain"
            else:
                job.levels, job.entry.quant, custom_hint = result
                job.hint = custom_hint or job.hint
                job.quantized = rec.numel
        elif job.role == "integer":
            job.levels, job.entry.quant = rec.array.astype(np.int64).ravel(), {"scheme": "integer"}
    if job.levels is not None:
        job.record = None  # the values are no longer needed: their memory map goes while the levels are coded
    job.ready = True
    return job


def _coded(job: _Job, backend: str) -> tuple[TensorEntry, bytes]:
    """The entry and payload of a quantized tensor (any thread: it touches only this job)."""
    entry, rec = job.entry, job.record
    with _naming(entry.name):
        if job.role == "plain":
            entry.encoding, entry.count = "plain", rec.numel
            payload = np.ascontiguousarray(rec.array, dtype=storage_dtype(rec.dtype)).tobytes()
            exact = _code_exact(rec, len(payload))
            if exact is not None:
                entry.encoding, entry.backend = "exact", EXACT_CODER
                payload, entry.backend_params = exact
        else:
            entry.backend, payload, entry.backend_params = code_levels(job.levels, backend, job.hint)
    return entry, payload


@contextmanager
def _naming(name: str):
    """A CdlInputError ("step too small", no backend fits ...) says which tensor it is about."""
    try:
        yield
    except CdlInputError as exc:
        if name in str(exc):
            raise
        raise CdlInputError(f"tensor {name!r}: {exc}") from None


EXACT_CODER = "float"  # the one coder of `exact` tensors (cdlcodec.backends.float_exact)
# The exact coder replaces verbatim bytes only when that saves at least this many bytes, its index
# entry included: a file with an `exact` tensor needs format 1.1, not worth it for a few bytes.
EXACT_MIN_SAVING = 64


def _code_exact(rec: TensorRecord, plain_bytes: int) -> tuple[bytes, bytes] | None:
    """(payload, params) of the exact float coder for a tensor it can hold, when they save at least
    EXACT_MIN_SAVING of the tensor's `plain_bytes` verbatim bytes; None otherwise (verbatim then)."""
    from .backends import float_exact

    if not float_exact.supports(rec.dtype) or plain_bytes < EXACT_MIN_SAVING:
        return None
    payload, params = float_exact.encode(np.ascontiguousarray(rec.array, dtype=storage_dtype(rec.dtype)), rec.dtype)
    index_bytes = 4 * -(-len(params) // 3) + len(f'"{EXACT_CODER}"') - len("null")  # base64 params, coder name
    return (payload, params) if plain_bytes - len(payload) - index_bytes >= EXACT_MIN_SAVING else None


def _exact_coder(entry: TensorEntry):
    """The module that decodes an `exact` tensor; CdlFormatError for a coder this cdlcodec lacks."""
    if entry.backend != EXACT_CODER:
        raise CdlFormatError(f"exact payload uses coder {entry.backend!r}, which this cdlcodec cannot decode")
    from .backends import float_exact

    return float_exact


def _quantize(quantizer, rec: TensorRecord, backend: str) -> tuple[np.ndarray, dict, EncodeHint | None] | None:
    """(levels, quant, hint) for one float tensor, or None where the quantizer keeps it exact.

    NaN and infinities have no level: such a tensor is refused by name, unless the quantizer keeps
    it exact anyway (CDL checkpoints keep the float tensors they do not quantize).
    """
    if _rows_independent(quantizer, rec):
        return _quantize_by_rows(quantizer, rec, backend)
    if _elementwise(quantizer, rec):
        return _quantize_in_blocks(quantizer, rec)
    w32 = to_float32(rec.array, rec.dtype)
    # float16 / bfloat16 / float32 values are exact in float32: widen that copy rather than convert twice
    values64 = w32.astype(np.float64) if rec.dtype in _EXACT_IN_FLOAT32 else to_float64(rec.array, rec.dtype)
    finite = bool(np.all(np.isfinite(w32)))
    try:
        result = quantizer.quantize_record(rec, values64, w32, backend)
    except CdlInputError:
        if not finite:  # the quantizer's own refusal of NaN, which cannot name the tensor
            raise _not_finite(rec.name) from None
        raise
    if result is not None and not finite:
        raise _not_finite(rec.name)
    return result


# A quantizer with one step per output channel (axis 0) and elementwise rounding treats every row on
# its own: it is given blocks of rows of about this many elements, so its float64 and float32 copies
# and temporaries (28 bytes a parameter) exist for one block, not for the whole tensor.
QUANTIZE_BLOCK_ELEMENTS = 1 << 20


def _rows_independent(quantizer, rec: TensorRecord) -> bool:
    from .quantizers.channel import ChannelQuantizer

    return (type(quantizer) is ChannelQuantizer and quantizer.axis == 0 and len(rec.shape) >= 2
            and rec.shape[0] > 1 and rec.numel > QUANTIZE_BLOCK_ELEMENTS)


def _quantize_by_rows(quantizer, rec: TensorRecord, backend: str) -> tuple[np.ndarray, dict, None]:
    """_quantize of a tensor whose rows are quantized independently, block by block: the same levels
    and steps as in one piece."""
    row = rec.numel // rec.shape[0]
    rows = max(1, QUANTIZE_BLOCK_ELEMENTS // row)
    # the levels are held in the narrowest integer type (the backends read them in int64 blocks)
    array, levels, steps, quant = rec.array, _NarrowLevels(rec.numel), [], {}
    for first in range(0, rec.shape[0], rows):
        block = TensorRecord(rec.name, array[first:first + rows], rec.dtype)
        block_levels, quant, _ = _quantize(quantizer, block, backend)
        levels.add(block_levels.reshape(-1))
        steps.extend(quant["steps"])
    return levels.result(), {**quant, "steps": steps}, None


def _elementwise(quantizer, rec: TensorRecord) -> bool:
    """One step for the whole tensor (from its float32 values) and rounding element by element."""
    from .quantizers.uniform import UniformQuantizer

    return type(quantizer) is UniformQuantizer and rec.dtype in _EXACT_IN_FLOAT32 and rec.numel > QUANTIZE_BLOCK_ELEMENTS


def _quantize_in_blocks(quantizer, rec: TensorRecord) -> tuple[np.ndarray, dict, None]:
    """_quantize of a tensor with one step, its float64 values and levels made block by block (the
    levels held narrow): the same levels and step as in one piece, without a float64 copy and int64
    levels of the whole tensor."""
    w32 = to_float32(rec.array, rec.dtype)
    if not np.all(np.isfinite(w32)):
        raise _not_finite(rec.name)
    step = quantizer.step_for(w32)
    flat, levels = w32.reshape(-1), _NarrowLevels(rec.numel)
    for start in range(0, flat.size, QUANTIZE_BLOCK_ELEMENTS):
        levels.add(quantizer.levels_for(flat[start:start + QUANTIZE_BLOCK_ELEMENTS].astype(np.float64), step))
    return levels.result(), UniformParams(step).to_json(), None


_EXACT_IN_FLOAT32 = ("float16", "bfloat16", "float32")


def _not_finite(name: str) -> CdlInputError:
    keep = "'" + glob.escape(name).replace("'", "'\"'\"'") + "'"  # a shell word matching only this name
    return CdlInputError(f"tensor {name!r} holds NaN or infinite values; keep it lossless with --keep {keep}")


def _bind_quantizer(model: ModelFile, options: EncodeOptions) -> Quantizer:
    """The quantizer for this model, bound to it (`prepare`). A CDL / R-CDL checkpoint (metadata
    "cdl.mode", set by its reader) is quantized with what it learned; an option that would be
    silently ignored is refused instead: another quantizer for a CDL checkpoint, a CDL quantizer
    for any other model."""
    from .io.cdl_checkpoint import is_cdl_model

    quantizer = options.quantizer
    if is_cdl_model(model):
        if quantizer is not None and not _is_cpmf(quantizer):
            raise parameter_error(f"quantizer ({quantizer.describe()}) cannot be used on a CDL / R-CDL checkpoint: "
                                  "its learned quantizers decide the steps; cdl_quantizer chooses how they are used",
                                  "quantizer", "cdl_quantizer")
        quantizer = options.cdl_quantizer or quantizer or make("cpmf")
    elif options.cdl_quantizer is not None:
        raise parameter_error(f"cdl_quantizer ({options.cdl_quantizer.describe()}) applies to CDL / R-CDL "
                              "checkpoints only, and this model is not one", "cdl_quantizer")
    return (quantizer or make("uniform")).prepare(model, options.backend)


def _is_cpmf(quantizer) -> bool:
    from .quantizers.cpmf import CpmfQuantizer

    return isinstance(quantizer, CpmfQuantizer)


def check_decodable(entry: TensorEntry, limits: Limits) -> None:
    """What decoding `entry` would allocate is bounded before anything is read or allocated: its
    decoded size by Limits.max_decoded_bytes, and a coded tensor's count by what its payload can
    honestly hold (Backend.max_count), so a few bytes cannot ask for gigabytes."""
    decoded = decoded_size(entry)
    if decoded > limits.max_decoded_bytes:
        raise CdlFormatError(f"tensor {entry.name!r}: decoding it holds {decoded:,} bytes, over the limit of "
                             f"{limits.max_decoded_bytes:,} (Limits.max_decoded_bytes)")
    if entry.encoding == "exact":
        try:
            bound = _exact_coder(entry).max_count(entry.length, entry.backend_params, entry.dtype)
            check_count(entry.backend, entry.length, entry.count, bound)
        except CdlFormatError as exc:
            raise type(exc)(f"tensor {entry.name!r}: {exc}") from exc
    if entry.encoding == "levels":
        try:
            backend = backends.get_for_decoding(entry.backend)
            bound = getattr(backend, "max_count", None)  # a plug-in backend may not bound its payloads
            if bound is not None:
                check_count(entry.backend, entry.length, entry.count, bound(entry.length, entry.backend_params))
        except CdlFormatError as exc:
            raise type(exc)(f"tensor {entry.name!r}: {exc}") from exc


def decode_entry(reader: ContainerReader, entry: TensorEntry, *, keep_levels: bool = True) -> TensorRecord:
    """One tensor back in storage form (exact for lossless tensors, level x step for quantized ones)."""
    check_decodable(entry, reader.limits)
    return decoded_record(entry, reader.read_payload(entry), keep_levels=keep_levels)


def decoded_record(entry: TensorEntry, payload: bytes, *, keep_levels: bool = True,
                   parallel_backend: bool = True) -> TensorRecord:
    """The tensor of a checked `entry` (check_decodable) from its `payload`. keep_levels=False drops
    the levels once dequantized (only the ONNX QDQ writer needs them; kept, they are narrowed). parallel_backend=False:
    a backend that can decode one tensor on several cores (cabac) uses one, for callers that decode
    several tensors at once (numba's parallel kernels may not be entered from two threads)."""
    if entry.encoding == "plain":
        arr = np.frombuffer(payload, dtype=storage_dtype(entry.dtype)).reshape(entry.shape).copy()
        return TensorRecord(entry.name, arr, entry.dtype)
    if entry.encoding == "exact":
        try:
            bits = _exact_coder(entry).decode(payload, entry.backend_params, entry.count, entry.dtype)
        except CdlFormatError as exc:
            raise type(exc)(f"tensor {entry.name!r}: {exc}") from exc
        except Exception as exc:  # as for backends: a coder bug must not look like a crash
            raise CdlDecodeError(f"tensor {entry.name!r}: exact payload could not be decoded ({exc})") from exc
        return TensorRecord(entry.name, bits.view(storage_dtype(entry.dtype)).reshape(entry.shape), entry.dtype)
    backend = backends.get_for_decoding(entry.backend)
    if not parallel_backend and getattr(backend, "parallel", False):
        backend = _single_core(backend)
    # Level blocks go straight into the values (and the kept levels): a tensor's int64 levels and the
    # backend's work for all of them never exist at once, only for one block.
    values = Dequantizer(entry.quant, entry.shape, entry.dtype, entry.name)
    kept = _NarrowLevels(entry.count) if keep_levels else None
    for block in _level_blocks(backend, entry, payload):
        if values.filled + block.size > entry.count:
            raise CdlDecodeError(f"tensor {entry.name!r}: decoded the wrong number of levels")
        values.add(block)
        if kept is not None:
            kept.add(block)
    if values.filled != entry.count:
        raise CdlDecodeError(f"tensor {entry.name!r}: decoded the wrong number of levels")
    return TensorRecord(entry.name, values.result(), entry.dtype, levels=None if kept is None else kept.result(),
                       quant=entry.quant)


def _levels_backend(entry: TensorEntry, parallel_backend: bool):
    backend = backends.get_for_decoding(entry.backend)
    if not parallel_backend and getattr(backend, "parallel", False):
        backend = _single_core(backend)
    return backend


def _counted_blocks(entry: TensorEntry, payload: bytes, parallel_backend: bool,
                    block_size: int = DECODE_BLOCK) -> Iterator[np.ndarray]:
    """A "levels" entry's level blocks, exactly entry.count levels in all (CdlDecodeError otherwise)."""
    filled = 0
    for block in _level_blocks(_levels_backend(entry, parallel_backend), entry, payload, block_size):
        if filled + block.size > entry.count:
            raise CdlDecodeError(f"tensor {entry.name!r}: decoded the wrong number of levels")
        filled += block.size
        yield block
        del block  # not held while the next block is decoded
    if filled != entry.count:
        raise CdlDecodeError(f"tensor {entry.name!r}: decoded the wrong number of levels")


def level_range(entry: TensorEntry, payload: bytes, *, parallel_backend: bool = True,
                block_size: int = DECODE_BLOCK) -> tuple[int, int]:
    """(smallest, largest) level of a checked "levels" entry ((0, 0) when empty), decoded block by block
    and kept nowhere: the ONNX QDQ writer decides every tensor's integer type from these before it
    decodes each tensor again (bounded_level_blocks) as it writes it, so no model's levels are ever held."""
    lo, hi = 0, 0
    first = True
    for block in _counted_blocks(entry, payload, parallel_backend, block_size):
        if block.size:
            b_lo, b_hi = int(block.min()), int(block.max())
            lo, hi = (b_lo, b_hi) if first else (min(lo, b_lo), max(hi, b_hi))
            first = False
        del block  # not held while the next block is decoded
    return lo, hi


def bounded_level_blocks(entry: TensorEntry, payload: bytes, bounds: tuple[int, int], *,
                         parallel_backend: bool = True, block_size: int = DECODE_BLOCK) -> Iterator[np.ndarray]:
    """The level blocks of a checked "levels" entry (no values made, nothing dequantized), every level
    within `bounds` (its level_range; CdlDecodeError otherwise, so a caller may narrow them safely)."""
    lo, hi = bounds
    for block in _counted_blocks(entry, payload, parallel_backend, block_size):
        if block.size and (int(block.min()) < lo or int(block.max()) > hi):
            raise CdlDecodeError(f"tensor {entry.name!r}: levels outside {lo}..{hi} (decoded differently twice)")
        yield block
        del block


def _level_blocks(backend, entry: TensorEntry, payload: bytes, block_size: int = DECODE_BLOCK) -> Iterator[np.ndarray]:
    """The backend's levels of `entry` block by block, its errors naming the tensor."""
    blocks = level_blocks(backend, payload, entry.backend_params, entry.count, entry.shape, block_size)
    while True:
        try:
            block = next(blocks)
        except StopIteration:
            return
        except CdlFormatError as exc:
            raise type(exc)(f"tensor {entry.name!r}: {exc}") from exc
        except Exception as exc:  # a backend must raise CdlDecodeError; never let a bug look like a crash
            raise CdlDecodeError(f"tensor {entry.name!r}: {entry.backend} payload could not be decoded ({exc})") from exc
        if not isinstance(block, np.ndarray):
            raise CdlDecodeError(f"tensor {entry.name!r}: decoded the wrong number of levels")
        yield block
        del block


class _NarrowLevels:
    """A tensor's levels in the narrowest signed integer type that holds them all, filled block by
    block (widened when a block needs it): a decoder that keeps every tensor's levels (the QDQ
    writer) holds ~1 byte a weight, never a tensor's int64 levels."""

    def __init__(self, count: int):
        self.array, self.filled = np.empty(count, np.int8), 0

    def add(self, block: np.ndarray) -> None:
        if block.size:
            lo, hi = int(block.min()), int(block.max())
            kind = next((k for k in (np.int8, np.int16, np.int32) if np.iinfo(k).min <= lo and hi <= np.iinfo(k).max),
                        np.int64)
            if np.dtype(kind).itemsize > self.array.dtype.itemsize:
                self.array = self.array.astype(kind)
            self.array[self.filled:self.filled + block.size] = block
        self.filled += block.size

    def result(self) -> np.ndarray:
        return self.array if self.array.size else np.zeros(0, np.int64)


def _single_core(backend):
    """A copy of `backend` that decodes on one core (its `parallel` switch off)."""
    serial = copy.copy(backend)
    serial.parallel = False
    return serial


def open_container(path: str, limits: Limits = Limits()) -> ContainerReader:
    """The container at `path`, refused before any decoding when a tensor cannot be decoded within
    `limits` (the caller closes it)."""
    reader = ContainerReader(path, limits)
    try:
        reader.check_decoded_size()
        for entry in reader.tensors:
            check_decodable(entry, limits)
    except BaseException:
        reader.close()
        raise
    return reader


def iter_decoded(reader: ContainerReader, entries: Iterable[TensorEntry] | None = None, *, threads: int | None = 1,
                 keep_levels: bool = True, quiet: bool = True) -> Iterator[TensorRecord]:
    """The decoded tensors of `entries` (default: all, in file order), one at a time and in that order,
    for a writer that stores each before asking for the next. Payloads are read here, in order; with
    threads > 1 up to `threads` tensors are decoded at once (a bounded window). Entries must have
    passed check_decodable (open_container checks them all)."""
    entries = list(reader.tensors if entries is None else entries)
    threads = threads or default_threads()
    # One tensor cannot be shared out between threads: its backend uses the cores itself (cabac chunks).
    parallel_backend = threads > 1 and len(entries) == 1
    work = partial(_decoded_pair, keep_levels=keep_levels, parallel_backend=parallel_backend)
    with Progress(sum(e.count for e in entries) or 1, "decoding", quiet=quiet) as bar:
        # one payload read ahead: a thread that finishes a tensor starts the next while this thread
        # writes the finished one out
        for record in ordered_map(work, entries, 1 if parallel_backend else threads, size=_count, ahead=1,
                                  prepare=lambda entry: (entry, reader.read_payload(entry))):
            bar.update(record.numel)
            yield record


def iter_level_ranges(reader: ContainerReader, entries: Iterable[TensorEntry], *, threads: int | None = 1,
                      quiet: bool = True, block_size: int = DECODE_BLOCK) -> Iterator[tuple[TensorEntry, tuple[int, int]]]:
    """(entry, level_range) for each of `entries` ("levels" entries that passed check_decodable), in
    order, up to `threads` tensors at once as iter_decoded does; nothing but the two integers is kept
    (each thread holds a payload and a block of `block_size` levels)."""
    entries = list(entries)
    threads = threads or default_threads()
    parallel_backend = threads > 1 and len(entries) == 1
    work = partial(_range_pair, parallel_backend=parallel_backend, block_size=block_size)
    with Progress(sum(e.count for e in entries) or 1, "reading levels", quiet=quiet) as bar:
        for entry, bounds in ordered_map(work, entries, 1 if parallel_backend else threads, size=_count, ahead=1,
                                         prepare=lambda entry: (entry, reader.read_payload(entry))):
            bar.update(entry.count)
            yield entry, bounds


def _range_pair(pair: tuple[TensorEntry, bytes], parallel_backend: bool,
                block_size: int) -> tuple[TensorEntry, tuple[int, int]]:
    return pair[0], level_range(*pair, parallel_backend=parallel_backend, block_size=block_size)


def _numel(record: TensorRecord) -> int:
    return record.numel


def _count(entry: TensorEntry) -> int:
    return entry.count


def _decoded_pair(pair: tuple[TensorEntry, bytes], keep_levels: bool, parallel_backend: bool) -> TensorRecord:
    return decoded_record(*pair, keep_levels=keep_levels, parallel_backend=parallel_backend)


def decode_container(path: str, *, quiet: bool = True, limits: Limits = Limits(), threads: int | None = 1) -> ModelFile:
    """Every tensor of a container, in order, plus its sections and metadata (all in memory: writers
    that can take one tensor at a time use open_container and iter_decoded instead)."""
    with open_container(path, limits) as reader:
        out = list(iter_decoded(reader, threads=threads, quiet=quiet))
        sections = [(s.name, s.kind, reader.read_section(s)) for s in reader.sections]
        return ModelFile(out, sections, dict(reader.metadata))


def select_entries(entries: list[TensorEntry], patterns: Iterable[str], path: str) -> list[TensorEntry]:
    """The entries whose names match one of `patterns` (fnmatch, case-sensitive), in file order;
    CdlInputError naming a pattern that matches no tensor (most likely a typo)."""
    patterns = tuple(patterns)
    for pattern in patterns:
        if not any(fnmatch.fnmatchcase(e.name, pattern) for e in entries):
            examples = ", ".join(repr(e.name) for e in entries[:3])
            raise CdlInputError(f"no tensor of {path} matches {pattern!r} ({len(entries):,} tensors, such as {examples})")
    return [e for e in entries if any(fnmatch.fnmatchcase(e.name, p) for p in patterns)]


def container_summary(path: str, limits: Limits = Limits(), *, check_checksums: bool = True) -> dict:
    """What `cdlcodec info --json` prints. Every payload and section checksum is compared too (one
    read of the file), so a file reported here is not silently corrupt; `checksums` says so."""
    with ContainerReader(path, limits) as reader:
        if check_checksums:
            reader.check_checksums()
        tensors = []
        for e in reader.tensors:
            nbytes = e.length + len(e.backend_params)
            tensors.append({
                "name": e.name, "shape": list(e.shape), "dtype": e.dtype,
                "backend": e.backend if e.encoding in ("levels", "exact") else "plain",
                **_step_summary(e), "bytes": nbytes, "bits_per_param": 8.0 * nbytes / e.numel if e.numel else 0.0,
            })
        num = sum(math.prod(t["shape"]) for t in tensors)
        nq = sum(math.prod(t["shape"]) for t in tensors if t["scheme"] in QUANTIZED_SCHEMES)
        return {
            "path": path, "format_version": f"{reader.version[0]}.{reader.version[1]}",
            "total_bytes": reader.file_size, "num_tensors": len(tensors), "num_params": num,
            "num_quantized_params": nq, "bits_per_param": 8.0 * reader.file_size / num if num else 0.0,
            "checksums": "verified" if check_checksums else "not checked",
            "metadata": dict(reader.metadata),
            "sections": [{"name": s.name, "kind": s.kind, "bytes": s.length,
                          **({"compression": s.compression, "decompressed_bytes": s.size} if s.compression else {})}
                         for s in reader.sections],
            "tensors": tensors,
        }


def _step_summary(entry: TensorEntry) -> dict:
    """scheme, step (one per tensor, else None) and steps (per-channel: axis, count, min, max, else None).
    A quant object the decoder would refuse is shown as stored, without steps: `info` describes a
    file, `verify` and `decode` judge it."""
    quant = entry.quant if entry.encoding == "levels" else None
    scheme = quant.get("scheme", "plain") if isinstance(quant, dict) else "plain"
    try:
        params = from_json(quant, entry.shape, entry.dtype, entry.name) if quant is not None else None
    except CdlFormatError:
        params = None
    step = quant["step"] if getattr(params, "step", None) is not None else None  # as stored (1 stays 1)
    steps = getattr(params, "steps", None)
    channels = None if not steps else {"axis": params.axis, "count": len(steps), "min": min(steps), "max": max(steps)}
    return {"scheme": scheme, "step": step, "steps": channels}
