"""decode --weights qdq --matmul-integer (issue 14 point 4): MatMul weights as DynamicQuantizeLinear ->
MatMulInteger, the coded int8 levels exactly, activations quantized by the runtime."""
from __future__ import annotations

import subprocess
import sys
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, numpy_helper

from cdlcodec.api import decode, encode
from cdlcodec.codec import decode_container
from cdlcodec.errors import CdlInputError
from cdlcodec.io.onnx_writer import OnnxOutputNote, write_onnx
from cdlcodec.quantizers import make
from cdlcodec.quantizers.uniform import UniformQuantizer
from onnx_models import mlp


def _run(path, x):
    s = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    return s.run(None, {"x": x})[0]


@pytest.fixture()
def coded(tmp_path):
    src = mlp(str(tmp_path / "m.onnx"), n_in=96, hidden=129, n_out=37)  # w1 12,384 levels: streamed
    cdl = str(tmp_path / "m.cdl")
    encode(src, cdl, quantizer=make("deploy", grid="int8", rel_step=0.01), backend="huffman")  # steps exact in float32
    return src, cdl


def test_matmul_weights_are_the_coded_int8_levels_and_run(coded, tmp_path):
    src, cdl = coded
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", OnnxOutputNote)
        decode(cdl, str(tmp_path / "i.onnx"), weights="qdq", matmul_integer=True)
    assert any("1 MatMul node(s) became DynamicQuantizeLinear -> MatMulInteger" in str(w.message) for w in caught)
    decode(cdl, str(tmp_path / "f.onnx"))
    model = onnx.load(str(tmp_path / "i.onnx"))
    onnx.checker.check_model(model, full_check=True)
    ops = [n.op_type for n in model.graph.node]
    assert ops.count("MatMulInteger") == 1 and ops.count("DynamicQuantizeLinear") == 1 and "MatMul" not in ops
    inits = {t.name: t for t in model.graph.initializer}
    rec = {r.name: r for r in decode_container(cdl).records}["w1"]
    w1 = inits["w1_quantized"]
    assert w1.data_type == TensorProto.INT8
    np.testing.assert_array_equal(numpy_helper.to_array(w1).ravel(), rec.levels)          # exactly the coded levels
    steps = numpy_helper.to_array(inits["w1_scale"])
    np.testing.assert_array_equal(numpy_helper.to_array(w1) * steps, rec.array)           # x step = the float decode
    x = np.random.default_rng(3).standard_normal((64, 96)).astype(np.float32)
    got, want = _run(str(tmp_path / "i.onnx"), x), _run(str(tmp_path / "f.onnx"), x)
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()                           # activation rounding only
    assert (got.argmax(1) == want.argmax(1)).mean() > 0.9


def test_lazy_levels_write_the_kept_levels_file(coded, tmp_path):
    _, cdl = coded
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OnnxOutputNote)
        write_onnx(str(tmp_path / "kept.onnx"), decode_container(cdl), weights="qdq", matmul_integer=True)
        decode(cdl, str(tmp_path / "lazy.onnx"), weights="qdq", matmul_integer=True)
    assert (tmp_path / "lazy.onnx").read_bytes() == (tmp_path / "kept.onnx").read_bytes()


def test_levels_beyond_int8_and_old_opsets_stay_dequantize_linear(tmp_path):
    src = mlp(str(tmp_path / "m.onnx"), n_in=96, hidden=129, n_out=37)
    cdl = str(tmp_path / "wide.cdl")
    encode(src, cdl, quantizer=UniformQuantizer(rel_step=0.001), backend="huffman")  # levels beyond int8
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OnnxOutputNote)
        decode(cdl, str(tmp_path / "w.onnx"), weights="qdq", matmul_integer=True)
    assert "MatMulInteger" not in [n.op_type for n in onnx.load(str(tmp_path / "w.onnx")).graph.node]
    old = onnx.load(src)
    old.opset_import[0].version = 10
    onnx.save(old, str(tmp_path / "old.onnx"))
    encode(str(tmp_path / "old.onnx"), str(tmp_path / "old.cdl"), quantizer=UniformQuantizer(rel_step=None, bits=8),
           backend="huffman")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", OnnxOutputNote)
        decode(str(tmp_path / "old.cdl"), str(tmp_path / "o.onnx"), weights="qdq", matmul_integer=True)
    assert any("needs opset 11" in str(w.message) for w in caught)
    assert "MatMulInteger" not in [n.op_type for n in onnx.load(str(tmp_path / "o.onnx")).graph.node]


def test_matmul_integer_needs_qdq_and_not_nbits(coded, tmp_path):
    _, cdl = coded
    with pytest.raises(CdlInputError, match="matmul_integer"):
        decode(cdl, str(tmp_path / "a.onnx"), matmul_integer=True)
    with pytest.raises(CdlInputError, match="matmul_integer"):
        decode(cdl, str(tmp_path / "b.onnx"), weights="qdq", matmul_integer=True, matmul_nbits=True)
    proc = subprocess.run([sys.executable, "-m", "cdlcodec", "decode", cdl, "-o", str(tmp_path / "c.onnx"),
                           "--matmul-integer", "-q"], capture_output=True, text=True)
    assert proc.returncode != 0 and proc.stderr.startswith("cdlcodec: error:") and "Traceback" not in proc.stderr
