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
                                         ContainerWriter, Limits, TensorEntry)


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
