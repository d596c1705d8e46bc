"""Edge-ready ONNX outputs (issue 14): QDQ decodes keep the model's opset where the weights fit int8,
say when and why they do not, pass the full checker, and run like the float decode."""
from __future__ import annotations

import json
import warnings

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from cdlcodec.api import decode, encode
from cdlcodec.cli.main import main as cli_main
from cdlcodec.codec import EncodeOptions, decode_container, encode_records
from cdlcodec.errors import CdlInputError
from cdlcodec.io.onnx_model import architecture_graph_section
from cdlcodec.io.onnx_writer import OnnxOutputNote, build_onnx
from cdlcodec.quantizers import make
from cdlcodec.quantizers.channel import ChannelQuantizer
from cdlcodec.fidelity.deploy import clamp_levels, deploy_min_steps
from cdlcodec.quantizers.uniform import UniformQuantizer
from cdlcodec.records import TensorRecord
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


def not_about_ort(notes: list[str]) -> list[str]:
    """The notes about the written model itself (not the onnxruntime session-option advice)."""
    return [n for n in notes if "MatMulNBits" not in n]


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
    assert opset_of(model) == 17 and model.ir_version == 8 and not_about_ort(notes) == []
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
    # --keep-opset: opset 17 stays; int16 DequantizeLinear needs 21, so int16 -> Cast -> Mul(step); still said
    kept, notes = decode_with_notes(cdl, str(tmp_path / "k.onnx"), weights="qdq", keep_opset=True)
    onnx.checker.check_model(kept, full_check=True)
    assert opset_of(kept) == 17 and integer_types(kept) == {TensorProto.INT16}
    assert {n.op_type for n in kept.graph.node} >= {"Cast", "Mul"} and not any(
        n.op_type == "DequantizeLinear" for n in kept.graph.node)
    assert any("beyond int8" in n and "Cast/Mul" in n for n in notes) and not any("moved" in n for n in notes)
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


def test_per_channel_scales_below_opset_13_keep_the_opset(tmp_path):
    """Per-channel DequantizeLinear needs opset 13; below it int8 -> Cast -> Mul(steps[1, C]) computes the
    same product at the model's own opset, bit-exact to the float decode."""
    src = with_opset(mlp(str(tmp_path / "mlp.onnx")), str(tmp_path / "mlp11.onnx"), 11)
    cdl = str(tmp_path / "m.cdl")
    encode(src, cdl, quantizer=make("deploy", grid="int8", rel_step=0.001), backend="huffman", quiet=True)
    decode(cdl, str(tmp_path / "f.onnx"))
    model, notes = decode_with_notes(cdl, str(tmp_path / "q.onnx"), weights="qdq")
    onnx.checker.check_model(model, full_check=True)
    assert opset_of(model) == 11 and model.ir_version == 8 and integer_types(model) == {TensorProto.INT8}
    assert notes == [] and not any(n.op_type == "DequantizeLinear" for n in model.graph.node)
    floats = float_weights(tmp_path / "f.onnx")
    for name, values in dequantize_like_onnx(model).items():
        np.testing.assert_array_equal(values, floats[name])
    np.testing.assert_array_equal(run(tmp_path / "q.onnx", X_MLP), run(tmp_path / "f.onnx", X_MLP))


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


# ---------------------------------------------------------------------------------------------- --deploy

