"""Decoding a tensor's levels block by block (issues 14 and 15: no int64 levels for a whole big tensor):
every backend's blocks are its whole-tensor levels, cut anywhere; a decoded tensor (values and the
levels the QDQ writer keeps) is the same however its levels are cut; and decoding holds one block of
levels, not the tensor's."""
from __future__ import annotations

import tracemalloc

import numpy as np
import pytest

import cdlcodec.backends.base as backend_base
from cdlcodec import backends
from cdlcodec.backends.cabac import CabacBackend
from cdlcodec.codec import check_decodable, decoded_record
from cdlcodec.errors import CdlDecodeError
from cdlcodec.formats.container import Limits, TensorEntry
from cdlcodec.quantizers import Dequantizer, dequantize
from cdlcodec.quantizers.trellis import dequantize_dependent

M = 2**31 - 1


def laplace(n: int, scale: float, seed: int = 0) -> np.ndarray:
    return np.rint(np.random.default_rng(seed).laplace(0, scale, n)).astype(np.int64)


LEVELS = {
    "laplace": laplace(20_011, 3.0),
    "wide": laplace(5_003, 3000.0, 1),          # raw widths past 8 bits, huffman's larger tables
    "sparse": np.array([-M, 0, M] * 999 + [5], np.int64),  # raw width 32, huffman's sparse table
    "byte": np.arange(-128, 128, dtype=np.int64).repeat(9),  # raw width 8
    "constant": np.full(3_001, -7, np.int64),
    "single": np.array([42], np.int64),
    "empty": np.zeros(0, np.int64),
}
CODERS = {"raw": backends.get("raw"), "huffman": backends.get("huffman"), "cabac": CabacBackend(chunk_size=777),
          "cabac-parallel": CabacBackend(chunk_size=1000, parallel=True)}


