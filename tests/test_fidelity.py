"""Encoding to a fidelity target: graph roles, inputs, GPTQ rounding, the verified search."""
from __future__ import annotations


import numpy as np
import pytest

onnx = pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

from cdlcodec.errors import CdlInputError  # noqa: E402
from cdlcodec.fidelity.gptq import gptq_levels, inverse_cholesky  # noqa: E402
from cdlcodec.fidelity.inputs import generate_inputs, load_calibration  # noqa: E402
from cdlcodec.fidelity.measures import Target, agreement, cosine, rel_mse  # noqa: E402
from cdlcodec.fidelity.roles import graph_roles, output_axes  # noqa: E402
from cdlcodec.fidelity.search import FidelityOptions, encode_to_target  # noqa: E402
from cdlcodec.formats.container import ContainerReader  # noqa: E402
from cdlcodec.io.model_files import read_model  # noqa: E402
from onnx_models import mlp as _mlp  # noqa: E402


@pytest.fixture
def mlp(tmp_path):
    path = _mlp(str(tmp_path / "mlp.onnx"))
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "calib.npz", x=rng.standard_normal((48, 32)).astype(np.float32))
    return path, str(tmp_path / "calib.npz")


def test_roles_come_from_the_consuming_op(mlp):
    stripped = onnx.load_from_string(read_model(mlp[0]).sections[0][2])
    roles = graph_roles(stripped)
    assert roles == {"w1": "weight", "b1": "precision", "w2": "weight", "b2": "precision", "scale": "precision"}
    assert output_axes(stripped) == {"w1": 1, "w2": 0}


def test_lstm_bias_and_gather_table_roles():
    w = numpy_helper.from_array(np.zeros((1, 16, 3), np.float32), "W")
    r = numpy_helper.from_array(np.zeros((1, 16, 4), np.float32), "R")
    b = numpy_helper.from_array(np.zeros((1, 32), np.float32), "B")
    emb = numpy_helper.from_array(np.zeros((50, 3), np.float32), "emb")
    nodes = [helper.make_node("Gather", ["emb", "ids"], ["e"]),
             helper.make_node("LSTM", ["e", "W", "R", "B"], ["y"], hidden_size=4)]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("ids", TensorProto.INT64, [5, 1])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [w, r, b, emb])
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    from cdlcodec.io.onnx_model import strip_tensor

    for t in proto.graph.initializer:
        strip_tensor(t, t.name)
    assert graph_roles(proto) == {"emb": "embedding", "W": "weight", "R": "weight", "B": "precision"}
    # generated inputs index the table they feed, within its rows
    ids = generate_inputs(proto).samples[0]["ids"]
    assert ids.dtype == np.int64 and ids.min() >= 0 and ids.max() < 50


def test_measures():
    a = [[np.array([1.0, 0.0, 0.0])], [np.array([0.0, 2.0, 0.0])]]
    b = [[np.array([1.0, 0.0, 0.0])], [np.array([0.0, 0.0, 2.0])]]
    assert cosine(a, a) == pytest.approx(1.0)
    assert cosine(a, b) == pytest.approx(0.5)
    assert agreement(a, b) == 0.5
    assert rel_mse(a, b) == pytest.approx(8.0 / 5.0)
    # one number per sample: compared across samples, not as a per-sample sign
    p = [[np.array([0.9])], [np.array([0.2])]]
    q = [[np.array([0.2])], [np.array([0.9])]]
    assert cosine(p, q) == pytest.approx(2 * 0.18 / 0.85)
    assert rel_mse([[np.ones(2)], [np.ones(2)]] , [[np.ones(2)], [np.ones(2)]]) == 0.0
    assert Target("rel_mse", 0.1).met(0.05) and not Target("cosine", 0.99).met(0.98)
    with pytest.raises(CdlInputError):
        Target("cosine", 1.5)


def test_gptq_lowers_output_error_at_the_same_step():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((512, 48)) @ (np.eye(48) + 0.5 * rng.standard_normal((48, 48)))
    w = rng.standard_normal((48, 24)) * 0.1
    step = 0.05
    levels = gptq_levels(w, inverse_cholesky(x.T @ x), step)
    nearest = np.rint(w / step)
    err_gptq = np.linalg.norm(x @ w - x @ (levels * step))
    err_near = np.linalg.norm(x @ w - x @ (nearest * step))
    assert err_gptq < 0.85 * err_near
    assert np.max(np.abs(levels - nearest)) <= 3  # compensation moves levels, it does not scramble them


def test_gptq_compiled_rows_equal_the_python_loop(monkeypatch):
    """The compiled row loop is the same arithmetic: identical levels, per-tensor and per-channel steps,
    across a block boundary, with clamping."""
    from cdlcodec.fidelity import gptq

    rng = np.random.default_rng(3)
    x = rng.standard_normal((700, 150)) @ (np.eye(150) + 0.3 * rng.standard_normal((150, 150)))
    w = rng.standard_normal((150, 20)) * 0.1
    u = inverse_cholesky(x.T @ x)
    cases = [(0.02, 2**31 - 1), (rng.uniform(0.01, 0.05, 20), 2**31 - 1), (0.005, 7)]
    compiled = [gptq_levels(w, u, step, limit=limit) for step, limit in cases]
    monkeypatch.setattr(gptq, "HAVE_NUMBA", False)
    for (step, limit), got in zip(cases, compiled):
        assert np.array_equal(got, gptq_levels(w, u, step, limit=limit))
    assert np.abs(compiled[2]).max() == 7


def test_encode_to_target_meets_it_and_records_it(mlp, tmp_path):
    path, calib = mlp
    out = str(tmp_path / "m.cdl")
    model = read_model(path)
    summary, report = encode_to_target(model, out, FidelityOptions(Target("cosine", 0.995), calib, quiet=True))
    assert report.achieved >= 0.995 and report.checked >= 0.995
    with ContainerReader(out) as reader:
        assert reader.metadata["fidelity.target"] == "cosine >= 0.995"
        assert float(reader.metadata["fidelity.achieved"]) >= 0.995
        coded = {e.name: e.encoding for e in reader.tensors}
    # biases and the output scale are stored exactly; the two weights are quantized
    assert coded == {"w1": "levels", "w2": "levels", "b1": "plain", "b2": "plain", "scale": "plain"}
    # a looser target gives a smaller file
    loose = str(tmp_path / "loose.cdl")
    summary2, _ = encode_to_target(model, loose, FidelityOptions(Target("cosine", 0.95), calib, quiet=True))
    assert summary2.coded_bytes < summary.coded_bytes


