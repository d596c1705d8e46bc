"""Reference points for "encode to a fidelity target" on real models (no cdlcodec).

    /work/bench/venv/bin/python benchmarks/fidelity/baselines.py --bench /work/bench [--models minilm ...]

For every model under BENCH/models with BENCH/data/NAME_eval.npz:
 (a) nearest rounding, step = r * std per tensor of ndim >= 2 (1-D tensors kept float32):
     the largest r whose mean output cosine on the eval inputs is >= the target (0.99),
     bits = order-0 entropy of each tensor's levels + 32 bits per 1-D param + 32 bits
     per step; zstd-19 of the levels as a sanity number;
 (b) int8 per-channel symmetric + zstd-19 (scales and 1-D tensors as float32);
 (c) the task-level check of each model at both points.
bits/param always divides by ALL float params of the ONNX model (1-D included).
Writes BENCH/results/baselines.json and prints a table.

The evaluation helpers (load_bench, Evaluator, cosine) are shared with nncodec_ref.py.
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import zstandard
from onnx import numpy_helper

TARGET = 0.99
FLOAT_TYPES = (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.DOUBLE)
BATCH = {"ddddocr_det": 1}  # its graph has a fixed batch of 1


# ---------------------------------------------------------------- shared evaluation
def load_bench(bench, name):
    model = onnx.load(str(Path(bench) / "models" / f"{name}.onnx"))
    with np.load(Path(bench) / "data" / f"{name}_eval.npz") as z:
        feeds = {k: z[k] for k in z.files}
    return model, feeds


def float_weights(model):
    """All float initializers of the main graph, as float32 arrays, in graph order."""
    return {t.name: numpy_helper.to_array(t).astype(np.float32)
            for t in model.graph.initializer if t.data_type in FLOAT_TYPES}


def structural_tensors(model):
    """Float initializers that are not weights but sizes (Resize/Upsample scales and roi):
    any change, even 1e-7, changes output shapes, so every method keeps them exact."""
    names = set()
    for node in model.graph.node:
        if node.op_type in ("Resize", "Upsample"):
            names.update(node.input[1:])
    return names


def cosine(ref_outputs, outputs):
    """Per sample, each output flattened; mean over outputs and samples."""
    per_output = []
    for ref, out in zip(ref_outputs, outputs):
        a = ref.reshape(len(ref), -1).astype(np.float64)
        b = out.reshape(len(out), -1).astype(np.float64)
        na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
        dot = (a * b).sum(1)
        cos = np.where((na == 0) & (nb == 0), 1.0, dot / np.maximum(na * nb, 1e-300))
        per_output.append(cos)
    return float(np.mean(per_output))


class Evaluator:
    """Runs the model with replaced weights on the eval inputs."""

    def __init__(self, name, model, feeds):
        self.name, self.model, self.feeds = name, model, feeds
        self.weights = float_weights(model)
        self.n_params = int(sum(w.size for w in self.weights.values()))
        self.batch = BATCH.get(name, 16)
        self.reference = self.run(self.weights)

    def run(self, weights):
        m = onnx.ModelProto()
        m.CopyFrom(self.model)
        for t in m.graph.initializer:
            if t.name in weights:
                t.CopyFrom(numpy_helper.from_array(
                    weights[t.name].astype(onnx.helper.tensor_dtype_to_np_dtype(t.data_type)), t.name))
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = 2
        sess = ort.InferenceSession(m.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        n = len(next(iter(self.feeds.values())))
        outs = None
        for i in range(0, n, self.batch):
            res = sess.run(None, {k: v[i:i + self.batch] for k, v in self.feeds.items()})
            outs = [[] for _ in res] if outs is None else outs
            for acc, r in zip(outs, res):
                acc.append(r)
        return [np.concatenate(o) for o in outs]

    def cosine(self, weights):
        outputs = self.run(weights)
        return cosine(self.reference, outputs), outputs

    def task(self, outputs):
        return TASKS[self.name](self, self.reference, outputs)


# ---------------------------------------------------------------- task-level checks
def ctc_greedy(probs, chars):
    texts = []
    for seq in probs.argmax(-1):
        prev, s = -1, []
        for idx in seq:
            if idx != prev and idx != 0:
                s.append(chars[idx])
            prev = idx
        texts.append("".join(s))
    return texts


def task_ocr_rec(ev, ref, out):
    meta = {p.key: p.value for p in ev.model.metadata_props}
    chars = ["blank"] + meta["character"].splitlines() + [" "]  # rapidocr's CTCLabelDecode
    a, b = ctc_greedy(ref[0], chars), ctc_greedy(out[0], chars)
    return {"text_changed": float(np.mean([x != y for x, y in zip(a, b)])), "example": [a[0], b[0]]}


def component_count(prob_map, thresh=0.3, min_area=10):
    from scipy import ndimage
    labels, n = ndimage.label(prob_map > thresh)
    if n == 0:
        return 0
    return int((np.bincount(labels.ravel())[1:] >= min_area).sum())


def task_ocr_det(ev, ref, out):
    """rapidocr's DB threshold 0.3; text boxes ~ connected regions of >= 10 pixels."""
    a = [component_count(p[0]) for p in ref[0]]
    b = [component_count(p[0]) for p in out[0]]
    return {"box_count_changed": float(np.mean([x != y for x, y in zip(a, b)])), "mean_boxes": float(np.mean(a))}


