"""Issue 11: the writer enforces every reader limit, decoders bound what a payload may expand to,
hostile indexes give a clean error (exit 2, never 3), and `cdlcodec verify` / `info` check payloads."""
from __future__ import annotations

import base64
import json
import math
import time
import zlib

import numpy as np
import pytest

from cdlcodec.backends import get as get_backend
from cdlcodec.backends.cabac import TERMINATION_SLACK, CabacBackend, max_chunk_levels
from cdlcodec.backends.cabac_coder import MAX_BINS_PER_BIT, PROB_BITS, TOP
from cdlcodec.backends.varint import write_svarint
from cdlcodec.cli.main import main
from cdlcodec.codec import container_summary, decode_container
from cdlcodec.errors import CdlDecodeError, CdlFormatError, CdlInputError
from cdlcodec.formats.container import ContainerReader, ContainerWriter, Limits, TensorEntry
from cdlcodec.quantizers import dequantize
from cdlcodec.verify import verify_container
from fuzz.fuzz_containers import build_container, split_container, tensor_entry

GOLDEN = sorted((__import__("pathlib").Path(__file__).parent / "golden").glob("container_*.cdl"))


def call(capsys, *args):
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def forge(path, tensors, payloads=None, sections=(), metadata=None, index_text=None):
    """A container with valid checksums around an arbitrary index (offsets laid out from the payloads)."""
    payloads = payloads if payloads is not None else [b""] * len(tensors)
    index = {"format": "cdl", "metadata": metadata or {}, "tensors": tensors,
             "sections": [{"name": n, "kind": k} for n, k, _ in sections]}
    data = build_container(index, payloads, [d for _, _, d in sections])
    if index_text is not None:  # literal-level edits of the JSON text (numbers json cannot write)
        index, tensors_, sections_ = split_container(data)
        data = build_container(index, tensors_, sections_, layout=False, index_bytes=index_text(json.dumps(index)).encode())
    path.write_bytes(data)
    return path


def constant(name, shape, dtype, value, quant=None, backend="raw"):
    """A coded constant tensor: no payload at all, whatever its size."""
    params = bytes([0]) + write_svarint(value) if backend == "raw" else bytes([1]) + write_svarint(value)
    return tensor_entry(name, shape, dtype, quant=quant or {"scheme": "uniform", "step": 0.5}, backend=backend,
                        params=params)


# --- the writer enforces every limit of the reader -------------------------------------------------

def _plain(name, shape, dtype="float32"):
    arr = np.zeros(shape, dtype)
    return TensorEntry(name, shape, dtype, "plain", None, None, b"", arr.size), arr.tobytes()


def _cabac_entry(n, chunk_size):
    payload, params = CabacBackend(chunk_size=chunk_size).encode(np.arange(n) % 3)  # params: a length per chunk
    return TensorEntry("t", (n,), "float32", "levels", {"scheme": "uniform", "step": 1.0}, "cabac", params, n), payload


WRITER_CASES = {
    # limit field: (Limits, what the writer is given)
    "max_ndim": (Limits(max_ndim=2), lambda w: w.add_tensor(*_plain("t", (1, 2, 3)))),
    "max_tensor_elements": (Limits(max_tensor_elements=10), lambda w: w.add_tensor(*_plain("t", (11,)))),
    "max_total_elements": (Limits(max_total_elements=10),
                           lambda w: [w.add_tensor(*_plain(n, (6,))) for n in "ab"]),
    "max_params_bytes": (Limits(max_params_bytes=16), lambda w: w.add_tensor(*_cabac_entry(20, chunk_size=1))),
    "max_metadata_bytes": (Limits(max_metadata_bytes=100), lambda w: w.set_metadata("onnx.producer", "p" * 200)),
    "max_index_bytes": (Limits(max_index_bytes=200), lambda w: [w.add_tensor(*_plain(f"t{i}", (1,))) for i in range(5)]),
    "max_tensors": (Limits(max_tensors=2), lambda w: [w.add_tensor(*_plain(f"t{i}", (1,))) for i in range(3)]),
    "max_sections": (Limits(max_sections=1), lambda w: [w.add_section(f"s{i}", "bytes", b"x") for i in range(2)]),
    "max_decoded_bytes": (Limits(max_decoded_bytes=100), lambda w: w.add_tensor(*_plain("t", (26,)))),
}