def test_a_target_only_exact_storage_meets_keeps_tensors_exact(mlp, tmp_path):
    path, calib = mlp
    out = str(tmp_path / "exact.cdl")
    _, report = encode_to_target(read_model(path), out, FidelityOptions(Target("rel_mse", 1e-30), calib, quiet=True))
    assert report.checked == 0.0 and report.quantized == 0
    with ContainerReader(out) as reader:  # verbatim, or bit for bit by the exact float coder (issue 16)
        assert {e.encoding for e in reader.tensors} <= {"plain", "exact"}
    from cdlcodec.codec import decode_container

    decoded = {r.name: r.array for r in decode_container(out).records}
    assert all(decoded[r.name].tobytes() == r.array.tobytes() for r in read_model(path).records)


def test_calibration_names_must_match_the_graph(mlp, tmp_path):
    path, _ = mlp
    bad = tmp_path / "bad.npz"
    np.savez(bad, y=np.zeros((4, 32), np.float32))
    with pytest.raises(CdlInputError, match="missing: x; unknown: y"):
        load_calibration(str(bad), onnx.load(path))


def test_decisions_of_softmax_and_sigmoid_outputs():
    from cdlcodec.fidelity.decisions import changed_samples

    kinds = {0: ("argmax", -1), 1: ("threshold", 0)}
    ref = [[np.array([[0.1, 0.9]]), np.array([0.7])], [np.array([[0.6, 0.4]]), np.array([0.2])]]
    same = [[np.array([[0.2, 0.8]]), np.array([0.6])], [np.array([[0.55, 0.45]]), np.array([0.3])]]
    flipped = [[np.array([[0.2, 0.8]]), np.array([0.4])], [np.array([[0.45, 0.55]]), np.array([0.3])]]
    assert changed_samples(ref, same, kinds) == 0
    assert changed_samples(ref, flipped, kinds) == 2


def test_default_target_keeps_every_calibration_decision(tmp_path):
    """The default (no target given) also promises that no calibration sample changes class."""
    from cdlcodec.codec import EncodeOptions
    from cdlcodec.fidelity.decisions import changed_samples, decision_kinds
    from cdlcodec.fidelity.encode import encode_model
    from cdlcodec.fidelity.runner import run_proto
    from cdlcodec.codec import decode_container
    from cdlcodec.io.onnx_writer import build_onnx

    path = _mlp(str(tmp_path / "m.onnx"))
    proto = onnx.load(path)
    proto.graph.node.append(helper.make_node("Softmax", ["logits"], ["probs"], axis=-1))
    proto.graph.output[0].name = "probs"
    onnx.save(proto, path)
    rng = np.random.default_rng(3)
    np.savez(tmp_path / "c.npz", x=rng.standard_normal((64, 32)).astype(np.float32))
    out = str(tmp_path / "m.cdl")
    model = read_model(path)
    summary, report = encode_model(model, out, EncodeOptions(quiet=True), None, str(tmp_path / "c.npz"))
    assert report.same_decisions and report.checked >= 0.999
    stripped = onnx.load_from_string(model.sections[0][2])
    inputs = load_calibration(str(tmp_path / "c.npz"), stripped)
    ref = run_proto(build_onnx(model), inputs)
    dec = run_proto(build_onnx(decode_container(out)), inputs)
    assert changed_samples(ref, dec, decision_kinds(stripped)) == 0
    with ContainerReader(out) as reader:
        assert reader.metadata["fidelity.target"] == "cosine >= 0.999, same decisions"


def test_dense_maps_are_not_decision_checked():
    from cdlcodec.fidelity.decisions import MAX_DECISIONS, changed_samples

    ref = [[np.full((1, MAX_DECISIONS + 1), 0.49)]]
    dec = [[np.full((1, MAX_DECISIONS + 1), 0.51)]]
    assert changed_samples(ref, dec, {0: ("threshold", 0)}) == 0
    assert changed_samples([[r[0][:, :8]] for r in ref], [[d[0][:, :8]] for d in dec], {0: ("threshold", 0)}) == 1


def test_gptq_with_trellis_coded_rows(monkeypatch):
    """GPTQ over trellis-coded rows: the levels are a valid dependent-scheme scan of the whole
    tensor (the decoder's dequantization gives what GPTQ compensated for) and the output error is
    lower than trellis coding without compensation at the same step."""
    from cdlcodec.fidelity.dependent import RowTrellis, dependent_levels
    from cdlcodec.quantizers.trellis import dequantize_dependent

    rng = np.random.default_rng(5)
    x = rng.standard_normal((600, 40)) @ (np.eye(40) + 0.5 * rng.standard_normal((40, 40)))
    w = rng.standard_normal((40, 16)) * 0.1
    step = 0.04
    compensated_for = []

    class Recording(RowTrellis):
        def next(self, values):
            levels, recon = super().next(values)
            compensated_for.append(recon)
            return levels, recon

    from cdlcodec.fidelity import gptq

    u = inverse_cholesky(x.T @ x)
    trellis = Recording(w, step)
    monkeypatch.setattr(gptq, "HAVE_NUMBA", False)  # the Python row loop, which calls next() per row
    levels = gptq_levels(w, u, step, trellis=trellis).ravel()
    q = dequantize_dependent(levels, trellis.quant()["states"]).reshape(40, 16) * step
    # the trellis state runs on across rows as the decoder's scan does
    assert np.array_equal(np.concatenate(compensated_for), q.ravel())
    monkeypatch.undo()
    compiled = Recording(w, step)
    assert np.array_equal(gptq_levels(w, u, step, trellis=compiled).ravel(), levels)  # compiled rows: the same
    assert compiled.state == trellis.state
    plain_levels, _, plain = dependent_levels(w, step)
    assert np.linalg.norm(x @ (w - q)) < 0.85 * np.linalg.norm(x @ (w - plain))
    assert np.max(np.abs(q - w)) < 6 * step  # compensation moves values, it does not scramble them


