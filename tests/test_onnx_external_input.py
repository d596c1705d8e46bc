"""Issue 15 point 4: ONNX models whose weights live in external data files encode lazily (each
tensor memory-mapped from its file when reached), round-trip exactly with --lossless, run in
onnxruntime after decoding, and every external reference is checked: a location outside the model's
folder, a missing file, or an offset/length that does not fit the file or the tensor is a clean
error naming the tensor, and nothing is written."""
from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from cdlcodec.api import decode, encode
from cdlcodec.cli.main import main as cli_main
from cdlcodec.codec import decode_container
from cdlcodec.errors import CdlInputError
from cdlcodec.io.lazy import LazyTensorRecord
from cdlcodec.io.onnx_model import read_onnx, stripped_graph
from cdlcodec.quantizers.uniform import UniformQuantizer
from onnx_models import mlp

X = np.random.default_rng(1).standard_normal((3, 32)).astype(np.float32)


def run(path, x=X):
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def with_extras(path):
    """mlp plus unused initializers of other kinds: float16 and bfloat16 (extracted), uint16 (a type
    cdlcodec keeps in the graph) and an int64 one; all big enough to go external."""
    model = onnx.load(path)
    rng = np.random.default_rng(2)
    bf16 = helper.make_tensor("bf16", TensorProto.BFLOAT16, [8, 40],
                              (rng.standard_normal(320).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).tobytes(),
                              raw=True)
    model.graph.initializer.extend([
        numpy_helper.from_array(rng.standard_normal((16, 40)).astype(np.float16), "half"), bf16,
        numpy_helper.from_array(rng.integers(0, 60000, (20, 20)).astype(np.uint16), "u16"),
        numpy_helper.from_array(rng.integers(-5, 5, (30, 10)).astype(np.int64), "i64")])
    onnx.save(model, path)
    return path


def external_model(folder, *, threshold=0, one_file=True, extras=True):
    """The test MLP saved with its tensors of at least `threshold` bytes in external data."""
    folder.mkdir(exist_ok=True)
    inline = str(folder / "inline.onnx")
    mlp(inline)
    if extras:
        with_extras(inline)
    model = onnx.load(inline)
    os.remove(inline)
    original = onnx.ModelProto()
    original.CopyFrom(model)  # onnx.save moves the data of `model` out
    path = folder / "model.onnx"
    onnx.save(model, str(path), save_as_external_data=True, all_tensors_to_one_file=one_file,
              location="model.onnx.data", size_threshold=threshold)
    return path, original


def external_names(model):
    return {t.name for t in model.graph.initializer if t.data_location == TensorProto.EXTERNAL}


@pytest.mark.parametrize("threshold,one_file", [(0, True), (0, False), (1024, True)],
                         ids=["all-in-one-file", "a-file-each", "mixed"])
def test_lossless_round_trip_is_exact_and_runs(tmp_path, threshold, one_file):
    src, original = external_model(tmp_path / "in", threshold=threshold, one_file=one_file)
    header = onnx.load(str(src), load_external_data=False)
    external = external_names(header)
    assert external and (threshold == 0) == (external == {t.name for t in header.graph.initializer})

    cdl = tmp_path / "m.cdl"
    encode(str(src), str(cdl), lossless=True)
    graph = stripped_graph(decode_container(str(cdl)))  # the stored graph references no file
    for tensor in graph.graph.initializer:
        if tensor.data_location == TensorProto.EXTERNAL:
            assert [e.value for e in tensor.external_data if e.key == "location"][0].startswith("cdl:")
    assert {t.name for t in graph.graph.initializer if t.data_location != TensorProto.EXTERNAL} == {"u16"}

    for threads in (1, 2):
        out = tmp_path / f"out{threads}.onnx"
        decode(str(cdl), str(out), threads=threads)
        decoded = onnx.load(str(out))
        got = {t.name: numpy_helper.to_array(t) for t in decoded.graph.initializer}
        want = {t.name: numpy_helper.to_array(t) for t in original.graph.initializer}
        assert got.keys() == want.keys()
        for name in want:
            assert got[name].dtype == want[name].dtype and got[name].tobytes() == want[name].tobytes(), name
        np.testing.assert_array_equal(run(out), run(src))