def yolox_boxes(pred, size=416, score_thr=0.1, nms_thr=0.45):
    """ddddocr's DetectionEngine post-processing (YOLOX grid decode + class-agnostic NMS)."""
    grids, strides = [], []
    for s in (8, 16, 32):
        n = size // s
        yv, xv = np.meshgrid(np.arange(n), np.arange(n), indexing="ij")
        grids.append(np.stack((xv, yv), -1).reshape(-1, 2))
        strides.append(np.full((n * n, 1), s))
    grids, strides = np.concatenate(grids), np.concatenate(strides)
    xy = (pred[:, :2] + grids) * strides
    wh = np.exp(pred[:, 2:4]) * strides
    scores = (pred[:, 4:5] * pred[:, 5:]).max(1)
    keep = scores > score_thr
    boxes = np.concatenate([xy - wh / 2, xy + wh / 2], 1)[keep]
    scores = scores[keep]
    order, kept = scores.argsort()[::-1], []
    while order.size:
        i = order[0]
        kept.append(i)
        xx1 = np.maximum(boxes[i, 0], boxes[order[1:], 0])
        yy1 = np.maximum(boxes[i, 1], boxes[order[1:], 1])
        xx2 = np.minimum(boxes[i, 2], boxes[order[1:], 2])
        yy2 = np.minimum(boxes[i, 3], boxes[order[1:], 3])
        inter = np.maximum(0, xx2 - xx1 + 1) * np.maximum(0, yy2 - yy1 + 1)
        area = (boxes[:, 2] - boxes[:, 0] + 1) * (boxes[:, 3] - boxes[:, 1] + 1)
        ovr = inter / (area[i] + area[order[1:]] - inter)
        order = order[1:][ovr <= nms_thr]
    return len(kept)


def task_ddddocr_det(ev, ref, out):
    a = [yolox_boxes(p) for p in ref[0]]
    b = [yolox_boxes(p) for p in out[0]]
    return {"box_count_changed": float(np.mean([x != y for x, y in zip(a, b)])), "mean_boxes": float(np.mean(a))}


def task_silero(ev, ref, out):
    a, b = ref[0][:, 0] > 0.5, out[0][:, 0] > 0.5
    return {"decisions_flipped": float(np.mean(a != b)), "speech_fraction": float(a.mean())}