def _embedding_model(path, vocab=1024, dim=96, n_out=8, seed=0):
    """ids -> Gather(table) -> ReduceMean over tokens -> MatMul -> y: a big table rounded without GPTQ."""
    rng = np.random.default_rng(seed)
    table = (rng.laplace(size=(vocab, dim)) * 0.05).astype(np.float32)
    w = (rng.standard_normal((dim, n_out)) / np.sqrt(dim)).astype(np.float32)
    nodes = [helper.make_node("Gather", ["table", "ids"], ["e"]),
             helper.make_node("ReduceMean", ["e"], ["m"], axes=[1], keepdims=0),
             helper.make_node("MatMul", ["m", "w"], ["y"])]
    graph = helper.make_graph(nodes, "emb", [helper.make_tensor_value_info("ids", TensorProto.INT64, ["n", 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", n_out])],
                              [numpy_helper.from_array(table, "table"), numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def test_big_tables_can_take_trellis_coded_quantization(tmp_path):
    """A big tensor rounded without error compensation is offered dependent (trellis-coded)
    quantization; it is chosen here (smaller at equal error), decodes exactly, and meets the target."""
    from cdlcodec.codec import decode_container
    from cdlcodec.fidelity.allocate import tensor_curve

    path = _embedding_model(str(tmp_path / "e.onnx"))
    rng = np.random.default_rng(2)
    np.savez(tmp_path / "c.npz", ids=rng.integers(0, 1024, (48, 12)).astype(np.int64))
    table = onnx.numpy_helper.to_array(onnx.load(path).graph.initializer[0]).astype(np.float64)
    curve = tensor_curve("table", table, None, dependent=True)
    dq = [i for i, c in enumerate(curve.candidates) if c.dependent]
    plain = [i for i, c in enumerate(curve.candidates) if not c.dependent and not c.exact]
    assert dq
    # at equal weight MSE the trellis candidates need fewer bits than rounding (interpolated)
    mse_p, bits_p = curve.mse[plain], curve.bits[plain]
    i = dq[len(dq) // 2]
    assert curve.bits[i] < np.interp(np.log(curve.mse[i]), np.log(mse_p), bits_p)
    out = str(tmp_path / "e.cdl")
    _, report = encode_to_target(read_model(path), out, FidelityOptions(Target("cosine", 0.995), str(tmp_path / "c.npz"),
                                                                        quiet=True))
    assert report.checked >= 0.995 and "trellis" in report.steps["table"]
    with ContainerReader(out) as reader:
        quant = {e.name: e.quant for e in reader.tensors}
    assert quant["table"]["scheme"] == "dependent"
    decoded = {r.name: r.array for r in decode_container(out).records}
    assert np.abs(decoded["table"] - table).max() <= 2 * quant["table"]["step"]


def test_a_kept_decision_keeps_half_its_margin():
    """Not flipping is not enough: a calibration decision that lost more than half its margin says
    held-apart inputs nearer the boundary would flip."""
    from cdlcodec.fidelity.decisions import changed_samples

    kinds = {0: ("argmax", -1)}
    ref = [[np.array([[0.0, 1.0, 0.2]])], [np.array([[3.0, 0.0, 0.0]])]]
    assert changed_samples(ref, [[np.array([[0.0, 0.7, 0.2]])], [np.array([[3.0, 0.0, 0.0]])]], kinds) == 0
    assert changed_samples(ref, [[np.array([[0.0, 0.55, 0.2]])], [np.array([[3.0, 0.0, 0.0]])]], kinds) == 1
    assert changed_samples(ref, [[np.array([[0.0, 1.9, 0.2]])], [np.array([[3.0, 0.0, 0.0]])]], kinds) == 0  # surer
    assert changed_samples(ref, [[np.array([[0.0, 0.5, 0.7]])], [np.array([[3.0, 0.0, 0.0]])]], kinds) == 1  # flipped


def test_margin_shortfall_is_the_worst_lost_share_and_agrees_with_the_check():
    """The search aims at the margin bound with this figure, so it must say what the pass/fail check says."""
    from cdlcodec.fidelity.decisions import changed_samples, margin_shortfall
    from cdlcodec.fidelity.measures import Target
    from cdlcodec.fidelity.search import evaluate

    kinds = {0: ("argmax", -1)}
    ref = [[np.array([[0.0, 1.0, 0.2]])], [np.array([[3.0, 0.0, 0.0]])]]  # margins 0.8 and 3.0
    second = [np.array([[2.4, 0.0, 0.0]])]                                # keeps 80 % of its margin
    cases = [([0.0, 0.7, 0.2], 1 - 0.5 / 0.8, True), ([0.0, 0.55, 0.2], 1 - 0.35 / 0.8, False),
             ([0.0, 1.9, 0.2], 0.2, True),  # surer: the other sample's loss is the worst
             ([0.0, 0.5, 0.7], 1 + 0.2 / 0.8, False)]  # flipped: more than all of it lost
    for first, shortfall, kept in cases:
        dec = [[np.array([first])], second]
        assert margin_shortfall(ref, dec, kinds) == pytest.approx(shortfall)
        assert (changed_samples(ref, dec, kinds) == 0) == kept
        scored = evaluate(Target("cosine", 0.5), kinds, ref, dec)
        assert scored.met == kept
        assert scored.ratio == pytest.approx(shortfall / 0.5, rel=0.05) and (scored.ratio <= 1.0) == kept


def test_only_decisions_a_check_can_read_are_held():
    """A dense sigmoid map decides nothing checkable (some pixel always sits at 0.5); a probability
    per sample, logits and an embedding do."""
    from cdlcodec.fidelity.decisions import MAX_DECISIONS, checkable

    rng = np.random.default_rng(0)
    side = int(np.sqrt(MAX_DECISIONS)) * 2
    reference = [[rng.random((1, 1, side, side)), rng.random((1, 1)), rng.standard_normal((1, 10)),
                  rng.standard_normal((1, 3)) * 5 + 3, rng.standard_normal((1, 32))] for _ in range(4)]
    kinds = {0: ("threshold", 0), 1: ("vector", 0), 2: ("vector", 0), 3: ("vector", 0), 4: ("vector", 0)}
    assert sorted(checkable(kinds, reference)) == [1, 2, 3, 4]
    out_of_range = [[r[0], r[1] + 2.0] for r in reference]  # one value outside [0, 1]: no probability
    assert checkable({1: ("vector", 0)}, out_of_range) == {}
    # a few class probabilities (positive, each row summing to 1) decide by argmax; a few positive
    # values that are no distribution are scores (DNSMOS's MOS) and decide nothing
    probs = [[p / p.sum()] for p in (rng.random((1, 3)) + 0.01 for _ in range(4))]
    assert checkable({0: ("vector", 0)}, probs) == {0: ("vector", 0)}
    scores = [[rng.random((1, 3)) * 3 + 1] for _ in range(4)]
    assert checkable({0: ("vector", 0)}, scores) == {}


def test_near_ties_are_not_promised():
    """A margin under 1 % of the output's median margin is a tie the original model does not decide."""
    from cdlcodec.fidelity.decisions import changed_samples

    kinds = {0: ("threshold", 0)}
    ref = [[np.array([[p]])] for p in (0.9, 0.1, 0.95, 0.501)]
    dec = [[np.array([[p]])] for p in (0.9, 0.1, 0.95, 0.499)]
    assert changed_samples(ref, dec, kinds) == 0
    dec[0] = [np.array([[0.6]])]
    assert changed_samples(ref, dec, kinds) == 1


def test_plain_vector_outputs_are_read_by_width(tmp_path):
    """An output with no softmax/sigmoid: a few values are logits (argmax), one value in [0, 1] is a
    probability (side of 0.5), a wide vector is an embedding (each sample's nearest other sample)."""
    from cdlcodec.fidelity.decisions import changed_samples, decision_kinds

    proto = onnx.load(_mlp(str(tmp_path / "m.onnx")))
    assert decision_kinds(proto) == {0: ("vector", 0)}
    kinds = {0: ("vector", 0)}
    logits = [[np.array([[2.0, 1.0, 0.0]])], [np.array([[0.0, 3.0, 1.0]])]]
    assert changed_samples(logits, [[np.array([[1.0, 2.0, 0.0]])], logits[1]], kinds) == 1
    probs = [[np.array([[0.8]])], [np.array([[0.1]])], [np.array([[0.7]])]]
    assert changed_samples(probs, [[np.array([[0.4]])], probs[1], probs[2]], kinds) == 1
    rng = np.random.default_rng(0)
    base = rng.standard_normal((6, 32))
    emb = [[base[i:i + 1]] for i in range(6)]
    assert changed_samples(emb, [[e[0] * 1.5] for e in emb], kinds) == 0  # scale does not move a cosine
    swapped = [[e[0].copy()] for e in emb]
    swapped[0][0][:] = base[1] + 0.01 * base[0]  # sample 0 now sits on sample 1: every neighbour of 0 and 1 moves
    assert changed_samples(emb, swapped, kinds) >= 2


def test_wide_probability_rows_decide_by_argmax(tmp_path):
    """A softmax spelled out (Exp / sum / Div) over 200 classes gives wide rows that sum to 1: they
    are class probabilities (argmax), not an embedding whose nearest other sample decides; their
    sensitivity is read at the logits under the Exp."""
    from cdlcodec.fidelity.decisions import changed_samples
    from cdlcodec.fidelity.pieces import _squashed_input

    kinds = {0: ("vector", 0)}
    rng = np.random.default_rng(2)
    logits = rng.standard_normal((4, 200)) * 3
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    ref = [[probs[i:i + 1]] for i in range(4)]
    blurred = [[0.95 * probs[i:i + 1] + 0.05 / 200] for i in range(4)]  # every top class keeps 95 % of its lead
    assert changed_samples(ref, blurred, kinds) == 0
    swapped = [[r[0].copy()] for r in ref]  # sample 0's two best classes trade places: its decision changed
    order = np.argsort(probs[0])
    swapped[0][0][0, order[-1]], swapped[0][0][0, order[-2]] = probs[0, order[-2]], probs[0, order[-1]]
    assert changed_samples(ref, swapped, kinds) == 1
    flipped = [[probs[i:i + 1][:, ::-1]] for i in range(4)]
    assert changed_samples(ref, flipped, kinds) == 4
    producers = {"e": helper.make_node("Exp", ["z"], ["e"]), "p": helper.make_node("Div", ["e", "s"], ["p"])}
    assert _squashed_input("p", producers) == "z"


def test_fidelity_encodes_are_the_same_bytes_on_any_thread_count(tmp_path):
    """Tensors are rounded on several threads at once (curves, sensitivities, each plan); the plan and
    the file must not depend on how many."""
    from cdlcodec.codec import EncodeOptions
    from cdlcodec.fidelity.encode import encode_model

    path = _embedding_model(str(tmp_path / "e.onnx"), vocab=512, n_out=24)
    rng = np.random.default_rng(4)
    np.savez(tmp_path / "c.npz", ids=rng.integers(0, 512, (40, 12)).astype(np.int64))
    model = read_model(path)
    files = []
    for threads in (1, 2, 3):
        out = str(tmp_path / f"t{threads}.cdl")
        encode_model(model, out, EncodeOptions(quiet=True, threads=threads), None, str(tmp_path / "c.npz"))
        files.append(open(out, "rb").read())
    assert files[0] == files[1] == files[2]


def test_the_default_is_stricter_where_no_decision_can_be_checked(tmp_path):
    """A raw [batch, boxes, values] head decides nothing a check can read (its threshold is in the
    user's code): the default then holds cosine 0.9999 instead of 0.999, and says so in the file."""
    from cdlcodec.codec import EncodeOptions
    from cdlcodec.fidelity.encode import encode_model

    rng = np.random.default_rng(6)
    w = (rng.standard_normal((16, 6)) / 4).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "head",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 40, 16])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 40, 6])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "head.onnx"))
    np.savez(tmp_path / "c.npz", x=rng.standard_normal((24, 40, 16)).astype(np.float32))
    out = str(tmp_path / "head.cdl")
    _, report = encode_model(read_model(str(tmp_path / "head.onnx")), out, EncodeOptions(quiet=True), None,
                             str(tmp_path / "c.npz"))
    assert report.target.value == 0.9999 and report.checked >= 0.9999
    with ContainerReader(out) as reader:
        assert reader.metadata["fidelity.target"].startswith("cosine >= 0.9999")
    # an explicit target is kept as asked
    _, report = encode_model(read_model(str(tmp_path / "head.onnx")), out + "2", EncodeOptions(quiet=True),
                             ("cosine", 0.999), str(tmp_path / "c.npz"))
    assert report.target.value == 0.999


