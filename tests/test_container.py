"""The container reader refuses every malformed file with a CdlFormatError naming the problem."""
from __future__ import annotations

import base64
import json
import struct
import zlib

import numpy as np
import pytest

from cdlcodec.errors import CdlFormatError, CdlInputError
from cdlcodec.formats.container import (END_MAGIC, FOOTER, MAGIC, PREFIX, ContainerReader,
                                         ContainerWriter, FormatError, Limits, TensorEntry)
from fuzz.fuzz_containers import build_container, split_container


def _write_plain(path, tensors, metadata=None, sections=()):
    with ContainerWriter(path, metadata or {}) as w:
        for name, kind, data in sections:
            w.add_section(name, kind, data)
        for name, arr in tensors:
            w.add_tensor(TensorEntry(name, arr.shape, str(arr.dtype), "plain", None, None, b"", arr.size),
                         arr.astype(arr.dtype.newbyteorder("<")).tobytes())


def _forge(path, index: dict, payload: bytes = b"", *, major=1, flags=0, crc_fix=True):
    """Write a file with an arbitrary index (valid checksum unless crc_fix=False)."""
    prefix = PREFIX.pack(MAGIC, major, 0, flags)
    ib = json.dumps(index).encode()
    off = len(prefix) + len(payload)
    crc = zlib.crc32(prefix + ib + struct.pack("<QQ", off, len(ib))) if crc_fix else 0
    path.write_bytes(prefix + payload + ib + FOOTER.pack(off, len(ib), crc, 0, END_MAGIC))


def _entry(name="t", shape=(2,), dtype="float32", encoding="plain", offset=0, length=8, payload=b"\0" * 8, **kw):
    d = {"name": name, "shape": list(shape), "dtype": dtype, "encoding": encoding, "quant": None,
         "backend": None, "backend_params": "", "count": int(np.prod(shape)), "offset": offset,
         "length": length, "crc32": zlib.crc32(payload)}
    d.update(kw)
    return d


def test_round_trip_plain_tensors_and_sections(tmp_path):
    a = np.arange(12, dtype=np.float32).reshape(3, 4)
    b = np.array([1, -2], dtype=np.int64)
    path = tmp_path / "x.cdl"
    _write_plain(path, [("a", a), ("b", b)], {"k": "v"}, [("graph", "json", b'{"x":1}')])
    with ContainerReader(path) as r:
        assert r.version == (1, 0)
        assert r.metadata == {"k": "v"}
        assert [t.name for t in r.tensors] == ["a", "b"]
        assert np.frombuffer(r.read_payload(r.tensor("a")), "<f4").reshape(3, 4).tolist() == a.tolist()
        assert r.read_section(r.section("graph")) == b'{"x":1}'


def test_writer_is_atomic_on_failure(tmp_path):
    path = tmp_path / "x.cdl"
    with pytest.raises(RuntimeError):
        with ContainerWriter(path) as w:
            w.add_section("s", "bytes", b"abc")
            raise RuntimeError("boom")
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


def test_writer_rejects_duplicate_names(tmp_path):
    with pytest.raises(CdlInputError, match="duplicate tensor name"):
        _write_plain(tmp_path / "x.cdl", [("a", np.zeros(1, np.float32)), ("a", np.zeros(1, np.float32))])
    assert not (tmp_path / "x.cdl").exists()


def test_writer_is_deterministic(tmp_path):
    a = np.linspace(-1, 1, 50, dtype=np.float32)
    _write_plain(tmp_path / "1.cdl", [("a", a)], {"z": "1", "a": "2"})
    _write_plain(tmp_path / "2.cdl", [("a", a)], {"a": "2", "z": "1"})
    assert (tmp_path / "1.cdl").read_bytes() == (tmp_path / "2.cdl").read_bytes()


@pytest.fixture
def good_file(tmp_path):
    path = tmp_path / "good.cdl"
    _write_plain(path, [("a", np.arange(6, dtype=np.float32)), ("b", np.ones(3, np.int32))])
    return path


def test_every_truncation_is_refused(good_file, tmp_path):
    data = good_file.read_bytes()
    bad = tmp_path / "bad.cdl"
    for n in range(len(data)):
        bad.write_bytes(data[:n])
        with pytest.raises(CdlFormatError):
            r = ContainerReader(bad)
            try:
                for t in r.tensors:
                    r.read_payload(t)
            finally:
                r.close()


def test_every_single_bit_flip_is_detected(good_file, tmp_path):
    data = bytearray(good_file.read_bytes())
    bad = tmp_path / "flip.cdl"
    for i in range(len(data)):
        flipped = bytearray(data)
        flipped[i] ^= 0x10
        bad.write_bytes(bytes(flipped))
        with pytest.raises(CdlFormatError):
            with ContainerReader(bad) as r:
                for t in r.tensors:
                    r.read_payload(t)


