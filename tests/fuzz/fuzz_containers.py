#!/usr/bin/env python
"""CRC-valid hostile .cdl containers against every reader of the format.

A checksum catches accidents, not attackers: anyone can recompute it.
Each case takes a seed container (the golden files and small containers built here with every
backend, dtype, quantization scheme and section kind), applies one to four mutations (payload bytes,
backend parameters, counts, shapes, dtypes, encodings, quantization fields, index fields, section
bytes, raw JSON number literals) and then recomputes the payload layout and every checksum, so that
only semantic validation stands in the way. Each case goes through decode_container,
cdlcodec.decode to a .safetensors file, verify_container(quick=True) and the `info` command (text and
JSON) under FUZZ_LIMITS.

Cases run in worker processes with an address-space rlimit; the parent gives each case a timeout.
Outcomes:
    decoded    the container decoded (it was still valid)
    refused    a CdlError (the only acceptable failure)
    bug        any other exception, a warning, or a CdlDecodeError wrapping a backend's exception
    rlimit     MemoryError: an allocation the limits should have prevented
    crash      the worker died (a signal, e.g. a segfault in a compiled kernel)
    timeout    a case ran longer than --timeout seconds

    python tests/fuzz/fuzz_containers.py --cases 100000 --seed 1 --jobs 1
    python tests/fuzz/fuzz_containers.py --replay 1234 --seed 1      # one case, with its traceback
    python tests/fuzz/fuzz_containers.py --write 1234 --seed 1 -o case.cdl

Cases are a pure function of (seed, case number), so any reported case can be replayed.
"""
from __future__ import annotations

import argparse
import base64
import json
import os
import random
import resource
import select
import shutil
import struct
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
import zlib
from pathlib import Path

from cdlcodec.formats.container import Limits

REPO = Path(__file__).resolve().parents[2]
GOLDEN = REPO / "tests" / "golden"

PREFIX = struct.Struct("<8sHHI")
FOOTER = struct.Struct("<QQII8s")
MAGIC = b"\x89CDL\r\n\x1a\n"
END_MAGIC = b"CDLEND\x00\x01"

INTERESTING_INTS = [0, 1, 2, 3, 7, 8, 15, 16, 17, 31, 32, 33, 63, 64, 127, 128, 255, 256, 1023, 1024,
                    4095, 65535, 65536, 65537, 1 << 20, (1 << 24) + 1, (1 << 31) - 1, 1 << 31, (1 << 32) - 1,
                    1 << 32, (1 << 32) + 1, 1 << 36, 1 << 53, (1 << 63) - 1, 1 << 63, 1 << 64, -1, -2, -(1 << 31)]
INTERESTING_STEPS = [0, -1, 1, 0.5, 1e-320, 5e-324, 1e-300, 1e300, 1.7976931348623157e308, 3.4e38, 65504.0,
                     70000.0, 1e39, 10 ** 30, True, "0.1", None, [0.1], {"x": 1}]
DTYPES = ["float64", "float32", "float16", "bfloat16", "int64", "int32", "int16", "int8", "uint8", "bool"]
JSON_LITERALS = ["1e400", "-1e400", "1" + "0" * 5000, "-0", "0.0", "1E-400", "123456789012345678901234567890",
                 "18446744073709551616", "-9223372036854775809", "4294967296", "1e308", "true", "null", '"7"']


# ---------------------------------------------------------------------------------------------
# Containers as (index, blobs): taken apart, and put back together with valid checksums
# ---------------------------------------------------------------------------------------------

def split_container(data: bytes) -> tuple[dict, list[bytes], list[bytes]]:
    """(index, tensor payloads, section blobs) of a well-formed container."""
    index_offset, index_length, _, _, _ = FOOTER.unpack(data[-FOOTER.size:])
    index = json.loads(data[index_offset:index_offset + index_length])
    area = data[PREFIX.size:index_offset]
    tensors = [area[t["offset"]:t["offset"] + t["length"]] for t in index["tensors"]]
    sections = [area[s["offset"]:s["offset"] + s["length"]] for s in index["sections"]]
    return index, tensors, sections