@pytest.mark.parametrize("field", sorted(WRITER_CASES))
def test_writer_refuses_what_the_reader_would_refuse(tmp_path, field):
    limits, fill = WRITER_CASES[field]
    path = tmp_path / "x.cdl"
    with pytest.raises(CdlInputError, match=rf"Limits\.{field}"):
        with ContainerWriter(path, limits=limits) as w:
            fill(w)
    assert list(tmp_path.iterdir()) == []  # nothing written, no temporary file left behind
    # the same content with the default limits: written, and read back
    with ContainerWriter(path) as w:
        fill(w)
    decode_container(str(path))
    with pytest.raises(CdlFormatError, match=field):  # and the decoder with the small limits refuses it
        decode_container(str(path), limits=limits)


def test_writer_refusal_names_the_tensor(tmp_path):
    with pytest.raises(CdlInputError, match=r"tensor 'deep'.*at most 8 dimensions.*got 9"):
        with ContainerWriter(tmp_path / "x.cdl") as w:
            w.add_tensor(*_plain("deep", (1,) * 9))


def test_writer_refuses_an_empty_shape_whose_other_dimensions_overflow(tmp_path):
    entry = TensorEntry("t", (0, 2**32, 2**32, 2**32), "float32", "plain", None, None, b"", 0)
    with pytest.raises(CdlInputError, match="Limits.max_tensor_elements"):
        with ContainerWriter(tmp_path / "x.cdl") as w:
            w.add_tensor(entry, b"")
    assert list(tmp_path.iterdir()) == []


def test_writer_accepts_exactly_the_limit(tmp_path):
    limits = Limits(max_tensor_elements=12, max_total_elements=24, max_decoded_bytes=96, max_tensors=2)
    path = tmp_path / "x.cdl"
    with ContainerWriter(path, limits=limits) as w:
        w.add_tensor(*_plain("a", (3, 4)))
        w.add_tensor(*_plain("b", (12,)))
    assert len(decode_container(str(path), limits=limits).records) == 2


def test_writer_refuses_what_json_cannot_carry_back(tmp_path):
    """The writer parses its own index with the reader's rules before writing it."""
    entry = TensorEntry("t", (2,), "float32", "levels", {"scheme": "uniform", "step": 10**50}, "raw",
                        bytes([0]) + write_svarint(1), 2)
    with pytest.raises(CdlInputError, match="reader would refuse.*digits"):
        with ContainerWriter(tmp_path / "x.cdl") as w:
            w.add_tensor(entry, b"")
    assert list(tmp_path.iterdir()) == []


def test_encode_cli_refuses_a_nine_dimension_tensor_and_writes_nothing(tmp_path, capsys):
    from cdlcodec.io.safetensors_file import write_safetensors_tensors

    src = tmp_path / "nine.safetensors"
    write_safetensors_tensors(str(src), [("t", np.ones((2,) + (1,) * 8, np.float32), "float32")])
    code, _, err = call(capsys, "encode", src, "-o", tmp_path / "x.cdl", "-q")
    assert code == 2 and "tensor 't'" in err and "Limits.max_ndim" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["nine.safetensors"]


def test_encode_cli_refuses_a_huge_onnx_producer_name(tmp_path, capsys):
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    w = numpy_helper.from_array(np.ones((4, 4), np.float32), "W")
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "W"], ["y"])], "g",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], [w])
    onnx.save(helper.make_model(graph, producer_name="p" * (2 << 20)), tmp_path / "m.onnx")
    code, _, err = call(capsys, "encode", tmp_path / "m.onnx", "-o", tmp_path / "x.cdl", "-q")
    assert code == 2 and "'onnx.producer'" in err and "Limits.max_metadata_bytes" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["m.onnx"]


def test_metadata_limit_counts_utf8_bytes_on_both_sides(tmp_path):
    limits = Limits(max_metadata_bytes=10)
    with pytest.raises(CdlInputError, match="max_metadata_bytes"):
        ContainerWriter(tmp_path / "x.cdl", {"k": "é" * 5}, limits=limits)  # 1 + 10 bytes, 6 characters
    path = forge(tmp_path / "x.cdl", [], metadata={"k": "é" * 5})
    with pytest.raises(CdlFormatError, match="max_metadata_bytes"):
        ContainerReader(path, limits)


