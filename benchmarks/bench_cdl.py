"""CDL / R-CDL training benchmark on LeNet-5 / MNIST-5k (issue 4).

One full-precision warm start (`--fp-epochs`, the paper's pretrained setting; 0 = from scratch) is
trained once; every CDL / R-CDL run starts from it and trains `--epochs` more, and the FP reference
continues ordinary training for the same `--epochs` (equal training budget). Runs: CDL and R-CDL at
b=4 and b=2 with λ=γ=0, then R-CDL at b=4 for increasing λ=γ. Prints one JSON line per run and a
table with accuracy (eval mode: hard weights and activations), Huffman bits per weight / activation
(eq. 41), H(w)/|w| and training step time relative to FP measured in the same process.

With --ptq (default on) each CDL / R-CDL model is also encoded with `cdlcodec.codec.encode_records`
(backend "auto") and its weight bits per weight read from the container, and the FP reference is
quantized post-training with nearest rounding (UniformQuantizer, rel_step bisected to the same
bits per weight, backend "auto") and evaluated after decoding: "PTQ acc" in the second table.

    python benchmarks/bench_cdl.py [--epochs 2] [--fp-epochs 3] [--recipe recommended|paper]
                                   [--lambdas 3e-6,1e-5,3e-5] [--lambda-bits 4] [--no-ptq]
"""
from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time

import torch

RECIPES = {
    # Section VI-B-3 as written: α0 = β0 = 500, q0/s0 = 2·mean|v|/sqrt(2^(b-1)).
    "paper": {"sharpness_init": "paper", "step_init": "paper"},
    # docs/cdl.md "recommended recipe": scale-aware sharpness, least-squared-error steps.
    "recommended": {"sharpness_init": "scaled", "step_init": "mse"},
}


def _container_eval(model, config, x_test, y_test):
    """(R-)CDL model -> container -> decoded model: (weight bits/weight, accuracy after decode)."""
    import cdlcodec
    from cdlcodec.cdl.checkpoint import cdl_state_dict
    from cdlcodec.codec import EncodeOptions, encode_records
    from cdlcodec.io.cdl_checkpoint import cdl_model_file
    from cdlcodec.io.torch_checkpoint import tensor_to_record
    from cdlcodec.training import evaluate

    state = cdl_state_dict(model, architecture="lenet5", bits=config.bits, first_last_bits=config.first_last_bits)
    records = [tensor_to_record(k, v) for k, v in state.items()]
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "cdl.cdl")
        model = cdl_model_file(records)  # read as a CDL checkpoint: sections, cdl.mode, learned quantizers
        summary = encode_records(model.records, out, EncodeOptions(backend="auto", quiet=True), model.metadata,
                                 model.sections)
        acc = evaluate(cdlcodec.load(out), x_test, y_test)
    total = summary.report["total"]
    return total["coded_bits"] / total["count"], acc