def build_container(index: dict, tensors: list[bytes], sections: list[bytes], *, layout: bool = True,
                    index_bytes: bytes | None = None) -> bytes:
    """A container with these blobs (sections first, as the writer lays them out) and valid checksums.

    layout=True sets every entry's offset, length and crc32 from its blob; index_bytes replaces the
    JSON text (for literal-level mutations), keeping the footer and its checksum valid."""
    area = bytearray()
    for entries, blobs in ((index.get("sections"), sections), (index.get("tensors"), tensors)):
        for entry, blob in zip(entries if isinstance(entries, list) else [], blobs):
            if layout and isinstance(entry, dict):
                entry["offset"], entry["length"], entry["crc32"] = len(area), len(blob), zlib.crc32(blob)
            area += blob
    if index_bytes is None:
        index_bytes = json.dumps(index).encode("utf-8")
    prefix = PREFIX.pack(MAGIC, 1, 0, 0)
    index_offset = PREFIX.size + len(area)
    crc = zlib.crc32(prefix + index_bytes + struct.pack("<QQ", index_offset, len(index_bytes)))
    return prefix + bytes(area) + index_bytes + FOOTER.pack(index_offset, len(index_bytes), crc, 0, END_MAGIC)


def tensor_entry(name, shape, dtype, *, encoding="levels", quant=None, backend=None, params=b"", count=None) -> dict:
    numel = 1
    for d in shape:
        numel *= d
    return {"name": name, "shape": list(shape), "dtype": dtype, "encoding": encoding, "quant": quant,
            "backend": backend, "backend_params": base64.b64encode(params).decode("ascii"),
            "count": numel if count is None else count, "offset": 0, "length": 0, "crc32": 0}


# ---------------------------------------------------------------------------------------------
# Seeds
# ---------------------------------------------------------------------------------------------

def _onnx_bytes() -> bytes:
    import numpy as np
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.zeros((3, 3), np.float32), "w")
    w.ClearField("raw_data")
    w.data_location = TensorProto.EXTERNAL
    entry = w.external_data.add()
    entry.key, entry.value = "location", "cdl:w"
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])], [w])
    return helper.make_model(graph, producer_name="fuzz").SerializeToString()


