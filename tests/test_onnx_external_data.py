"""Issue 14 item 5: a decoded ONNX model beyond protobuf's 2 GB limit is written with its large
tensors as ONNX external data ("<file>.data" beside it) instead of being refused. The threshold is
lowered through the module constant: a real 2 GB model takes too long to encode in a test."""
from __future__ import annotations

import os
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest

import cdlcodec.io.onnx_writer as writer
from cdlcodec.api import decode, encode
from cdlcodec.cli.main import main as cli_main
from cdlcodec.codec import decode_container
from cdlcodec.errors import CdlInputError
from cdlcodec.io.onnx_writer import OnnxOutputNote, build_onnx
from cdlcodec.quantizers.uniform import UniformQuantizer
from onnx_models import mlp

X = np.ones((2, 128), np.float32)


def run(model, x=X):
    source = model.SerializeToString() if isinstance(model, onnx.ModelProto) else str(model)
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


@pytest.fixture()
def container(tmp_path):
    src = mlp(str(tmp_path / "mlp.onnx"), n_in=128, hidden=64)  # w1: 8,192 elements (streamed), w2: 640 (inline)
    cdl = str(tmp_path / "m.cdl")
    encode(src, cdl, quantizer=UniformQuantizer(rel_step=0.01), backend="huffman", quiet=True)
    return cdl


@pytest.mark.parametrize("options", [{}, {"weights": "qdq"}])
def test_a_model_beyond_the_threshold_gets_external_data(tmp_path, monkeypatch, container, options):
    monkeypatch.setattr(writer, "EXTERNAL_DATA_THRESHOLD", 10_000)  # the real one is protobuf's 2 GB
    out = tmp_path / "big.onnx"
    with pytest.warns(OnnxOutputNote, match="big.onnx.data beside it"):
        decode(container, str(out), **options)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OnnxOutputNote)
        expected = build_onnx(decode_container(container), **options)

    assert out.stat().st_size < 10_000 < (tmp_path / "big.onnx.data").stat().st_size
    header = onnx.load(str(out), load_external_data=False)
    external = [t for t in header.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL]
    assert external and all(int(e.value) % writer.EXTERNAL_DATA_ALIGNMENT == 0
                            for t in external for e in t.external_data if e.key == "offset")
    assert {e.value for t in external for e in t.external_data if e.key == "location"} == {"big.onnx.data"}

    written = onnx.load(str(out))  # reads the data file back in
    for t in [*written.graph.initializer, *expected.graph.initializer]:
        t.ClearField("data_location")  # explicitly DEFAULT or unset: the same
    assert written == expected
    onnx.checker.check_model(str(out), full_check=True)
    np.testing.assert_array_equal(run(out), run(expected))


def test_the_cli_says_where_the_data_went(tmp_path, monkeypatch, capsys, container):
    monkeypatch.setattr(writer, "EXTERNAL_DATA_THRESHOLD", 10_000)
    with pytest.raises(SystemExit) as exc:
        cli_main(["decode", container, "-o", str(tmp_path / "m.onnx")])
    err = capsys.readouterr().err
    assert exc.value.code == 0, err
    assert "cdlcodec: note: the model is beyond protobuf's 2 GB limit: its large tensors are in m.onnx.data" in err
    assert (tmp_path / "m.onnx.data").exists()


def test_a_model_too_big_even_with_external_data_leaves_no_file(tmp_path, monkeypatch, container):
    monkeypatch.setattr(writer, "EXTERNAL_DATA_THRESHOLD", 10_000)
    monkeypatch.setattr(writer, "PROTOBUF_LIMIT", 1_000)  # the graph without its large tensors is bigger
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OnnxOutputNote)
        with pytest.raises(CdlInputError, match="beyond protobuf's 2 GB limit.*even with its large tensors as "
                                                "external data"):
            decode(container, str(tmp_path / "big.onnx"))
    assert sorted(os.listdir(tmp_path)) == ["m.cdl", "mlp.onnx"]


def test_below_the_threshold_there_is_one_file(tmp_path, container):
    decode(container, str(tmp_path / "small.onnx"))
    assert sorted(os.listdir(tmp_path)) == ["m.cdl", "mlp.onnx", "small.onnx"]
    header = onnx.load(str(tmp_path / "small.onnx"), load_external_data=False)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in header.graph.initializer)