def test_quantized_encode_runs_close_to_the_original(tmp_path):
    src, _ = external_model(tmp_path / "in", extras=False)
    cdl, out = tmp_path / "m.cdl", tmp_path / "out.onnx"
    encode(str(src), str(cdl), quantizer=UniformQuantizer(rel_step=0.01), backend="cabac")
    decode(str(cdl), str(out))
    ref, got = run(src), run(out)
    assert np.abs(got - ref).max() < 0.05 * np.abs(ref).max()
    assert not np.array_equal(got, ref)  # quantized, not copied


def test_default_fidelity_encode_reads_external_data(tmp_path):
    src, _ = external_model(tmp_path / "in", extras=False)
    summary = encode(str(src), str(tmp_path / "m.cdl"))
    assert summary.fidelity is not None and summary.num_quantized_params > 0


def test_tensors_are_mapped_when_read_not_before(tmp_path):
    src, _ = external_model(tmp_path / "in", threshold=1024)
    model = read_onnx(str(src))
    lazy = {r.name for r in model.records if isinstance(r, LazyTensorRecord)}
    assert lazy == external_names(onnx.load(str(src), load_external_data=False)) - {"u16"}
    record = next(r for r in model.records if r.name == "w1")
    assert isinstance(record.array, np.memmap) and record.array.shape == (32, 64)
    assert "external data" in model.metadata["onnx.external_data"]


def rewrite(src, name, **changes):
    """The model at `src` with tensor `name`'s external_data entries changed (None removes one)."""
    model = onnx.load(str(src), load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.name == name)
    entries = {e.key: e.value for e in tensor.external_data}
    for key, value in changes.items():
        if value is None:
            entries.pop(key, None)
        else:
            entries[key] = value
    del tensor.external_data[:]
    for key, value in entries.items():
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    src.write_bytes(model.SerializeToString())


def hostile_cases(tmp_path):
    outside = tmp_path / "secret.bin"
    outside.write_bytes(bytes(64 * 32 * 4))
    return {
        "absolute": ({"location": str(outside)}, "relative file name inside the model's folder"),
        "dot-dot": ({"location": "../secret.bin"}, "relative file name inside the model's folder"),
        "dot-dot-inside": ({"location": "sub/../../secret.bin"}, "relative file name inside the model's folder"),
        "symlink-out": ({"location": "link.bin"}, "leads outside the model's folder"),
        "missing": ({"location": "nope.bin"}, "no such file"),
        "offset-past-end": ({"offset": "99999999"}, "beyond the file"),
        "length-wrong": ({"length": "12"}, "holds 12 bytes, its dims \\[32, 64\\] and type need 8,192"),
        "length-past-end": ({"length": "99999999999"}, "beyond the file"),
        "offset-not-a-number": ({"offset": "-4"}, "not a non-negative integer"),
        "no-location": ({"location": None}, "without a file name"),
        "reserved-name": ({"location": "cdl:w2"}, "reserved"),
        "no-length-rest-of-file": ({"length": None}, "holds .* bytes, its dims \\[32, 64\\] and type need 8,192"),
    }




@pytest.mark.parametrize("case", ["absolute", "dot-dot", "dot-dot-inside", "symlink-out", "missing", "offset-past-end",
                                  "length-wrong", "length-past-end", "offset-not-a-number", "no-location",
                                  "reserved-name", "no-length-rest-of-file"])
def test_hostile_references_are_clean_errors_naming_the_tensor(tmp_path, capsys, case):
    src, _ = external_model(tmp_path / "in", extras=False)
    (tmp_path / "in" / "link.bin").symlink_to(tmp_path / "secret.bin")
    changes, message = hostile_cases(tmp_path)[case]
    rewrite(src, "w1", **changes)
    with pytest.raises(CdlInputError, match=f"tensor 'w1': external data .*{message}"):
        read_onnx(str(src))
    out = tmp_path / "m.cdl"
    with pytest.raises(SystemExit) as exc:
        cli_main(["encode", str(src), "-o", str(out), "--lossless"])
    err = capsys.readouterr().err
    assert exc.value.code != 0 and "cdlcodec: error:" in err and "'w1'" in err and "Traceback" not in err
    assert not out.exists() and not [p for p in tmp_path.iterdir() if p.name.startswith("m.cdl")]


