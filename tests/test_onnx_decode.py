"""ONNX in, ONNX out: graph kept in the container, float and QDQ writers, bad input (no torch used)."""
from __future__ import annotations

import os

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from cdlcodec.api import decode, encode
from cdlcodec.codec import EncodeOptions, decode_container, encode_records
from cdlcodec.errors import CdlFormatError, CdlInputError
from cdlcodec.io.onnx_writer import build_onnx
from cdlcodec.quantizers.uniform import UniformQuantizer
from cdlcodec.records import ModelFile, TensorRecord

RNG = np.random.default_rng(7)
W1 = RNG.standard_normal((8, 16)).astype(np.float32)
B1 = RNG.standard_normal(16).astype(np.float32)
W2 = RNG.standard_normal((16, 4)).astype(np.float32)
TABLE = RNG.standard_normal((4, 8)).astype(np.float32)       # a float Constant node (spox-style weights)
ODD = np.arange(12, dtype=np.uint16).reshape(3, 4)             # a type cdlcodec does not store
SUB = RNG.standard_normal((1, 4)).astype(np.float32)           # an initializer inside an If branch


def _tiny_model(opset: int = 17) -> onnx.ModelProto:
    """x[N,8] -> relu(x W1 + b1) W2 (+ TABLE-derived bias), with an If whose branch owns a weight."""
    then_g = helper.make_graph([helper.make_node("Add", ["h2", "sub_w"], ["y_then"])], "then",
                               [], [helper.make_tensor_value_info("y_then", TensorProto.FLOAT, None)],
                               [numpy_helper.from_array(SUB, "sub_w")])
    else_g = helper.make_graph([helper.make_node("Identity", ["h2"], ["y_else"])], "else",
                               [], [helper.make_tensor_value_info("y_else", TensorProto.FLOAT, None)])
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["r1"]),
        helper.make_node("MatMul", ["r1", "w2"], ["h2a"]),
        helper.make_node("Constant", [], ["table"], value=numpy_helper.from_array(TABLE)),
        helper.make_node("ReduceMean", ["table"], ["tmean"], axes=[1], keepdims=0) if opset < 18 else
        helper.make_node("ReduceMean", ["table", "axes"], ["tmean"], keepdims=0),
        helper.make_node("Add", ["h2a", "tmean"], ["h2"]),
        helper.make_node("Cast", ["odd"], ["odd_f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceSum", ["odd_f"], ["odd_sum"], keepdims=0),
        helper.make_node("Greater", ["odd_sum", "zero"], ["cond"]),
        helper.make_node("If", ["cond"], ["y"], then_branch=then_g, else_branch=else_g),
    ]
    inits = [numpy_helper.from_array(W1, "w1"), numpy_helper.from_array(B1, "b1"),
             numpy_helper.from_array(W2, "w2"), numpy_helper.from_array(ODD, "odd"),
             numpy_helper.from_array(np.array(0.0, np.float32), "zero")]
    if opset >= 18:
        inits.append(numpy_helper.from_array(np.array([1], np.int64), "axes"))
    graph = helper.make_graph(nodes, "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], producer_name="cdlcodec-tests")
    model.ir_version = 8
    onnx.checker.check_model(model)
    return model


def session_options() -> ort.SessionOptions:
    """onnxruntime fuses DequantizeLinear -> MatMul into MatMulNBits and, at its default accuracy
    level 4, quantizes the activations to int8 as well; level 0 keeps float activations, which is
    what the QDQ model means (docs/decoders.md)."""
    so = ort.SessionOptions()
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    return so


def _run(path_or_proto, x):
    data = path_or_proto if isinstance(path_or_proto, str) else path_or_proto.SerializeToString()
    return ort.InferenceSession(data, session_options(), providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


@pytest.fixture()
def tiny(tmp_path):
    path = str(tmp_path / "tiny.onnx")
    onnx.save(_tiny_model(), path)
    return path


X = RNG.standard_normal((5, 8)).astype(np.float32)


def _encode(src, out, rel_step=0.01, backend="huffman", keep=()):
    return encode(src, out, quantizer=UniformQuantizer(rel_step=rel_step), backend=backend, keep=keep)


def test_lossless_settings_reproduce_the_model_exactly(tiny, tmp_path):
    _encode(tiny, str(tmp_path / "t.cdl"), keep=("*",))
    decode(str(tmp_path / "t.cdl"), str(tmp_path / "back.onnx"))
    back = onnx.load(str(tmp_path / "back.onnx"))
    onnx.checker.check_model(back, full_check=True)
    np.testing.assert_array_equal(_run(str(tmp_path / "back.onnx"), X), _run(tiny, X))
    inits = {t.name: numpy_helper.to_array(t) for t in back.graph.initializer}
    np.testing.assert_array_equal(inits["odd"], ODD)          # unsupported type kept byte for byte
    np.testing.assert_array_equal(inits["w1"], W1)


def test_graph_section_and_record_names(tiny, tmp_path):
    _encode(tiny, str(tmp_path / "t.cdl"))
    model = decode_container(str(tmp_path / "t.cdl"))
    names = [r.name for r in model.records]
    assert names[:3] == ["w1", "b1", "w2"]
    assert "odd" not in names                                  # uint16: stays inside the graph
    assert "/If_10.then_branch/sub_w" in names and "table" in names
    kinds = {(n, k) for n, k, _ in model.sections}
    assert ("model.onnx", "onnx") in kinds
    graph = onnx.load_from_string(dict((n, d) for n, _, d in model.sections)["model.onnx"])
    w1 = next(t for t in graph.graph.initializer if t.name == "w1")
    assert w1.raw_data == b"" and w1.external_data[0].value == "cdl:w1"
    assert model.metadata["source.kind"] == "onnx" and model.metadata["onnx.kept_tensors"] == "1"


def test_float_decode_equals_dequantized_weights(tiny, tmp_path):
    _encode(tiny, str(tmp_path / "t.cdl"), rel_step=0.05)
    decode(str(tmp_path / "t.cdl"), str(tmp_path / "f.onnx"), weights="float")
    back = onnx.load(str(tmp_path / "f.onnx"))
    onnx.checker.check_model(back, full_check=True)
    records = {r.name: r for r in decode_container(str(tmp_path / "t.cdl")).records}
    w1 = numpy_helper.to_array(next(t for t in back.graph.initializer if t.name == "w1"))
    np.testing.assert_array_equal(w1, records["w1"].array)
    np.testing.assert_array_equal(w1, (records["w1"].levels * records["w1"].quant["step"]).reshape(8, 16).astype(np.float32))
    # float weights, step 0.05 std: outputs within 2% of the original model's output range
    ref = _run(tiny, X)
    assert np.abs(_run(str(tmp_path / "f.onnx"), X) - ref).max() < 0.02 * np.abs(ref).max()


@pytest.mark.parametrize("bits,expect_type,expect_opset", [(4, TensorProto.INT4, 21), (8, TensorProto.INT8, 17)])
def test_qdq_weights_are_integers_and_run_like_float(tiny, tmp_path, bits, expect_type, expect_opset):
    cdl = str(tmp_path / "t.cdl")
    encode(tiny, cdl, quantizer=UniformQuantizer(rel_step=None, bits=bits), backend="huffman")
    decode(cdl, str(tmp_path / "f.onnx"))
    decode(cdl, str(tmp_path / "q.onnx"), weights="qdq")
    q = onnx.load(str(tmp_path / "q.onnx"))
    onnx.checker.check_model(q, full_check=True)
    assert next(o.version for o in q.opset_import if o.domain == "") == expect_opset
    types = {t.name: t.data_type for t in q.graph.initializer}
    assert types["w1_quantized"] == expect_type and types["w2_quantized"] == expect_type
    assert "w1" not in types and types["b1"] == TensorProto.FLOAT   # 1-D bias stays float (lossless)
    dq = [n for n in q.graph.node if n.op_type == "DequantizeLinear"]
    assert {n.output[0] for n in dq} >= {"w1", "w2", "table"}
    np.testing.assert_allclose(_run(str(tmp_path / "q.onnx"), X), _run(str(tmp_path / "f.onnx"), X), atol=1e-5)


def test_qdq_int4_can_be_refused(tiny, tmp_path):
    cdl = str(tmp_path / "t.cdl")
    encode(tiny, cdl, quantizer=UniformQuantizer(rel_step=None, bits=4), backend="huffman")
    decode(cdl, str(tmp_path / "q.onnx"), weights="qdq", int4=False)
    q = onnx.load(str(tmp_path / "q.onnx"))
    assert {t.data_type for t in q.graph.initializer if t.name.endswith("_quantized")} == {TensorProto.INT8}


def test_per_channel_steps_become_an_axis(tmp_path):
    """A record with per-output-channel steps (quant scheme "uniform" with axis/steps) -> DequantizeLinear(axis)."""
    model = _tiny_model()
    for t in model.graph.initializer:
        if t.name == "w2":
            from cdlcodec.io.onnx_model import strip_tensor
            strip_tensor(t, "w2")
    steps = [0.01 * (i + 1) for i in range(4)]
    levels = np.rint(W2 / np.array(steps, np.float64)).astype(np.int64)
    values = (levels * np.array(steps)).astype(np.float32)
    rec = TensorRecord("w2", values, "float32", levels=levels.ravel(), quant={"scheme": "uniform", "axis": 1, "steps": steps})
    proto = build_onnx(ModelFile([rec], [("model.onnx", "onnx", model.SerializeToString())]), weights="qdq")
    onnx.checker.check_model(proto, full_check=True)
    node = next(n for n in proto.graph.node if n.op_type == "DequantizeLinear")
    assert [(a.name, a.i) for a in node.attribute] == [("axis", 1)]
    reference = build_onnx(ModelFile([rec], [("model.onnx", "onnx", model.SerializeToString())]), weights="float")
    np.testing.assert_allclose(_run(proto, X), _run(reference, X), atol=1e-5)


def test_float16_model_round_trip(tmp_path):
    w = RNG.standard_normal((8, 4)).astype(np.float16)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "half",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["N", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["N", 4])],
                              [numpy_helper.from_array(w, "w")])
    path = str(tmp_path / "half.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)]), path)
    cdl = str(tmp_path / "h.cdl")
    encode(path, cdl, quantizer=UniformQuantizer(rel_step=None, bits=8), backend="huffman")
    for mode in ("float", "qdq"):
        decode(cdl, str(tmp_path / f"{mode}.onnx"), weights=mode)
        onnx.checker.check_model(onnx.load(str(tmp_path / f"{mode}.onnx")), full_check=True)
    xh = X.astype(np.float16)
    sess = lambda p: ort.InferenceSession(p, providers=["CPUExecutionProvider"]).run(None, {"x": xh})[0]
    np.testing.assert_allclose(sess(str(tmp_path / "qdq.onnx")).astype(np.float32),
                               sess(str(tmp_path / "float.onnx")).astype(np.float32), atol=2e-2)
    assert {t.data_type for t in onnx.load(str(tmp_path / "qdq.onnx")).graph.initializer} == {TensorProto.INT8, TensorProto.FLOAT16}


# ---------------------------------------------------------------------------------------------- bad input

def test_external_data_decodes_as_the_same_model_inline(tmp_path):
    """Weights in an external data file (the If branch's too) are read as inline ones are
    (tests/test_onnx_external_input.py checks the references)."""
    inline, external = str(tmp_path / "inline.onnx"), str(tmp_path / "ext.onnx")
    onnx.save(_tiny_model(), inline)
    onnx.save(_tiny_model(), external, save_as_external_data=True, all_tensors_to_one_file=True,
              location="ext.data", size_threshold=0)
    for src, name in ((inline, "a"), (external, "b")):
        _encode(src, str(tmp_path / f"{name}.cdl"), keep=("*",))
        decode(str(tmp_path / f"{name}.cdl"), str(tmp_path / f"{name}.onnx"))
    assert onnx.load(str(tmp_path / "a.onnx")) == onnx.load(str(tmp_path / "b.onnx"))


def test_graph_without_float_weights_is_refused(tmp_path):
    graph = helper.make_graph([helper.make_node("Add", ["x", "k"], ["y"])], "ints",
                              [helper.make_tensor_value_info("x", TensorProto.INT64, [3])],
                              [helper.make_tensor_value_info("y", TensorProto.INT64, [3])],
                              [numpy_helper.from_array(np.arange(3, dtype=np.int64), "k")])
    path = str(tmp_path / "ints.onnx")
    onnx.save(helper.make_model(graph), path)
    with pytest.raises(CdlInputError, match="no float weights"):
        _encode(path, str(tmp_path / "x.cdl"))


def test_not_an_onnx_file(tmp_path):
    path = tmp_path / "junk.onnx"
    path.write_bytes(b"\x08\x07garbage that is not protobuf\xff\xff\xff")
    with pytest.raises(CdlInputError, match="not a valid ONNX model"):
        _encode(str(path), str(tmp_path / "x.cdl"))


def test_onnx_output_needs_a_graph(tmp_path):
    cdl = str(tmp_path / "plain.cdl")
    encode_records([TensorRecord("w", W1, "float32")], cdl, EncodeOptions(backend="huffman", quiet=True))
    with pytest.raises(CdlInputError, match="no ONNX graph"):
        decode(cdl, str(tmp_path / "x.onnx"))
    assert not (tmp_path / "x.onnx").exists()


def test_weights_option_is_for_onnx_only(tiny, tmp_path):
    _encode(tiny, str(tmp_path / "t.cdl"))
    with pytest.raises(CdlInputError, match="does not apply"):
        decode(str(tmp_path / "t.cdl"), str(tmp_path / "x.safetensors"), weights="qdq")
    with pytest.raises(CdlInputError, match="weights must be one of"):
        decode(str(tmp_path / "t.cdl"), str(tmp_path / "x.onnx"), weights="int3")


def test_graph_that_disagrees_with_the_tensors_is_a_format_error(tiny, tmp_path):
    model = _tiny_model()
    for t in model.graph.initializer:
        if t.name == "w1":
            from cdlcodec.io.onnx_model import strip_tensor
            strip_tensor(t, "w1")
    wrong = TensorRecord("w1", np.zeros((16, 8), np.float32), "float32")
    with pytest.raises(CdlFormatError, match="dims"):
        build_onnx(ModelFile([wrong], [("model.onnx", "onnx", model.SerializeToString())]))
    with pytest.raises(CdlFormatError, match="does not hold"):
        build_onnx(ModelFile([], [("model.onnx", "onnx", model.SerializeToString())]))


def test_cli_reports_external_data_without_traceback(tmp_path):
    import subprocess
    import sys

    path = str(tmp_path / "ext.onnx")
    onnx.save(_tiny_model(), path, save_as_external_data=True, location="ext.data", size_threshold=0)
    os.remove(tmp_path / "ext.data")  # the model names a data file that is not there
    proc = subprocess.run([sys.executable, "-m", "cdlcodec", "encode", path, "-o", str(tmp_path / "x.cdl")],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.startswith("cdlcodec: error:") and "external data 'ext.data': no such file" in proc.stderr
    assert "Traceback" not in proc.stderr and not (tmp_path / "x.cdl").exists()
