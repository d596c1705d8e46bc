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
