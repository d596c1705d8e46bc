"""The decisions a model's outputs encode, so that an encoder can promise they do not change.

An output produced by a Softmax or LogSoftmax (through layout-only ops) decides by its argmax along
the softmax axis (a class, or one character per position of an OCR line); an output produced by a
Sigmoid decides by which side of 0.5 each value lies (speech or not, text pixel or not). An output
that is one plain vector per sample ([batch, features], no squashing op) is read by its values and
width: one value in [0, 1] is a probability (side of 0.5); rows that are probability distributions
(non-negative, summing to 1: a softmax written out as Exp / ReduceSum / Div, as in Magika's file-type
model) or a few values (under MIN_EMBEDDING, a classifier's logits) decide by their argmax, unless
every value is positive on every sample (scores, not logits: they decide nothing); wider
ones are an embedding, which decides for each sample which other sample of the same run is most
similar to it (cosine): the retrieval a sentence or image embedding is used for.

Not flipping a calibration decision is not enough: an unseen input nearer the boundary still flips
(keeping only the side of every calibration decision, silero-vad still flipped 1 of 64 held-apart
speech decisions). So a decision counts as kept only when it keeps at least half of its margin, which
keeps the rounding's pull towards every boundary well inside the margins seen. (Holding the margin
from growing by as much too cost 2-16 % more bits for no held-apart change: BENCHMARKS.md.) Ties (margins
under TIE of the output's median margin) decide nothing and are not held.
"""
from __future__ import annotations

import numpy as np

_LAYOUT_ONLY = ("Identity", "Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze")
_FLOATS = (1, 10, 11, 16)  # onnx FLOAT, FLOAT16, DOUBLE, BFLOAT16

# A kept decision keeps at least this share of its margin (see the module docstring).
KEEP_MARGIN = 0.5
# A plain [batch, features] output this wide is an embedding; narrower ones are logits.
MIN_EMBEDDING = 16
# Positive scores: a narrower plain output whose every value is positive on every sample is read as
# regression scores that decide nothing, not as logits. Logits are shift-invariant under the softmax
# and trained ones sit around 0 with both signs; scores (DNSMOS's [batch, 3] speech-quality MOS,
# raw 1-4) do not, and reading them as logits held only the order of the three scores within each
# sample while lowering the default target to cosine 0.999: DNSMOS's MOS moved by up to 0.22 on
# real clips. Read as deciding nothing, the default holds cosine 0.9999 (up to 0.09). A classifier
# wrongly read this way only gets the stricter target (more bits), never a looser one.


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
    """Output index -> ("argmax", axis), ("threshold", 0) or ("vector", 0) (a rank-2 float output
    without a squashing op: logits or an embedding, told apart by its width when it is checked)."""
    squashed = squashing_nodes(stripped_proto)
    kinds = {j: (("threshold", 0) if op == "Sigmoid" else ("argmax", axis)) for j, (op, _, axis) in squashed.items()}
    for j, output in enumerate(stripped_proto.graph.output):
        tensor_type = output.type.tensor_type
        if j not in kinds and tensor_type.elem_type in _FLOATS and len(tensor_type.shape.dim) == 2:
            kinds[j] = ("vector", 0)
    return kinds


def describe_decisions(kinds: dict[int, tuple[str, int]], output_names: list[str]) -> str:
    """"'probs' (argmax along axis -1), 'speech' (side of 0.5)" for the encoder's log."""
    what = {"argmax": "argmax along axis {axis}", "threshold": "side of 0.5",
            "vector": "argmax if under %d values, else each sample's nearest other sample" % MIN_EMBEDDING}
    return ", ".join(f"'{output_names[j]}' ({what[kind].format(axis=axis)})" for j, (kind, axis) in sorted(kinds.items()))


# Outputs with more decisions per sample than this are maps (a text-probability image, a dense
# segmentation): some pixel always sits at 0.5, so "no pixel changes" would forbid any rounding
# while the task (the boxes found) does not notice. Their cosine still counts.
MAX_DECISIONS = 1024


# A margin under this share of the output's median margin is a tie: the original model does not
# decide it (LeNet-5's calibration digits: one at 0.1 % of the median, the next at 6 %), so no
# rounding can be asked to keep it.
TIE = 0.01


def changed_samples(reference, decoded, kinds: dict[int, tuple[str, int]]) -> int:
    """How many samples have at least one decision that flipped or kept less than half its margin
    (outputs with more than MAX_DECISIONS decisions per sample are not checked)."""
    changed = np.zeros(len(reference), dtype=bool)
    for margins, tie in _checked(reference, decoded, kinds):
        for i, (m, dm) in enumerate(margins):
            changed[i] |= not _kept(m, dm, tie)
    return int(changed.sum())


def margin_shortfall(reference, decoded, kinds: dict[int, tuple[str, int]]) -> float:
    """The worst decision's lost share of its margin, 1 - decoded margin / original margin, over every
    checked decision (0: every margin kept or grown; above 1: a decision flipped). All decisions are
    kept when it is at most 1 - KEEP_MARGIN. A continuous figure, so that a search can aim at the
    bound instead of only learning pass or fail (the margins move roughly with the output error)."""
    worst = 0.0
    for margins, tie in _checked(reference, decoded, kinds):
        for m, dm in margins:
            worst = max(worst, _shortfall(m, dm, tie))
    return worst


