"""CDL / R-CDL LeNet-5 -> .cdl -> ONNX (float, qdq) against the checkpoint's eval mode.

Trains LeNet-5 for one epoch (full precision), fine-tunes it with CDL and with R-CDL for four
steps, encodes each checkpoint, decodes to ONNX and runs onnxruntime on the 1,000 MNIST test images
twice: with its QDQ transformers off ("exact", docs/decoders.md) and with its defaults.

    python benchmarks/bench_decode_cdl.py
"""
from __future__ import annotations

import os
import tempfile

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import onnxruntime as ort  # noqa: E402
import torch  # noqa: E402

import cdlcodec  # noqa: E402

from cdlcodec.cdl.checkpoint import build_model_from_checkpoint, cdl_state_dict  # noqa: E402
from cdlcodec.cdl.train import TrainConfig, train_model  # noqa: E402
from cdlcodec.api import decode, encode  # noqa: E402
from cdlcodec.data.mnist import load_mnist_5k  # noqa: E402
from cdlcodec.models import build  # noqa: E402
from cdlcodec.training import train_classifier  # noqa: E402


def main() -> None:
    (xt, yt), (xs, ys) = load_mnist_5k()
    torch.manual_seed(0)
    fp = train_classifier(build("lenet5"), xt, yt, epochs=1, lr=3e-3, quiet=True)
    root = tempfile.mkdtemp(prefix="bench_decode_cdl_")
    print(f"{'mode':<5} {'weights':<7} {'onnxruntime':<12} {'max|dlogit|':>11} {'same argmax':>12} {'accuracy':>9}")
    for mode in ("cdl", "rcdl"):
        torch.manual_seed(0)
        model = build("lenet5")
        model.load_state_dict(fp.state_dict())
        result = train_model(model, xt[:256], yt[:256], xs[:64], ys[:64],
                             TrainConfig(mode=mode, bits=4, epochs=1, batch_size=64, quiet=True))
        state = cdl_state_dict(result.model, architecture="lenet5", bits=4, first_last_bits=8)
        ckpt = os.path.join(root, f"{mode}.pt")
        torch.save(state, ckpt)
        with torch.no_grad():
            ref = build_model_from_checkpoint(state)(torch.from_numpy(xs)).numpy()
        encode(ckpt, ckpt + ".cdl")
        with torch.no_grad():
            out = cdlcodec.load(ckpt + ".cdl")(torch.from_numpy(xs)).numpy()
        same = int((out.argmax(1) == ref.argmax(1)).sum())
        print(f"{mode:<5} {'torch':<7} {'(load)':<12} {np.abs(out - ref).max():>11.2e} {f'{same}/1000':>12} "
              f"{(out.argmax(1) == ys).mean():>9.3f}")
        for weights in ("float", "qdq"):
            path = f"{ckpt}.{weights}.onnx"
            decode(ckpt + ".cdl", path, quiet=True, weights=weights)
            for label, config in (("exact", {"session.disable_quant_qdq": "1"}), ("default", {})):
                so = ort.SessionOptions()
                for key, value in config.items():
                    so.add_session_config_entry(key, value)
                out = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"]).run(None, {"input": xs})[0]
                same = int((out.argmax(1) == ref.argmax(1)).sum())
                print(f"{mode:<5} {weights:<7} {label:<12} {np.abs(out - ref).max():>11.2e} {f'{same}/1000':>12} "
                      f"{(out.argmax(1) == ys).mean():>9.3f}")


if __name__ == "__main__":
    main()
