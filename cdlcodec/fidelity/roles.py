"""What each stored tensor is for, read from the graph: the op that consumes it and in which slot.

Shape alone misleads: an LSTM bias `B` is [2, 8·hidden] and a fixed transform basis looks like any
convolution kernel. Roles decide what the encoder may quantize:
- "weight": the multiplicative operand of Conv/ConvTranspose (input 1), Gemm (A or B), MatMul (either
  side), LSTM/GRU/RNN (W and R), Einsum operands, and onnxruntime's fused versions of these
  (com.microsoft FusedConv, FusedMatMul, ...) — quantized;
- "embedding": the table of a Gather — quantized (only the looked-up rows reach the output);
- "precision": biases (Conv/Gemm C/LSTM B), normalisation scales and shifts, anything consumed by
  elementwise arithmetic, shape, or another op — kept exact (they are small and sensitive).
A tensor used in several places takes the most conservative role.
"""
from __future__ import annotations

WEIGHT_SLOTS = {
    "Conv": (1,), "ConvTranspose": (1,), "Gemm": (0, 1), "MatMul": (0, 1), "LSTM": (1, 2), "GRU": (1, 2),
    "RNN": (1, 2), "Einsum": tuple(range(8)), "ConvInteger": (1,), "MatMulInteger": (1,),
}
# onnxruntime's own fused ops (domain com.microsoft), found in files saved after its graph optimizations:
# an ORT-optimized MobileNetV2 has 35 FusedConv nodes, whose kernels were all stored exactly (19.1 bits/param).
CONTRIB_WEIGHT_SLOTS = {"FusedConv": (1,), "NhwcConv": (1,), "FusedMatMul": (0, 1), "FusedGemm": (0, 1),
                        "Attention": (1,)}
EMBEDDING_SLOTS = {"Gather": (0,)}
_RANK = {"precision": 0, "embedding": 1, "weight": 2}


PASS_THROUGH = {"Transpose", "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity", "Cast", "Slice", "Split",
                "Concat", "Expand", "Tile"}


def graph_roles(stripped_proto) -> dict[str, str]:
    """Record name -> role for every tensor the container stores that the graph consumes.

    Layout-only ops (Transpose, Slice, Reshape, ...) are followed to the op that finally uses the
    values, so the slices of an unrolled LSTM's weights are weights and its bias slices stay exact.
    """
    from ..io.onnx_model import iter_graphs, reference_of

    refs: dict[str, str] = {}
    consumers: dict[str, list] = {}
    for graph, _ in iter_graphs(stripped_proto.graph):
        for init in graph.initializer:
            ref = reference_of(init)
            if ref is not None:
                refs[init.name] = ref
        for node in graph.node:
            if node.op_type == "Constant":
                for attr in node.attribute:
                    if attr.name == "value" and attr.HasField("t") and reference_of(attr.t) is not None:
                        refs[node.output[0]] = reference_of(attr.t)
            for slot, value in enumerate(node.input):
                consumers.setdefault(value, []).append((node, slot))
    outputs = {o.name for o in stripped_proto.graph.output}
    memo: dict[str, str | None] = {}

    def role_of_value(value: str, depth: int = 0) -> str | None:
        if value in memo:
            return memo[value]
        memo[value] = "precision"  # a cycle or a deep chain: the safe answer
        if depth > 64:
            return "precision"
        found = ["precision"] if value in outputs else []
        for node, slot in consumers.get(value, ()):
            standard = node.domain in ("", "ai.onnx")
            if standard and node.op_type in PASS_THROUGH and (slot == 0 or node.op_type == "Concat"):
                found += [r for r in (role_of_value(o, depth + 1) for o in node.output if o) if r]
            elif standard and slot in WEIGHT_SLOTS.get(node.op_type, ()):
                found.append("weight")
            elif node.domain == "com.microsoft" and slot in CONTRIB_WEIGHT_SLOTS.get(node.op_type, ()):
                found.append("weight")
            elif standard and slot in EMBEDDING_SLOTS.get(node.op_type, ()):
                found.append("embedding")
            else:
                found.append("precision")
        memo[value] = min(found, key=_RANK.__getitem__) if found else None
        return memo[value]

    roles: dict[str, str] = {}
    for value, ref in refs.items():
        role = role_of_value(value)
        if role is not None:
            old = roles.get(ref)
            roles[ref] = role if old is None else min(old, role, key=_RANK.__getitem__)
    return roles


def gemm_layout(stripped_proto) -> dict[str, tuple[str, str, int]]:
    """Initializer name -> (op, activation input name, input-axis of the weight) for weights of
    MatMul(X, W) and Gemm(X, W, transB) whose activations can be captured for error compensation.

    input-axis is the axis of W that multiplies the activation's last axis: 0 for MatMul and Gemm
    without transB (W is [in, out]), 1 for Gemm with transB=1 (W is [out, in]).
    """
    from ..io.onnx_model import reference_of

    stored = {init.name for init in stripped_proto.graph.initializer if reference_of(init) is not None}
    uses: dict[str, int] = {}
    for node in stripped_proto.graph.node:
        for value in node.input:
            if value in stored:
                uses[value] = uses.get(value, 0) + 1
    out = {}
    for node in stripped_proto.graph.node:
        if node.domain not in ("", "ai.onnx") or len(node.input) < 2:
            continue
        x, w = node.input[0], node.input[1]
        if w not in stored or x in stored or uses.get(w) != 1:
            continue
        if node.op_type == "MatMul":
            out[w] = ("MatMul", x, 0)
        elif node.op_type == "Gemm":
            attrs = {a.name: a for a in node.attribute}
            if "transA" in attrs and attrs["transA"].i:
                continue
            trans_b = bool(attrs["transB"].i) if "transB" in attrs else False
            out[w] = ("Gemm", x, 1 if trans_b else 0)
    return out


def output_axes(stripped_proto) -> dict[str, int]:
    """Record name -> the axis of its output channels, for per-channel steps (weights only)."""
    from ..io.onnx_model import iter_graphs, reference_of

    out: dict[str, int] = {}
    for graph, _ in iter_graphs(stripped_proto.graph):
        refs = {init.name: reference_of(init) for init in graph.initializer if reference_of(init) is not None}
        dims = {init.name: len(init.dims) for init in graph.initializer}
        for node in graph.node:
            attrs = {a.name: a.i for a in node.attribute}
            for slot, value in enumerate(node.input):
                ref = refs.get(value)
                if ref is None:
                    continue
                axis = None
                if node.op_type in ("Conv", "FusedConv", "NhwcConv") and slot == 1:
                    axis = 0
                elif node.op_type == "ConvTranspose" and slot == 1:
                    axis = 1
                elif node.op_type == "MatMul" and slot == 1:
                    axis = dims[value] - 1
                elif node.op_type in ("Gemm", "FusedGemm") and slot == 1:
                    axis = 0 if attrs.get("transB", 0) else 1
                elif node.op_type == "FusedMatMul" and slot == 1:
                    axis = dims[value] - (2 if attrs.get("transB", 0) else 1)
                elif node.op_type == "Attention" and slot == 1:  # [hidden, 3 * hidden]: Q, K and V side by side
                    axis = 1
                elif node.op_type in ("LSTM", "GRU", "RNN") and slot in (1, 2):
                    axis = 1
                if axis is not None and out.get(ref, axis) == axis:
                    out[ref] = axis
                else:
                    out[ref] = -1  # used with two layouts: no per-channel steps
    return {k: v for k, v in out.items() if v >= 0}