@pytest.mark.parametrize("content, message", [
    (b"", "bad magic|truncated"),
    (b"PK\x03\x04" + b"\0" * 60, "bad magic"),
    (MAGIC + b"\x01\x00", "truncated"),
])
def test_not_a_container(tmp_path, content, message):
    p = tmp_path / "x.cdl"
    p.write_bytes(content)
    with pytest.raises(CdlFormatError, match=message):
        ContainerReader(p)


def test_unknown_version_and_flags(tmp_path):
    p = tmp_path / "x.cdl"
    _forge(p, {"format": "cdl", "metadata": {}, "tensors": [], "sections": []}, major=2)
    with pytest.raises(CdlFormatError, match="version 2"):
        ContainerReader(p)
    _forge(p, {"format": "cdl", "metadata": {}, "tensors": [], "sections": []}, flags=1)
    with pytest.raises(CdlFormatError, match="flags"):
        ContainerReader(p)


def test_checksum_mismatch(tmp_path):
    p = tmp_path / "x.cdl"
    _forge(p, {"format": "cdl", "metadata": {}, "tensors": [], "sections": []}, crc_fix=False)
    with pytest.raises(CdlFormatError, match="checksum"):
        ContainerReader(p)


def test_payload_checksum_mismatch(tmp_path):
    p = tmp_path / "x.cdl"
    _forge(p, {"format": "cdl", "metadata": {}, "tensors": [_entry(crc32=1)], "sections": []}, b"\0" * 8)
    with ContainerReader(p) as r, pytest.raises(CdlFormatError, match="checksum mismatch in the payload"):
        r.read_payload(r.tensors[0])