def checkable(kinds: dict[int, tuple[str, int]], reference) -> dict[int, tuple[str, int]]:
    """The outputs among `kinds` whose decisions `reference` (a run of the original model) lets a
    check read: not dense maps, not single values that are no probability."""
    return {j: kind for j, kind in kinds.items()
            if _margins([r[j] for r in reference], [r[j] for r in reference], *kind) is not None}


def _checked(reference, decoded, kinds):
    """(per-sample margins, tie level) of every output whose decisions are checked."""
    for j, kind_axis in kinds.items():
        margins = _margins([r[j] for r in reference], [d[j] for d in decoded], *kind_axis)
        if margins is None:
            continue
        live = np.concatenate([np.abs(m[m != 0]) for m, _ in margins])
        yield margins, (TIE * float(np.median(live)) if live.size else 0.0)


def _margins(reference: list, decoded: list, kind: str, axis: int):
    """Per sample (reference margins, decoded margins) of output j's decisions; None when the output
    decides nothing checkable (a dense map, mismatched shapes, one value that is no probability)."""
    if not reference or any(np.shape(a) != np.shape(reference[0]) for a in reference + decoded):
        return None
    shape = np.shape(reference[0])
    if kind == "vector":
        if len(shape) == 2 and shape[1] >= 2 and all(_distribution(r) for r in reference):
            kind, axis = "argmax", -1  # class probabilities (a softmax the graph spells out)
        elif len(shape) == 2 and shape[0] == 1 and shape[1] >= MIN_EMBEDDING:
            return _neighbour_margins(reference, decoded)
        elif len(shape) == 2 and shape[1] == 1 and all(0.0 <= float(np.min(r)) and float(np.max(r)) <= 1.0
                                                     for r in reference):
            kind = "threshold"  # one value per sample in [0, 1]: a probability, decided at 0.5
        elif len(shape) == 2 and shape[1] < MIN_EMBEDDING and all(float(np.min(r)) > 0.0 for r in reference):
            return None  # every value positive on every sample: scores, not logits ("Positive scores" above)
        else:
            kind, axis = "argmax", -1  # a few values per sample: a classifier's logits
    if len(shape) == 0:
        return None
    if kind == "threshold":
        if int(np.prod(shape)) > MAX_DECISIONS:
            return None
        return [(np.ravel(np.asarray(r, np.float64) - 0.5), np.ravel(np.asarray(d, np.float64) - 0.5))
                for r, d in zip(reference, decoded)]
    width = shape[axis]
    if width < 2 or int(np.prod(shape)) // width > MAX_DECISIONS:
        return None
    return [_argmax_margins(np.asarray(r, np.float64), np.asarray(d, np.float64), axis)
            for r, d in zip(reference, decoded)]


def _distribution(rows) -> bool:
    """Rows of non-negative values that each sum to 1 (to float32 rounding)."""
    r = np.asarray(rows, np.float64)
    return bool(np.all(r >= 0.0) and np.allclose(r.sum(axis=-1), 1.0, rtol=0.0, atol=1e-4))


def _shortfall(margin: np.ndarray, decoded_margin: np.ndarray, tie: float = 0.0) -> float:
    """max over live decisions of 1 - decoded/original margin (a flip is above 1); ties (a margin
    at or under `tie`) decide nothing and are skipped."""
    margin, decoded_margin = np.ravel(margin), np.ravel(decoded_margin)
    live = np.abs(margin) > tie
    if not live.any():
        return 0.0
    return float(np.max(1.0 - decoded_margin[live] / margin[live]))


def _kept(margin: np.ndarray, decoded_margin: np.ndarray, tie: float = 0.0) -> bool:
    """Every decision on the same side as before with at least KEEP_MARGIN of its margin (a decision
    may grow more certain); 1e-9 of slack for float error in a margin exactly on the bound."""
    return _shortfall(margin, decoded_margin, tie) <= (1.0 - KEEP_MARGIN) + 1e-9


def _argmax_margins(r: np.ndarray, d: np.ndarray, axis: int) -> tuple[np.ndarray, np.ndarray]:
    """(top-1 minus runner-up in the reference, the same class minus the best other in the decoded)."""
    r, d = np.moveaxis(r, axis, -1), np.moveaxis(d, axis, -1)
    top = np.argmax(r, axis=-1)[..., None]
    r_top, d_top = np.take_along_axis(r, top, -1)[..., 0], np.take_along_axis(d, top, -1)[..., 0]
    others = np.ones(r.shape, dtype=bool)
    np.put_along_axis(others, top, False, -1)
    r_next = np.where(others, r, -np.inf).max(axis=-1)
    d_next = np.where(others, d, -np.inf).max(axis=-1)
    return r_top - r_next, d_top - d_next


def _neighbour_margins(reference: list, decoded: list):
    """Each sample's most similar other sample (cosine) as a decision: the similarity margin to the
    runner-up in the reference, and the same neighbour's lead over the best other in the decoded."""
    if len(reference) < 3:
        return None
    margin, decoded_margin = _argmax_margins(_similarities(reference), _similarities(decoded), -1)
    return list(zip(margin[:, None], decoded_margin[:, None]))


def _similarities(vectors: list) -> np.ndarray:
    e = np.concatenate([np.asarray(v, np.float64) for v in vectors])
    e = e / np.maximum(np.linalg.norm(e, axis=1, keepdims=True), 1e-30)
    s = e @ e.T
    np.fill_diagonal(s, -np.inf)  # a sample is not its own neighbour
    return s
