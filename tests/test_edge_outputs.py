"""Edge-ready ONNX outputs (issue 14): QDQ decodes keep the model's opset where the weights fit int8,
say when and why they do not, pass the full checker, and run like the float decode."""
from __future__ import annotations

import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto

from cdlcodec.api import decode, encode
from cdlcodec.cli.main import main as cli_main
from cdlcodec.io.onnx_writer import OnnxOutputNote
from cdlcodec.quantizers.channel import ChannelQuantizer
from cdlcodec.quantizers.uniform import UniformQuantizer
from onnx_models import lstm_gemm, mlp

X_MLP = np.random.default_rng(1).standard_normal((6, 32)).astype(np.float32)
X_SEQ = np.random.default_rng(2).standard_normal((5, 3, 8)).astype(np.float32)


def opset_of(model) -> int:
    return next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))


def decode_with_notes(cdl, out, **options) -> tuple[onnx.ModelProto, list[str]]:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        decode(cdl, out, **options)
    return onnx.load(out), [str(w.message) for w in caught if issubclass(w.category, OnnxOutputNote)]


def run(path, x, so=None):
    """onnxruntime with its DEFAULT session options unless told otherwise."""
    session = ort.InferenceSession(str(path), so or ort.SessionOptions(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def integer_types(model) -> set[int]:
    return {t.data_type for t in model.graph.initializer if t.name.endswith("_quantized")}


def with_opset(src, dst, opset):
    model = onnx.load(src)
    model.opset_import[0].version = opset
    onnx.save(model, dst)
    return dst


def test_int8_per_channel_weights_keep_the_opset(tmp_path):
    src = mlp(str(tmp_path / "mlp.onnx"))
    cdl = str(tmp_path / "m.cdl")
    encode(src, cdl, quantizer=ChannelQuantizer(rel_step=None, bits=8), backend="huffman", quiet=True)
    model, notes = decode_with_notes(cdl, str(tmp_path / "q.onnx"), weights="qdq")
    onnx.checker.check_model(model, full_check=True)
    assert opset_of(model) == 17 and model.ir_version == 8 and notes == []
    assert integer_types(model) == {TensorProto.INT8}
    assert all(a.name == "axis" for n in model.graph.node if n.op_type == "DequantizeLinear" for a in n.attribute)


def test_levels_beyond_int8_are_said_with_the_way_to_int8(tmp_path):
    src = mlp(str(tmp_path / "mlp.onnx"))
    cdl = str(tmp_path / "m.cdl")
    encode(src, cdl, quantizer=UniformQuantizer(rel_step=0.001), backend="huffman", quiet=True)
    model, notes = decode_with_notes(cdl, str(tmp_path / "q.onnx"), weights="qdq")
    onnx.checker.check_model(model, full_check=True)
    assert opset_of(model) == 21 and TensorProto.INT16 in integer_types(model)
    assert any("opset 17 to 21" in n and "int16 levels" in n and "--keep-opset" in n for n in notes), notes
    assert any("beyond int8" in n and "--deploy int8" in n for n in notes), notes
    # --keep-opset: opset 17 stays, no int16 (which needs opset 21); still said
    kept, notes = decode_with_notes(cdl, str(tmp_path / "k.onnx"), weights="qdq", keep_opset=True)
    onnx.checker.check_model(kept, full_check=True)
    assert opset_of(kept) == 17 and TensorProto.INT16 not in integer_types(kept)
    assert any("beyond int8" in n for n in notes) and not any("moved" in n for n in notes)
    np.testing.assert_allclose(run(tmp_path / "k.onnx", X_MLP), run(tmp_path / "q.onnx", X_MLP), atol=1e-5)


def test_the_cli_prints_the_notes_on_stderr(tmp_path, capsys):
    src = mlp(str(tmp_path / "mlp.onnx"))
    cdl = str(tmp_path / "m.cdl")
    encode(src, cdl, quantizer=UniformQuantizer(rel_step=0.001), backend="huffman", quiet=True)
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["decode", cdl, "-o", str(tmp_path / "q.onnx"), "--weights", "qdq", "-q"])
    assert exit_info.value.code == 0
    err = capsys.readouterr().err
    assert "cdlcodec: note: " in err and "--deploy int8" in err and "opset 17 to 21" in err


def test_per_channel_scales_below_opset_13_upgrade_only_to_13(tmp_path):
    src = with_opset(mlp(str(tmp_path / "mlp.onnx")), str(tmp_path / "mlp11.onnx"), 11)
    cdl = str(tmp_path / "m.cdl")
    encode(src, cdl, quantizer=ChannelQuantizer(rel_step=None, bits=8), backend="huffman", quiet=True)
    model, notes = decode_with_notes(cdl, str(tmp_path / "q.onnx"), weights="qdq")
    onnx.checker.check_model(model, full_check=True)
    assert opset_of(model) == 13 and integer_types(model) == {TensorProto.INT8}
    assert any("opset 11 to 13" in n and "per-channel" in n for n in notes), notes


@pytest.mark.parametrize("quantizer,opset", [(UniformQuantizer(rel_step=None, bits=8), 12),
                                             (UniformQuantizer(rel_step=0.001), 21)])
def test_lstm_gemm_model_passes_the_full_checker(tmp_path, quantizer, opset):
    """The declared output rank (2) contradicts the graph (3); opset 21's shape inference sees it."""
    src = lstm_gemm(str(tmp_path / "lstm.onnx"))
    cdl = str(tmp_path / "l.cdl")
    encode(src, cdl, quantizer=quantizer, backend="huffman", quiet=True)
    decode(cdl, str(tmp_path / "f.onnx"))
    model, notes = decode_with_notes(cdl, str(tmp_path / "q.onnx"), weights="qdq")
    onnx.checker.check_model(model, full_check=True)
    assert opset_of(model) == opset
    if opset == 21:
        assert any("graph output 'y'" in n for n in notes), notes
        assert len(model.graph.output[0].type.tensor_type.shape.dim) == 3
    out = run(tmp_path / "q.onnx", X_SEQ)
    assert out.shape == (5, 3, 12)
    np.testing.assert_allclose(out, run(tmp_path / "f.onnx", X_SEQ), atol=1e-5)