def _save(graph, path, opset: int = 17) -> str:
    """`graph` as an ONNX model file (IR 8, the default domain at `opset`)."""
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    onnx.save(model, str(path))
    return str(path)


def _cli(capture, *args) -> tuple[int, str]:
    """(exit status, stderr) of `cdlcodec ARGS`; `capture`: capsys, or capfd to see what onnxruntime
    writes to file descriptor 2 itself."""
    from cdlcodec.cli.main import main

    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    return exc.value.code, capture.readouterr().err


def _detector_head(path, seed=7, grid=None):
    """x[n, 40, 16] -> Concat(boxes = (x @ wb) * 300 on the pixel scale, scores = Sigmoid(x @ ws),
    [grid]) along the last axis: a YOLOv8-style head whose class scores are tiny next to its boxes."""
    rng = np.random.default_rng(seed)
    arrays = {"wb": rng.standard_normal((16, 4)) / 4, "ws": rng.standard_normal((16, 6)) / 4,
              "pixels": np.array(300.0)}
    nodes = [helper.make_node("MatMul", ["x", "wb"], ["b0"]), helper.make_node("Mul", ["b0", "pixels"], ["boxes"]),
             helper.make_node("MatMul", ["x", "ws"], ["logits"]), helper.make_node("Sigmoid", ["logits"], ["scores"])]
    pieces = ["boxes", "scores"]
    if grid is not None:  # a constant piece no weight reaches (an anchor grid)
        arrays["grid"] = grid
        nodes.append(helper.make_node("Expand", ["grid", "shape_of_x"], ["anchors"]))
        nodes.insert(0, helper.make_node("Shape", ["x"], ["shape_x"]))
        nodes.insert(1, helper.make_node("Slice", ["shape_x", "s0", "s2"], ["nb"]))
        nodes.insert(2, helper.make_node("Concat", ["nb", "two"], ["shape_of_x"], axis=0))
        arrays.update(s0=np.array([0], np.int64), s2=np.array([2], np.int64), two=np.array([2], np.int64))
        pieces.append("anchors")
    nodes += [helper.make_node("Concat", pieces, ["cat"], axis=2), helper.make_node("Identity", ["cat"], ["out"])]
    inits = [numpy_helper.from_array(a.astype(np.float32) if a.dtype == np.float64 else a, n) for n, a in arrays.items()]
    width = 10 + (0 if grid is None else grid.shape[-1])
    graph = helper.make_graph(nodes, "head", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 40, 16])],
                              [helper.make_tensor_value_info("out", TensorProto.FLOAT, ["n", 40, width])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def test_outputs_concatenated_from_pieces_are_measured_piece_by_piece(tmp_path):
    from cdlcodec.fidelity.pieces import output_parts

    from cdlcodec.io.onnx_model import stripped_graph

    grid = np.random.default_rng(0).standard_normal((40, 2)).astype(np.float32)
    parts = output_parts(stripped_graph(read_model(_detector_head(str(tmp_path / "h.onnx"), grid=grid))))
    # the constant anchor grid is left out; the sigmoid piece's sensitivity is read at its logits
    assert parts.pieced == {0: ["boxes", "scores"]}
    assert [parts.probes[k - 1] for k in parts.measured] == ["boxes", "scores"]
    assert [parts.probes[k - 1] for k in parts.distortion] == ["boxes", "logits"]
    # a plain output is measured as it is
    plain = output_parts(stripped_graph(read_model(_mlp(str(tmp_path / "m.onnx")))))
    assert plain.pieced == {} and plain.measured == [0] and plain.probes == []


def test_small_pieces_of_a_concatenated_output_keep_the_target(tmp_path):
    """The boxes (hundreds of pixels) would hide the class scores from a cosine of the whole output:
    measured by pieces, the decoded scores themselves keep the default's cosine."""
    import onnxruntime as ort

    from cdlcodec.codec import EncodeOptions, decode_container
    from cdlcodec.fidelity.encode import encode_model
    from cdlcodec.fidelity.measures import cosine
    from cdlcodec.io.onnx_writer import build_onnx

    path = _detector_head(str(tmp_path / "head.onnx"))
    x = np.random.default_rng(3).standard_normal((24, 40, 16)).astype(np.float32)
    np.savez(tmp_path / "c.npz", x=x)
    out = str(tmp_path / "head.cdl")
    _, report = encode_model(read_model(path), out, EncodeOptions(quiet=True), None, str(tmp_path / "c.npz"))
    assert report.target.value == 0.9999

    def scores(proto_bytes):
        session = ort.InferenceSession(proto_bytes, providers=["CPUExecutionProvider"])
        return [[session.run(None, {"x": x[i:i + 1]})[0][..., 4:]] for i in range(len(x))]

    original = scores(open(path, "rb").read())
    decoded = scores(build_onnx(decode_container(out), weights="float").SerializeToString())
    assert cosine(original, decoded) >= 0.9999
    assert cosine(original, decoded) < 1.0  # the scores' weights were quantized, not stored exactly


def _one_hot_classifier(path, seed=8):
    """bytes[n, 12] (int32) -> Equal(bytes, 0..15) one-hot -> MatMul -> logits: an integer input that
    indexes no table (Magika's file-type model reads its bytes like this)."""
    rng = np.random.default_rng(seed)
    inits = [numpy_helper.from_array(np.arange(16, dtype=np.int32).reshape(1, 1, 16), "symbols"),
             numpy_helper.from_array(np.array([-1, 12 * 16], np.int64), "flat"),
             numpy_helper.from_array((rng.standard_normal((12 * 16, 5)) / 8).astype(np.float32), "w")]
    nodes = [helper.make_node("Unsqueeze", ["bytes", "axis2"], ["b3"]),
             helper.make_node("Equal", ["b3", "symbols"], ["hot"]),
             helper.make_node("Cast", ["hot"], ["hotf"], to=TensorProto.FLOAT),
             helper.make_node("Reshape", ["hotf", "flat"], ["x"]),
             helper.make_node("MatMul", ["x", "w"], ["logits"])]
    inits.append(numpy_helper.from_array(np.array([2], np.int64), "axis2"))
    graph = helper.make_graph(nodes, "onehot", [helper.make_tensor_value_info("bytes", TensorProto.INT32, ["n", 12])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def test_without_inputs_to_vary_the_default_is_data_free_and_says_so(tmp_path, capsys):
    """Integers that index no table are generated as zeros: every generated sample would be the same
    input, so the encoder does not pretend to check on them."""
    path = _one_hot_classifier(str(tmp_path / "onehot.onnx"))
    out = str(tmp_path / "onehot.cdl")
    code, err = _cli(capsys, "encode", path, "-o", out)
    assert code == 0, err
    assert "no graph input can be generated at random" in err and "give --calibration" in err
    with ContainerReader(out) as reader:
        assert "fidelity.target" not in reader.metadata
        (w,) = [e for e in reader.tensors if e.name == "w"]
        assert w.encoding == "levels"
    # an explicit target cannot be checked on one point: a clean error, nothing written
    code, err = _cli(capsys, "encode", path, "-o", out + "2", "--target-cosine", "0.99")
    assert code != 0 and "cdlcodec: error:" in err and "give --calibration" in err
    assert not (tmp_path / "onehot.cdl2").exists()
    # with calibration data the search runs as usual
    np.savez(tmp_path / "c.npz", bytes=np.random.default_rng(0).integers(0, 16, (24, 12)).astype(np.int32))
    code, err = _cli(capsys, "encode", path, "-o", out + "3", "--calibration", tmp_path / "c.npz")
    assert code == 0, err
    with ContainerReader(out + "3") as reader:
        assert reader.metadata["fidelity.target"].startswith("cosine >= 0.999")


def test_float16_models_with_squashed_outputs_encode_by_default(tmp_path):
    """The logits under a float16 softmax are fetched as an extra output: declared as float32 they made
    onnxruntime refuse the graph ("Type Error ... does not match expected type (tensor(float16))")."""
    from cdlcodec.codec import EncodeOptions
    from cdlcodec.fidelity.encode import encode_model

    rng = np.random.default_rng(4)
    w = (rng.standard_normal((32, 10)) / 6).astype(np.float16)
    nodes = [helper.make_node("MatMul", ["x", "w"], ["z"]), helper.make_node("Softmax", ["z"], ["p"], axis=-1)]
    graph = helper.make_graph(nodes, "fp16", [helper.make_tensor_value_info("x", TensorProto.FLOAT16, ["n", 32])],
                              [helper.make_tensor_value_info("p", TensorProto.FLOAT16, ["n", 10])],
                              [numpy_helper.from_array(w, "w")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, str(tmp_path / "fp16.onnx"))
    _, report = encode_model(read_model(str(tmp_path / "fp16.onnx")), str(tmp_path / "fp16.cdl"),
                             EncodeOptions(quiet=True), None)
    assert report.checked >= 0.999


def test_a_model_that_cannot_run_on_generated_inputs_gets_the_data_free_default(tmp_path, capfd):
    """An audio model declared [n, samples] runs a 400-sample convolution: 32 generated samples cannot
    pass it. Without calibration data the default then says why and uses the data-free rule; an
    explicit target is a clean error asking for calibration data; onnxruntime's own log stays quiet."""
    rng = np.random.default_rng(9)
    inits = [numpy_helper.from_array((rng.standard_normal((8, 1, 400)) / 20).astype(np.float32), "w"),
             numpy_helper.from_array((rng.standard_normal((8, 4)) / 4).astype(np.float32), "w2"),
             numpy_helper.from_array(np.array([1], np.int64), "one"), numpy_helper.from_array(np.array([2], np.int64), "two")]
    nodes = [helper.make_node("Unsqueeze", ["audio", "one"], ["a3"]), helper.make_node("Conv", ["a3", "w"], ["c"], strides=[160]),
             helper.make_node("ReduceMean", ["c", "two"], ["m"], keepdims=0), helper.make_node("MatMul", ["m", "w2"], ["y"])]
    graph = helper.make_graph(nodes, "audio", [helper.make_tensor_value_info("audio", TensorProto.FLOAT, ["n", "samples"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 4])], inits)
    path = _save(graph, tmp_path / "audio.onnx", opset=18)
    code, err = _cli(capfd, "encode", path, "-o", tmp_path / "a.cdl")
    assert code == 0, err
    assert "does not run on inputs generated from its declared shapes" in err and "data-free default" in err
    assert "[E:onnxruntime" not in err
    with ContainerReader(str(tmp_path / "a.cdl")) as reader:
        assert "fidelity.target" not in reader.metadata
    code, err = _cli(capfd, "encode", path, "-o", tmp_path / "b.cdl", "--target-cosine", "0.99")
    assert code == 2 and "cdlcodec: error: cannot check a fidelity target" in err and "--calibration" in err
    assert not (tmp_path / "b.cdl").exists()
    np.savez(tmp_path / "c.npz", audio=rng.standard_normal((24, 1600)).astype(np.float32))
    code, err = _cli(capfd, "encode", path, "-o", tmp_path / "c.cdl", "--calibration", tmp_path / "c.npz")
    assert code == 0, err
    with ContainerReader(str(tmp_path / "c.cdl")) as reader:
        assert reader.metadata["fidelity.target"].startswith("cosine >= 0.999")


def test_outputs_alike_on_every_generated_input_mean_nothing_was_checked(tmp_path, capsys):
    """A front end whose generated inputs are too short for one frame returns the same (empty) features
    for all of them: "cosine 1" there is no check, so the default falls back and says so."""
    from cdlcodec.fidelity.inputs import outputs_alike

    assert outputs_alike([[np.zeros(3)], [np.zeros(3)]]) and not outputs_alike([[np.zeros(3)], [np.ones(3)]])
    rng = np.random.default_rng(10)
    inits = [numpy_helper.from_array((rng.standard_normal((16, 8)) / 4).astype(np.float32), "w"),
             numpy_helper.from_array(np.array([100], np.int64), "start"),
             numpy_helper.from_array(np.array([400], np.int64), "stop"),
             numpy_helper.from_array(np.array([1], np.int64), "axis")]
    # samples 100..400 of each frame row, then mean over them: nothing of a 32-sample input is left
    nodes = [helper.make_node("Slice", ["x", "start", "stop", "axis"], ["frame"]),
             helper.make_node("ReduceSum", ["frame"], ["energy"], keepdims=1),
             helper.make_node("Expand", ["energy", "shape16"], ["e16"]),
             helper.make_node("MatMul", ["e16", "w"], ["y"])]
    inits.append(numpy_helper.from_array(np.array([1, 16], np.int64), "shape16"))
    graph = helper.make_graph(nodes, "frames", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", "samples"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 8])], inits)
    path = _save(graph, tmp_path / "frames.onnx")
    code, err = _cli(capsys, "encode", path, "-o", str(tmp_path / "f.cdl"))
    assert code == 0, err
    assert "outputs are the same for every generated input" in err and "data-free default" in err
    with ContainerReader(str(tmp_path / "f.cdl")) as reader:
        assert "fidelity.target" not in reader.metadata


def test_onnxruntime_fused_ops_carry_weights(tmp_path):
    """Files saved after onnxruntime's graph optimizations hold com.microsoft FusedConv / FusedMatMul
    nodes: their kernels are weights (quantized, per output channel), not precision tensors."""
    from cdlcodec.codec import EncodeOptions
    from cdlcodec.fidelity.encode import encode_model
    from cdlcodec.io.onnx_model import stripped_graph

    rng = np.random.default_rng(11)
    inits = [numpy_helper.from_array((rng.standard_normal((8, 3, 3, 3)) / 4).astype(np.float32), "k"),
             numpy_helper.from_array((rng.standard_normal(8) / 10).astype(np.float32), "kb"),
             numpy_helper.from_array((rng.standard_normal((5, 8)) / 3).astype(np.float32), "m")]
    nodes = [helper.make_node("FusedConv", ["x", "k", "kb"], ["c"], domain="com.microsoft", activation="Relu",
                              pads=[1, 1, 1, 1]),
             helper.make_node("ReduceMean", ["c"], ["p"], axes=[2, 3], keepdims=0),
             helper.make_node("FusedMatMul", ["p", "m"], ["y"], domain="com.microsoft", transB=1, alpha=1.0)]
    graph = helper.make_graph(nodes, "fused", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 12, 12])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 5])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)])
    model.ir_version = 8
    path = str(tmp_path / "fused.onnx")
    onnx.save(model, path)
    stripped = stripped_graph(read_model(path))
    assert graph_roles(stripped) == {"k": "weight", "kb": "precision", "m": "weight"}
    assert output_axes(stripped) == {"k": 0, "m": 0}
    np.savez(tmp_path / "c.npz", x=rng.standard_normal((24, 3, 12, 12)).astype(np.float32))
    out = str(tmp_path / "fused.cdl")
    _, report = encode_model(read_model(path), out, EncodeOptions(quiet=True), None, str(tmp_path / "c.npz"))
    assert report.checked >= 0.999
    with ContainerReader(out) as reader:
        coded = {e.name: e.encoding for e in reader.tensors}
    assert coded["k"] == "levels" and coded["m"] == "levels" and coded["kb"] == "plain"


