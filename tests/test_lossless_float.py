"""The exact float coder (cdlcodec.backends.float_exact) and the container's `exact` encoding: bit-exact
round trips (NaN payloads, infinities, signed zeros, subnormals), the same bytes without numba, clean
errors on corrupt input, `encode --lossless` end to end, and a golden file pinning the bytes.
(Regenerate the golden file deliberately: CDL_REGENERATE_GOLDEN=1 pytest tests/test_lossless_float.py.)"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from cdlcodec.backends import float_exact as fe
from cdlcodec.codec import EncodeOptions, decode_container, encode_records
from cdlcodec.errors import CdlDecodeError, CdlFormatError
from cdlcodec.formats.container import ContainerReader
from cdlcodec.io.safetensors_file import read_safetensors_tensors, write_safetensors_tensors
from cdlcodec.records import TensorRecord

GOLDEN = Path(__file__).parent / "golden"
REGENERATE = os.environ.get("CDL_REGENERATE_GOLDEN") == "1"
STORAGE = {"float32": np.uint32, "float16": np.uint16, "bfloat16": np.uint16}
SPECIALS = {  # NaN payloads (quiet, signalling, negative), infinities, signed zeros, subnormals, extremes
    "float32": [0x7FC00000, 0x7F800001, 0xFFC12345, 0x7FFFFFFF, 0x7F800000, 0xFF800000, 0x00000000, 0x80000000,
                0x00000001, 0x807FFFFF, 0x00400000, 0x7F7FFFFF, 0xFF7FFFFF, 0x00800000],
    "float16": [0x7E00, 0x7C01, 0xFE55, 0x7FFF, 0x7C00, 0xFC00, 0x0000, 0x8000, 0x0001, 0x83FF, 0x0200, 0x7BFF,
                0xFBFF, 0x0400],
    "bfloat16": [0x7FC0, 0x7F81, 0xFFC5, 0x7FFF, 0x7F80, 0xFF80, 0x0000, 0x8000, 0x0001, 0x807F, 0x0040, 0x7F7F,
                 0xFF7F, 0x0080],
}


def _weights(dtype: str, n: int, seed: int = 0) -> np.ndarray:
    """Storage array of n Gaussian weights in `dtype`, with every special value mixed in."""
    w = (np.random.default_rng(seed).standard_normal(n) * 0.05).astype(np.float32)
    if dtype == "float32":
        bits = w.view(np.uint32).copy()
    elif dtype == "float16":
        bits = w.astype(np.float16).view(np.uint16).copy()
    else:
        bits = (w.view(np.uint32) >> 16).astype(np.uint16)  # truncation: any bfloat16 pattern will do
    specials = np.array(SPECIALS[dtype], STORAGE[dtype])[:n]
    bits[np.arange(specials.size) * max(n // max(specials.size, 1), 1)] = specials
    return bits


def _round_trip(bits: np.ndarray, dtype: str, encoder=fe.encode) -> tuple[bytes, bytes]:
    payload, params = encoder(bits, dtype) if encoder is fe.encode else encoder(bits.view(STORAGE[dtype]), dtype)
    back = fe.decode(payload, params, bits.size, dtype)
    assert back.dtype == np.dtype(STORAGE[dtype]).newbyteorder("<") and back.tobytes() == bits.tobytes()
    return payload, params


@pytest.mark.parametrize("dtype", sorted(STORAGE))
@pytest.mark.parametrize("n", [0, 1, 3, 14, 1001, 5000])
def test_exact_round_trip_with_special_values(dtype, n):
    bits = _weights(dtype, n)
    payload, params = _round_trip(bits, dtype)
    if n == 5000:  # trained-weight-like data is smaller than its raw bytes
        assert len(payload) + len(params) < bits.nbytes


@pytest.mark.parametrize("dtype", sorted(STORAGE))
def test_many_chunks_and_coded_low_planes(monkeypatch, dtype):
    monkeypatch.setattr(fe, "CHUNK_LOG2", 10)  # 1024-element chunks; 4099 elements end in a short chunk
    bits = _weights(dtype, 4099, seed=3)
    payload, params = _round_trip(bits, dtype)
    assert params[1] == 10
    if dtype == "float32":  # float32 upcast from bfloat16: its two low planes are constant and cost nothing
        up = (bits >> 16 << 16).astype(np.uint32)
        payload_up, params_up = _round_trip(up, dtype)
        assert len(payload_up) + len(params_up) < up.nbytes * 0.45


def test_constant_tensor_has_no_payload_and_no_count_bound():
    bits = np.full(5000, 0x3F80, np.uint16)
    payload, params = _round_trip(bits, "bfloat16")
    assert payload == b"" and fe.max_count(0, params, "bfloat16") is None


@settings(max_examples=60, deadline=None)
@given(dtype=st.sampled_from(sorted(STORAGE)), data=st.data())
def test_any_bit_patterns_round_trip(dtype, data):
    top = np.iinfo(STORAGE[dtype]).max
    values = data.draw(st.lists(st.one_of(st.integers(0, top), st.sampled_from(SPECIALS[dtype])), max_size=300))
    _round_trip(np.array(values, dtype=STORAGE[dtype]), dtype)
    if dtype != "float32" and values:  # version 2 as well, whichever the encoder would choose
        _round_trip(np.array(values, dtype=STORAGE[dtype]), dtype, fe._encode_packed)


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
@pytest.mark.parametrize("n", [1, 2, 3, 4, 5, 6, 7, 14, 1001, 4099])
def test_version_2_round_trip_with_special_values(monkeypatch, dtype, n):
    monkeypatch.setattr(fe, "CHUNK_LOG2", 10)  # 4099 elements: five chunks, the last of 3 elements
    bits = _weights(dtype, n, seed=n)
    payload, params = _round_trip(bits, dtype, fe._encode_packed)
    assert params == bytes([2, 10, fe.DTYPES[dtype][0], fe.PACKED_SCALE_BITS])
    assert fe.max_count(len(payload), params, dtype) >= n


def test_trained_bfloat16_weights_take_version_2_where_it_is_smaller():
    bits = _weights("bfloat16", 60000, seed=9)
    payload, params = _round_trip(bits, "bfloat16")
    v1 = fe._encode_planes(bits, "bfloat16")
    assert params[0] == 2 and len(payload) + len(params) < len(v1[0]) + len(v1[1])
    # the exponent and the mantissa's top 2 bits (entropy ~ their order-0 entropy) + 6 raw bits
    symbols = (bits.astype(np.int64) >> 5) & 0x3FF
    p = np.bincount(symbols) / bits.size
    entropy = -(p[p > 0] * np.log2(p[p > 0])).sum()
    assert len(payload) * 8 / bits.size < entropy + 6 + 0.1
    small = _weights("bfloat16", 14)  # a table costs more than it saves: version 1
    assert fe.encode(small, "bfloat16")[1][0] == 1


def _repeated_values(dtype: str) -> np.ndarray:
    """A DFT basis (Silero VAD's STFT weights are one): few distinct values, repeated in patterns."""
    from cdlcodec.dtypes import from_float64

    basis = np.cos(np.outer(np.arange(130), np.arange(128)) * 2 * np.pi / 128)
    return np.ascontiguousarray(from_float64(basis, dtype)).view(STORAGE[dtype]).ravel()


@pytest.mark.parametrize("dtype", sorted(STORAGE))
def test_repeated_values_take_the_dictionary_coder(dtype):
    bits = _repeated_values(dtype)
    payload, params = _round_trip(bits, dtype)
    planes = fe._encode_planes(bits, dtype)
    assert params[0] == 3 and len(payload) < 0.5 * len(planes[0])
    assert fe.max_count(len(payload), params, dtype) is None  # bounded by the decoded-size limit
    for count in (bits.size - 1, bits.size + 1):  # the stream must hold exactly `count` elements
        with pytest.raises(CdlDecodeError, match="elements"):
            fe.decode(payload, params, count, dtype)
    for bad in (payload[:-1], payload + b"\0", payload[:12] + b"\xff" + payload[13:]):
        with pytest.raises(CdlDecodeError):
            fe.decode(bad, params, bits.size, dtype)
    for wrong in (params[:2], params + b"\0", bytes([3, params[1], 27]), bytes([3, 9, params[2]])):
        with pytest.raises(CdlDecodeError):
            fe.decode(payload, wrong, bits.size, dtype)
    # trained-weight-like data never reaches the (slow) dictionary coder
    assert fe.encode(_weights(dtype, 5000), dtype)[1][0] in (1, 2)


def test_version_2_nonzero_padding_bits_are_refused():
    bits = _weights("bfloat16", 5, seed=1)  # 30 raw bits in 4 bytes: the last 2 bits are padding
    payload, params = fe._encode_packed(bits, "bfloat16")
    bad = bytearray(payload)
    bad[-1] |= 0x80
    with pytest.raises(CdlDecodeError, match="padding"):
        fe.decode(bytes(bad), params, 5, "bfloat16")
    for wrong in (bytes([2, 18, 0, 11]), bytes([2, 18, 0, 16]), bytes([2, 18, 0, 12, 0]), bytes([2, 18, 2, 12])):
        with pytest.raises(CdlDecodeError):
            fe.decode(payload, wrong, 5, "bfloat16")


_CHILD = r"""
import sys
sys.modules["numba"] = None
import json, numpy as np
from cdlcodec.jit import HAVE_NUMBA
from cdlcodec.backends import float_exact as fe
assert not HAVE_NUMBA
out = {}
for dtype, values in json.loads(sys.stdin.read()).items():
    bits = np.array(values, dtype={"float32": np.uint32}.get(dtype, np.uint16))
    payload, params = fe.encode(bits, dtype)
    out[dtype] = [payload.hex(), params.hex(), fe.decode(payload, params, bits.size, dtype).tolist()]
    if dtype != "float32":
        payload, params = fe._encode_packed(bits, dtype)
        out[dtype + " v2"] = [payload.hex(), params.hex(), fe.decode(payload, params, bits.size, dtype).tolist()]
print(json.dumps(out))
"""


def test_without_numba_the_same_bytes():
    cases = {dtype: _weights(dtype, 2100, seed=5).tolist() for dtype in STORAGE}
    child = subprocess.run([sys.executable, "-c", _CHILD], input=json.dumps(cases), capture_output=True, text=True,
                           timeout=600)
    assert child.returncode == 0, child.stderr[-2000:]
    result = json.loads(child.stdout)
    for dtype, values in cases.items():
        payload, params = fe.encode(np.array(values, dtype=STORAGE[dtype]), dtype)
        assert result[dtype][:2] == [payload.hex(), params.hex()], dtype
        assert result[dtype][2] == values, dtype
        if dtype != "float32":
            payload, params = fe._encode_packed(np.array(values, dtype=STORAGE[dtype]), dtype)
            assert result[dtype + " v2"] == [payload.hex(), params.hex(), values], dtype


@pytest.mark.parametrize("dtype, encoder", [(d, fe.encode) for d in sorted(STORAGE)]
                         + [(d, fe._encode_packed) for d in ("bfloat16", "float16")])
def test_corrupt_payloads_and_params_give_clean_errors(dtype, encoder):
    rng = np.random.default_rng(11)
    bits = _weights(dtype, 3001, seed=7)
    payload, params = encoder(bits, dtype)
    for _ in range(150):
        p, q = bytearray(payload), bytearray(params)
        target = p if rng.random() < 0.7 or not q else q
        how = rng.integers(3)
        if how == 0 and target:
            target[rng.integers(len(target))] ^= 1 << int(rng.integers(8))
        elif how == 1 and target:
            del target[int(rng.integers(len(target))):]
        else:
            target += bytes(rng.integers(0, 256, int(rng.integers(1, 5)), dtype=np.uint8))
        try:
            back = fe.decode(bytes(p), bytes(q), bits.size, dtype)
        except CdlDecodeError:
            continue
        assert back.size == bits.size  # a flip inside a verbatim plane is still a valid tensor


def test_count_beyond_what_the_payload_can_hold_is_refused_before_allocating():
    payload, params = fe.encode(_weights("bfloat16", 3000), "bfloat16")
    with pytest.raises(CdlDecodeError, match="cannot come from"):
        fe.decode(payload, params, 1 << 40, "bfloat16")
    with pytest.raises(CdlDecodeError, match="dtype"):
        fe.decode(payload, params, 3000, "float16")


def _records():
    rng = np.random.default_rng(16)
    return [
        TensorRecord("w.f32", _weights("float32", 3000, seed=1).view(np.float32).reshape(30, 100), "float32"),
        TensorRecord("w.f16", _weights("float16", 2000, seed=2).view(np.float16).reshape(40, 50), "float16"),
        TensorRecord("w.bf16", _weights("bfloat16", 2500, seed=3).reshape(50, 50), "bfloat16"),
        TensorRecord("bias", (rng.standard_normal(600) * 0.02).astype(np.float32), "float32"),
        TensorRecord("tiny", np.array([1.5, -0.0], np.float32), "float32"),
        TensorRecord("steps", np.array([7, 9], np.int64), "int64"),
    ]


def test_container_exact_encoding_and_version(tmp_path):
    out = tmp_path / "lossless.cdl"
    encode_records(_records(), str(out), EncodeOptions(lossless=True, quiet=True))
    with ContainerReader(str(out)) as reader:
        assert reader.version == (1, 1)
        encodings = {e.name: e.encoding for e in reader.tensors}
    assert encodings == {"w.f32": "exact", "w.f16": "exact", "w.bf16": "exact", "bias": "exact", "tiny": "plain",
                         "steps": "levels"}
    for rec, back in zip(_records(), decode_container(str(out)).records):
        assert back.array.dtype == rec.array.dtype and back.array.tobytes() == rec.array.tobytes(), rec.name


def test_lossy_encode_codes_its_1d_tensors_exactly_and_stays_1_0_without_them(tmp_path):
    from cdlcodec.quantizers.uniform import UniformQuantizer

    options = EncodeOptions(quantizer=UniformQuantizer(rel_step=0.25), keep=("w.f16", "w.bf16"), quiet=True)
    records = _records()
    records[0].array = np.random.default_rng(4).standard_normal((30, 100)).astype(np.float32)  # finite
    encode_records(records, str(tmp_path / "a.cdl"), options)
    with ContainerReader(str(tmp_path / "a.cdl")) as reader:
        assert reader.version == (1, 1) and reader.tensor("w.f32").encoding == "levels"
        assert [reader.tensor(n).encoding for n in ("bias", "w.f16", "w.bf16")] == ["exact"] * 3
    back = {r.name: r.array for r in decode_container(str(tmp_path / "a.cdl")).records}
    assert all(back[r.name].tobytes() == r.array.tobytes() for r in records[1:])
    # nothing the coder shrinks by 64 bytes (zeros: 20 bytes verbatim, 7 coded): the file stays 1.0
    zeros = TensorRecord("zeros", np.zeros(10, np.float16), "float16")
    encode_records([zeros, *_records()[4:]], str(tmp_path / "b.cdl"), options)
    with ContainerReader(str(tmp_path / "b.cdl")) as reader:
        assert reader.version == (1, 0) and reader.tensor("zeros").encoding == "plain"


def test_unknown_exact_coder_is_a_format_error(tmp_path):
    out = tmp_path / "x.cdl"
    encode_records(_records()[:1], str(out), EncodeOptions(lossless=True, quiet=True))
    data = out.read_bytes().replace(b'"backend":"float"', b'"backend":"flaot"')
    _fix_index_crc(tmp_path / "y.cdl", data)
    with pytest.raises(CdlFormatError, match="coder 'flaot'"):
        decode_container(str(tmp_path / "y.cdl"))


def _fix_index_crc(path: Path, data: bytes) -> None:
    import struct
    import zlib

    index_offset, index_length = struct.unpack("<QQ", data[-32:-16])
    crc = zlib.crc32(data[:16] + data[index_offset:index_offset + index_length] + data[-32:-16])
    path.write_bytes(data[:-16] + struct.pack("<I", crc) + data[-12:])


def test_cli_lossless_end_to_end(tmp_path):
    src = tmp_path / "in.safetensors"
    write_safetensors_tensors(str(src), [(r.name, r.array, r.dtype) for r in _records()])
    run = lambda *args: subprocess.run([sys.executable, "-m", "cdlcodec", *args], capture_output=True, text=True,
                                       timeout=600)
    enc = run("encode", str(src), "-o", str(tmp_path / "m.cdl"), "--lossless", "-q")
    assert enc.returncode == 0, enc.stderr
    dec = run("decode", str(tmp_path / "m.cdl"), "-o", str(tmp_path / "back.safetensors"), "-q")
    assert dec.returncode == 0, dec.stderr
    original = {n: (a.tobytes(), d) for n, a, d in read_safetensors_tensors(str(src))}
    back = {n: (a.tobytes(), d) for n, a, d in read_safetensors_tensors(str(tmp_path / "back.safetensors"))}
    assert back == original
    refused = run("encode", str(src), "-o", str(tmp_path / "n.cdl"), "--lossless", "--rel-step", "0.1")
    assert refused.returncode == 2 and "--lossless quantizes nothing; drop --rel-step" in refused.stderr
    assert not (tmp_path / "n.cdl").exists()


def _v2_records():
    """bfloat16 weights that the coder's version 2 takes (a tail of 2 elements in the last quartet)."""
    w = (np.random.default_rng(26).standard_normal((37, 166)) * 0.04).astype(np.float32)
    return [TensorRecord("w.bf16", (w.view(np.uint32) >> 16).astype(np.uint16).reshape(37, 166), "bfloat16")]


def _v3_records():
    """Repeated values (a DFT basis) that the coder's version 3 (lzma) takes, beside trained weights."""
    return [TensorRecord("stft.basis", _repeated_values("float32").view(np.float32).reshape(130, 128), "float32"),
            *_v2_records()]


@pytest.mark.parametrize("name, make", [("lossless", _records), ("lossless_v2", _v2_records),
                                        ("lossless_v3", _v3_records)])
def test_golden_lossless_container(tmp_path, name, make):
    golden, inputs = GOLDEN / f"{name}_container.cdl", GOLDEN / f"{name}_input.safetensors"
    if REGENERATE:
        write_safetensors_tensors(str(inputs), [(r.name, r.array, r.dtype) for r in make()])
    records = [TensorRecord(n, a, d) for n, a, d in read_safetensors_tensors(str(inputs))]
    out = golden if REGENERATE else tmp_path / "out.cdl"
    encode_records(records, str(out), EncodeOptions(lossless=True, quiet=True), {"cdlcodec.version": "golden"})
    assert out.read_bytes() == golden.read_bytes(), "exact float coder output changed: a format event"
    for rec, back in zip(records, decode_container(str(golden)).records):
        assert back.array.tobytes() == rec.array.tobytes(), rec.name
    with ContainerReader(str(golden)) as reader:  # which coder versions the file pins
        versions = sorted({e.backend_params[0] for e in reader.tensors if e.encoding == "exact"})
    assert versions == {"lossless": [1], "lossless_v2": [2], "lossless_v3": [2, 3]}[name]


def test_a_1_0_reader_refuses_exact_tensors_cleanly(tmp_path, monkeypatch):
    from cdlcodec.formats import container

    out = tmp_path / "x.cdl"
    encode_records(_records()[:1], str(out), EncodeOptions(lossless=True, quiet=True))
    monkeypatch.setattr(container, "ENCODINGS", ("levels", "plain"))  # what a 1.0 reader knows
    with pytest.raises(CdlFormatError, match="unknown encoding 'exact'"):
        ContainerReader(str(out))


def test_quantized_inputs_stay_exact_integers_with_exact_scales(tmp_path):
    rng = np.random.default_rng(8)
    records = [
        TensorRecord("fc.weight_quantized", rng.integers(-127, 128, (64, 48)).astype(np.int8), "int8"),
        TensorRecord("fc.weight_scale", np.array(0.0123456789, np.float32), "float32"),
        TensorRecord("fc.weight_zero_point", np.array(128, np.uint8), "uint8"),
        TensorRecord("conv.weight_quantized", rng.integers(0, 256, (16, 8, 3, 3)).astype(np.uint8), "uint8"),
        TensorRecord("conv.weight_scale", (rng.random(16) * 1e-3).astype(np.float32), "float32"),
    ]
    out = tmp_path / "q.cdl"
    encode_records(records, str(out), EncodeOptions(lossless=True, quiet=True))
    with ContainerReader(str(out)) as reader:
        assert [(e.encoding, (e.quant or {}).get("scheme")) for e in reader.tensors[::3]] == [("levels", "integer")] * 2
    for rec, back in zip(records, decode_container(str(out)).records):
        assert back.dtype == rec.dtype and back.array.tobytes() == rec.array.tobytes(), rec.name


def test_crc_valid_hostile_containers_with_exact_tensors_give_only_cdl_errors(tmp_path):
    """The fuzzer's mutations (tests/fuzz/fuzz_containers.py: payload bytes, coder params, counts,
    shapes, dtypes, encodings, index fields, checksums recomputed) on the exact-coded golden file."""
    from fuzz.fuzz_containers import make_case, run_case

    seeds = [(GOLDEN / "lossless_container.cdl").read_bytes()]
    outcomes = {}
    for case in range(300):
        path = tmp_path / f"case{case % 4}.cdl"
        path.write_bytes(make_case(seeds, 16, case))
        outcome, detail = run_case(str(path))
        assert outcome in ("decoded", "refused"), f"case {case}: {outcome}\n{detail}"
        outcomes[outcome] = outcomes.get(outcome, 0) + 1
    assert outcomes.get("decoded", 0) >= 10 and outcomes.get("refused", 0) >= 150, outcomes


def _v2_with_table(bits: np.ndarray, table: bytes) -> tuple[bytes, bytes]:
    """A one-chunk version 2 payload of `bits` whose table is replaced by `table` (stream and raw
    bits kept)."""
    from cdlcodec.backends import float_kernels as fk

    payload, params = fe._encode_packed(bits, "bfloat16")
    data = np.frombuffer(payload, np.uint8)
    end = 4 + int(data[:4].view("<u4")[0])
    stream = fk.read_frequencies(data, 4, end, np.zeros(1024, np.int64))
    body = table + payload[stream:]
    return (end - stream + len(table)).to_bytes(4, "little") + body, params


def test_frequencies_whose_sum_wraps_around_are_refused():
    """Three frequencies 2**63 - 1, 2**63 - 1, 4098 sum to 4096 in int64: the decoder used to build its
    tables from them and write far outside them (a crash); each frequency is now bounded first."""
    from cdlcodec.backends.varint import write_uvarint

    bits = _weights("bfloat16", 4096, seed=3)
    huge = [2**63 - 1, 2**63 - 1, 4098]
    table = write_uvarint(3) + b"".join(write_uvarint(0) + write_uvarint(f) for f in huge)
    payload, params = _v2_with_table(bits, table)
    with pytest.raises(CdlDecodeError, match="table"):
        fe.decode(payload, params, bits.size, "bfloat16")
    # version 1: the same frequencies in the plane descriptor
    v1 = bytes([1, 18, 0, 2]) + bytes([0b111]) + bytes(31) + b"".join(write_uvarint(f) for f in huge) + bytes([0])
    with pytest.raises(CdlDecodeError, match="rANS table"):
        fe.decode(bytes(4 + 16 + 64), v1, 64, "bfloat16")


@pytest.mark.parametrize("n", [4, 5, 17, 1000, 4099, (1 << 18) + 7])
def test_version_2_decodes_at_every_length_and_near_the_payload_end(monkeypatch, n):
    """The fast loop stops 8 bytes before the payload's end and the old loop finishes: lengths around
    quartets and chunks, several chunks, the last chunk's raw bits at the very end."""
    monkeypatch.setattr(fe, "CHUNK_LOG2", 12)
    bits = _weights("bfloat16", n, seed=n)
    payload, params = fe._encode_packed(bits, "bfloat16")
    assert fe.decode(payload, params, n, "bfloat16").tobytes() == bits.tobytes()
    v1 = fe._encode_planes(bits, "bfloat16")
    assert fe.decode(*v1, n, "bfloat16").tobytes() == bits.tobytes()