@pytest.mark.parametrize("coder", sorted(CODERS))
@pytest.mark.parametrize("name", sorted(LEVELS))
@pytest.mark.parametrize("block", [None, 1, 7, 8, 999, 4096, 1 << 20])
def test_blocks_are_the_levels_cut_anywhere(coder, name, block):
    levels, backend = LEVELS[name], CODERS[coder]
    if coder.startswith("cabac") and name in ("sparse",):
        levels = levels.clip(-1000, 1000)  # cabac's binarization is for weights, not ±2**31
    payload, params = backend.encode(levels)
    parts = list(backend.decode_blocks(payload, params, levels.size, None, block))
    assert all(p.dtype == np.int64 and p.ndim == 1 for p in parts)
    if block is not None and parts:  # raw: whole bytes of levels; cabac: whole chunks, 32 when parallel
        most = {"raw": max(8, block), "huffman": block, "cabac": max(777, block // 777 * 777),
                "cabac-parallel": max(32 * 1000, block // 1000 * 1000)}[coder]
        assert max(p.size for p in parts) <= most
    joined = np.concatenate(parts) if parts else np.zeros(0, np.int64)
    np.testing.assert_array_equal(joined, levels)
    np.testing.assert_array_equal(backend.decode(payload, params, levels.size), levels)


@pytest.mark.parametrize("coder", ["raw", "huffman", "cabac"])
def test_a_bad_payload_fails_in_blocks_as_whole(coder):
    """A payload that decodes wrongly is refused with CdlDecodeError whether asked for whole or in
    blocks; for the errors found only at the end (trailing bytes), after the blocks before it."""
    backend, levels = CODERS[coder], LEVELS["laplace"]
    payload, params = backend.encode(levels)
    spoiled = payload + b"\x00\x01"
    for block in (None, 1000):
        with pytest.raises(CdlDecodeError):
            list(backend.decode_blocks(spoiled, params, levels.size, None, block))
        with pytest.raises(CdlDecodeError):
            backend.decode(spoiled, params, levels.size)


def test_cabac_names_the_corrupt_chunk_of_a_later_block():
    backend = CabacBackend(chunk_size=1000, parallel=False)
    levels = LEVELS["laplace"]
    payload, params = backend.encode(levels)
    spoiled = bytearray(payload)
    spoiled[-3:] = b"\xff\xff\xff"  # the last chunk's bytes
    with pytest.raises(CdlDecodeError, match=r"cabac chunk 20\b") as whole:
        backend.decode(bytes(spoiled), params, levels.size)
    with pytest.raises(CdlDecodeError, match=r"cabac chunk 20\b") as blocks:
        list(backend.decode_blocks(bytes(spoiled), params, levels.size, None, 3000))
    assert str(whole.value) == str(blocks.value)


QUANTS = [
    ({"scheme": "uniform", "step": 0.013}, "float32"),
    ({"scheme": "uniform", "axis": 0, "steps": list(np.linspace(0.001, 0.2, 61))}, "bfloat16"),
    ({"scheme": "uniform", "axis": 1, "steps": list(np.linspace(0.01, 0.02, 331))}, "float16"),
    ({"scheme": "dependent", "step": 0.02, "states": 8}, "float32"),
    ({"scheme": "dependent", "axis": 0, "steps": list(np.linspace(0.001, 0.2, 61)), "states": 4}, "float32"),
    ({"scheme": "integer"}, "int32"),
]


@pytest.mark.parametrize("quant,dtype", QUANTS)
@pytest.mark.parametrize("block", [1, 100, 331, 4000, None])
def test_dequantizer_in_blocks_equals_dequantize(quant, dtype, block):
    levels = laplace(61 * 331, 20.0, 3)
    whole = dequantize(levels, quant, (61, 331), dtype, "t")
    parts = Dequantizer(quant, (61, 331), dtype, "t")
    for start in range(0, levels.size, block or levels.size):
        parts.add(levels[start:start + (block or levels.size)])
    assert parts.result().tobytes() == whole.tobytes()


def test_dependent_blocks_carry_the_trellis_state():
    levels = laplace(999, 5.0, 4)
    whole = dequantize_dependent(levels, 8)
    first, state = dequantize_dependent(levels[:500], 8, with_state=True)
    rest = dequantize_dependent(levels[500:], 8, state)
    np.testing.assert_array_equal(np.concatenate([first, rest]), whole)


def _entry(levels, backend, quant, dtype, shape):
    payload, params = backends.get(backend).encode(levels)
    entry = TensorEntry("w", shape, dtype, "levels", quant, backend, params, levels.size)
    entry.length = len(payload)
    return entry, payload


def _narrowest(levels):
    for kind in (np.int8, np.int16, np.int32):
        if levels.size and np.iinfo(kind).min <= levels.min() and levels.max() <= np.iinfo(kind).max:
            return levels.astype(kind)
    return levels


@pytest.mark.parametrize("backend", ["raw", "huffman", "cabac"])
@pytest.mark.parametrize("quant,dtype", QUANTS)
@pytest.mark.parametrize("scale", [2.0, 300.0, 1e5])
def test_decoded_tensor_in_blocks_equals_the_whole_tensor_path(monkeypatch, backend, quant, dtype, scale):
    """Values and kept levels (narrowest type, widened from int8 when a later block needs it) are
    those of one whole-tensor decode, for every backend, scheme and level range."""
    levels = laplace(61 * 331, scale, 5).clip(-2**30, 2**30)
    if quant["scheme"] == "integer":
        levels = levels.clip(-2**31, 2**31 - 1)
    levels[-1] = levels.max() + 1 if scale < 100 else levels[-1]  # widest value in the last block
    entry, payload = _entry(levels, backend, quant, dtype, (61, 331))
    check_decodable(entry, Limits())
    monkeypatch.setattr(backend_base, "DECODE_BLOCK", None)  # one block: the whole-tensor path
    whole = decoded_record(entry, payload)
    monkeypatch.setattr(backend_base, "DECODE_BLOCK", 1000)
    blocks = decoded_record(entry, payload)
    assert whole.array.tobytes() == blocks.array.tobytes()
    assert whole.array.tobytes() == dequantize(levels, quant, (61, 331), dtype, "w").tobytes()
    assert blocks.levels.dtype == _narrowest(levels).dtype
    np.testing.assert_array_equal(blocks.levels, levels)


def test_a_backend_without_blocks_still_decodes():
    class Whole:
        name = "whole"

        def decode(self, payload, params, count, shape=None):
            return np.frombuffer(payload, np.int64).copy()

    parts = list(backend_base.level_blocks(Whole(), np.arange(5, dtype=np.int64).tobytes(), b"", 5))
    assert len(parts) == 1 and parts[0].tolist() == [0, 1, 2, 3, 4]


def test_decoding_a_tensor_holds_one_block_of_levels_not_the_tensor():
    """tracemalloc (numpy reports its buffers to it) over the decode of 8 M levels to bfloat16: the
    values (16 MB), the payload's padded copy and a block or two of int64 levels (8 MB each); the
    whole-tensor path held 64 MB of int64 levels besides the values."""
    n = 1 << 23
    levels = laplace(n, 4.0, 6)
    entry, payload = _entry(levels, "cabac", {"scheme": "uniform", "step": 0.01}, "bfloat16", (2048, 4096))
    check_decodable(entry, Limits())
    decoded_record(entry, payload, keep_levels=False, parallel_backend=False)  # compile and warm up
    tracemalloc.start()
    try:
        record = decoded_record(entry, payload, keep_levels=False, parallel_backend=False)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert record.array.nbytes == 2 * n
    bound = record.array.nbytes + len(payload) + 3 * backend_base.DECODE_BLOCK * 8
    print(f"peak {peak / 1e6:.1f} MB, bound {bound / 1e6:.1f} MB")
    assert peak <= bound, (peak, bound)
    assert bound < record.array.nbytes + 8 * n  # the bound is below what whole int64 levels took


@pytest.mark.parametrize("name", ["laplace", "wide", "byte", "sparse", "constant", "empty"])
def test_encoders_work_in_blocks_on_narrow_levels_with_the_same_bytes(monkeypatch, name):
    """Encoders take int8/16/32 levels as they are and read them in int64 blocks (histograms, raw
    offsets and bit packing, huffman's bit writer, cabac's whole chunks), so that no int64 copy of a
    whole tensor is made: the coded bytes depend neither on the block nor on the levels' dtype."""
    import cdlcodec.backends.cabac as cabac
    import cdlcodec.backends.raw as raw
    import cdlcodec.backends.stats as stats

    levels = LEVELS[name] if name != "sparse" else LEVELS[name].clip(-2**15, 2**15 - 1)
    coders = {"raw": backends.get("raw"), "huffman": backends.get("huffman"), "cabac": CabacBackend(),
              "cabac-777": CabacBackend(chunk_size=777)}
    want = {c: coder.encode(levels) for c, coder in coders.items()}
    for block in (1000, 7, 777 * 3):
        for module in (stats, raw, cabac):
            monkeypatch.setattr(module, "COUNT_BLOCK", block)
        for kind in (np.int64, np.int32, np.int16):
            narrow = levels.astype(kind)
            if not np.array_equal(narrow, levels):
                continue
            for c, coder in coders.items():
                assert coder.encode(narrow) == want[c], (c, block, kind)
    np.testing.assert_array_equal(CabacBackend().decode(*want["cabac"], levels.size), levels)


def test_narrow_levels_are_checked_like_int64_ones():
    from cdlcodec.backends.stats import as_coded_levels
    from cdlcodec.errors import CdlInputError

    narrow = np.array([1, -5, 7], np.int16)
    assert as_coded_levels(narrow) is narrow  # held as they are
    with pytest.raises(CdlInputError, match="supported range"):
        as_coded_levels(np.array([0, -2**31], np.int32))
    assert as_coded_levels(np.array([1, 2], np.uint8)).dtype == np.int64


@pytest.mark.parametrize("backend", ["raw", "huffman", "cabac"])
@pytest.mark.parametrize("scale", [0.0, 2.0, 300.0, 1e5])
def test_level_range_and_bounded_blocks_are_the_kept_levels(backend, scale):
    """decode --weights qdq reads each tensor's level range in one pass (nothing kept), then its levels
    again block by block, nothing dequantized: the range and the levels are the whole decode's."""
    from cdlcodec.codec import bounded_level_blocks, level_range
    from cdlcodec.io.lazy import LazyLevels

    levels = laplace(61 * 331, scale, 5).clip(-2**30, 2**30)
    entry, payload = _entry(levels, backend, QUANTS[0][0], "float32", (61, 331))
    check_decodable(entry, Limits())
    kept = decoded_record(entry, payload).levels
    bounds = level_range(entry, payload, parallel_backend=False)
    assert bounds == (int(levels.min()), int(levels.max()))
    parts = list(bounded_level_blocks(entry, payload, bounds, parallel_backend=False, block_size=1000))
    np.testing.assert_array_equal(np.concatenate(parts), levels)
    lazy = LazyLevels(levels.size, *bounds, lambda: bounded_level_blocks(entry, payload, bounds, block_size=999))
    assert (lazy.size, lazy.min(), lazy.max(), lazy.dtype) == (kept.size, kept.min(), kept.max(), kept.dtype)
    assert lazy.read().tobytes() == kept.tobytes()
    assert lazy.read(np.int64).tobytes() == levels.tobytes()


def test_bounded_blocks_refuse_levels_past_their_range():
    """A level outside the range read before is an error, never an integer wrapped into a narrow type."""
    from cdlcodec.codec import bounded_level_blocks

    levels = laplace(5000, 20.0, 3)
    entry, payload = _entry(levels, "huffman", QUANTS[0][0], "float32", (5000,))
    with pytest.raises(CdlDecodeError, match="levels outside"):
        list(bounded_level_blocks(entry, payload, (int(levels.min()), int(levels.max()) - 1)))
    assert level_range_of_empty() == (0, 0)


def level_range_of_empty():
    from cdlcodec.codec import level_range

    entry, payload = _entry(np.zeros(0, np.int64), "raw", QUANTS[0][0], "float32", (0, 4))
    return level_range(entry, payload)


def test_a_backend_without_narrow_levels_is_given_int64():
    from cdlcodec.codec import code_levels

    seen = []

    class Plugin:
        name = "plugin"

        def encode(self, levels, hint=None):
            seen.append(levels.dtype)
            return levels.tobytes(), b""

    real_get = backends.get
    levels = np.array([3, -1, 2], np.int16)
    try:
        backends.get = lambda name: Plugin() if name == "plugin" else real_get(name)
        assert code_levels(levels, "plugin")[1] == levels.astype(np.int64).tobytes()
        assert code_levels(levels, "raw") == code_levels(levels.astype(np.int64), "raw")
    finally:
        backends.get = real_get
    assert seen == [np.int64]


def test_encoding_a_tensor_holds_narrow_levels_not_int64(tmp_path):
    """tracemalloc over encode_records of one 2048 x 4096 float32 tensor with the data-free default
    (per-channel steps, every backend tried): the levels are held as int16 and every backend reads
    them in blocks; the int64 levels alone took 64 MB, the huffman histogram's copy another 64."""
    from cdlcodec.codec import EncodeOptions, encode_records
    from cdlcodec.fidelity.encode import data_free_default
    from cdlcodec.records import TensorRecord

    n = 1 << 23
    weights = (np.random.default_rng(8).laplace(0, 0.02, n).astype(np.float32)).reshape(2048, 4096)
    options = EncodeOptions(quantizer=data_free_default(), quiet=True, threads=1)
    records = [TensorRecord("w", weights, "float32")]
    encode_records(records, str(tmp_path / "warm.cdl"), options)  # compile and warm up
    tracemalloc.start()
    try:
        encode_records(records, str(tmp_path / "w.cdl"), options)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    print(f"peak {peak / 1e6:.1f} MB")
    assert (tmp_path / "w.cdl").read_bytes() == (tmp_path / "warm.cdl").read_bytes()
    assert peak < 8 * n, peak


def test_qdq_writer_streams_the_kept_levels_without_a_copy():
    from cdlcodec.io.onnx_writer import INT4, INT8, INT16, _integer_array

    kept = np.array([-8, 7, -1, 0, 3], np.int8)
    assert _integer_array(kept, INT8) is kept
    assert _integer_array(kept, INT16).tobytes() == kept.astype("<i2").tobytes()
    packed = _integer_array(kept, INT4)  # low nibble first, the odd one padded with 0
    assert packed.tolist() == [0x78, 0x0F, 0x03]


@pytest.mark.parametrize("cuts", [[5], [1, 4], [2, 3], [1, 1, 3], [3, 0, 2], [0, 5]])
def test_qdq_writer_streams_lazy_levels_block_by_block(cuts):
    """LazyLevels go to the file block by block, int4 nibbles paired across the blocks' ends: the same
    bytes as the whole array's."""
    from cdlcodec.io.lazy import LazyLevels
    from cdlcodec.io.onnx_writer import INT4, INT8, INT16, INT32, _integer_array, _integer_pieces

    levels = np.array([-8, 7, -1, 0, 3], np.int64)
    ends = np.cumsum(cuts)[:-1]
    lazy = LazyLevels(levels.size, -8, 7, lambda: iter(np.split(levels, ends)))
    for kind in (INT4, INT8, INT16, INT32):
        pieces = list(_integer_pieces(lazy, kind))
        assert b"".join(np.ascontiguousarray(p).tobytes() for p in pieces) == _integer_array(levels, kind).tobytes()
        assert max(p.size for p in pieces) <= max(cuts)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16", "float16"])
@pytest.mark.parametrize("rule", [{"rel_step": 0.05}, {"step": 0.004}, {"rel_step": 1e-9}])
def test_one_step_quantization_in_blocks_is_the_one_piece_result(monkeypatch, dtype, rule):
    """A per-tensor step (--rel-step, --step) is found once, then the float64 values and the levels
    are made block by block and held narrow: the same levels, step and errors as in one piece."""
    import cdlcodec.codec as codec
    from cdlcodec.dtypes import from_float64
    from cdlcodec.errors import CdlInputError
    from cdlcodec.quantizers import make
    from cdlcodec.records import TensorRecord

    w = from_float64(np.random.default_rng(9).laplace(0, 0.02, (37, 41)), dtype)
    record, quantizer = TensorRecord("w", w, dtype), make("uniform", **rule)
    assert not codec._elementwise(quantizer, record)
    try:
        whole = codec._quantize(quantizer, record, "auto")
    except CdlInputError as exc:
        whole = exc
    monkeypatch.setattr(codec, "QUANTIZE_BLOCK_ELEMENTS", 5 * 41 + 3)
    assert codec._elementwise(quantizer, record)
    if isinstance(whole, CdlInputError):  # a step too small: the same refusal
        with pytest.raises(CdlInputError) as blocks:
            codec._quantize(quantizer, record, "auto")
        assert str(blocks.value) == str(whole)
        return
    blocks = codec._quantize(quantizer, record, "auto")
    assert blocks[1] == whole[1] and blocks[0].dtype != np.int64
    np.testing.assert_array_equal(blocks[0], whole[0])
    w.reshape(-1)[300] = from_float64(np.array([np.nan]), dtype)[0]  # NaN in a later block: refused by name
    with pytest.raises(CdlInputError, match="tensor 'w' holds NaN"):
        codec._quantize(quantizer, record, "auto")


@pytest.mark.parametrize("rule,options", [
    ({"bits": 4}, {}), ({"bits": 4}, {"matmul_nbits": True}), ({"bits": 4}, {"int4": False}),
    ({"bits": 8}, {"matmul_nbits": True}), ({"rel_step": 0.002}, {}), ({"rel_step": 0.002}, {"keep_opset": True}),
])
def test_qdq_decode_with_lazy_levels_writes_the_kept_levels_file(tmp_path, monkeypatch, rule, options):
    """decode --weights qdq (level ranges first, then each tensor's levels again in small blocks, int4
    nibbles paired across the blocks' ends) writes the same bytes as the writer given every tensor's
    kept levels at once (decode_container), for int4, int8, int16, --keep-opset and MatMulNBits."""
    import warnings

    import cdlcodec.api as api
    from cdlcodec.api import decode, encode
    from cdlcodec.codec import decode_container
    from cdlcodec.io.onnx_writer import OnnxOutputNote, write_onnx
    from cdlcodec.quantizers.uniform import UniformQuantizer
    from onnx_models import mlp

    src = mlp(str(tmp_path / "m.onnx"), n_in=96, hidden=129, n_out=37)  # w1: 12,384 levels, streamed
    cdl = str(tmp_path / "m.cdl")
    encode(src, cdl, quantizer=UniformQuantizer(**({"rel_step": None} | rule)), backend="huffman")
    monkeypatch.setattr(api, "QDQ_DECODE_BLOCK", 1001)  # huffman: blocks of 1,001 levels, odd sizes
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OnnxOutputNote)
        write_onnx(str(tmp_path / "kept.onnx"), decode_container(cdl), weights="qdq", **options)
        decode(cdl, str(tmp_path / "lazy.onnx"), weights="qdq", threads=2, **options)
    assert (tmp_path / "lazy.onnx").read_bytes() == (tmp_path / "kept.onnx").read_bytes()