def test_the_scorer_of_eval_and_search_measures_the_same_pieces(tmp_path):
    """`cdlcodec eval --onnx` / `search --onnx` score like the encoder: the class scores of a
    concatenated head count on their own, so spoiling them is not hidden by the pixel-scale boxes."""
    from cdlcodec.fidelity.scorer import OnnxScorer
    from cdlcodec.records import ModelFile, TensorRecord

    path = _detector_head(str(tmp_path / "head.onnx"))
    np.savez(tmp_path / "c.npz", x=np.random.default_rng(5).standard_normal((8, 40, 16)).astype(np.float32))
    scorer = OnnxScorer.from_files(path, str(tmp_path / "c.npz"), "cosine")
    model = scorer.model
    assert scorer.score(model) == pytest.approx(1.0)
    spoiled = ModelFile([TensorRecord(r.name, -np.asarray(r.array), r.dtype) if r.name == "ws" else r
                         for r in model.records], model.sections, model.metadata)
    # the boxes (one piece) are untouched, the scores' logits flipped: the mean over the two pieces
    # drops far below what the whole output's cosine (dominated by the boxes) would show
    assert scorer.score(spoiled) < 0.9


def test_a_graph_with_nothing_to_quantize_is_stored_exactly(tmp_path, capsys):
    """Only tensors too small to quantize: the default writes every tensor exactly and says so
    (it used to fail with "no weights to quantize")."""
    from cdlcodec.codec import decode_container

    w, b = np.arange(6, dtype=np.float32).reshape(3, 2) / 7, np.ones(2, np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["h"]), helper.make_node("Add", ["h", "b"], ["y"])],
                              "tiny", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 2])],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(b, "b")])
    path = _save(graph, tmp_path / "tiny.onnx")
    for args in ([], ["--target-cosine", "0.99"]):
        code, err = _cli(capsys, "encode", path, "-o", tmp_path / "t.cdl", *args)
        assert code == 0, err
        assert "every tensor was stored exactly" in err and "unverified" not in err
        decoded = {r.name: np.asarray(r.array) for r in decode_container(str(tmp_path / "t.cdl")).records}
        assert np.array_equal(decoded["w"], w) and np.array_equal(decoded["b"], b)
        (tmp_path / "t.cdl").unlink()


