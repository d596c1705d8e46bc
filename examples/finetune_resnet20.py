"""Your own training loop, CDL fine-tuning, and the coded model in ONNX: ResNet-20 on the bundled digits.

    python examples/finetune_resnet20.py --fp-epochs 2 --epochs 1 --bits 4 --lam 1e-6 --out-dir /tmp/r20

1. trains ResNet-20 (cdlcodec.models "resnet20:in_channels=1") in full precision for --fp-epochs
   on the 4,000 bundled MNIST training digits, through an ordinary torch DataLoader;
2. converts it (`cdlcodec.cdl.convert.convert`: Conv/Linear -> CDL layers, ReLUs -> activation
   quantizers; BatchNorm and biases stay float) and fine-tunes it with CDL / R-CDL for --epochs
   with the same loader and loss (`cdlcodec.cdl.finetune.finetune`);
3. saves the CDL checkpoint, encodes it (`cdlcodec encode`, here through the Python API), decodes
   it to ONNX (`cdlcodec decode -o resnet20.onnx`) and to a torch module (`cdlcodec.load`);
4. measures test accuracy (1,000 held-out digits) of the FP model, the fine-tuned model, the
   loaded module and the ONNX model under onnxruntime, and exits 1 unless the last two agree.

Prints one JSON line. With a model of your own, pass `example_input=` to `save_checkpoint` (the
checkpoint then carries its graph) and rebuild it with
`cdlcodec.cdl.checkpoint.build_model_from_checkpoint(state, model=YourModel())` (docs/cdl.md).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import cdlcodec
from cdlcodec.cdl.checkpoint import save_checkpoint
from cdlcodec.cdl.convert import convert
from cdlcodec.cdl.finetune import finetune
from cdlcodec.data.mnist import load_mnist_5k
from cdlcodec.models import build
from cdlcodec.training import evaluate, train_classifier

ARCHITECTURE = "resnet20:in_channels=1"


def onnx_logits(path: str, x: np.ndarray, batch: int = 250) -> np.ndarray:
    import onnxruntime as ort

    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    name = session.get_inputs()[0].name
    return np.concatenate([session.run(None, {name: x[i:i + batch]})[0] for i in range(0, len(x), batch)])


def torch_logits(model, x: np.ndarray, batch: int = 250) -> np.ndarray:
    with torch.no_grad():
        return np.concatenate([model(torch.from_numpy(x[i:i + batch])).numpy() for i in range(0, len(x), batch)])


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fp-epochs", type=int, default=2)
    parser.add_argument("--epochs", type=int, default=1, help="CDL / R-CDL fine-tuning epochs")
    parser.add_argument("--mode", choices=("cdl", "rcdl"), default="rcdl")
    parser.add_argument("--bits", type=int, default=4)
    parser.add_argument("--lam", type=float, default=0.0, help="price of one bit of H(w), eq. 30")
    parser.add_argument("--gamma", type=float, default=0.0, help="price of one bit of H(x), eq. 30")
    parser.add_argument("--lr", type=float, default=1e-3, help="weights' rate while fine-tuning")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--train-samples", type=int, default=None, help="first N training digits only")
    parser.add_argument("--test-samples", type=int, default=None, help="first N test digits only")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out-dir", default="finetune_resnet20_out")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    (x_train, y_train), (x_test, y_test) = load_mnist_5k()
    x_train, y_train = x_train[:args.train_samples], y_train[:args.train_samples]
    x_test, y_test = x_test[:args.test_samples], y_test[:args.test_samples]
    torch.manual_seed(args.seed)
    loader = DataLoader(TensorDataset(torch.from_numpy(x_train), torch.from_numpy(y_train)),
                        batch_size=args.batch_size, shuffle=True,
                        generator=torch.Generator().manual_seed(args.seed))

    model = build(ARCHITECTURE)
    if args.fp_epochs:
        train_classifier(model, x_train, y_train, epochs=args.fp_epochs, batch_size=args.batch_size,
                         seed=args.seed, quiet=True)
    with torch.no_grad():
        fp_accuracy = evaluate(model, x_test, y_test)

    model = convert(model, bits=args.bits, first_last_bits=8, mode=args.mode)
    result = finetune(model, loader, F.cross_entropy, epochs=args.epochs, lam=args.lam, gamma=args.gamma,
                      lr=args.lr)
    with torch.no_grad():
        cdl_accuracy = evaluate(result.model, x_test, y_test)

    os.makedirs(args.out_dir, exist_ok=True)
    checkpoint = os.path.join(args.out_dir, "resnet20-cdl.pt")
    container = os.path.join(args.out_dir, "resnet20.cdl")
    onnx_path = os.path.join(args.out_dir, "resnet20.onnx")
    for path in (container, onnx_path):     # encode / decode refuse to overwrite
        if os.path.exists(path):
            os.remove(path)
    save_checkpoint(result.model, checkpoint, architecture=ARCHITECTURE, bits=args.bits, first_last_bits=8)
    summary = cdlcodec.encode(checkpoint, container)          # = cdlcodec encode resnet20-cdl.pt -o resnet20.cdl
    cdlcodec.decode(container, onnx_path)                     # = cdlcodec decode resnet20.cdl -o resnet20.onnx
    loaded = cdlcodec.load(container)

    expected, got = torch_logits(loaded, x_test), onnx_logits(onnx_path, x_test)
    load_accuracy = float((expected.argmax(1) == y_test).mean())
    onnx_accuracy = float((got.argmax(1) == y_test).mean())
    total = summary.report["total"]
    report = {
        "fp_accuracy": fp_accuracy, "cdl_accuracy": cdl_accuracy, "load_accuracy": load_accuracy,
        "onnx_accuracy": onnx_accuracy, "prediction_agreement": float((expected.argmax(1) == got.argmax(1)).mean()),
        "max_abs_logit_difference": float(np.abs(expected - got).max()),
        "coded_bits_per_weight": total["coded_bits"] / total["count"], "weights": total["count"],
        "container_bytes": os.path.getsize(container), "onnx_bytes": os.path.getsize(onnx_path),
        "finetune_steps": result.steps, "finetune_seconds": round(result.seconds, 1),
        "seconds": round(time.perf_counter() - start, 1),
        "config": {k: v for k, v in vars(args).items() if k != "out_dir"},
    }
    print(json.dumps(report))
    return report


if __name__ == "__main__":
    outcome = main()
    sys.exit(0 if outcome["onnx_accuracy"] == outcome["load_accuracy"] else 1)