def task_ocr_cls(ev, ref, out):
    return {"top1_agreement": float(np.mean(ref[0].argmax(1) == out[0].argmax(1)))}


def embedding_checks(ref, out):
    """Embedding cosine, and whether each sample's nearest neighbour in the eval set stays the same."""
    def nn(e):
        e = e / np.linalg.norm(e, axis=1, keepdims=True)
        s = e @ e.T
        np.fill_diagonal(s, -np.inf)
        return s.argmax(1)
    return {"embedding_cosine": cosine(ref, out), "nn_agreement": float(np.mean(nn(ref[0]) == nn(out[0])))}


TASKS = {
    "minilm": lambda ev, ref, out: embedding_checks(ref, out),
    "mobilenetv2": lambda ev, ref, out: embedding_checks(ref, out),
    "silero_vad": task_silero,
    "ocr_rec": task_ocr_rec,
    "ocr_cls": task_ocr_cls,
    "lenet5": task_ocr_cls,  # top-1 agreement of the digit classifier (make_lenet5.py)
    "ocr_det": task_ocr_det,
    "ddddocr_det": task_ddddocr_det,
}


# ---------------------------------------------------------------- (a) nearest rounding
def entropy_bits(levels):
    _, counts = np.unique(levels, return_counts=True)
    p = counts / counts.sum()
    return float(-(counts * np.log2(p)).sum())


def level_bytes(levels):
    span = max(abs(int(levels.min())), abs(int(levels.max())))
    dtype = np.int8 if span < 128 else np.int16 if span < 32768 else np.int32
    return levels.astype(dtype).tobytes()


def nearest_rounding(weights, r):
    """Decoded weights and, per tensor of ndim >= 2, (levels, step)."""
    dec, coded = {}, {}
    for name, w in weights.items():
        if w.ndim < 2:
            dec[name] = w
            continue
        step = r * float(w.std()) or 1.0
        levels = np.round(w / step).astype(np.int64)
        dec[name] = (levels * step).astype(np.float32)
        coded[name] = (levels, step)
    return dec, coded


def nearest_rounding_size(weights, coded):
    """(order-0 entropy bits, zstd-19 bytes) of the levels, steps and float 1-D tensors."""
    bits, raw = 0.0, []
    for name, w in weights.items():
        if name in coded:
            levels, step = coded[name]
            bits += entropy_bits(levels) + 32
            raw.append(level_bytes(levels) + np.float32(step).tobytes())
        else:
            bits += 32 * w.size
            raw.append(w.tobytes())
    return bits, len(zstandard.ZstdCompressor(level=19).compress(b"".join(raw)))


def largest_passing(evaluate, lo_start=0.01, hi_limit=4.0, steps=7):
    """Largest r with evaluate(r) >= TARGET: geometric walk up, then bisection."""
    lo, lo_val = None, None
    r = lo_start
    while r > 1e-4 and evaluate(r) < TARGET:  # a very sensitive model: walk down first
        r /= 4
    while r <= hi_limit:
        val = evaluate(r)
        if val < TARGET:
            break
        lo, lo_val, r = r, val, r * 2
    if lo is None:
        return None
    hi = r
    for _ in range(steps):
        mid = (lo * hi) ** 0.5
        val = evaluate(mid)
        if val >= TARGET:
            lo, lo_val = mid, val
        else:
            hi = mid
    return lo


# ---------------------------------------------------------------- (b) int8 per channel
def channel_axis(model):
    """Output-channel axis of each weight: MatMul's B is [in, out]; Gemm's depends on transB."""
    axes = {}
    for node in model.graph.node:
        if node.op_type == "MatMul" and len(node.input) > 1:
            axes[node.input[1]] = -1
        elif node.op_type == "Gemm" and len(node.input) > 1:
            trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
            axes[node.input[1]] = 0 if trans_b else -1
        elif node.op_type == "ConvTranspose" and len(node.input) > 1:
            axes[node.input[1]] = 1
    return axes