def test_a_graph_input_without_a_shape_gets_the_data_free_default(tmp_path, capsys):
    x = onnx.ValueInfoProto()
    x.name = "x"
    x.type.tensor_type.elem_type = TensorProto.FLOAT  # no shape declared
    w = np.random.default_rng(12).standard_normal((32, 8)).astype(np.float32)
    graph = helper.make_graph([helper.make_node("MatMul", ["x", "w"], ["y"])], "noshape", [x],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [numpy_helper.from_array(w, "w")])
    path = _save(graph, tmp_path / "noshape.onnx")
    code, err = _cli(capsys, "encode", path, "-o", str(tmp_path / "a.cdl"))
    assert code == 0 and "declares no shape" in err and "data-free default" in err
    code, err = _cli(capsys, "encode", path, "-o", str(tmp_path / "b.cdl"), "--target-cosine", "0.99")
    assert code == 2 and "declares no shape" in err and "--calibration" in err
    assert not (tmp_path / "b.cdl").exists()


def test_sensitivity_samples_stop_once_the_outputs_hold_enough_values():
    from cdlcodec.fidelity.search import MIN_SENSITIVITY_SAMPLES, SENSITIVITY_SAMPLES, sensitivity_samples

    def sample(*shapes):
        return [[np.zeros(s, np.float32) for s in shapes]]

    assert sensitivity_samples(sample((1, 10))) == SENSITIVITY_SAMPLES           # a classifier: every sample
    assert sensitivity_samples(sample((1, 3549, 6))) == SENSITIVITY_SAMPLES      # 21k values per sample
    assert sensitivity_samples(sample((1, 1, 384, 512))) == 6                    # 196,608 values: 6 hold 1 M
    assert sensitivity_samples(sample((1, 7600, 10), (1, 7600, 32))) == MIN_SENSITIVITY_SAMPLES
    assert sensitivity_samples([]) == SENSITIVITY_SAMPLES


