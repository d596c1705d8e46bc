"""Sharded safetensors checkpoints as model hubs publish them: a folder with
`model-0000k-of-0000n.safetensors` shards, `model.safetensors.index.json` (its `weight_map` says
which shard holds each tensor) and small text files such as `config.json`,
`generation_config.json` and the tokenizer's.

`read_sharded(path)` reads the folder (or its index file) into one ModelFile: every shard's tensors
in shard order (file name order), each shard's in its data order, plus two kinds of sections:
- LAYOUT_SECTION (json): the index file's name and, per shard, its file name, its safetensors
  `__metadata__` and its tensor names in order;
- `file:<name>` (bytes): each carried file verbatim, the index file included. Carried are regular
  files with a text extension (CARRIED_EXTENSIONS) that are UTF-8 text, at most MAX_CARRIED_BYTES
  each; anything else in the folder (a binary tokenizer.model, code, sub-folders) is not, and the
  layout names it under "not_carried".

`write_sharded(folder, model)` writes the same layout back: the same shard file names, each with
the same tensors in the same order and the same `__metadata__`, the index file and carried files
byte for byte. The folder appears complete or not at all: it is written as a temporary folder
beside the target and renamed into place (the target may not exist yet or be an empty folder).
Layout and file names come from a container, which is untrusted: each must be a plain file name.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import struct
import tempfile

from ..errors import CdlFormatError, CdlInputError
from ..records import ModelFile, TensorRecord
from .safetensors_file import MAX_HEADER, SafetensorsWriter, read_safetensors

INDEX_SUFFIX = ".safetensors.index.json"
LAYOUT_SECTION = "safetensors.layout"
FILE_PREFIX = "file:"
CARRIED_EXTENSIONS = (".json", ".txt", ".md", ".jinja", ".yaml", ".yml")
MAX_CARRIED_BYTES = 64 << 20   # a large tokenizer.json is tens of MB; model weights never travel this way
MAX_LAYOUT_BYTES = 64 << 20    # the index JSON of a 1,000,000-tensor model is below this
SOURCE_KIND = "safetensors.sharded"


# ----------------------------------------------------------------------------------------------
# Reading a sharded folder
# ----------------------------------------------------------------------------------------------

def read_sharded(path: str) -> ModelFile:
    """A sharded checkpoint folder, or its `*.safetensors.index.json`, as one ModelFile."""
    folder, index_name = _locate(path)
    index_path = os.path.join(folder, index_name)
    weight_map = _weight_map(index_path)
    shard_names = sorted(set(weight_map.values()))
    records: list[TensorRecord] = []
    shards = []
    seen: dict[str, str] = {}
    for shard in shard_names:
        shard_path = os.path.join(folder, shard)
        if not os.path.isfile(shard_path):
            raise CdlInputError(f"{index_path}: shard {shard!r} is not a file in {folder}")
        shard_records = read_safetensors(shard_path).records
        names = [r.name for r in shard_records]
        for name in names:
            if name in seen:
                raise CdlInputError(f"{folder}: tensor {name!r} is in two shards, {seen[name]} and {shard}")
            seen[name] = shard
            if weight_map.get(name) != shard:
                where = f"in {weight_map[name]!r}" if name in weight_map else "nowhere"
                raise CdlInputError(f"{index_path}: shard {shard} holds tensor {name!r}, which the weight_map puts {where}")
        records.extend(shard_records)
        shards.append({"file": shard, "metadata": _shard_metadata(shard_path), "tensors": names})
    missing = sorted(set(weight_map) - set(seen))
    if missing:
        raise CdlInputError(f"{index_path}: the weight_map names {len(missing)} tensor(s) no shard holds, "
                            f"e.g. {missing[0]!r}")
    carried, not_carried = _carried_files(folder, set(shard_names))
    layout = {"index": index_name, "shards": shards, "not_carried": not_carried}
    sections = [(LAYOUT_SECTION, "json", json.dumps(layout, separators=(",", ":")).encode("utf-8"))]
    sections += [(FILE_PREFIX + name, "bytes", data) for name, data in carried]
    return ModelFile(records, sections, {"source.kind": SOURCE_KIND})


def _locate(path: str) -> tuple[str, str]:
    """(folder, index file name) for a folder or an index file path."""
    if os.path.isdir(path):
        indexes = sorted(e.name for e in os.scandir(path) if e.name.endswith(INDEX_SUFFIX) and e.is_file())
        if len(indexes) != 1:
            found = f"{len(indexes)} of them ({', '.join(indexes)})" if indexes else "none"
            raise CdlInputError(f"{path}: a directory is read as a sharded safetensors checkpoint, which needs one "
                                f"*{INDEX_SUFFIX} file, found {found}; give a model file or the index file itself")
        return path, indexes[0]
    if not path.endswith(INDEX_SUFFIX):
        raise CdlInputError(f"cannot read {path!r}: a .json model file is the index of a sharded safetensors "
                            f"checkpoint, named *{INDEX_SUFFIX}")
    return os.path.dirname(os.path.abspath(path)), os.path.basename(path)


def _weight_map(index_path: str) -> dict[str, str]:
    index = _strict_json(_read_capped(index_path, MAX_LAYOUT_BYTES), index_path, CdlInputError)
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise CdlInputError(f"{index_path}: not a sharded checkpoint index (no \"weight_map\" object of tensor names)")
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or not shard.endswith(".safetensors"):
            raise CdlInputError(f"{index_path}: tensor {name!r} maps to {shard!r}, not a .safetensors shard")
        _check_file_name(shard, f"{index_path}: shard", CdlInputError)
    return weight_map


def _shard_metadata(path: str) -> dict[str, str]:
    """The `__metadata__` string map of a safetensors file that read_safetensors has validated."""
    with open(path, "rb") as fh:
        (n,) = struct.unpack("<Q", fh.read(8))
        header = json.loads(fh.read(min(n, MAX_HEADER)).decode("utf-8"))
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise CdlInputError(f"{path}: not a valid .safetensors file (__metadata__ is not a map of strings)")
    return meta


def _carried_files(folder: str, shards: set[str]) -> tuple[list[tuple[str, bytes]], list[str]]:
    """([(name, bytes)] of the files carried as sections, [names of the others]), both sorted."""
    carried, skipped = [], []
    for entry in sorted(os.scandir(folder), key=lambda e: e.name):
        if entry.name in shards:
            continue
        data = None
        if (entry.is_file() and entry.name.lower().endswith(CARRIED_EXTENSIONS) and _is_plain_file_name(entry.name)
                and entry.stat().st_size <= MAX_CARRIED_BYTES):
            data = _read_capped(entry.path, MAX_CARRIED_BYTES)
            try:
                data.decode("utf-8")
            except UnicodeDecodeError:
                data = None
        if data is None:
            skipped.append(entry.name)
        else:
            carried.append((entry.name, data))
    return carried, skipped


# ----------------------------------------------------------------------------------------------
# Writing the folder back
# ----------------------------------------------------------------------------------------------

def has_layout(model: ModelFile) -> bool:
    return any(name == LAYOUT_SECTION for name, _, _ in model.sections)


def write_sharded(path: str, model: ModelFile) -> None:
    """The decoded model as the sharded folder it was encoded from (module docstring)."""
    sections = {name: (kind, data) for name, kind, data in model.sections}
    if LAYOUT_SECTION not in sections:
        raise CdlInputError(f"cannot write the folder {path}: the container holds no shard layout (it was not "
                            "encoded from a sharded safetensors folder); decode it to a model file instead "
                            "(.safetensors, .pt, ...)")
    shards = _layout(sections[LAYOUT_SECTION][1], model.records)
    carried = []
    for name, (kind, data) in sections.items():
        if name.startswith(FILE_PREFIX):
            file_name = _check_file_name(name[len(FILE_PREFIX):], "carried file", CdlFormatError)
            if file_name in shards:
                raise CdlFormatError(f"carried file {file_name!r} has the name of a shard")
            carried.append((file_name, data))
    by_name = {r.name: r for r in model.records}
    with _folder_in_place(path) as tmp:
        for file_name, (metadata, names) in shards.items():
            records = [by_name[n] for n in names]
            # Header from the plan, then one tensor at a time: a shard is never held whole.
            with SafetensorsWriter(os.path.join(tmp, file_name), [(r.name, r.dtype, r.shape) for r in records],
                                   metadata) as writer:
                for record in records:
                    writer.add(record)
        for file_name, data in carried:
            with open(os.path.join(tmp, file_name), "wb") as fh:
                fh.write(data)


def _layout(data: bytes, records: list[TensorRecord]) -> dict[str, tuple[dict[str, str], list[str]]]:
    """{shard file name: (its __metadata__, its tensor names)} from the layout section, checked
    against the decoded records: every tensor in exactly one shard."""
    what = f"section {LAYOUT_SECTION!r}"
    if len(data) > MAX_LAYOUT_BYTES:
        raise CdlFormatError(f"{what} is larger than {MAX_LAYOUT_BYTES:,} bytes")
    layout = _strict_json(data, what, CdlFormatError)
    shards = layout.get("shards") if isinstance(layout, dict) else None
    if not isinstance(shards, list) or not shards:
        raise CdlFormatError(f"{what} lists no shards")
    out: dict[str, tuple[dict[str, str], list[str]]] = {}
    placed: set[str] = set()
    for shard in shards:
        file_name = shard.get("file") if isinstance(shard, dict) else None
        metadata, names = (shard.get("metadata"), shard.get("tensors")) if isinstance(shard, dict) else (None, None)
        if (not isinstance(file_name, str) or not file_name.endswith(".safetensors") or not isinstance(metadata, dict)
                or not all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
                or not isinstance(names, list) or not all(isinstance(n, str) for n in names)):
            raise CdlFormatError(f"{what}: a shard entry is not {{file: *.safetensors, metadata: strings, tensors: names}}")
        _check_file_name(file_name, f"{what}: shard", CdlFormatError)
        if file_name in out:
            raise CdlFormatError(f"{what}: shard {file_name!r} is listed twice")
        for name in names:
            if name in placed:
                raise CdlFormatError(f"{what}: tensor {name!r} is placed in two shards")
            placed.add(name)
        out[file_name] = (metadata, names)
    decoded = {r.name for r in records}
    if placed != decoded:
        extra = sorted(placed - decoded) or sorted(decoded - placed)
        raise CdlInputError(f"the decoded tensors do not match the shard layout (e.g. {extra[0]!r}); "
                            "a subset of the tensors is written to a single file (.safetensors), not a folder")
    return out


@contextlib.contextmanager
def _folder_in_place(path: str):
    """A temporary folder beside `path`; on success it becomes `path` (which may be an empty folder)."""
    target = os.path.abspath(path.rstrip("/\\") or path)
    if os.path.exists(target) and not (os.path.isdir(target) and not os.listdir(target)):
        raise CdlInputError(f"cannot write the folder {path}: it exists and is not an empty folder")
    parent = os.path.dirname(target)
    if not os.path.isdir(parent):
        raise CdlInputError(f"cannot write the folder {path}: no such directory {parent}")
    tmp = tempfile.mkdtemp(prefix=".cdlcodec-", dir=parent)
    try:
        yield tmp
        mask = os.umask(0)
        os.umask(mask)
        os.chmod(tmp, 0o777 & ~mask)  # what mkdir would give, not mkdtemp's private 0700
        for name in os.listdir(tmp):
            os.chmod(os.path.join(tmp, name), 0o666 & ~mask)
        os.replace(tmp, target)  # an empty target folder is replaced; a non-empty one fails (checked above)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# ----------------------------------------------------------------------------------------------
# Shared checks
# ----------------------------------------------------------------------------------------------

def _is_plain_file_name(name: str) -> bool:
    """A file name in one folder: no separator, no `..`, no NUL, not hidden, at most 255 bytes."""
    return (bool(name) and not name.startswith(".") and not any(c in name for c in "/\\\0")
            and len(name.encode("utf-8", "surrogatepass")) <= 255)


def _check_file_name(name: str, what: str, error: type) -> str:
    """`name` itself when it is a plain file name; names come from untrusted index files and containers."""
    if not _is_plain_file_name(name):
        raise error(f"{what} {name!r} is not a plain file name")
    return name


def _read_capped(path: str, limit: int) -> bytes:
    with open(path, "rb") as fh:
        data = fh.read(limit + 1)
    if len(data) > limit:
        raise CdlInputError(f"{path}: larger than {limit:,} bytes")
    return data


def _strict_json(data: bytes, what: str, error: type):
    def no_duplicates(pairs):
        keys = [k for k, _ in pairs]
        if len(set(keys)) != len(keys):
            raise ValueError("duplicate key")
        return dict(pairs)

    def no_constant(name):
        raise ValueError(f"{name} is not JSON")

    try:
        return json.loads(data.decode("utf-8"), object_pairs_hook=no_duplicates, parse_constant=no_constant)
    except (ValueError, RecursionError) as exc:
        raise error(f"{what} is not valid JSON: {exc}") from None
