"""LeNet-5 trained on the bundled MNIST digits, as an ONNX model with calibration and evaluation inputs,
laid out like the other benchmark models (BENCH/models/lenet5.onnx, BENCH/data/lenet5_{calib,eval}.npz).

    python benchmarks/fidelity/make_lenet5.py --out /work/bench      # the cdlcodec venv (needs torch)

The network is the demo's (cdlcodec.models "lenet5", 4 epochs, seed 0); calibration = 128 training
digits, evaluation = 256 test digits (never seen in training or calibration).
"""
import argparse
import warnings
from pathlib import Path

import numpy as np
import torch

from cdlcodec.data.mnist import load_mnist_5k
from cdlcodec.models import build
from cdlcodec.training import train_classifier


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="/work/bench")
    args = ap.parse_args()
    out = Path(args.out)
    (out / "models").mkdir(parents=True, exist_ok=True)
    (out / "data").mkdir(parents=True, exist_ok=True)
    (x_train, y_train), (x_test, _) = load_mnist_5k()
    model = train_classifier(build("lenet5"), x_train, y_train, epochs=4, seed=0, quiet=True).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(model, (torch.zeros(1, 1, 28, 28),), str(out / "models" / "lenet5.onnx"), dynamo=False,
                          input_names=["x"], output_names=["logits"], opset_version=17,
                          dynamic_axes={"x": {0: "n"}, "logits": {0: "n"}})
    np.savez(out / "data" / "lenet5_calib.npz", x=x_train[:128].astype(np.float32))
    np.savez(out / "data" / "lenet5_eval.npz", x=x_test[:256].astype(np.float32))


if __name__ == "__main__":
    main()