def dequantize_like_onnx(model) -> dict[str, np.ndarray]:
    """Each DequantizeLinear's (or Cast -> Mul's) output computed as the operators define it: int * scale
    in the scale's type, one rounding."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    casts = {n.output[0]: n.input[0] for n in model.graph.node if n.op_type == "Cast"}
    out = {}
    for node in model.graph.node:
        if node.op_type == "Mul" and node.input[0] in casts:
            ints, scale = inits[casts[node.input[0]]].astype(np.int64), inits[node.input[1]]
            out[node.output[0]] = ints.astype(scale.dtype) * scale  # the scale is shaped to broadcast
            continue
        if node.op_type != "DequantizeLinear":
            continue
        ints, scale = inits[node.input[0]].astype(np.int64), inits[node.input[1]]
        axis = next((a.i for a in node.attribute if a.name == "axis"), None)
        if axis is not None:
            shape = [1] * ints.ndim
            shape[axis] = -1
            scale = scale.reshape(shape)
        out[node.output[0]] = ints.astype(scale.dtype) * scale  # one rounding, in the scale's type
    return out


def float_weights(path) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in onnx.load(str(path)).graph.initializer}


@pytest.mark.parametrize("grid,itype,opset", [("int8", TensorProto.INT8, 17), ("int4", TensorProto.INT4, 21)])
def test_deploy_grid_qdq_decode_is_exact_to_the_coded_weights(tmp_path, grid, itype, opset):
    src = mlp(str(tmp_path / "mlp.onnx"), outlier=True)
    cdl = str(tmp_path / "d.cdl")
    encode(src, cdl, quantizer=make("deploy", grid=grid, rel_step=0.001), backend="auto", quiet=True)
    decode(cdl, str(tmp_path / "f.onnx"))
    model, notes = decode_with_notes(cdl, str(tmp_path / "q.onnx"), weights="qdq")
    onnx.checker.check_model(model, full_check=True)
    assert opset_of(model) == opset and integer_types(model) == {itype}
    assert not any("beyond int8" in n for n in notes)
    assert (not_about_ort(notes) == []) == (grid == "int8")
    # the output channels read from the graph: MatMul W[in, out] -> axis 1, Gemm transB W[out, in] -> axis 0
    axes = {n.output[0]: n.attribute[0].i for n in model.graph.node if n.op_type == "DequantizeLinear"}
    assert axes == {"w1": 1, "w2": 0}
    floats = float_weights(tmp_path / "f.onnx")
    for name, values in dequantize_like_onnx(model).items():
        assert values.dtype == floats[name].dtype
        np.testing.assert_array_equal(values, floats[name])  # bit for bit
    np.testing.assert_array_equal(run(tmp_path / "q.onnx", X_MLP), run(tmp_path / "f.onnx", X_MLP))


@pytest.mark.parametrize("opset", [19, 17])
def test_deploy_float16_weights_are_exact_too(tmp_path, opset):
    """float16 scales need opset 19 for DequantizeLinear; below it, int8 -> Cast(float16) -> Mul(step)."""
    w = np.random.default_rng(3).standard_normal((8, 4)).astype(np.float16)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "half",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["N", 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT16, ["N", 4])],
                              [numpy_helper.from_array(w, "w")])
    src = str(tmp_path / "half.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)]), src)
    cdl = str(tmp_path / "h.cdl")
    encode(src, cdl, quantizer=make("deploy", grid="int8", rel_step=0.001), backend="huffman", quiet=True)
    decode(cdl, str(tmp_path / "f.onnx"))
    model, _ = decode_with_notes(cdl, str(tmp_path / "q.onnx"), weights="qdq")
    onnx.checker.check_model(model, full_check=True)
    assert opset_of(model) == opset and integer_types(model) == {TensorProto.INT8}
    ops = [n.op_type for n in model.graph.node]
    assert ops[:2] == (["DequantizeLinear", "MatMul"] if opset >= 19 else ["Cast", "Mul"])
    values = dequantize_like_onnx(model)["w"]
    assert values.dtype == np.float16
    np.testing.assert_array_equal(values, float_weights(tmp_path / "f.onnx")["w"])
    xh = np.random.default_rng(4).standard_normal((3, 8)).astype(np.float16)
    # float16 arithmetic (and at opset 19 onnxruntime's MatMulNBits fusion): close, as in test_onnx_decode
    np.testing.assert_allclose(run(tmp_path / "q.onnx", xh).astype(np.float32),
                               run(tmp_path / "f.onnx", xh).astype(np.float32), atol=2e-2)


def test_deploy_min_steps_choose_the_clip_with_least_error():
    weight = np.random.default_rng(5).standard_t(3, (4, 256))  # heavy tails, as trained weights have
    steps = deploy_min_steps(weight, 0, 4)

    def error(step):
        return np.sum((weight - clamp_levels(np.rint(weight / step[:, None]), 4) * step[:, None]) ** 2, axis=1)

    max_abs = np.max(np.abs(weight), axis=1) / 7
    assert np.all(steps < 0.85 * max_abs) and np.all(error(steps) < 0.8 * error(max_abs))
    np.testing.assert_array_equal(deploy_min_steps(weight.T, 1, 4), steps)   # the axis is honoured
    np.testing.assert_array_equal(deploy_min_steps(np.zeros((2, 3)), 0, 8), [1.0, 1.0])
    np.testing.assert_array_equal(clamp_levels(np.array([-300, -5, 0, 9, 200]), 8), [-127, -5, 0, 9, 127])
    np.testing.assert_array_equal(clamp_levels(np.array([-300, -5, 0, 9, 200]), 4), [-7, -5, 0, 7, 7])


def test_deploy_keeps_a_coarser_explicit_step_and_bits_ask_for_a_narrower_grid():
    rng = np.random.default_rng(6)
    w = rng.standard_normal((3, 50)).astype(np.float32)
    record = TensorRecord("w", w, "float32")
    levels, quant, _ = make("deploy", grid="int8", step=0.25).quantize_record(record, w.astype(np.float64), w, "")
    assert quant["steps"] == [0.25, 0.25, 0.25] and np.abs(levels).max() <= 127
    levels, quant, _ = make("deploy", grid="int8", bits=4).quantize_record(record, w.astype(np.float64), w, "")
    assert np.abs(levels).max() <= 7
    np.testing.assert_array_equal(quant["steps"], np.float32(deploy_min_steps(w, 0, 4)))
    with pytest.raises(CdlInputError, match="bits must be between 2 and 4"):
        make("deploy", grid="int4", bits=8)
    with pytest.raises(CdlInputError, match="grid must be one of"):
        make("deploy", grid="int3")


@pytest.mark.parametrize("args,message", [
    (("--rel-step", "0.01", "--lambda", "0.1"), "drop --lambda"),
    (("--rel-step", "0.01", "--trellis"), "drop --trellis"),
])
def test_deploy_refusals_are_clear(tmp_path, capsys, args, message):
    src = mlp(str(tmp_path / "mlp.onnx"))
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["encode", src, "-o", str(tmp_path / "d.cdl"), "--deploy", "int8", "-q", *args])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("cdlcodec: error: --deploy int8") and message in err and "Traceback" not in err
    assert not (tmp_path / "d.cdl").exists()


@pytest.mark.parametrize("grid,bound", [("int8", 127), ("int4", 7)])
def test_deploy_with_a_fidelity_target(tmp_path, capsys, grid, bound):
    """--deploy with the fidelity search: the target is met by a plan whose every quantized weight
    lies on the per-channel grid, so the QDQ decode is int8 (int4) and exact to what was checked."""
    from cdlcodec.codec import decode_container
    from cdlcodec.formats.container import ContainerReader

    src = mlp(str(tmp_path / "mlp.onnx"))
    rng = np.random.default_rng(4)
    np.savez(tmp_path / "c.npz", x=rng.standard_normal((48, 32)).astype(np.float32))
    out = str(tmp_path / "d.cdl")
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["encode", src, "-o", out, "--deploy", grid, "--target-cosine", "0.99",
                  "--calibration", str(tmp_path / "c.npz"), "-q"])
    assert exit_info.value.code == 0, capsys.readouterr().err
    with ContainerReader(out) as reader:
        assert reader.metadata["fidelity.target"] == f"cosine >= 0.99, {grid} grid"
        assert float(reader.metadata["fidelity.achieved"]) >= 0.99
    decoded = decode_container(out)
    coded = [r for r in decoded.records if r.levels is not None]
    assert coded  # the weights were quantized, not stored exactly
    for rec in coded:
        assert np.abs(rec.levels).max() <= bound and "steps" in rec.quant and rec.quant["scheme"] == "uniform"
    with pytest.raises(SystemExit) as exit_info:
        cli_main(["decode", out, "-o", str(tmp_path / "q.onnx"), "--weights", "qdq", "-q"])
    assert exit_info.value.code == 0
    assert integer_types(onnx.load(str(tmp_path / "q.onnx"))) == {TensorProto.INT8 if grid == "int8" else TensorProto.INT4}


def test_an_int8_deployment_stays_int8_when_levels_would_fit_int4(tmp_path, capsys):
    """Levels that happen to fit 4 bits on an int8 grid are written int8: no int4, no opset upgrade."""
    src = mlp(str(tmp_path / "mlp.onnx"))
    out, qdq = str(tmp_path / "d.cdl"), str(tmp_path / "q.onnx")
    for argv in (["encode", src, "-o", out, "--deploy", "int8", "--bits", "4", "-q"],
                 ["decode", out, "-o", qdq, "--weights", "qdq", "-q"]):
        with pytest.raises(SystemExit) as exit_info:
            cli_main(argv)
        assert exit_info.value.code == 0
    assert "opset" not in capsys.readouterr().err
    model = onnx.load(qdq)
    assert opset_of(model) == 17 and integer_types(model) == {TensorProto.INT8}


def test_deploy_from_the_command_line(tmp_path, capsys):
    src = mlp(str(tmp_path / "mlp.onnx"))
    for argv in (["encode", src, "-o", str(tmp_path / "d.cdl"), "--deploy", "int8", "--rel-step", "0.01", "-q"],
                 ["decode", str(tmp_path / "d.cdl"), "-o", str(tmp_path / "q.onnx"), "--weights", "qdq", "-q"]):
        with pytest.raises(SystemExit) as exit_info:
            cli_main(argv)
        assert exit_info.value.code == 0
    err = capsys.readouterr().err
    assert "--deploy" not in err and "opset" not in err  # int8 fits: nothing moved, nothing beyond int8
    model = onnx.load(str(tmp_path / "q.onnx"))
    assert opset_of(model) == 17 and integer_types(model) == {TensorProto.INT8}


# ---------------------------------------------------------------------------------------------- runtime parity

def literal_session(data: bytes) -> ort.InferenceSession:
    """onnxruntime computing the graph as written: no optimisation, no fusion."""
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(data, so, providers=["CPUExecutionProvider"])


@pytest.mark.parametrize("weights", ["float", "qdq"])
def test_cdl_activation_quantizers_run_the_same_under_default_session_options(tmp_path, weights):
    """LeNet-5 with four quantized activations: default onnxruntime options (QDQ transformers on) give what
    the graph says, i.e. the CDL model's eval arithmetic (tests/test_decode_cdl.py checks it against torch).
    Without the writer's Max(., 0) after each activation the logits moved by 0.01-0.02."""
    import torch

    from cdlcodec.models import build

    torch.manual_seed(0)
    records = [TensorRecord(k, v.numpy(), "float32") for k, v in build("lenet5").state_dict().items()]
    section, _ = architecture_graph_section("lenet5", records)
    activations = [{"module": f"relu{i}", "s": s, "bits": b} for i, s, b in ((1, 0.02, 4), (2, 0.03, 8), (3, 0.05, 4),
                                                                            (4, 0.05, 4))]
    cdl = str(tmp_path / "l.cdl")
    encode_records(records, cdl, EncodeOptions(UniformQuantizer(rel_step=None, bits=4), "huffman", (), True), {},
                   [section, ("cdl.activations", "json",
                              json.dumps({"version": 1, "activations": activations}).encode())])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OnnxOutputNote)
        proto = build_onnx(decode_container(cdl), weights=weights).SerializeToString()
    x = np.random.default_rng(0).uniform(0, 1, (64, 1, 28, 28)).astype(np.float32)
    want = literal_session(proto).run(None, {"input": x})[0]
    got = ort.InferenceSession(proto, providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    assert np.abs(got - want).max() < 1e-4 and np.array_equal(got.argmax(1), want.argmax(1))


def test_matmul_weights_name_the_session_option_that_keeps_float_activations(tmp_path):
    """onnxruntime fuses DequantizeLinear -> MatMul into MatMulNBits with int8 activations by default; the
    note names the option, and with it the QDQ model computes what the float decode computes."""
    src = mlp(str(tmp_path / "mlp.onnx"), n_in=256, hidden=256)
    cdl = str(tmp_path / "d.cdl")
    encode(src, cdl, quantizer=make("deploy", grid="int8", rel_step=0.001), backend="huffman", quiet=True)
    decode(cdl, str(tmp_path / "f.onnx"))
    _, notes = decode_with_notes(cdl, str(tmp_path / "q.onnx"), weights="qdq")
    note = next(n for n in notes if "MatMulNBits" in n)
    assert note.startswith("1 MatMul node(s)") and "session.qdq_matmulnbits_accuracy_level=0" in note
    x = np.random.default_rng(4).standard_normal((8, 256)).astype(np.float32)
    so = ort.SessionOptions()
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    np.testing.assert_allclose(run(tmp_path / "q.onnx", x, so), run(tmp_path / "f.onnx", x), atol=1e-5)


def test_deploy_gives_embedding_tables_one_scale_per_feature(tmp_path):
    rng = np.random.default_rng(8)
    table, w = rng.standard_normal((50, 6)).astype(np.float32), rng.standard_normal((6, 3)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"]), helper.make_node("MatMul", ["e", "w"], ["y"])]
    graph = helper.make_graph(nodes, "emb", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["N"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 3])],
                              [numpy_helper.from_array(table, "table"), numpy_helper.from_array(w, "w")])
    src = str(tmp_path / "emb.onnx")
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), src)
    cdl = str(tmp_path / "e.cdl")
    encode(src, cdl, quantizer=make("deploy", grid="int8", rel_step=0.001), backend="huffman", quiet=True)
    model, _ = decode_with_notes(cdl, str(tmp_path / "q.onnx"), weights="qdq")
    axes = {n.output[0]: n.attribute[0].i for n in model.graph.node if n.op_type == "DequantizeLinear"}
    assert axes == {"table": 1, "w": 1}


