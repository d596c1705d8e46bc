"""CDL / R-CDL (and FP) LeNet-5 checkpoints -> .cdl -> torch, ONNX float and ONNX QDQ.

Every decode must reproduce the checkpoint's eval mode: torch exactly; ONNX the same prediction on
all but one of the 1,000 bundled MNIST test images, logits within 1e-4 on 99 % of them (float32
summation order may move an activation across a quantizer's rounding boundary). The ONNX graph of a CDL container is the float
architecture exported at encode time; the activation quantizers are inserted by the ONNX writer.
"""
from __future__ import annotations

import json

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import helper, numpy_helper

import cdlcodec
from cdlcodec.cli.main import main as cli_main
from cdlcodec.codec import decode_container
from cdlcodec.data.mnist import load_mnist_5k
from cdlcodec.io.onnx_writer import build_onnx
from cdlcodec.models import build
from cdlcodec.records import ModelFile

MODES = ("fp", "cdl", "rcdl")


def cli(*args) -> int:
    with pytest.raises(SystemExit) as exit_info:
        cli_main([str(a) for a in args])
    return exit_info.value.code


def exact_session(path_or_bytes) -> ort.InferenceSession:
    """onnxruntime as docs/decoders.md recommends for quantized-activation models: its QDQ graph
    transformers re-quantize float weights/biases next to a DequantizeLinear (int8 / int32), which
    moves outputs by more than an activation step; "session.disable_quant_qdq" keeps the model exact."""
    so = ort.SessionOptions()
    so.add_session_config_entry("session.disable_quant_qdq", "1")
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
    return ort.InferenceSession(str(path_or_bytes) if not isinstance(path_or_bytes, bytes) else path_or_bytes,
                                so, providers=["CPUExecutionProvider"])


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """FP LeNet-5 (one epoch), CDL and R-CDL fine-tuned from it for four steps, each encoded with the CLI."""
    from cdlcodec.cdl.checkpoint import cdl_state_dict
    from cdlcodec.cdl.train import TrainConfig, train_model
    from cdlcodec.training import train_classifier

    root = tmp_path_factory.mktemp("cdl_decode")
    (x_train, y_train), (x_test, y_test) = load_mnist_5k()
    torch.manual_seed(0)
    fp = train_classifier(build("lenet5"), x_train, y_train, epochs=1, lr=3e-3, quiet=True)
    states = {"fp": {k: v.detach().clone() for k, v in fp.state_dict().items()}}
    for mode in ("cdl", "rcdl"):
        torch.manual_seed(0)
        model = build("lenet5")
        model.load_state_dict(fp.state_dict())
        config = TrainConfig(mode=mode, bits=4, first_last_bits=8, epochs=1, batch_size=64, quiet=True)
        result = train_model(model, x_train[:256], y_train[:256], x_test[:64], y_test[:64], config)
        states[mode] = cdl_state_dict(result.model, architecture="lenet5", bits=4, first_last_bits=8)
    for mode, state in states.items():
        torch.save(state, root / f"{mode}.pt")
        arch = ("--arch", "lenet5") if mode == "fp" else ()
        assert cli("encode", root / f"{mode}.pt", "-o", root / f"{mode}.cdl", *arch, "-q") == 0
    return root, states, np.ascontiguousarray(x_test, dtype=np.float32), np.asarray(y_test)


def reference_logits(mode, state, root, x):
    """The checkpoint's eval-mode outputs (FP: the decoded, quantized state_dict in LeNet-5)."""
    if mode == "fp":
        assert cli("decode", root / "fp.cdl", "-o", root / "fp_back.pt", "-q") == 0
        model = build("lenet5")
        model.load_state_dict(torch.load(root / "fp_back.pt", weights_only=True), strict=True)
    else:
        from cdlcodec.cdl.checkpoint import build_model_from_checkpoint

        model = build_model_from_checkpoint(state)
    with torch.no_grad():
        return model.eval()(torch.from_numpy(x)).numpy()


@pytest.mark.parametrize("mode", MODES)
def test_torch_onnx_float_and_qdq_reproduce_eval_mode(checkpoints, mode):
    root, states, x, y = checkpoints
    container = root / f"{mode}.cdl"
    ref = reference_logits(mode, states[mode], root, x)
    assert (ref.argmax(1) == y).mean() > 0.5  # a model that discriminates, so agreement means something

    module = cdlcodec.load(str(container))
    with torch.no_grad():
        assert np.array_equal(module(torch.from_numpy(x)).numpy(), ref)

    for weights in ("float", "qdq"):
        path = root / f"{mode}_{weights}.onnx"
        assert cli("decode", container, "-o", path, "--weights", weights, "-q") == 0
        onnx.checker.check_model(onnx.load(str(path)), full_check=True)
        out = exact_session(path).run(None, {"input": x})[0]
        # Same arithmetic up to float32 summation order in Conv/Gemm: logits within 1e-4 unless such a
        # difference moves one activation across a CDL quantizer's rounding boundary (then by about a
        # step; whether any does depends on the trained steps and the onnxruntime build), so asked of
        # all but 1 % of the rows; the predictions of all but one image.
        close_rows = (np.abs(out - ref) < 1e-4).all(axis=1)
        assert close_rows.mean() >= 0.99, (mode, weights, close_rows.mean())
        assert (out.argmax(1) != ref.argmax(1)).sum() <= 1, (mode, weights)


