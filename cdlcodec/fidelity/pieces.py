"""Which values a fidelity measure compares: graph outputs, or the pieces an output is assembled from.

A detector often returns one tensor built by Concat from pieces on very different scales: YOLOv8's
[batch, 4 + classes, anchors] holds box coordinates in pixels (up to the image size) next to class
probabilities in [0, 1]. A cosine of the whole tensor is the cosine of the boxes: measured on NudeNet's
detector, 0.9999 overall left the class scores at cosine 0.84-0.98 and moved detection scores by
up to 0.35 on real photographs. So an output that Concat assembles (through layout-only ops, and
Concats of Concats) is measured piece by piece, each piece counting as an output of its own; pieces
that no weight reaches (a constant anchor grid) are left out, since they would pad the mean with
perfect scores.

The runs fetch the pieces as extra outputs (untyped, so that onnxruntime infers their types).
`OutputParts.measured` lists, per measured value, its position in a run's outputs (the graph
outputs first, then the probes); `distortion` is the same with every value produced by a Softmax,
LogSoftmax or Sigmoid (or a softmax written out as Div(Exp(x), sum)) replaced by that op's input,
where the sensitivity of a weight shows before saturation hides it.
"""
from __future__ import annotations

from dataclasses import dataclass, field

_LAYOUT_ONLY = ("Identity", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze")
_SQUASHING = ("Softmax", "LogSoftmax", "Sigmoid")
MAX_PIECES = 16            # more pieces than this: the output is measured whole
_MAX_DEPTH = 4             # Concats of Concats followed this deep


@dataclass
class OutputParts:
    n_outputs: int                                   # graph outputs (first in every run's list)
    probes: list[str] = field(default_factory=list)  # inner values runs return after the outputs
    measured: list[int] = field(default_factory=list)
    distortion: list[int] = field(default_factory=list)
    pieced: dict[int, list[str]] = field(default_factory=dict)  # output index -> its pieces

    def positions(self, measure: str) -> list[int]:
        """What `measure` compares: the pieces for cosine and relative MSE; the outputs themselves for
        top-1 agreement (the argmax of the first output)."""
        return list(range(self.n_outputs)) if measure == "agreement" else self.measured

    def view(self, outs, positions: list[int]):
        """Per sample, the values at `positions` of a run's outputs."""
        return [[s[k] for k in positions] for s in outs]


def output_parts(stripped_proto) -> OutputParts:
    """What the measure compares and where the sensitivity is read, for a graph (see the module docstring)."""
    graph = stripped_proto.graph
    producers = {out: node for node in graph.node for out in node.output}
    weighted = _reached_by_weights(stripped_proto)
    n = len(graph.output)
    parts = OutputParts(n)
    positions: dict[str, int] = {o.name: j for j, o in enumerate(graph.output)}  # a piece may be an output too

    def position(name: str) -> int:
        if name not in positions:
            positions[name] = n + len(parts.probes)
            parts.probes.append(name)
        return positions[name]

    for j, output in enumerate(graph.output):
        pieces = _pieces(output.name, producers, 0)
        kept = [p for p in pieces if p in weighted]
        if len(pieces) >= 2 and 1 <= len(kept) <= MAX_PIECES:
            parts.pieced[j] = kept
            for piece in kept:
                parts.measured.append(position(piece))
                logits = _squashed_input(piece, producers)
                parts.distortion.append(position(logits) if logits else positions[piece])
        else:
            parts.measured.append(j)
            logits = _squashed_input(output.name, producers)
            parts.distortion.append(position(logits) if logits else j)
    return parts


def _through_layout(value: str, producers):
    """The first node producing `value` that is not layout-only (None for a graph input or initializer)."""
    for _ in range(8):
        node = producers.get(value)
        if node is None or node.domain not in ("", "ai.onnx") or node.op_type not in _LAYOUT_ONLY:
            return node
        value = node.input[0]
    return None


def _pieces(value: str, producers, depth: int) -> list[str]:
    node = _through_layout(value, producers)
    if node is None or node.op_type != "Concat" or depth >= _MAX_DEPTH:
        return [value]
    out: list[str] = []
    for piece in node.input:
        if piece:
            out += _pieces(piece, producers, depth + 1)
    return list(dict.fromkeys(out))


def _squashed_input(value: str, producers) -> str | None:
    """The logits under a Softmax / LogSoftmax / Sigmoid producing `value`, or under a softmax spelled
    out as Div(Exp(x), ...) (Magika's); None for any other value."""
    node = _through_layout(value, producers)
    if node is not None and node.op_type in _SQUASHING:
        return node.input[0]
    if node is not None and node.op_type == "Div":
        numerator = producers.get(node.input[0])
        if numerator is not None and numerator.op_type == "Exp":
            return numerator.input[0]
    return None


def _reached_by_weights(stripped_proto) -> set[str]:
    """Values computed from at least one tensor the encoder may quantize (a weight or embedding table by
    its consuming op, roles.py): quantizing can change them. A constant anchor grid, added or multiplied
    in, is no weight. (Nodes with control-flow subgraphs count through the node's outputs.)"""
    from ..io.onnx_model import reference_of
    from .roles import graph_roles

    graph = stripped_proto.graph
    roles = graph_roles(stripped_proto)
    reached = {t.name for t in graph.initializer if roles.get(reference_of(t) or "") in ("weight", "embedding")}
    for node in graph.node:  # ONNX graphs are topologically sorted
        if node.op_type == "Constant" and any(roles.get(reference_of(a.t) or "") in ("weight", "embedding")
                                              for a in node.attribute if a.HasField("t")):
            reached.update(node.output)
        elif any(i in reached for i in node.input) or _subgraph_uses(node, reached):
            reached.update(node.output)
    return reached


def _subgraph_uses(node, reached: set[str]) -> bool:
    for attr in node.attribute:
        for g in ([attr.g] if attr.HasField("g") else []) + list(attr.graphs):
            if any(i in reached for sub in g.node for i in sub.input):
                return True
    return False