HOSTILE = {
    "duplicate names": ([_entry("a"), _entry("a", offset=8)], b"\0" * 16, "duplicate tensor name"),
    "overflowing shape": ([_entry(shape=(2**40, 2**40))], b"\0" * 8, "exceed the limit|invalid dimension"),
    "negative dim": ([_entry(shape=(-1,))], b"\0" * 8, "invalid dimension"),
    "too many dims": ([_entry(shape=(1,) * 9)], b"\0" * 8, "at most 8"),
    "overlap": ([_entry("a"), _entry("b", offset=4)], b"\0" * 12, "overlaps|payloads end|does not hold"),
    "gap": ([_entry("a", offset=4)], b"\0" * 12, "gap"),
    "trailing bytes": ([_entry("a")], b"\0" * 12, "payloads end"),
    "outside the file": ([_entry("a", offset=0, length=10**12)], b"\0" * 8, "does not hold|payloads end"),
    "plain length mismatch": ([_entry("a", length=4, payload=b"\0" * 4)], b"\0" * 4, "does not hold"),
    "count mismatch": ([_entry("a", encoding="levels", backend="raw", count=3)], b"\0" * 8, "coded levels"),
    "no backend": ([_entry("a", encoding="levels")], b"\0" * 8, "names no backend"),
    "bad dtype": ([_entry("a", dtype="complex64")], b"\0" * 8, "unknown dtype"),
    "bad encoding": ([_entry("a", encoding="zip")], b"\0" * 8, "unknown encoding"),
    "bad base64": ([_entry("a", backend_params="!!!")], b"\0" * 8, "base64"),
    "string offset": ([_entry("a", offset="0")], b"\0" * 8, "offset"),
    "float count": ([_entry("a", count=2.0)], b"\0" * 8, "count"),
    "bool dim": ([_entry("a", shape=[True, 2])], b"\0" * 8, "invalid dimension"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_indexes_are_refused(tmp_path, case):
    tensors, payload, message = HOSTILE[case]
    p = tmp_path / "x.cdl"
    _forge(p, {"format": "cdl", "metadata": {}, "tensors": tensors, "sections": []}, payload)
    with pytest.raises(CdlFormatError, match=message):
        ContainerReader(p)


def test_duplicate_json_keys_and_nan(tmp_path):
    p = tmp_path / "x.cdl"
    prefix = PREFIX.pack(MAGIC, 1, 0, 0)
    for raw, message in [(b'{"format":"cdl","format":"cdl","tensors":[]}', "duplicate key"),
                         (b'{"format":"cdl","tensors":[],"x":NaN}', "non-finite")]:
        crc = zlib.crc32(prefix + raw + struct.pack("<QQ", 16, len(raw)))
        p.write_bytes(prefix + raw + FOOTER.pack(16, len(raw), crc, 0, END_MAGIC))
        with pytest.raises(CdlFormatError, match=message):
            ContainerReader(p)


def test_limits_are_enforced_before_allocation(tmp_path):
    p = tmp_path / "x.cdl"
    _forge(p, {"format": "cdl", "metadata": {}, "tensors": [_entry(shape=(4, 4), length=64, payload=b"\0" * 64)],
               "sections": []}, b"\0" * 64)
    with pytest.raises(CdlFormatError, match="limit"):
        ContainerReader(p, Limits(max_tensor_elements=10))
    # a huge index length in the footer is refused before it is read
    data = bytearray(p.read_bytes())
    struct.pack_into("<Q", data, len(data) - 24, 1 << 40)
    p.write_bytes(bytes(data))
    with pytest.raises(CdlFormatError, match="index length"):
        ContainerReader(p)


def test_output_gets_ordinary_permissions(tmp_path):
    import os
    import stat

    old = os.umask(0o022)
    try:
        _write_plain(tmp_path / "x.cdl", [("a", np.zeros(2, np.float32))])
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(tmp_path / "x.cdl").st_mode) == 0o644


# --- zlib-compressed sections (format 1.2) ---------------------------------------------------------

def _graph_like(n=4000):
    """Bytes shaped like a stripped ONNX graph: repeated node and tensor names (compress well)."""
    return b"".join(b"/model/layer%d/conv/Conv_output_0\x12cdl:layer%d.weight" % (i % 97, i % 97) for i in range(n // 40))


def test_sections_are_stored_compressed_where_it_pays_and_read_back_exactly(tmp_path):
    graph, noise = _graph_like(), np.random.default_rng(0).bytes(5000)
    path = tmp_path / "s.cdl"
    with ContainerWriter(path) as w:
        w.add_section("model.onnx", "onnx", graph)
        w.add_section("noise", "bytes", noise)              # incompressible: stored as it is
        w.add_section("tiny", "json", b'{"a": 1}')          # too small to be worth a stream
        w.add_section("raw.onnx", "onnx", graph, compress=False)
    with ContainerReader(path) as r:
        assert r.version == (1, 2)
        by_name = {s.name: s for s in r.sections}
        assert by_name["model.onnx"].compression == "zlib" and by_name["model.onnx"].size == len(graph)
        assert by_name["model.onnx"].length < len(graph) // 4 and by_name["model.onnx"].kind == "onnx"
        assert [by_name[n].compression for n in ("noise", "tiny", "raw.onnx")] == [None, None, None]
        assert [r.read_section(by_name[n]) for n in ("model.onnx", "noise", "tiny", "raw.onnx")] == \
            [graph, noise, b'{"a": 1}', graph]
        r.check_checksums()
    index, _, _ = split_container(path.read_bytes())
    stored = {s["name"]: s for s in index["sections"]}
    assert stored["model.onnx"]["kind"] == "zlib" and stored["model.onnx"]["content"] == "onnx"  # older readers refuse it
    with ContainerWriter(tmp_path / "plain.cdl") as w:  # nothing compressed: still written as 1.0
        w.add_section("noise", "bytes", noise)
    with ContainerReader(tmp_path / "plain.cdl") as r:
        assert r.version == (1, 0)


def _zlib_container(tmp_path, entry_edit=None, blob=None):
    graph = _graph_like()
    packed = zlib.compress(graph, 9) if blob is None else blob
    entry = {"name": "model.onnx", "kind": "zlib", "content": "onnx", "size": len(graph)}
    if entry_edit:
        entry_edit(entry)
    index = {"format": "cdl", "metadata": {}, "tensors": [], "sections": [entry]}
    path = tmp_path / "z.cdl"
    path.write_bytes(build_container(index, [], [packed]))   # checksums valid: only the zlib layer lies
    return path


@pytest.mark.parametrize("edit, blob, message", [
    (lambda e: e.update(size=e["size"] + 1), None, "does not hold exactly the stated"),
    (lambda e: e.update(size=e["size"] - 1), None, "does not hold exactly the stated"),
    (None, b"\x78\x9c" + b"\xff" * 300, "its zlib data is corrupt"),
    (None, zlib.compress(_graph_like(), 9)[:-20], "does not hold exactly the stated"),
    (None, zlib.compress(_graph_like(), 9) + b"trailing", "does not hold exactly the stated"),
])
def test_a_lying_zlib_section_is_a_clean_error_on_reading_it(tmp_path, edit, blob, message):
    path = _zlib_container(tmp_path, edit, blob)
    with ContainerReader(path) as r:
        with pytest.raises(FormatError, match=message):
            r.read_section(r.sections[0])


@pytest.mark.parametrize("edit, message", [
    (lambda e: e.update(size=10 ** 9), "cannot hold the stated"),          # a bomb: refused unread
    (lambda e: e.update(size=(1 << 30) + 1), "must be an integer in"),      # over Limits.max_section_bytes
    (lambda e: e.pop("size"), "must be an integer in"),
    (lambda e: e.update(content="zlib"), "unknown kind 'zlib'"),
    (lambda e: e.update(content="python"), "unknown kind 'python'"),
    (lambda e: e.pop("content"), "must be a string"),
])
def test_an_impossible_zlib_section_is_refused_when_the_file_is_opened(tmp_path, edit, message):
    with pytest.raises(FormatError, match=message):
        ContainerReader(_zlib_container(tmp_path, edit)).close()