def _nearest_ptq(fp_state, target_bpw, x_test, y_test):
    """FP model with nearest rounding at the rel_step whose weight bits/weight is closest to target."""
    from cdlcodec.codec import EncodeOptions, decode_container, encode_records
    from cdlcodec.io.torch_checkpoint import record_to_tensor, tensor_to_record
    from cdlcodec.models import build
    from cdlcodec.quantizers.uniform import UniformQuantizer
    from cdlcodec.training import evaluate

    records = [tensor_to_record(k, v) for k, v in fp_state.items()]

    def trial(rel_step):
        with tempfile.TemporaryDirectory() as tmp:
            out = os.path.join(tmp, "fp.cdl")
            s = encode_records(records, out, EncodeOptions(UniformQuantizer(rel_step=rel_step), "auto", (), True))
            dec = decode_container(out)
        quantized = [r for r in dec.records if r.levels is not None]
        bpw = sum(s.coded_bits[r.name] for r in quantized) / max(sum(r.numel for r in quantized), 1)
        model = build("lenet5")
        model.load_state_dict({r.name: record_to_tensor(r) for r in dec.records})
        return bpw, evaluate(model.eval(), x_test, y_test), rel_step

    lo, hi, best = 0.01, 8.0, None
    for _ in range(14):
        mid = math.sqrt(lo * hi)
        bpw, acc, rel = trial(mid)
        if best is None or abs(bpw - target_bpw) < abs(best[0] - target_bpw):
            best = (bpw, acc, rel)
        if abs(bpw - target_bpw) / target_bpw < 0.01:
            break
        lo, hi = (mid, hi) if bpw > target_bpw else (lo, mid)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2, help="CDL / R-CDL epochs (after the warm start)")
    parser.add_argument("--fp-epochs", type=int, default=3, help="full-precision warm-start epochs (0: from scratch)")
    parser.add_argument("--recipe", choices=sorted(RECIPES), default="recommended")
    parser.add_argument("--lambdas", default="3e-6,1e-5,3e-5")
    parser.add_argument("--lambda-bits", type=int, default=4, help="b of the R-CDL λ sweep")
    parser.add_argument("--runs", default="cdl:4,rcdl:4,cdl:2,rcdl:2", help="mode:bits runs at λ=γ=0")
    parser.add_argument("--no-ptq", action="store_true", help="skip the container / post-training comparison")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from cdlcodec.cdl.train import TrainConfig, rate_report, train_model
    from cdlcodec.data.mnist import load_mnist_5k
    from cdlcodec.models import build

    (x, y), (xt, yt) = load_mnist_5k()
    start = time.perf_counter()

    def fresh():
        torch.manual_seed(args.seed)
        return build("lenet5")

    def config(mode, bits, lam, epochs):
        return TrainConfig(mode=mode, bits=bits, lam=lam, gamma=lam, epochs=epochs, seed=args.seed, quiet=True,
                           **(RECIPES[args.recipe] if mode != "fp" else {}))

    warm_state, warm_acc = None, None
    if args.fp_epochs:
        warm = train_model(fresh(), x, y, xt, yt, config("fp", 4, 0.0, args.fp_epochs))
        warm_state = {k: v.detach().clone() for k, v in warm.model.state_dict().items()}
        warm_acc = warm.test_accuracy

    def start_model():
        model = fresh()
        if warm_state is not None:
            model.load_state_dict(warm_state)
        return model

    runs = [("fp", 4, 0.0)]
    runs += [(r.split(":")[0], int(r.split(":")[1]), 0.0) for r in args.runs.split(",") if r]
    runs += [("rcdl", args.lambda_bits, float(lam)) for lam in args.lambdas.split(",") if lam]
    results = []
    fp_state = None
    for mode, bits, lam in runs:
        cfg = config(mode, bits, lam, args.epochs)
        res = train_model(start_model(), x, y, xt, yt, cfg)
        report = {"mode": mode, "bits": bits if mode != "fp" else 32, "lambda": lam, "gamma": lam,
                  "recipe": args.recipe if mode != "fp" else None, "fp_epochs": args.fp_epochs,
                  "epochs": args.epochs, "test_accuracy": res.test_accuracy,
                  "seconds_per_step": round(res.seconds_per_step, 5)}
        report.update(rate_report(res.model, x, cfg))
        if mode == "fp":
            fp_state = {k: v.detach().clone() for k, v in res.model.state_dict().items()}
        elif not args.no_ptq:
            bpw, acc = _container_eval(res.model, cfg, xt, yt)
            ptq_bpw, ptq_acc, rel = _nearest_ptq(fp_state, bpw, xt, yt)
            report.update({"container_bits_per_weight": bpw, "decoded_accuracy": acc,
                           "ptq_bits_per_weight": ptq_bpw, "ptq_accuracy": ptq_acc, "ptq_rel_step": rel})
        print(json.dumps(report), flush=True)
        results.append(report)
    fp = results[0]
    print(f"\nLeNet-5 / MNIST-5k, recipe {args.recipe}, FP warm start {args.fp_epochs} epochs "
          f"(acc {100 * warm_acc:.1f} %)" if warm_acc is not None else
          f"\nLeNet-5 / MNIST-5k, recipe {args.recipe}, from scratch", end="")
    print(f", then {args.epochs} epochs, Adam, {args.threads} threads, seed {args.seed}; "
          f"total {time.perf_counter() - start:.0f} s")
    print(f"{'mode':<5} {'b':>2} {'λ=γ':>7} {'acc %':>6} {'Δacc':>6} {'bits/w':>7} {'bits/act':>8} "
          f"{'H(w)/|w|':>8} {'s/step':>7} {'×FP':>5}")
    for r in results:
        ent = r["entropy_bits_per_weight"]
        print(f"{r['mode']:<5} {r['bits']:>2} {r['lambda']:>7.0e} {100 * r['test_accuracy']:>6.1f} "
              f"{100 * (r['test_accuracy'] - fp['test_accuracy']):>+6.1f} {r['bits_per_weight']:>7.2f} "
              f"{r['bits_per_activation']:>8.2f} {(f'{ent:.2f}' if ent is not None else '-'):>8} "
              f"{r['seconds_per_step']:>7.3f} {r['seconds_per_step'] / fp['seconds_per_step']:>5.2f}")
    if args.no_ptq:
        return
    print("\nAfter encode/decode (backend auto): (R-)CDL model vs the FP reference quantized post-training "
          "by nearest rounding at the same weight bits/weight")
    print(f"{'mode':<5} {'b':>2} {'λ=γ':>7} {'bits/w':>7} {'acc %':>6} | {'PTQ b/w':>7} {'PTQ acc':>7} "
          f"{'rel_step':>8} | {'CDL−PTQ':>7}")
    for r in results[1:]:
        print(f"{r['mode']:<5} {r['bits']:>2} {r['lambda']:>7.0e} {r['container_bits_per_weight']:>7.3f} "
              f"{100 * r['decoded_accuracy']:>6.1f} | {r['ptq_bits_per_weight']:>7.3f} "
              f"{100 * r['ptq_accuracy']:>7.1f} {r['ptq_rel_step']:>8.3f} | "
              f"{100 * (r['decoded_accuracy'] - r['ptq_accuracy']):>+7.1f}")


if __name__ == "__main__":
    main()