def test_big_output_maps_measure_sensitivity_on_fewer_samples(tmp_path, capsys):
    """A convolution whose output map holds 256k values per sample: the sensitivity phase (one model run
    per tensor) runs 4 samples, not 16; the file still meets the default and decodes to the same bytes
    on a second encode (the count comes from the outputs, not from timing)."""
    rng = np.random.default_rng(11)
    w1 = (rng.standard_normal((8, 3, 3, 3)) / 4).astype(np.float32)
    w2 = (rng.standard_normal((4, 8, 3, 3)) / 8).astype(np.float32)
    graph = helper.make_graph(
        [helper.make_node("Conv", ["x", "w1"], ["h"], pads=[1, 1, 1, 1]), helper.make_node("Relu", ["h"], ["r"]),
         helper.make_node("Conv", ["r", "w2"], ["y"], pads=[1, 1, 1, 1])], "map",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 256, 256])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4, 256, 256])],
        [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    path = _save(graph, tmp_path / "map.onnx")
    code, err = _cli(capsys, "encode", path, "-o", tmp_path / "a.cdl")
    assert code == 0, err
    assert "measuring the output sensitivity of 2 tensors on 4 samples" in err
    with ContainerReader(str(tmp_path / "a.cdl")) as reader:
        assert reader.metadata["fidelity.target"].startswith("cosine >= 0.9999")
        assert float(reader.metadata["fidelity.achieved"]) >= 0.9999
    code, err = _cli(capsys, "encode", path, "-o", tmp_path / "b.cdl")
    assert code == 0, err
    assert (tmp_path / "a.cdl").read_bytes() == (tmp_path / "b.cdl").read_bytes()


def test_positive_scores_are_no_logits(tmp_path):
    """DNSMOS (speechmos) returns [batch, 3] quality scores, raw 1-4: read as logits, the default held
    only the order of the three scores in each sample and lowered its target to cosine 0.999, and
    the MOS moved by up to 0.22 on real clips. A narrow output positive on every sample decides
    nothing: the default holds cosine 0.9999; one with a value <= 0 is still a classifier's logits."""
    from cdlcodec.codec import EncodeOptions
    from cdlcodec.fidelity.decisions import changed_samples, checkable
    from cdlcodec.fidelity.encode import encode_model

    kinds = {0: ("vector", 0)}
    scores = [[np.array([[3.1, 2.9, 3.0]])], [np.array([[1.2, 1.5, 1.1]])], [np.array([[2.0, 2.2, 2.1]])]]
    assert checkable(kinds, scores) == {}
    logits = [[np.array([[3.1, -0.4, 1.0]])], scores[1], scores[2]]
    assert checkable(kinds, logits) == kinds
    assert changed_samples(logits, [[np.array([[-0.5, 3.1, 1.0]])], scores[1], scores[2]], kinds) == 1

    proto = onnx.load(_mlp(str(tmp_path / "m.onnx"), n_out=3))
    proto.graph.node.append(helper.make_node("Add", ["logits", "offset"], ["scores"]))
    proto.graph.initializer.append(numpy_helper.from_array(np.full(3, 3.0, np.float32), "offset"))
    proto.graph.output[0].name = "scores"
    onnx.save(proto, str(tmp_path / "scores.onnx"))
    out = str(tmp_path / "scores.cdl")
    _, report = encode_model(read_model(str(tmp_path / "scores.onnx")), out, EncodeOptions(quiet=True), None, None)
    assert report.target.value == 0.9999 and report.checked >= 0.9999  # 0.999, "same decisions" before
    with ContainerReader(out) as reader:
        assert reader.metadata["fidelity.target"].startswith("cosine >= 0.9999")