@pytest.mark.parametrize("mode", ("cdl", "rcdl"))
def test_cdl_graph_has_activation_quantizers_where_the_relus_were(checkpoints, mode, tmp_path):
    from cdlcodec.cdl_format import read_cdl_metadata

    root, states, _, _ = checkpoints
    meta = read_cdl_metadata(states[mode])
    decoded = decode_container(str(root / f"{mode}.cdl"))
    assert {name for name, _, _ in decoded.sections} == {"model.onnx", "cdl.activations"}
    assert decoded.metadata["graph"] == "onnx" and decoded.metadata["architecture"] == "lenet5"
    assert decoded.metadata["cdl.mode"] == mode
    # the stored graph references only the float architecture's tensors, never q/alpha/s/beta
    graph = onnx.load_from_string(next(data for name, _, data in decoded.sections if name == "model.onnx"))
    refs = {t.external_data[0].value for t in graph.graph.initializer if t.data_location == 1}
    assert refs == {f"cdl:{k}" for k in build("lenet5").state_dict()}

    # its own QDQ decode: this test must not depend on the one above having run first
    assert cli("decode", root / f"{mode}.cdl", "-o", tmp_path / "qdq.onnx", "--weights", "qdq", "-q") == 0
    proto = onnx.load(str(tmp_path / "qdq.onnx"))
    producer = {out: node for node in proto.graph.node for out in node.output}
    inits = {t.name: numpy_helper.to_array(t) for t in proto.graph.initializer}
    quantize = [n for n in proto.graph.node if n.op_type == "QuantizeLinear"]
    assert len(quantize) == len(meta.activations)
    for node, act in zip(quantize, meta.activations):
        relu = producer[node.input[0]]
        assert relu.op_type == "Relu" and relu.name == f"/{act.module}/Relu"
        assert inits[node.input[1]] == np.float32(act.s)
        clip = next(n for n in proto.graph.node if n.input and n.input[0] == node.output[0])
        assert clip.op_type == "Clip" and int(inits[clip.input[2]]) == (1 << act.bits) - 1
    # weights: int4 for the 4-bit layers, int8 for the 8-bit first and last layers
    kinds = {t.name.split("_quantized")[0]: t.data_type for t in proto.graph.initializer if "_quantized" in t.name}
    expect = {w.weight: onnx.TensorProto.INT4 if w.bits == 4 else onnx.TensorProto.INT8 for w in meta.weights}
    assert kinds == expect
    # --arch is for plain state_dicts: a CDL checkpoint is refused with a clean error, not a traceback
    assert cli("encode", root / f"{mode}.pt", "-o", root / "again.cdl", "--arch", "lenet5", "-q") == 2


def test_activation_chain_rounds_like_the_cdl_activation_quantizer():
    """QuantizeLinear -> Clip -> DequantizeLinear == ActivationQuantizer eval, ties and clipping included."""
    from cdlcodec.cdl.layers import ActivationQuantizer

    nodes = [helper.make_node("Relu", ["x"], ["r"], name="/act/Relu"),
             helper.make_node("Identity", ["r"], ["y"], name="/out/Identity")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N"])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N"])])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    for bits, s in ((3, 0.5), (8, 0.1)):
        section = json.dumps({"version": 1, "activations": [{"module": "act", "s": s, "bits": bits}]}).encode()
        proto = build_onnx(ModelFile([], [("model.onnx", "onnx", model.SerializeToString()),
                                          ("cdl.activations", "json", section)], {}))
        # exact halves of the step (ties: half to even), negatives, values past the top level
        x = np.concatenate([np.arange(-4, 600, dtype=np.float32) * np.float32(s) / 2,
                            np.random.default_rng(0).uniform(-1, 40, 2000).astype(np.float32)])
        got = exact_session(proto.SerializeToString()).run(None, {"x": x})[0]
        quantizer = ActivationQuantizer(bits)
        with torch.no_grad():
            quantizer.s.fill_(s)
            want = quantizer.eval()(torch.from_numpy(x)).numpy()
        assert np.array_equal(got, want), bits
