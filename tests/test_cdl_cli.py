"""`cdlcodec train` end to end (one epoch) and its error handling."""
import json

import pytest
import torch

from cdlcodec.cli.main import main


def _run(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def test_train_cdl_smoke(tmp_path, capsys):
    from cdlcodec.cdl.checkpoint import build_model_from_checkpoint
    from cdlcodec.cdl_format import read_cdl_metadata
    from cdlcodec.data.mnist import load_mnist_5k
    from cdlcodec.training import evaluate

    out = tmp_path / "ckpt.pt"
    code, stdout, _ = _run(["train", "lenet5-mnist", "--mode", "cdl", "--bits", "4", "--lambda", "1e-6",
                            "--gamma", "1e-5", "--epochs", "2", "--train-samples", "320", "-o", str(out), "--quiet"], capsys)
    assert code == 0
    lines = stdout.strip().splitlines()
    assert len(lines) == 1
    report = json.loads(lines[0])
    assert report["mode"] == "cdl" and report["epochs"] == 2 and report["steps"] == 10
    assert report["lambda"] == 1e-6 and report["gamma"] == 1e-5
    assert 0 < report["bits_per_weight"] < 8 and 0 < report["bits_per_activation"] <= 5
    assert 0 < report["entropy_bits_per_weight"] < 8
    state = torch.load(out, weights_only=True)
    assert read_cdl_metadata(state).mode == "cdl"
    model = build_model_from_checkpoint(state)
    (_, _), (x_test, y_test) = load_mnist_5k()
    assert evaluate(model, x_test, y_test) == report["test_accuracy"]
    assert not list(tmp_path.glob(".tmp-*"))          # the atomic write left no temporary file


def test_train_fp_writes_plain_state_dict(tmp_path, capsys):
    from cdlcodec.models import build

    out = tmp_path / "fp.pt"
    code, stdout, _ = _run(["train", "lenet5-mnist", "--mode", "fp", "--epochs", "1", "--train-samples", "2000", "-o", str(out), "-q"],
                           capsys)
    assert code == 0
    report = json.loads(stdout)
    assert report["bits_per_weight"] == 32.0 and report["test_accuracy"] > 0.5
    build("lenet5").load_state_dict(torch.load(out, weights_only=True), strict=True)


@pytest.mark.parametrize("argv,needle", [
    (["train", "resnet-imagenet", "-o", "x.pt"], "unknown task"),
    (["train", "lenet5-mnist", "--bits", "1", "-o", "x.pt"], "--bits"),
    (["train", "lenet5-mnist", "--lambda", "-1", "-o", "x.pt"], "--lambda"),
    (["train", "lenet5-mnist", "--epochs", "0", "-o", "x.pt"], "--epochs"),
    (["train", "lenet5-mnist", "--train-samples", "0", "-o", "x.pt"], "--train-samples"),
    (["train", "lenet5-mnist", "-o", "/nonexistent-dir/x.pt"], "directory"),
    (["train", "lenet5-mnist", "--fp-epochs", "-1", "-o", "x.pt"], "--fp-epochs"),
    (["train", "lenet5-mnist", "--mode", "fp", "--fp-epochs", "2", "-o", "x.pt"], "--fp-epochs"),
    (["train", "lenet5-mnist", "--sharpness-constant", "0", "-o", "x.pt"], "sharpness constant"),
])
def test_train_bad_options_are_clean_errors(argv, needle, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, err = _run(argv, capsys)
    assert code == 2
    assert needle in err and "Traceback" not in err
    assert not (tmp_path / "x.pt").exists()
