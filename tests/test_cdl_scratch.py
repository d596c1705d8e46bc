"""Training from scratch (issue 17, point 3): the default sharpness schedule learns, and a collapsed
run is an error that names its likely cause and writes no checkpoint."""
import json

import pytest
import torch

from cdlcodec.cdl.convert import calibrate, convert, weight_quantizers
from cdlcodec.cdl.train import TrainConfig, TrainingCollapsed, diagnose_collapse, train_model
from cdlcodec.cli.main import main
from cdlcodec.models import build


@pytest.fixture(scope="module")
def digits():
    from cdlcodec.data.mnist import load_mnist_5k

    return load_mnist_5k()


def test_rcdl_from_scratch_learns_on_a_subset(digits):
    # 960 digits, 2 epochs (30 steps), no warm start. Measured: 52 % with the default anneal
    # schedule, 22.6 % with the former default (α·q² = β·s² = 8 from the first step), FP 68.4 %.
    (x, y), (xt, yt) = digits
    torch.manual_seed(0)
    config = TrainConfig(mode="rcdl", bits=4, epochs=2, quiet=True)
    result = train_model(build("lenet5"), x[:960], y[:960], xt, yt, config)
    assert result.test_accuracy >= 0.40
    assert result.collapse is None
    for _, m in weight_quantizers(result.model):       # sharp at the end: soft and hard quantizers agree
        assert float((m.alpha * m.q ** 2).detach()) >= 8.0 * (1 - 1e-5)


def _run(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        main(argv)
    out = capsys.readouterr()
    return exc.value.code, out.out, out.err


def test_diverging_training_is_an_error_and_writes_nothing(tmp_path, capsys):
    # Full precision at an absurd learning rate: the logits overflow at the second step.
    out = tmp_path / "fp.pt"
    code, stdout, err = _run(["train", "lenet5-mnist", "--mode", "fp", "--lr", "1e30", "--train-samples", "256",
                              "--epochs", "1", "-o", str(out), "-q"], capsys)
    assert code == 2 and stdout == "" and "Traceback" not in err
    assert err.startswith("cdlcodec: error: training diverged: the loss became nan at step 2")
    assert "the learning rate is too large" in err and "--lr" in err
    assert not out.exists() and not list(tmp_path.iterdir())


def test_collapse_near_chance_is_an_error_unless_allowed(tmp_path, capsys):
    # An absurd learning rate kills every ReLU within 100 steps (batch 1; full precision keeps the
    # test fast, the check is the same for every mode): the run ends near chance. Without
    # --allow-collapse: the error, and no checkpoint.
    argv = ["train", "lenet5-mnist", "--mode", "fp", "--lr", "10", "--train-samples", "100", "--batch-size", "1",
            "--epochs", "1", "-q"]
    out = tmp_path / "r.pt"
    code, stdout, err = _run(argv + ["-o", str(out)], capsys)
    assert code == 2 and stdout == "" and "Traceback" not in err
    assert err.startswith("cdlcodec: error: training collapsed: test accuracy ")
    assert "Likely cause: the model did not learn: lower --lr (now 10)" in err and "--allow-collapse" in err
    assert not out.exists() and not list(tmp_path.iterdir())
    code, stdout, err = _run(argv + ["-o", str(out), "--allow-collapse"], capsys)
    assert code == 0 and out.exists()
    assert json.loads(stdout)["collapse"].startswith("training collapsed")
    assert err.startswith("cdlcodec: warning: training collapsed")


def test_dead_layers_are_named_with_the_price_of_a_bit(digits):
    (x, _), (xt, yt) = digits
    torch.manual_seed(0)
    model = convert(build("lenet5"), bits=4, mode="rcdl")
    calibrate(model, torch.as_tensor(x[:64]))
    with torch.no_grad():
        model.fc1.weight.zero_()                  # what an overwhelming λ·H(w) drives a layer to
    config = TrainConfig(mode="rcdl", lam=1e-3, gamma=0.0)
    probe = torch.as_tensor(xt[:256])
    verdict = diagnose_collapse(model, 0.3, 0.1, 5, 0.2, config, probe)   # short run, accuracy well above chance
    assert verdict is not None and "fc1 (all weights quantize to 0)" in verdict
    assert "one bit per weight costs 61.5" in verdict and "|w| = 61,470" in verdict
    model.fc1.weight.data.normal_(0, 0.05)
    assert diagnose_collapse(model, 0.3, 0.1, 5, 0.2, config, probe) is None
    # Near chance: judged after MIN_STEPS_TO_JUDGE steps, or when training accuracy was high.
    assert diagnose_collapse(model, 0.11, 0.1, 5, 0.2, config, probe) is None
    assert diagnose_collapse(model, 0.11, 0.1, 500, 0.2, config, probe).startswith("training collapsed: test accuracy 11.0 %")
    hard = diagnose_collapse(model, 0.11, 0.1, 5, 0.9, TrainConfig(mode="rcdl"), probe)
    assert "hard eval quantizer" in hard


def test_library_raises_training_collapsed_with_parameter_names(digits):
    (x, y), (xt, yt) = digits
    torch.manual_seed(0)
    config = TrainConfig(mode="fp", lr=1e30, epochs=1, quiet=True)
    with pytest.raises(TrainingCollapsed, match=r"lower lr \(now 1e\+30\)"):
        train_model(build("lenet5"), x[:128], y[:128], xt[:64], yt[:64], config)