def test_a_link_inside_the_folder_is_followed(tmp_path):
    src, original = external_model(tmp_path / "in", extras=False)
    data = tmp_path / "in" / "model.onnx.data"
    (tmp_path / "in" / "weights").mkdir()
    os.replace(data, tmp_path / "in" / "weights" / "real.data")
    data.symlink_to(tmp_path / "in" / "weights" / "real.data")
    cdl, out = tmp_path / "m.cdl", tmp_path / "out.onnx"
    encode(str(src), str(cdl), lossless=True)
    decode(str(cdl), str(out))
    np.testing.assert_array_equal(run(out), run(src))


def test_a_model_in_memory_cannot_have_external_data(tmp_path):
    from cdlcodec.io.onnx_model import read_onnx_bytes

    src, _ = external_model(tmp_path / "in", extras=False)
    with pytest.raises(CdlInputError, match="given as bytes"):
        read_onnx_bytes(src.read_bytes(), "exported model")


def test_external_data_in_and_out(tmp_path, monkeypatch):
    """A model read from external data and decoded beyond the (lowered) 2 GB threshold is written with
    external data again, its own file beside it, and runs as the original does."""
    import warnings

    import cdlcodec.io.onnx_writer as writer

    monkeypatch.setattr(writer, "EXTERNAL_DATA_THRESHOLD", 4_000)  # the real one is protobuf's 2 GB
    monkeypatch.setattr(writer, "STREAM_MIN_ELEMENTS", 1_000)  # w1 (2,048 values) goes external
    src, _ = external_model(tmp_path / "in")
    cdl, out = tmp_path / "m.cdl", tmp_path / "out" / "big.onnx"
    out.parent.mkdir()
    encode(str(src), str(cdl), lossless=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        decode(str(cdl), str(out))
    header = onnx.load(str(out), load_external_data=False)
    assert {e.value for t in header.graph.initializer for e in t.external_data if e.key == "location"} == {"big.onnx.data"}
    assert sorted(p.name for p in out.parent.iterdir()) == ["big.onnx", "big.onnx.data"]
    np.testing.assert_array_equal(run(out), run(src))


def test_any_reference_is_read_exactly_or_refused_cleanly(tmp_path):
    """Random offsets, lengths and names: the tensor's exact bytes or a CdlInputError, nothing else."""
    src, original = external_model(tmp_path / "in", extras=False)
    (tmp_path / "in" / "sub").mkdir()
    want = numpy_helper.to_array(next(t for t in original.graph.initializer if t.name == "w1"))
    header = onnx.load(str(src), load_external_data=False)
    offset = int(next(e.value for t in header.graph.initializer if t.name == "w1"
                      for e in t.external_data if e.key == "offset"))
    rng = np.random.default_rng(15)
    names = ["model.onnx.data", "./model.onnx.data", "sub/../model.onnx.data", "sub", "model.onnx", "",
             "model.onnx.data/", "\u00e9.data", "a:b", "model.onnx.data\x00x"]
    numbers = [None, "0", str(offset), "8192", "-1", "1e3", " 12", "99999999999999999999", "0x10", str(offset + 4)]
    data, accepted = (tmp_path / "in" / "model.onnx.data").read_bytes(), set()
    for _ in range(200):
        changes = {"location": names[rng.integers(len(names))], "offset": numbers[rng.integers(len(numbers))],
                   "length": numbers[rng.integers(len(numbers))]}
        rewrite(src, "w1", **changes)
        try:
            records = read_onnx(str(src)).records
        except CdlInputError:
            continue
        got = next(r for r in records if r.name == "w1").array
        start = int(changes["offset"] or 0)  # a reference may point at other bytes of the file: those
        assert got.shape == want.shape and got.tobytes() == data[start:start + want.nbytes], changes
        accepted.add(start)
    assert accepted  # not only refusals
    rewrite(src, "w1", location="model.onnx.data", offset=str(offset + 4), length="8192")  # other bytes, in range
    assert next(r for r in read_onnx(str(src)).records if r.name == "w1").array.tobytes() == data[offset + 4:offset + 8196]
    rewrite(src, "w1", location="model.onnx.data", offset=str(offset), length="8192")
    assert next(r for r in read_onnx(str(src)).records if r.name == "w1").array.tobytes() == want.tobytes()
