"""ResNet-20 with CDL (issue 17, point 4): `cdlcodec train resnet20-mnist` end to end, and its
checkpoint (residual adds, BatchNorm, global pooling) encoded and decoded to ONNX, where
onnxruntime gives the predictions of `cdlcodec.load()`."""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")


def _agreement(onnx_path, module, x):
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x})[0]
    with torch.no_grad():
        expected = module(torch.from_numpy(x)).numpy()
    return got, expected


def test_train_resnet20_mnist_encode_decode_onnx_matches_load(tmp_path, cli):
    import onnx

    import cdlcodec
    from cdlcodec.cdl.layers import ActivationQuantizer
    from cdlcodec.data.mnist import load_mnist_5k

    ckpt, container, onnx_path = tmp_path / "r20.pt", tmp_path / "r20.cdl", tmp_path / "r20.onnx"
    status, out, err = cli("train", "resnet20-mnist", "--epochs", "1", "--train-samples", "32",
                           "--batch-size", "32", "--quiet", "-o", ckpt)
    assert status == 0, err
    report = json.loads(out.strip().splitlines()[-1])
    assert report["task"] == "resnet20-mnist" and report["steps"] == 1 and 0 <= report["test_accuracy"] <= 1
    for args in (("encode", ckpt, "-o", container), ("decode", container, "-o", onnx_path)):
        status, _, err = cli(*args, "-q")
        assert status == 0, err
        assert "no ONNX graph" not in err

    loaded = cdlcodec.load(str(container))
    assert sum(isinstance(m, ActivationQuantizer) for m in loaded.modules()) == 19
    graph = onnx.load(str(onnx_path)).graph
    ops = [n.op_type for n in graph.node]
    assert ops.count("QuantizeLinear") == 19 and ops.count("Add") == 9
    assert ops.count("BatchNormalization") == 21 and "GlobalAveragePool" in ops

    (_, _), (x_test, y_test) = load_mnist_5k()
    x, y = x_test[:200], y_test[:200]
    got, expected = _agreement(onnx_path, loaded, x)
    # Same arithmetic up to float32 summation order in Conv / BatchNormalization: logits agree to 1e-4
    # unless such a difference moves one activation across a rounding boundary (then by about a step),
    # so we ask that of most rows (how many cross depends on the trained steps: 89.5 % of rows within
    # 1e-4 with one thread, 100 % with two, at lr_q = lr_s = 0.003), the same predictions and accuracy.
    close_rows = (np.abs(got - expected) <= 1e-4 * max(1.0, np.abs(expected).max())).all(axis=1)
    assert close_rows.mean() >= 0.85
    assert (got.argmax(1) == expected.argmax(1)).mean() >= 0.99
    assert abs((got.argmax(1) == y).mean() - (expected.argmax(1) == y).mean()) <= 0.005


def test_resnet20_is_sized_from_a_grey_checkpoint():
    from cdlcodec import models

    grey = models.build("resnet20:in_channels=1")
    assert grey.example_input_shape == (1, 1, 32, 32)
    rebuilt = models.build("resnet20", shapes={k: tuple(v.shape) for k, v in grey.state_dict().items()})
    assert rebuilt.conv1.in_channels == 1 and rebuilt.fc.out_features == 10
    rebuilt.load_state_dict(grey.state_dict(), strict=True)
    assert models.build("resnet20").conv1.in_channels == 3


def test_finetune_example_runs_end_to_end(tmp_path, capsys):
    """examples/finetune_resnet20.py at toy size: every stage runs and ONNX agrees with load()."""
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "examples" / "finetune_resnet20.py"
    spec = importlib.util.spec_from_file_location("finetune_resnet20_example", path)
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    report = example.main(["--fp-epochs", "0", "--epochs", "1", "--train-samples", "32", "--batch-size", "32",
                           "--test-samples", "64", "--out-dir", str(tmp_path)])
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1]) == report
    assert report["finetune_steps"] == 1 and report["weights"] == 270608
    assert report["prediction_agreement"] >= 63 / 64 and report["onnx_accuracy"] == pytest.approx(report["load_accuracy"], abs=1 / 64)
    assert 0 < report["coded_bits_per_weight"] < 8
    assert {p.name for p in tmp_path.iterdir()} == {"resnet20-cdl.pt", "resnet20.cdl", "resnet20.onnx"}