def build_seeds() -> list[bytes]:
    """The golden containers plus small ones covering every backend, dtype, scheme and section kind."""
    import numpy as np

    from cdlcodec.backends.cabac import CabacBackend
    from cdlcodec.backends.huffman import HuffmanBackend
    from cdlcodec.backends.raw import RawBackend

    seeds = [p.read_bytes() for p in sorted(GOLDEN.glob("container_*.cdl"))]
    rng = np.random.default_rng(7)
    backends = {"raw": RawBackend(), "huffman": HuffmanBackend(), "cabac": CabacBackend(chunk_size=8),
                "cabac1": CabacBackend(n_gt=1, mode=2, chunk_size=1 << 16)}
    laplace = np.rint(rng.laplace(0, 2, 48)).astype(np.int64)
    level_sets = {
        "laplace": (laplace, (6, 8)), "zeros": (np.zeros(40, np.int64), (5, 8)),
        "const": (np.full(9, -3, np.int64), (3, 3)), "wide": (rng.integers(-2**31 + 1, 2**31 - 1, 10), (2, 5)),
        "empty": (np.zeros(0, np.int64), (0, 4)), "scalar": (np.array([5], np.int64), ()),
    }
    for bname, backend in backends.items():
        entries, blobs = [], []
        for lname, (levels, shape) in level_sets.items():
            payload, params = backend.encode(levels)
            quant = {"scheme": "uniform", "step": 0.125}
            if lname == "laplace":
                quant = {"scheme": "uniform", "axis": 1, "steps": [0.5 + i for i in range(shape[1])]}
            elif lname == "zeros":
                quant = {"scheme": "dependent", "step": 0.01, "states": 8}
            elif lname == "const":
                quant = {"scheme": "dependent", "axis": 0, "steps": [1.0, 2.0, 3.0], "states": 4}
            entries.append(tensor_entry(f"{bname}.{lname}", shape, "float32" if lname != "scalar" else "bfloat16",
                                        quant=quant, backend=bname.rstrip("1"), params=params))
            blobs.append(payload)
        for dtype, values in (("int8", [-128, 0, 127]), ("uint8", [0, 255, 3]), ("bool", [0, 1, 1]),
                              ("int64", [-(2**31) + 1, 0, 2**31 - 1]), ("int16", [7, 7, 7])):
            payload, params = backend.encode(np.array(values, np.int64))
            entries.append(tensor_entry(f"{bname}.{dtype}", (3,), dtype, quant={"scheme": "integer"},
                                        backend=bname.rstrip("1"), params=params))
            blobs.append(payload)
        half = np.array([1.5, -2.0, 65504.0], np.float16)
        entries.append(tensor_entry(f"{bname}.plain", (3,), "float16", encoding="plain"))
        blobs.append(half.tobytes())
        index = {"format": "cdl", "metadata": {"cdlcodec.version": "fuzz", "source.kind": "onnx"},
                 "tensors": entries, "sections": []}
        seeds.append(build_container(index, blobs, []))
    index = {"format": "cdl", "metadata": {}, "tensors": [tensor_entry("w", (3, 3), "float32", encoding="plain")],
             "sections": [{"name": "model.onnx", "kind": "onnx"}, {"name": "cdl.activations", "kind": "json"},
                          {"name": "blob", "kind": "bytes"}]}
    seeds.append(build_container(index, [np.zeros(9, np.float32).tobytes()],
                                 [_onnx_bytes(), b'{"a": [1, 2.5, {"b": null}]}', b"\x00\x01"]))
    # format 1.2: sections stored as zlib streams (the graph of every ONNX encode since then)
    graph, config = _onnx_bytes(), json.dumps({"a": [1, 2.5, {"b": None}] * 20}).encode()
    index = {"format": "cdl", "metadata": {}, "tensors": [tensor_entry("w", (3, 3), "float32", encoding="plain")],
             "sections": [{"name": "model.onnx", "kind": "zlib", "content": "onnx", "size": len(graph)},
                          {"name": "config", "kind": "zlib", "content": "json", "size": len(config)}]}
    seeds.append(build_container(index, [np.zeros(9, np.float32).tobytes()],
                                 [zlib.compress(graph, 9), zlib.compress(config, 9)]))
    return seeds


# ---------------------------------------------------------------------------------------------
# Mutations
# ---------------------------------------------------------------------------------------------

def _bytes_mutation(r: random.Random, data: bytes, same_length: bool = False) -> bytes:
    b = bytearray(data)
    op = r.choice([0, 1, 6]) if same_length else r.randrange(7)
    if op == 0 and b:
        for _ in range(r.randint(1, 8)):
            b[r.randrange(len(b))] ^= 1 << r.randrange(8)
    elif op == 1 and b:
        b[r.randrange(len(b))] = r.choice([0, 0xFF, 0x7F, 0x80, r.randrange(256)])
    elif op == 2:
        del b[max(0, len(b) - r.randint(1, 8)):]
    elif op == 3:
        b += bytes(r.randrange(256) for _ in range(r.randint(1, 16)))
    elif op == 4:
        b = bytearray(r.randrange(256) for _ in range(r.choice([0, 1, 2, 5, 17, 64])))
    elif op == 5 and b:
        pos = r.randrange(len(b))
        b[pos:pos] = bytes([r.choice([0, 0x80, 0xFF])]) * r.randint(1, 4)
    else:
        b = bytearray(len(b))
    return bytes(b)


