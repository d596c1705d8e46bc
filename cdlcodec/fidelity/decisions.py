"""The decisions a model's outputs encode, so that an encoder can promise they do not change.

An output produced by a Softmax or LogSoftmax (through layout-only ops) decides by its argmax along
the softmax axis (a class, or one character per position of an OCR line); an output produced by a
Sigmoid decides by which side of 0.5 each value lies (speech or not, text pixel or not). A cosine
of 0.999 can still move a sample that sits near a boundary; "same decisions" checks the decisions
themselves on every calibration sample.
"""
from __future__ import annotations

import numpy as np

_LAYOUT_ONLY = ("Identity", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze")


def squashing_nodes(stripped_proto) -> dict[int, tuple[str, str, int]]:
    """Graph output index -> (op type, its input name, softmax axis) for outputs computed by a
    Softmax / LogSoftmax / Sigmoid, followed back through layout-only ops."""
    producers = {out: node for node in stripped_proto.graph.node for out in node.output}
    found = {}
    for j, output in enumerate(stripped_proto.graph.output):
        value, layout_changed = output.name, False
        for _ in range(8):
            node = producers.get(value)
            if node is None or node.domain not in ("", "ai.onnx"):
                break
            if node.op_type in ("Softmax", "LogSoftmax", "Sigmoid"):
                axis = next((a.i for a in node.attribute if a.name == "axis"), -1)
                # the softmax axis is known in the output only when nothing reshaped it on the way
                found[j] = (node.op_type, node.input[0], axis if not layout_changed else -1)
                break
            if node.op_type not in _LAYOUT_ONLY:
                break
            layout_changed = layout_changed or node.op_type != "Identity"
            value = node.input[0]
    return found


def decision_kinds(stripped_proto) -> dict[int, tuple[str, int]]:
    """Output index -> ("argmax", axis) or ("threshold", 0)."""
    return {j: (("threshold", 0) if op == "Sigmoid" else ("argmax", axis))
            for j, (op, _, axis) in squashing_nodes(stripped_proto).items()}


# Outputs with more decisions per sample than this are maps (a text-probability image, a dense
# segmentation): some pixel always sits at 0.5, so "no pixel changes" would forbid any rounding
# while the task (the boxes found) does not notice. Their cosine still counts.
MAX_DECISIONS = 1024


def changed_samples(reference, decoded, kinds: dict[int, tuple[str, int]]) -> int:
    """How many samples have at least one decision that differs between the two runs (outputs with
    more than MAX_DECISIONS decisions per sample are not checked)."""
    changed = 0
    for ref_outs, dec_outs in zip(reference, decoded):
        for j, (kind, axis) in kinds.items():
            r, d = np.asarray(ref_outs[j]), np.asarray(dec_outs[j])
            decisions = r.size if kind == "threshold" else r.size // max(r.shape[axis] if r.ndim else 1, 1)
            if decisions > MAX_DECISIONS:
                continue
            if kind == "threshold":
                same = np.array_equal(r > 0.5, d > 0.5)
            else:
                same = r.ndim == 0 or np.array_equal(np.argmax(r, axis=axis), np.argmax(d, axis=axis))
            if not same:
                changed += 1
                break
    return changed