@pytest.mark.parametrize("grid,bits", [("int8", 8), ("int4", 4)])
def test_matmul_nbits_runs_like_the_float_decode_under_default_options(tmp_path, grid, bits):
    src = mlp(str(tmp_path / "mlp.onnx"), n_in=100, hidden=48)   # K = 100: padded to whole blocks
    cdl = str(tmp_path / "d.cdl")
    encode(src, cdl, quantizer=make("deploy", grid=grid, rel_step=0.001), backend="huffman", quiet=True)
    decode(cdl, str(tmp_path / "f.onnx"))
    model, notes = decode_with_notes(cdl, str(tmp_path / "q.onnx"), weights="qdq", matmul_nbits=True)
    onnx.checker.check_model(model, full_check=True)
    nbits = [n for n in model.graph.node if n.op_type == "MatMulNBits"]
    assert len(nbits) == 1 and nbits[0].domain == "com.microsoft" and nbits[0].output[0] == "h0"
    attrs = {a.name: a.i for a in nbits[0].attribute}
    assert attrs["bits"] == bits and attrs["K"] == 100 and attrs["N"] == 48 and attrs["accuracy_level"] == 0
    assert not any(n.op_type == "MatMul" for n in model.graph.node) and "w1" not in float_weights(tmp_path / "q.onnx")
    assert any("MatMulNBits" in n and "became" in n for n in notes) and not any("accuracy_level=0" in n for n in notes)
    x = np.random.default_rng(9).standard_normal((7, 100)).astype(np.float32)
    np.testing.assert_allclose(run(tmp_path / "q.onnx", x), run(tmp_path / "f.onnx", x), rtol=1e-5, atol=1e-5)