# --- hostile indexes: exit 2 with a message, never exit 3 -----------------------------------------

_P1 = {"scheme": "uniform", "step": 1.0}
HOSTILE = {
    "step 1e400": ([constant("w", (2, 2), "float32", 1, _P1)], lambda s: s.replace('"step": 1.0', '"step": 1e400'),
                   "not finite"),
    "5000-digit int": ([constant("w", (2, 2), "float32", 1, _P1)],
                       lambda s: s.replace('"step": 1.0', '"step": 1' + "0" * 5000), "integer of 5,001 digits"),
    "5000-digit offset": ([constant("w", (2, 2), "float32", 1, _P1)],
                          lambda s: s.replace('"offset": 0', '"offset": 1' + "0" * 5000), "integer of 5,001 digits"),
    "empty but huge shape": ([constant("w", (0, 2**32, 2**32, 2**32), "float32", 0)], None, "max_tensor_elements"),
    "integer scheme on float": ([constant("w", (4,), "float32", 1, {"scheme": "integer"})], None,
                                "integer scheme needs an integer or bool dtype"),
    "bool level 7": ([constant("w", (4,), "bool", 7, {"scheme": "integer"})], None, r"outside the range of bool \(0..1\)"),
    "uint8 level -1": ([constant("w", (4,), "uint8", -1, {"scheme": "integer"})], None, "outside the range of uint8"),
    "unpaired surrogate name": ([constant("\ud800", (4,), "float32", 1)], None, "unpaired surrogate"),
    "huge int step": ([constant("w", (4,), "float32", 1, {"scheme": "uniform", "step": 10**39})], None, None),
    "unknown backend": ([dict(constant("w", (4,), "float32", 1), backend="zip")], None, "tensor 'w'.*backend 'zip'"),
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_index_is_a_clean_error_for_decode_and_info(tmp_path, capsys, case):
    tensors, edit, message = HOSTILE[case]
    path = forge(tmp_path / "x.cdl", tensors, index_text=edit)
    out = tmp_path / "out.safetensors"
    code, _, err = call(capsys, "decode", path, "-o", out, "-q")
    if message is None:  # a valid file after all (1e39 is a finite step)
        assert code == 0, err
        return
    assert code == 2, err
    assert err.startswith("cdlcodec: error: ") and "internal error" not in err
    assert __import__("re").search(message, err), err
    assert not out.exists()
    code, _, err = call(capsys, "info", path)
    assert code in (0, 2) and "internal error" not in err  # info reads no levels: it may accept the file
    code, _, err = call(capsys, "verify", path)
    assert code == 2 and __import__("re").search(message, err), err


def test_hostile_index_through_the_real_entry_point(tmp_path, run_cli):
    path = forge(tmp_path / "x.cdl", [constant("w", (4,), "float32", 1, {"scheme": "integer"})])
    res = run_cli("decode", path, "-o", tmp_path / "o.safetensors")
    assert res.returncode == 2 and "integer scheme needs an integer" in res.stderr, res.stderr
    res = run_cli("info", forge(tmp_path / "y.cdl", [constant("w", (2,), "float32", 1, _P1)],
                                index_text=lambda s: s.replace('"step": 1.0', '"step": 1' + "0" * 5000)))
    assert res.returncode == 2 and "digits" in res.stderr, res.stderr


# --- values past the dtype's range are ±inf, silently and the same everywhere ----------------------

@pytest.mark.parametrize("dtype, step, level, expect", [
    ("float16", 40000.0, 2, np.inf),          # a coarse step on float16 weights: legitimately past 65504
    ("float16", 40000.0, -2, -np.inf),
    ("float32", 1e300, 7, np.inf),
    ("float64", 1.7976931348623157e308, 2, np.inf),  # the binary64 product itself overflows
    ("bfloat16", 3.0e38, 2, np.inf),
    ("float16", 32752.0, 2, 65504.0),         # 65504 exactly still fits
])
def test_overflowing_products_become_inf_without_warnings(dtype, step, level, expect):
    import warnings

    from cdlcodec.dtypes import to_float64

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = dequantize(np.full(3, level, np.int64), {"scheme": "uniform", "step": step}, (3,), dtype)
    assert np.all(to_float64(out, dtype) == expect)


@pytest.mark.parametrize("axis", [0, 1, 2])
def test_blockwise_dequantize_matches_the_whole_tensor_product(monkeypatch, axis):
    import cdlcodec.quantizers as q

    rng = np.random.default_rng(axis)
    shape = (5, 7, 3)
    levels = rng.integers(-50, 50, math.prod(shape))
    steps = list(rng.random(shape[axis]) + 0.1)
    bshape = [1, 1, 1]
    bshape[axis] = shape[axis]
    expect = (levels.reshape(shape).astype(np.float64) * np.array(steps).reshape(bshape)).astype(np.float32)
    monkeypatch.setattr(q, "DEQUANTIZE_BLOCK", 4)  # many blocks that cut across rows and channels
    out = dequantize(levels, {"scheme": "uniform", "axis": axis, "steps": steps}, shape, "float32")
    assert np.array_equal(out, expect)


# --- decompression bombs ----------------------------------------------------------------------------

def test_constant_tensor_beyond_the_decoded_size_limit_is_refused_before_allocating(tmp_path):
    # 331 bytes asking for 2**32 float64 values (32 GiB, plus 32 GiB of levels)
    path = forge(tmp_path / "x.cdl", [constant("w", (2**32,), "float64", 1)])
    assert path.stat().st_size < 400
    start = time.perf_counter()
    with pytest.raises(CdlFormatError, match=r"tensor 'w'.*Limits\.max_decoded_bytes"):
        decode_container(str(path))
    with pytest.raises(CdlFormatError, match=r"max_decoded_bytes"):
        verify_container(str(path))
    assert time.perf_counter() - start < 2


def test_decoded_size_limit_counts_every_value_and_the_largest_levels(tmp_path):
    # Decoders go tensor by tensor: levels live only while their tensor is decoded, values stay.
    tensors = [constant("a", (100,), "float32", 1), constant("b", (100,), "uint8", 1, {"scheme": "integer"})]
    path = forge(tmp_path / "x.cdl", tensors)
    exact = 100 * 4 + 100 * 1 + 100 * 8  # every tensor's values plus one tensor's int64 levels
    assert len(decode_container(str(path), limits=Limits(max_decoded_bytes=exact)).records) == 2
    with pytest.raises(CdlFormatError, match=r"tensor 'b'.*max_decoded_bytes"):
        decode_container(str(path), limits=Limits(max_decoded_bytes=exact - 1))


def test_a_constant_tensor_still_decodes(tmp_path):
    for backend in ("raw", "huffman"):
        path = forge(tmp_path / f"{backend}.cdl", [constant("w", (300, 7), "float32", -3, backend=backend)])
        (rec,) = decode_container(str(path)).records
        assert rec.array.shape == (300, 7) and np.all(rec.array == -1.5)


@pytest.mark.parametrize("backend, params, payload, message", [
    ("huffman", None, b"\xff" * 4, r"33 levels cannot come from a 4-byte huffman payload \(at most 32\)"),
    ("raw", bytes([3]) + write_svarint(0), b"\x00" * 12, "raw"),
    ("cabac", None, b"\x12\x34", "cabac payload"),
])
def test_more_levels_than_the_payload_can_hold_are_refused(tmp_path, backend, params, payload, message):
    count = 33 if backend != "cabac" else 2**30  # 12 GiB decoded: within Limits.max_decoded_bytes
    if params is None and backend == "huffman":
        params = get_backend("huffman").encode(np.arange(10))[1]
    if backend == "cabac":  # one chunk of 2**30 levels in two bytes
        params = bytes([1, 10, 0, 0]) + b"".join(_uvarint(v) for v in (2**30, 0, 1, 2))
    entry = tensor_entry("w", (count,), "float32", quant=_P1, backend=backend, params=params)
    path = forge(tmp_path / "x.cdl", [entry], [payload])
    start = time.perf_counter()
    with pytest.raises(CdlDecodeError, match=message):
        decode_container(str(path))
    assert time.perf_counter() - start < 2
    # the backend refuses it by itself too, before allocating
    with pytest.raises(CdlDecodeError):
        get_backend(backend).decode(payload, params, count)


def _uvarint(value):
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def test_cabac_bins_per_bit_follow_from_the_coder_precision():
    # the largest share of the range a bin can keep, from the 15-bit probability clamp and TOP
    keep = 1 - 2.0**-PROB_BITS + 2.0**-PROB_BITS * (2**PROB_BITS - 1) / TOP
    assert MAX_BINS_PER_BIT - 1 < 1 / -math.log2(keep) <= MAX_BINS_PER_BIT


@pytest.mark.parametrize("n", [1, 1000, 1 << 16, 1 << 24])
def test_cabac_bound_holds_for_the_cheapest_stream_and_is_tight(n):
    """All-zero levels in one chunk are the cheapest cabac stream there is."""
    backend = CabacBackend(chunk_size=n)
    payload, params = backend.encode(np.zeros(n, np.int64))
    assert backend.max_count(len(payload), params) == n  # one chunk of n levels
    assert n <= max_chunk_levels(len(payload))
    if n == 1 << 24:  # 2**24 zeros honestly take ~100 bytes; the bound is loose by the slack only
        assert max_chunk_levels(len(payload)) < n * (len(payload) + TERMINATION_SLACK) / (len(payload) - 4)


def test_every_backend_bound_holds_on_random_tensors():
    rng = np.random.default_rng(11)
    for trial in range(60):
        n = int(rng.integers(1, 3000))
        levels = rng.choice([np.zeros(n, np.int64), np.full(n, int(rng.integers(-9, 9))),
                             np.rint(rng.laplace(0, rng.random() * 4, n)).astype(np.int64),
                             (rng.random(n) < 0.01) * rng.integers(-500, 500, n)])
        for backend in (get_backend("raw"), get_backend("huffman"),
                        CabacBackend(chunk_size=int(rng.choice([1, 5, 64, 4096])), n_gt=int(rng.integers(0, 12)))):
            payload, params = backend.encode(levels)
            bound = backend.max_count(len(payload), params)
            assert bound is None or n <= bound, (trial, backend.name)
            assert np.array_equal(backend.decode(payload, params, n), levels)


def test_cabac_parallel_decode_of_many_chunks_keeps_its_state_small():
    """Before, the parallel kernel held 7.7 kB of contexts for every chunk at once (2**17 chunks of
    one level: 1 GB); it now works through them in batches, with the same result."""
    import resource
    import subprocess
    import sys

    code = f"""
import resource, numpy as np
import cdlcodec.backends.cabac as cabac
levels = np.random.default_rng(0).integers(-3, 4, cabac.PARALLEL_MIN_LEVELS + 5)
payload, params = cabac.CabacBackend(chunk_size=1).encode(levels)
small = cabac.CabacBackend(chunk_size=1).encode(levels[:3])
threshold, cabac.PARALLEL_MIN_LEVELS = cabac.PARALLEL_MIN_LEVELS, 1
cabac.CabacBackend(parallel=True).decode(*small, 3)  # threads and kernels start before the limit
cabac.PARALLEL_MIN_LEVELS = threshold
used = int(open('/proc/self/statm').read().split()[0]) * resource.getpagesize()
resource.setrlimit(resource.RLIMIT_AS, (used + (400 << 20),) * 2)
assert np.array_equal(cabac.CabacBackend(parallel=True).decode(payload, params, levels.size), levels)
print('ok')
"""
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                         env=dict(__import__("os").environ, NUMBA_NUM_THREADS="2"))
    assert res.returncode == 0 and "ok" in res.stdout, res.stderr[-2000:]