def int8_per_channel(weights, axes):
    dec, raw = {}, []
    for name, w in weights.items():
        if w.ndim < 2:
            dec[name] = w
            raw.append(w.tobytes())
            continue
        ax = axes.get(name, 0) % w.ndim
        reduce = tuple(i for i in range(w.ndim) if i != ax)
        scale = np.abs(w).max(axis=reduce, keepdims=True) / 127
        scale = np.where(scale == 0, 1.0, scale).astype(np.float32)
        q = np.clip(np.round(w / scale), -127, 127).astype(np.int8)
        dec[name] = (q * scale).astype(np.float32)
        raw.append(q.tobytes() + scale.tobytes())
    return dec, len(zstandard.ZstdCompressor(level=19).compress(b"".join(raw)))


# ---------------------------------------------------------------- driver
def run_model_baselines(bench, name):
    t0 = time.time()
    model, feeds = load_bench(bench, name)
    ev = Evaluator(name, model, feeds)
    n = ev.n_params
    n_1d = int(sum(w.size for w in ev.weights.values() if w.ndim < 2))
    res = {"params": n, "params_1d": n_1d, "eval_samples": len(next(iter(feeds.values()))),
           "float32_bits_per_param": 32.0}

    cache = {}

    def cos_at(r):
        cache[r] = ev.cosine(nearest_rounding(ev.weights, r)[0])[0]
        return cache[r]

    r = largest_passing(cos_at)
    if r is None:
        res["nearest"] = None
    else:
        dec, coded = nearest_rounding(ev.weights, r)
        bits, zbytes = nearest_rounding_size(ev.weights, coded)
        c, outs = ev.cosine(dec)
        res["nearest"] = {"r": r, "cosine": c, "bits_per_param_entropy": bits / n,
                          "bits_per_param_zstd19": zbytes * 8 / n, "task": ev.task(outs),
                          "sweep": sorted(cache.items())}
    dec, zbytes = int8_per_channel(ev.weights, channel_axis(model))
    c, outs = ev.cosine(dec)
    res["int8_zstd19"] = {"cosine": c, "bits_per_param": zbytes * 8 / n, "task": ev.task(outs)}
    res["seconds"] = round(time.time() - t0, 1)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--bench", type=Path, default=Path("/work/bench"))
    ap.add_argument("--models", nargs="*", default=list(TASKS))
    args = ap.parse_args()
    out_path = args.bench / "results" / "baselines.json"
    results = json.loads(out_path.read_text()) if out_path.exists() else {}
    for name in args.models:
        results[name] = run_model_baselines(args.bench, name)
        print(name, json.dumps(results[name]), flush=True)
        out_path.parent.mkdir(parents=True, exist_ok=True)
        out_path.write_text(json.dumps(results, indent=1))
    print(f"\n{'model':12} {'params':>10} {'1-D':>7} | {'nearest r':>9} {'bpp(H)':>7} {'bpp(zstd)':>9} {'cos':>7} | "
          f"{'int8 bpp':>8} {'int8 cos':>8} | task (nearest ; int8)")
    for name in args.models:
        r = results[name]
        a, b = r["nearest"], r["int8_zstd19"]
        a_txt = (f"{a['r']:9.4f} {a['bits_per_param_entropy']:7.3f} {a['bits_per_param_zstd19']:9.3f} {a['cosine']:7.4f}"
                 if a else f"{'none':>9} {'':7} {'':9} {'':7}")
        task = lambda t: ", ".join(f"{k}={v:.3f}" for k, v in t.items() if isinstance(v, float))
        print(f"{name:12} {r['params']:10d} {r['params_1d']:7d} | {a_txt} | {b['bits_per_param']:8.3f} "
              f"{b['cosine']:8.5f} | {task(a['task']) if a else '-'} ; {task(b['task'])}")


if __name__ == "__main__":
    main()
