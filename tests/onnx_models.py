"""Tiny ONNX models built with onnx.helper, shared by the tests that run graphs."""
from __future__ import annotations

import numpy as np


def mlp(path, seed=0, n_in=32, hidden=64, n_out=10, outlier=False):
    """x -> MatMul(W1) + b1 -> Relu -> Gemm(W2ᵀ, b2, transB) -> LayerNorm-like Mul(scale) -> logits."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    w1 = (rng.standard_normal((n_in, hidden)) / np.sqrt(n_in)).astype(np.float32)
    if outlier:
        w1[0, 0] = 40.0 * float(w1.std())
    b1 = (rng.standard_normal(hidden) * 0.1).astype(np.float32)
    w2 = (rng.standard_normal((n_out, hidden)) / np.sqrt(hidden)).astype(np.float32)
    b2 = (rng.standard_normal(n_out) * 0.1).astype(np.float32)
    scale = (1 + 0.1 * rng.standard_normal(n_out)).astype(np.float32)
    nodes = [
        helper.make_node("MatMul", ["x", "w1"], ["h0"]),
        helper.make_node("Add", ["h0", "b1"], ["h1"]),
        helper.make_node("Relu", ["h1"], ["h2"]),
        helper.make_node("Gemm", ["h2", "w2", "b2"], ["y0"], transB=1),
        helper.make_node("Mul", ["y0", "scale"], ["logits"]),
    ]
    inits = [numpy_helper.from_array(a, n) for a, n in ((w1, "w1"), (b1, "b1"), (w2, "w2"), (b2, "b2"), (scale, "scale"))]
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", n_in])],
                              [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["n", n_out])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.save(model, path)
    return path


def lstm_gemm(path, seed=0, n_in=8, hidden=16, n_out=12, opset=12):
    """x[T, N, n_in] -> bidirectional LSTM -> Gemm(transB) -> y[T, N, n_out], shaped like ddddocr's OCR
    recogniser, including its flaw: the output is declared [T, N] (rank 2) while the graph computes rank 3.
    Reshape's shape inference before opset 14 cannot see that; after an upgrade the full checker does."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(seed)
    h4 = 4 * hidden
    arrays = {
        "lstm_W": rng.standard_normal((2, h4, n_in)) / np.sqrt(n_in),
        "lstm_R": rng.standard_normal((2, h4, hidden)) / np.sqrt(hidden),
        "lstm_B": rng.standard_normal((2, 2 * h4)) * 0.1,
        "fc_W": rng.standard_normal((n_out, 2 * hidden)) / np.sqrt(2 * hidden),
        "fc_B": rng.standard_normal(n_out) * 0.1,
    }
    inits = [numpy_helper.from_array(a.astype(np.float32), n) for n, a in arrays.items()]
    inits += [numpy_helper.from_array(np.array([-1, 2 * hidden], np.int64), "rows_shape"),
              numpy_helper.from_array(np.array([-1], np.int64), "minus_one"),
              numpy_helper.from_array(np.array(0, np.int64), "i0"),
              numpy_helper.from_array(np.array(1, np.int64), "i1")]
    nodes = [
        helper.make_node("LSTM", ["x", "lstm_W", "lstm_R", "lstm_B"], ["Y"], hidden_size=hidden,
                         direction="bidirectional"),
        helper.make_node("Transpose", ["Y"], ["Yt"], perm=[0, 2, 1, 3]),     # [T, N, 2, H]
        helper.make_node("Reshape", ["Yt", "rows_shape"], ["rows"]),            # [T*N, 2H]
        helper.make_node("Gemm", ["rows", "fc_W", "fc_B"], ["logits2d"], transB=1),
        helper.make_node("Shape", ["x"], ["xs"]),
        helper.make_node("Gather", ["xs", "i0"], ["t"]), helper.make_node("Gather", ["xs", "i1"], ["n"]),
        helper.make_node("Unsqueeze", ["t"], ["t1"], axes=[0]), helper.make_node("Unsqueeze", ["n"], ["n1"], axes=[0]),
        helper.make_node("Concat", ["t1", "n1", "minus_one"], ["out_shape"], axis=0),
        helper.make_node("Reshape", ["logits2d", "out_shape"], ["y"]),
    ]
    graph = helper.make_graph(nodes, "lstm_gemm",
                              [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["T", "N", n_in])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["T", "N"])], inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 7
    onnx.checker.check_model(model, full_check=True)  # passes at opset 12 despite the declared rank
    onnx.save(model, path)
    return path
