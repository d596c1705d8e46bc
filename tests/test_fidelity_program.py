"""Fidelity targets for torch.export programs (.pt2, issue 13): the program runs as it is.

The search works on an ONNX translation of the program; what is promised is checked by running the
decoded container's own program in torch. These tests decode the written file, load its program and
measure the promise themselves.
"""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime")

from cdlcodec.api import decode, encode  # noqa: E402
from cdlcodec.errors import CdlInputError  # noqa: E402
from cdlcodec.fidelity.measures import cosine  # noqa: E402


class _Net(torch.nn.Module):
    """Conv + BatchNorm (with non-trivial running statistics) + Linear: BN must not be folded away."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 8, 3)
        self.bn = torch.nn.BatchNorm2d(8)
        self.fc = torch.nn.Linear(8 * 6 * 6, 10)

    def forward(self, x):
        return self.fc(torch.relu(self.bn(self.conv(x))).flatten(1))


def _program(tmp_path, dynamic=True):
    torch.manual_seed(0)
    net = _Net()
    with torch.no_grad():
        net.bn.running_mean.uniform_(-0.5, 0.5)
        net.bn.running_var.uniform_(0.5, 2.0)
    net.eval()
    example = (torch.randn(2, 1, 8, 8),)
    shapes = ({0: torch.export.Dim("batch")},) if dynamic else None
    program = torch.export.export(net, example, dynamic_shapes=shapes)
    path = tmp_path / "net.pt2"
    torch.export.save(program, path)
    return net, path


def _calibration(tmp_path, n=48, name="x"):
    rng = np.random.default_rng(1)
    x = rng.standard_normal((n, 1, 8, 8)).astype(np.float32)
    path = tmp_path / "calib.npz"
    np.savez(path, **{name: x})
    return x, path


def _decoded_outputs(tmp_path, container, x):
    back = tmp_path / "back.pt2"
    decode(str(container), str(back))
    module = torch.export.load(back).module()   # our own file, written by the test: trusted
    with torch.no_grad():
        return [[module(torch.from_numpy(x[i:i + 1])).numpy()] for i in range(len(x))]


def test_pt2_meets_an_explicit_target_on_its_own_program(tmp_path):
    net, path = _program(tmp_path)
    x, calib = _calibration(tmp_path)
    summary = encode(str(path), str(tmp_path / "net.cdl"), target=("cosine", 0.995), calibration=str(calib))
    report = summary.fidelity
    assert report is not None and report.checked >= 0.995
    with torch.no_grad():
        reference = [[net(torch.from_numpy(x[i:i + 1])).numpy()] for i in range(len(x))]
    decoded = _decoded_outputs(tmp_path, tmp_path / "net.cdl", x)
    achieved = cosine(reference, decoded)
    assert achieved >= 0.995
    assert achieved == pytest.approx(report.checked, abs=1e-5)   # the reported figure is the program's
    assert achieved < 1.0 - 1e-7                                   # and it was quantized, not stored exactly
    assert summary.coded_bits["fc.weight"] / net.fc.weight.numel() < 8


def test_pt2_default_target_with_in_memory_batches_keeps_decisions(tmp_path):
    net, path = _program(tmp_path)
    x, _ = _calibration(tmp_path)
    batches = [torch.from_numpy(x[i:i + 16]) for i in range(0, len(x), 16)]
    summary = encode(str(path), str(tmp_path / "d.cdl"), calibration=batches)
    assert summary.fidelity.checked >= 0.999
    with torch.no_grad():
        reference = net(torch.from_numpy(x)).argmax(1).numpy()
    decoded = np.concatenate([o[0] for o in _decoded_outputs(tmp_path, tmp_path / "d.cdl", x)]).argmax(1)
    assert (decoded == reference).all()


def test_pt2_cli_calibration_named_after_the_wrong_input_is_a_clean_error(tmp_path, cli):
    _, path = _program(tmp_path)
    _, calib = _calibration(tmp_path, name="images")
    out = tmp_path / "w.cdl"
    code, _, err = cli("encode", path, "-o", out, "--calibration", calib, "-q")
    assert code == 2
    assert "cdlcodec: error:" in err and "x" in err and "images" in err
    assert not out.exists()


def test_pt2_that_cannot_take_one_sample_is_refused_with_advice(tmp_path):
    _, path = _program(tmp_path, dynamic=False)   # batch fixed at 2 by the export
    _, calib = _calibration(tmp_path)
    with pytest.raises(CdlInputError, match="one sample at a time"):
        encode(str(path), str(tmp_path / "s.cdl"), target=("cosine", 0.99), calibration=str(calib))
    assert not (tmp_path / "s.cdl").exists()


def test_pt2_target_without_calibration_is_refused(tmp_path):
    _, path = _program(tmp_path)
    with pytest.raises(CdlInputError, match="needs calibration data"):
        encode(str(path), str(tmp_path / "n.cdl"), target=("cosine", 0.99))


def test_pt2_without_calibration_or_target_stays_data_free(tmp_path):
    _, path = _program(tmp_path)
    summary = encode(str(path), str(tmp_path / "f.cdl"))
    assert summary.fidelity is None