# --- verify and info ---------------------------------------------------------------------------------

@pytest.mark.parametrize("golden", GOLDEN, ids=lambda p: p.name)
def test_verify_accepts_the_golden_files(capsys, golden):
    code, out, err = call(capsys, "verify", golden)
    assert code == 0, err
    assert out.startswith(f"{golden}: OK (5 tensors, 0 sections, 493 params") and "payloads decoded" in out


def _flip_in_payload(data: bytes, tensor: int, fix_crc: bool) -> bytes:
    index, tensors, sections = split_container(data)
    blob = bytearray(tensors[tensor])
    blob[len(blob) // 2] ^= 0x40
    tensors[tensor] = bytes(blob)
    if fix_crc:
        return build_container(index, tensors, sections)
    return build_container(index, tensors, sections, layout=False)


def test_info_and_verify_catch_a_corrupt_payload(tmp_path, capsys):
    golden = next(p for p in GOLDEN if p.name == "container_cabac.cdl")
    index, _, _ = split_container(golden.read_bytes())
    biggest = max(range(len(index["tensors"])), key=lambda i: index["tensors"][i]["length"])
    bad = tmp_path / "bad.cdl"
    bad.write_bytes(_flip_in_payload(golden.read_bytes(), biggest, fix_crc=False))
    for command in ("info", "verify"):
        code, out, err = call(capsys, command, bad)
        assert code == 2 and "checksum mismatch in the payload of tensor" in err, (command, err)
    # info --json says the payload checksums were verified on a good file
    code, out, _ = call(capsys, "info", golden, "--json")
    assert code == 0 and json.loads(out)["checksums"] == "verified"
    assert container_summary(str(bad), check_checksums=False)["checksums"] == "not checked"


def test_verify_decodes_what_no_checksum_can_catch(tmp_path, capsys):
    golden = next(p for p in GOLDEN if p.name == "container_cabac.cdl")
    index, _, _ = split_container(golden.read_bytes())
    biggest = max(range(len(index["tensors"])), key=lambda i: index["tensors"][i]["length"])
    bad = tmp_path / "bad.cdl"
    bad.write_bytes(_flip_in_payload(golden.read_bytes(), biggest, fix_crc=True))  # CRC-valid garbage
    code, out, err = call(capsys, "verify", "--quick", bad)
    assert code == 0 and "payloads not decoded (--quick)" in out
    code, out, err = call(capsys, "verify", bad)
    assert code == 2 and f"tensor '{index['tensors'][biggest]['name']}': cabac" in err, err


def test_verify_checks_quant_parameters_without_decoding(tmp_path):
    path = forge(tmp_path / "x.cdl", [constant("w", (4,), "float32", 1, {"scheme": "uniform", "step": -1})])
    with pytest.raises(CdlFormatError, match="step must be a finite positive number"):
        verify_container(str(path), quick=True)


@pytest.mark.parametrize("kind, data, message", [
    ("json", b'{"a": 1,}', "not valid JSON"),
    ("json", b'{"a": NaN}', "not valid JSON"),
    ("onnx", b"\x08\x07\x12\xff\xff", "not a valid ONNX model"),
])
def test_verify_parses_sections(tmp_path, kind, data, message):
    path = forge(tmp_path / "x.cdl", [], sections=[("s", kind, data)])
    with pytest.raises(CdlFormatError, match=rf"section 's' \({kind}\) is {message}"):
        verify_container(str(path))
    decode_container(str(path))  # decoding itself does not read sections it is not asked for


def test_verify_checks_a_torch_export_section_with_the_archive_checker(tmp_path):
    path = forge(tmp_path / "x.cdl", [], sections=[("model.pt2", "torch.export", b"PK\x05\x06 not a program")])
    with pytest.raises(CdlFormatError, match=r"section 'model.pt2' \(torch.export\).*refused: not a zip archive"):
        verify_container(str(path), quick=True)


def test_verify_accepts_valid_sections_and_reports_them(tmp_path, capsys):
    import onnx
    from onnx import helper

    model = helper.make_model(helper.make_graph([], "g", [], []), producer_name="t").SerializeToString()
    path = forge(tmp_path / "x.cdl", [constant("w", (3,), "float32", 2)],
                 sections=[("model.onnx", "onnx", model), ("cdl.activations", "json", b"{}"), ("b", "bytes", b"\0")])
    assert onnx.load_from_string(model).producer_name == "t"
    code, out, err = call(capsys, "verify", path)
    assert code == 0, err
    assert "1 tensor, 3 sections, 3 params" in out


def test_verify_reports_each_file_and_fails_if_any_fails(tmp_path, capsys):
    bad = forge(tmp_path / "bad.cdl", [constant("w", (4,), "bool", 7, {"scheme": "integer"})])
    code, out, err = call(capsys, "verify", GOLDEN[0], bad)
    assert code == 2
    assert f"{GOLDEN[0]}: OK" in out and f"cdlcodec: error: {bad}: tensor 'w'" in err