def test_matmul_nbits_needs_integer_weights(tmp_path):
    src = mlp(str(tmp_path / "mlp.onnx"))
    cdl = str(tmp_path / "d.cdl")
    encode(src, cdl, quantizer=make("deploy", grid="int8", rel_step=0.01), backend="huffman", quiet=True)
    with pytest.raises(CdlInputError, match="matmul_nbits applies to integer weights"):
        decode(cdl, str(tmp_path / "x.onnx"), matmul_nbits=True)
    assert not (tmp_path / "x.onnx").exists()


# ---------------------------------------------------------------------------------------------- streaming writer

@pytest.mark.parametrize("options", [{}, {"weights": "qdq"}, {"weights": "qdq", "int4": False},
                                     {"weights": "qdq", "matmul_nbits": True}])
@pytest.mark.parametrize("quantizer", ["deploy4", "fine"])
def test_streamed_file_holds_the_same_model_as_build_onnx(tmp_path, options, quantizer):
    """write_onnx writes the big tensors straight from the decoded arrays (fields in another order):
    what onnx.load reads back equals build_onnx's ModelProto field for field."""
    src = mlp(str(tmp_path / "mlp.onnx"), n_in=128, hidden=64)   # w1: 8,192 elements (streamed), w2: 640 (not)
    cdl = str(tmp_path / "m.cdl")
    chosen = make("deploy", grid="int4", rel_step=0.001) if quantizer == "deploy4" else UniformQuantizer(rel_step=0.001)
    encode(src, cdl, quantizer=chosen, backend="huffman", quiet=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", OnnxOutputNote)
        decode(cdl, str(tmp_path / "out.onnx"), **options)
        expected = build_onnx(decode_container(cdl), **options)
    written = onnx.load(str(tmp_path / "out.onnx"))
    assert written == expected
    assert len((tmp_path / "out.onnx").read_bytes()) == expected.ByteSize()
    onnx.checker.check_model(written, full_check=True)
    np.testing.assert_array_equal(run(tmp_path / "out.onnx", np.ones((2, 128), np.float32)),
                                  run_proto(expected, np.ones((2, 128), np.float32)))


def run_proto(proto, x):
    session = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: x})[0]


def test_a_model_beyond_protobufs_limit_is_refused_before_writing(tmp_path, monkeypatch):
    import cdlcodec.io.onnx_writer as writer

    src = mlp(str(tmp_path / "mlp.onnx"), n_in=128, hidden=64)
    cdl = str(tmp_path / "m.cdl")
    encode(src, cdl, quantizer=UniformQuantizer(rel_step=0.01), backend="huffman", quiet=True)
    monkeypatch.setattr(writer, "PROTOBUF_LIMIT", 20_000)   # the real one is 2 GB
    with pytest.raises(CdlInputError, match="beyond protobuf's 2 GB limit"):
        decode(cdl, str(tmp_path / "big.onnx"))
    assert not (tmp_path / "big.onnx").exists()