def _uvarint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        if value:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def _read_uvarint(buf: bytes, pos: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = buf[pos]  # IndexError at the end: the caller falls back to byte mutations
        value |= (byte & 0x7F) << shift
        pos, shift = pos + 1, shift + 7
        if not byte & 0x80 or shift > 63:
            return value, pos


def _cabac_params(r: random.Random, params: bytes, payload_len: int) -> bytes:
    """Rewrite one field of cabac params structurally (kept parseable so the decoder is reached)."""
    try:
        head, pos, fields = list(params[:4]), 4, []
        for _ in range(3):
            value, pos = _read_uvarint(params, pos)
            fields.append(value)
        lengths = []
        for _ in range(min(fields[2], len(params))):
            value, pos = _read_uvarint(params, pos)
            lengths.append(value)
        if len(head) < 4:
            raise IndexError
    except IndexError:
        return _bytes_mutation(r, params)
    which = r.randrange(6)
    if which == 0:
        head[r.randrange(4)] = r.choice([0, 1, 2, 3, 5, 10, 32, 33, 255])
    elif which == 1:
        fields[0] = r.choice([1, 2, 3, 8, 1 << 16, (1 << 31) - 1, payload_len + 1])  # chunk size
    elif which == 2:
        fields[1] = r.choice([0, 1, 2, 3, 7, 1 << 20, (1 << 31) - 1])  # row length
    elif which == 3 and lengths:  # move bytes between chunks, keeping the total
        i, j = r.randrange(len(lengths)), r.randrange(len(lengths))
        moved = r.randint(0, lengths[i])
        lengths[i] -= moved
        lengths[j] += moved
    elif which == 4:  # everything in one chunk: a long stream
        fields[0], fields[2], lengths = r.choice([1 << 20, 1 << 27, (1 << 31) - 1]), 1, [payload_len]
    else:  # many tiny chunks
        n = r.choice([2, 16, 300])
        fields[0], fields[2] = 1, n
        lengths = [payload_len] + [0] * (n - 1)
    return bytes(head) + b"".join(_uvarint(v) for v in [*fields[:2], len(lengths), *lengths])


def _deep_payload(r: random.Random, t: dict, blobs: list[bytes], i: int) -> None:
    """A payload the decoder gets to read: lengths kept consistent with the params and the count,
    so that the coded stream itself (not a length check) is what is hostile."""
    import numpy as np

    from cdlcodec.backends import huffman_kernels as hk
    from cdlcodec.backends.huffman import code_lengths
    from cdlcodec.backends.varint import write_svarint

    count = t.get("count") if isinstance(t.get("count"), int) and 0 < t.get("count", 0) <= 4096 else r.randint(1, 300)
    t["count"], t["shape"] = count, [count]
    t["encoding"], t["dtype"] = "levels", r.choice(["float32", "float16", "bfloat16", "int8", "bool", "int64"])
    t["quant"] = {"scheme": "integer"} if t["dtype"] in ("int8", "bool", "int64") else {"scheme": "uniform", "step": 0.5}
    kind = r.randrange(3)
    if kind == 0:  # raw: any width and base, random bits of exactly the right length
        width = r.randint(1, 32)
        t["backend"] = "raw"
        params = bytes([width]) + write_svarint(r.choice([0, -1, 1, -(2**31) + 1, 2**31 - 1, -5]))
        payload = bytes(r.randrange(256) for _ in range((count * width + 7) // 8))
    elif kind == 1:  # huffman: a valid code table over random symbols, random payload bits
        n = r.randint(2, min(count, 40)) if count >= 2 else 2
        values = np.array(sorted(r.sample(range(-300, 300), n)), np.int64)
        lengths = code_lengths(np.array([r.randint(1, 1000) for _ in range(n)]), r.randint(max(1, (n - 1).bit_length()), 24))
        table = hk.write_dense_table(values, lengths) if r.random() < 0.5 else hk.write_sparse_table(values, lengths)
        t["backend"], params = "huffman", table.tobytes()
        payload = bytes(r.randrange(256) for _ in range(r.randint(max(1, count // 8), count * 3)))
    else:  # cabac: random bytes, one chunk or several, any n_gt, mode and rates
        chunk = r.choice([count, max(1, count // 3), 1, 7])
        n_chunks = -(-count // chunk)
        lengths = [r.randint(0, 12) for _ in range(n_chunks)]
        t["backend"] = "cabac"
        params = bytes([1, r.randint(0, 32), r.randint(0, 2), r.randint(0, 5)]) + b"".join(
            _uvarint(v) for v in [chunk, r.choice([0, 1, 3, count // 2]), n_chunks, *lengths])
        payload = bytes(r.randrange(256) for _ in range(sum(lengths)))
    t["backend_params"] = base64.b64encode(params).decode("ascii")
    blobs[i] = payload


def _mutate_tensor(r: random.Random, t: dict, blobs: list[bytes], i: int) -> None:
    op = r.randrange(13)
    if op == 0:  # mostly in place, so that length checks let the stream through
        blobs[i] = _bytes_mutation(r, blobs[i], same_length=r.random() < 0.7)
    elif op == 12:
        _deep_payload(r, t, blobs, i)
    elif op == 1:
        try:
            params = base64.b64decode(t.get("backend_params"), validate=True)
        except (TypeError, ValueError):  # an earlier mutation left no valid base64 here
            params = b""
        if t.get("backend") == "cabac" and r.random() < 0.7:
            params = _cabac_params(r, params, len(blobs[i]))
        elif t.get("backend") == "raw" and params and r.random() < 0.5:
            params = bytes([r.choice([0, 1, 7, 8, 31, 32, 33, 64, 255])]) + params[1:]
        elif t.get("backend") == "huffman" and params and r.random() < 0.3:
            params = bytes([r.randrange(6)]) + params[1:]
        else:
            params = _bytes_mutation(r, params)
        t["backend_params"] = base64.b64encode(params).decode("ascii")
    elif op == 2:
        n = r.choice(INTERESTING_INTS)
        t["count"] = n
        if r.random() < 0.7:
            t["shape"] = [n] if r.random() < 0.5 else [r.choice([0, 1, 2, n]), n]
    elif op == 3:
        t["shape"] = [r.choice(INTERESTING_INTS) for _ in range(r.choice([0, 1, 2, 4, 8, 9]))]
        if r.random() < 0.5:
            numel = 1
            for d in t["shape"]:
                numel *= d if isinstance(d, int) else 1
            t["count"] = numel
    elif op == 4:
        t["dtype"] = r.choice(DTYPES + ["complex64", 7, None])
    elif op == 5:
        t["encoding"] = r.choice(["levels", "plain", "zip", None])
    elif op == 6:
        t["backend"] = r.choice(["raw", "huffman", "cabac", None, "zip", 3])
    elif op == 7:
        quant = t.get("quant") if isinstance(t.get("quant"), dict) else {}
        quant = dict(quant)
        key = r.choice(["scheme", "step", "steps", "axis", "states", None])
        if key == "scheme":
            quant["scheme"] = r.choice(["uniform", "integer", "dependent", "lloyd", None, 1])
        elif key == "step":
            quant["step"] = r.choice(INTERESTING_STEPS)
        elif key == "steps":
            quant["steps"] = [r.choice(INTERESTING_STEPS[:12]) for _ in range(r.choice([0, 1, 2, 3, 5, 8]))]
            quant.setdefault("axis", r.choice([0, 1]))
        elif key == "axis":
            quant["axis"] = r.choice([-1, 0, 1, 2, 8, "0", None, True])
        elif key == "states":
            quant["states"] = r.choice([0, 3, 4, 8, 16, True, 4.0, None])
        else:
            quant = r.choice([None, [], "uniform", {}])
        t["quant"] = quant
    elif op == 8:  # a constant tensor asking for a lot
        t["count"] = n = r.choice([1 << 20, 1 << 24, 1 << 27, 1 << 31, 1 << 32])
        t["shape"] = [n]
        t["encoding"], t["backend"] = "levels", r.choice(["raw", "huffman"])
        t["backend_params"] = base64.b64encode(b"\x00\x02" if t["backend"] == "raw" else b"\x01\x05").decode()
        blobs[i] = b""
    elif op == 9:
        key = r.choice(["name", "offset", "length", "crc32", "backend_params", "quant", "shape", "count"])
        t[key] = r.choice([None, -1, 1.5, "x", [], {}, 1 << 64, "!!!"])
    elif op == 10:
        t.pop(r.choice(list(t)), None)
    else:
        j = r.randrange(len(blobs))
        blobs[i], blobs[j] = blobs[j], blobs[i]


def _mutate_index(r: random.Random, index: dict, tensors: list[bytes], sections: list[bytes]) -> None:
    op = r.randrange(6)
    if op == 0 and len(index["tensors"]) > 1:  # duplicate or drop a tensor
        i = r.randrange(len(index["tensors"]))
        if r.random() < 0.5:
            index["tensors"].append(dict(index["tensors"][i]))
            tensors.append(tensors[i])
        else:
            del index["tensors"][i], tensors[i]
    elif op == 1:
        index["metadata"] = r.choice([{"k": "v" * r.choice([10, 1 << 20])}, {"k": 1}, [], {"\ud800": "x"}])
    elif op == 2 and index["sections"]:
        i = r.randrange(len(index["sections"]))
        sections[i] = _bytes_mutation(r, sections[i])
    elif op == 3 and index["sections"]:
        i = r.randrange(len(index["sections"]))
        section = index["sections"][i]
        field = r.choice(["kind", "content", "size"])
        if field == "size":  # a zlib section's stated length: off by a little, huge, or not a number
            stated = section.get("size") if type(section.get("size")) is int else 0  # an earlier mutation may have made it "9"
            section["size"] = r.choice([0, 1, stated + r.choice([-1, 1]), 1 << 30, 1 << 40, "9"])
        else:
            section[field] = r.choice(["onnx", "json", "bytes", "torch.export", "zip", "zlib"])
    elif op == 4:
        index["format"] = r.choice(["cdl", "CDL", None])
    elif index["tensors"]:
        index["tensors"][r.randrange(len(index["tensors"]))]["name"] = r.choice(["", "\ud800", "a" * 1000, "w"])


def _mutate_literal(r: random.Random, text: bytes) -> bytes:
    """Replace one JSON number literal (a digit run) with an interesting one."""
    digits = [i for i, c in enumerate(text) if 48 <= c <= 57 and (i == 0 or not 48 <= text[i - 1] <= 57)]
    if not digits:
        return text
    start = r.choice(digits)
    end = start
    while end < len(text) and (48 <= text[end] <= 57 or text[end] in b".eE+-"):
        end += 1
    return text[:start] + r.choice(JSON_LITERALS).encode() + text[end:]


def make_case(seeds: list[bytes], seed: int, case: int) -> bytes:
    """The container of case `case`: a pure function of (seed, case)."""
    r = random.Random(f"{seed}:{case}")
    index, tensors, sections = split_container(r.choice(seeds))
    for _ in range(r.choice([1, 1, 2, 3, 4])):
        if r.random() < 0.8 and index["tensors"]:
            i = r.randrange(len(index["tensors"]))
            _mutate_tensor(r, index["tensors"][i], tensors, i)
        else:
            _mutate_index(r, index, tensors, sections)
    keep_layout = r.random() < 0.03  # now and then an index whose offsets no longer match
    data = build_container(index, tensors, sections, layout=not keep_layout)
    if r.random() < 0.05:
        index_offset, index_length, _, _, _ = FOOTER.unpack(data[-FOOTER.size:])
        text = _mutate_literal(r, data[index_offset:index_offset + index_length])
        data = build_container(index, tensors, sections, layout=False, index_bytes=text)
    return data


# ---------------------------------------------------------------------------------------------
# Running one case
# ---------------------------------------------------------------------------------------------

# 8 MiB of decoded tensors (and their levels) per file keeps every case small and fast; the limits
# themselves are what is being tested: a bomb must be refused before it allocates.
FUZZ_LIMITS = Limits(max_decoded_bytes=8 << 20)


def _info_text(path: str) -> None:
    """What `cdlcodec info` prints (text and --json), rendered into a buffer."""
    import contextlib
    import io

    from cdlcodec.cli.commands.info import command

    with contextlib.redirect_stdout(io.StringIO()):
        command.callback(path, False)
        command.callback(path, True)


def _decode_to_file(path: str, output: str) -> None:
    """What `cdlcodec decode -o x.safetensors` does."""
    from cdlcodec.api import decode

    decode(path, output, limits=FUZZ_LIMITS)


def run_case(path: str) -> tuple[str, str]:
    """(outcome, detail) of decoding (also to a .safetensors file), verifying and showing `path`."""
    from cdlcodec.codec import decode_container
    from cdlcodec.errors import CdlError
    from cdlcodec.verify import verify_container

    outcome = "decoded"
    output = os.path.join(os.path.dirname(path), "out.safetensors")
    for step in (lambda: decode_container(path, limits=FUZZ_LIMITS),
                 lambda: _decode_to_file(path, output),
                 lambda: verify_container(path, FUZZ_LIMITS, quick=True),
                 lambda: _info_text(path)):
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("error")  # a warning reaches the user's terminal: a bug too
                step()
        except MemoryError:
            return "rlimit", traceback.format_exc(limit=-3)
        except CdlError as exc:
            cause = exc.__cause__
            if cause is not None and not isinstance(cause, CdlError) and "could not be decoded (" in str(exc):
                return "bug", "".join(traceback.format_exception(cause, limit=-4))  # a wrapped backend bug
            outcome = "refused"
        except Exception:  # anything else is a bug by definition
            return "bug", traceback.format_exc(limit=-4)
    return outcome, ""


def worker(seed: int, tmp: str) -> None:
    """Read case numbers from stdin, answer one JSON line per case on stdout; files go to `tmp`."""
    global _TMP
    _TMP = tmp
    seeds = build_seeds()
    for data in seeds:  # load every kernel and library before the first timed case
        run_case(_write(data))
    out = sys.stdout
    print(json.dumps({"ready": True}), file=out, flush=True)
    for line in sys.stdin:
        case = int(line)
        path = _write(make_case(seeds, seed, case))
        outcome, detail = run_case(path)
        print(json.dumps({"case": case, "outcome": outcome, "detail": detail[-2000:]}), file=out, flush=True)


_TMP = None  # the folder a worker writes its case (and the decoded output) to


def _scratch() -> str:
    shm = "/dev/shm" if os.path.isdir("/dev/shm") else None  # a RAM disk: the output's fsync is free
    return tempfile.mkdtemp(prefix="cdl-fuzz-", dir=shm)


def _write(data: bytes) -> str:
    path = os.path.join(_TMP, "case.cdl")
    with open(path, "wb") as fh:
        fh.write(data)
    return path


# ---------------------------------------------------------------------------------------------
# The campaign: workers under an rlimit, a timeout per case
# ---------------------------------------------------------------------------------------------

class _Worker:
    def __init__(self, seed: int, mem_mb: int):
        def limit():
            resource.setrlimit(resource.RLIMIT_AS, (mem_mb << 20, mem_mb << 20))
            resource.setrlimit(resource.RLIMIT_CORE, (0, 0))

        env = dict(os.environ, NUMBA_NUM_THREADS="1", OMP_NUM_THREADS="1", PYTHONHASHSEED="0")
        self.tmp = _scratch()
        self.proc = subprocess.Popen([sys.executable, __file__, "--worker", "--seed", str(seed), "--tmp", self.tmp],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env, preexec_fn=limit,
                                     text=True, bufsize=1)
        self.case: int | None = None
        self.deadline = 0.0
        ready = self._read_line(120.0)
        if ready is None or not ready.get("ready"):
            raise RuntimeError(f"fuzz worker did not start (exit status {self.proc.poll()})")

    def _read_line(self, timeout: float) -> dict | None:
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            return None
        line = self.proc.stdout.readline()
        return json.loads(line) if line else None

    def send(self, case: int, timeout: float) -> None:
        self.case, self.deadline = case, time.monotonic() + timeout
        self.proc.stdin.write(f"{case}\n")
        self.proc.stdin.flush()

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        shutil.rmtree(self.tmp, ignore_errors=True)


def campaign(cases: int, seed: int, jobs: int = 1, timeout: float = 20.0, mem_mb: int = 2048, start: int = 0,
             progress: bool = False) -> dict:
    """Run cases start..start+cases-1; returns counts per outcome and the failing cases."""
    counts = {k: 0 for k in ("decoded", "refused", "bug", "rlimit", "crash", "timeout")}
    failures: list[dict] = []
    t0 = time.monotonic()
    workers = [_Worker(seed, mem_mb) for _ in range(jobs)]
    todo = iter(range(start, start + cases))
    done = 0

    def record(case: int, outcome: str, detail: str) -> None:
        nonlocal done
        counts[outcome] += 1
        done += 1
        if outcome not in ("decoded", "refused"):
            failures.append({"case": case, "outcome": outcome, "detail": detail})
        if progress and done % 5000 == 0:
            print(f"  {done:,} cases, {time.monotonic() - t0:.0f} s: {counts}", file=sys.stderr, flush=True)

    try:
        for w in workers:
            case = next(todo, None)
            if case is not None:
                w.send(case, timeout)
        while any(w.case is not None for w in workers):
            busy = [w for w in workers if w.case is not None]
            wait = max(0.0, min(w.deadline for w in busy) - time.monotonic())
            ready, _, _ = select.select([w.proc.stdout for w in busy], [], [], wait)
            for i, w in enumerate(workers):
                if w.case is None:
                    continue
                if w.proc.stdout in ready:
                    line = w.proc.stdout.readline()
                    if line:
                        msg = json.loads(line)
                        record(msg["case"], msg["outcome"], msg["detail"])
                    else:  # the worker died on this case
                        status = w.proc.wait()
                        w.kill()
                        record(w.case, "crash", f"worker exit status {status}")
                        w = workers[i] = _Worker(seed, mem_mb)
                elif time.monotonic() >= w.deadline:
                    case = w.case
                    w.kill()
                    record(case, "timeout", f"no answer within {timeout} s")
                    w = workers[i] = _Worker(seed, mem_mb)
                else:
                    continue
                w.case = None
                case = next(todo, None)
                if case is not None:
                    w.send(case, timeout)
    finally:
        for w in workers:
            w.proc.stdin.close()
            w.kill()
    return {"cases": done, "seed": seed, "jobs": jobs, "seconds": round(time.monotonic() - t0, 1),
            "counts": counts, "failures": failures}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cases", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--start", type=int, default=0, help="first case number")
    ap.add_argument("--timeout", type=float, default=20.0, help="seconds per case")
    ap.add_argument("--mem-mb", type=int, default=2048, help="address-space rlimit of each worker")
    ap.add_argument("--json", action="store_true", help="print the result as JSON")
    ap.add_argument("--replay", type=int, metavar="CASE", help="run one case here, with its traceback")
    ap.add_argument("--write", type=int, metavar="CASE", help="write one case's container to -o")
    ap.add_argument("-o", "--output", default="case.cdl")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--tmp", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.worker:
        worker(args.seed, args.tmp)
        return 0
    if args.write is not None or args.replay is not None:
        data = make_case(build_seeds(), args.seed, args.write if args.write is not None else args.replay)
        if args.write is not None:
            Path(args.output).write_bytes(data)
            return 0
        global _TMP
        _TMP = _scratch()
        try:
            outcome, detail = run_case(_write(data))
        finally:
            shutil.rmtree(_TMP, ignore_errors=True)
        print(outcome, detail, sep="\n")
        return 0 if outcome in ("decoded", "refused") else 1
    result = campaign(args.cases, args.seed, args.jobs, args.timeout, args.mem_mb, args.start, progress=True)
    if args.json:
        print(json.dumps(result, indent=1))
    else:
        print(f"{result['cases']:,} cases, seed {args.seed}, {args.jobs} job(s), {result['seconds']} s: {result['counts']}")
        for f in result["failures"][:20]:
            print(f"--- case {f['case']}: {f['outcome']}\n{f['detail']}")
    return 1 if result["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
