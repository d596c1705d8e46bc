"""Sweeps: point expansion, eq. 41 rates measured on the real containers, methods, built-in tasks."""
from __future__ import annotations

import math
import sys

import numpy as np
import pytest
import torch
from torch import nn

from cdlcodec.errors import CdlInputError
from cdlcodec.evaluation import Task, expand, get_task, run_recipe, run_sweep
from cdlcodec.evaluation import tasks as tasks_module
from cdlcodec.evaluation.plot import pareto_front
from cdlcodec.evaluation.rates import container_rates


@pytest.fixture(scope="module")
def toy_task():
    """A trained-looking linear classifier on separable synthetic data (no training needed)."""
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 32, generator=g) * 2
    labels = torch.arange(400) % 4
    x = centers[labels] + 0.5 * torch.randn(400, 32, generator=g)
    model = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 4))
    with torch.no_grad():   # a readout that solves the task: first layer sees the class centres
        model[0].weight.copy_(torch.cat([centers, -centers, torch.randn(8, 32, generator=g) * 0.1]) / 8)
        model[0].bias.zero_()
        model[2].weight.copy_(torch.cat([torch.eye(4), -torch.eye(4), torch.zeros(4, 8)], 1))
        model[2].bias.zero_()

    def evaluate(m):
        with torch.no_grad():
            return float((m(x).argmax(1) == labels).float().mean())

    return Task.from_model("toy", model, evaluate)


def test_expand_is_a_cartesian_product_with_stable_keys():
    specs = expand({"method": "rd", "lam": [0.1, 0.3], "rel_step": [0.2, 0.5], "backend": "cabac"})
    assert [s.key("t") for s in specs] == [
        "t/rd/backend=cabac,lam=0.1,rel_step=0.2", "t/rd/backend=cabac,lam=0.1,rel_step=0.5",
        "t/rd/backend=cabac,lam=0.3,rel_step=0.2", "t/rd/backend=cabac,lam=0.3,rel_step=0.5"]
    assert expand({"method": "fp32"})[0].key("t") == "t/fp32/default"
    with pytest.raises(CdlInputError):
        expand({"rel_step": 0.1})


def test_bad_points_are_rejected_before_any_work(toy_task):
    with pytest.raises(CdlInputError, match="unknown method"):
        run_sweep(toy_task, [{"method": "nearest"}, {"method": "magic"}], quiet=True)
    with pytest.raises(CdlInputError, match="no setting 'rel_stp'"):
        run_sweep(toy_task, [{"method": "nearest", "rel_stp": 0.1}], quiet=True)
    with pytest.raises(CdlInputError, match="twice"):
        run_sweep(toy_task, [{"method": "fp16"}, {"method": "fp16"}], quiet=True)


def test_post_training_sweep_measures_the_real_container(toy_task):
    kept = {}

    def keep_files(row):
        kept[row["key"]] = row

    result = run_sweep(toy_task, [{"method": "fp32"}, {"method": "nearest", "rel_step": [0.05, 1.0]},
                                  {"method": "rd", "rel_step": 0.5, "lam": [0.0, 0.5]},
                                  {"method": "fp16"}, {"method": "int8-zlib"}, {"method": "int8-lzma"}],
                       quiet=True, on_row=keep_files)
    rows = {r["key"]: r for r in result["rows"]}
    assert not [r for r in rows.values() if "error" in r]
    assert result["reference_accuracy"] == 1.0
    n_weights = 32 * 16 + 16 * 4
    n_params = n_weights + 16 + 4
    fp32 = rows["toy/fp32/default"]
    assert (fp32["bits_per_weight"], fp32["file_bytes"], fp32["num_weights"]) == (32.0, 4 * n_params, n_weights)
    assert rows["toy/fp16/default"]["bits_per_weight"] == 16.0
    fine, coarse = rows["toy/nearest/rel_step=0.05"], rows["toy/nearest/rel_step=1"]
    assert fine["num_weights"] == n_weights and fine["num_params"] == n_params
    assert coarse["bits_per_weight"] < fine["bits_per_weight"] < 16
    assert fine["accuracy"] == 1.0 and fine["accuracy_drop"] == 0.0
    # bits per parameter counts the whole file
    assert fine["bits_per_param"] == pytest.approx(8 * fine["file_bytes"] / n_params)
    # float activations count as 32 bits (eq. 41b applies to quantized activations only)
    assert {r["bits_per_activation"] for r in rows.values()} == {32.0}
    # lambda 0 is nearest rounding: the same levels, the same size as nearest at that step
    rd0, rd5 = rows["toy/rd/lam=0,rel_step=0.5"], rows["toy/rd/lam=0.5,rel_step=0.5"]
    assert rd5["bits_per_weight"] < rd0["bits_per_weight"]
    for row in rows.values():
        assert row["encode_ms"] >= 0 and row["decode_ms"] >= 0
    assert set(kept) == set(rows)


def test_bits_per_weight_is_the_coded_weight_payload(tmp_path, toy_task):
    """eq. 41a: Σ coded bits of the quantized tensors / their element count, read from the index."""
    from cdlcodec.codec import EncodeOptions, container_summary, encode_records
    from cdlcodec.io.torch_checkpoint import tensor_to_record
    from cdlcodec.quantizers.uniform import UniformQuantizer

    path = str(tmp_path / "m.cdl")
    records = [tensor_to_record(k, v) for k, v in toy_task.reference_model().state_dict().items()]
    encode_records(records, path, EncodeOptions(UniformQuantizer(rel_step=0.2), "huffman", (), True))
    rates = container_rates(path)
    summary = container_summary(path)
    quantized = [t for t in summary["tensors"] if t["scheme"] == "uniform"]
    assert [t["name"] for t in quantized] == ["0.weight", "2.weight"]
    assert rates.weight_bits == 8 * sum(t["bytes"] for t in quantized)
    assert rates.num_weights == sum(math.prod(t["shape"]) for t in quantized)
    assert rates.bits_per_param == pytest.approx(8 * summary["total_bytes"] / summary["num_params"])


def test_pareto_front():
    pts = [(4.0, 96.0), (2.0, 90.0), (3.0, 95.0), (3.5, 94.0), (8.0, 96.0), (2.0, 91.0), (32.0, 97.0)]
    assert [pts[i] for i in pareto_front(pts)] == [(2.0, 91.0), (3.0, 95.0), (4.0, 96.0), (32.0, 97.0)]


def test_mlp_digits_cdl_point_reproduces_the_trained_model():
    """Built-in task + R-CDL method: quantized activations are measured (eq. 41b) and the model
    rebuilt from the container is exactly as accurate as the trained checkpoint in eval mode."""
    results = run_recipe({"threads": 1, "sweeps": [{"task": "mlp-digits", "fp_epochs": 4, "points": [
        {"method": "rcdl", "bits": 4, "epochs": 1}, {"method": "nearest", "rel_step": 0.3}]}]}, quiet=True)
    rows = {r["method"]: r for r in results["sweeps"][0]["rows"]}
    assert "error" not in rows["rcdl"], rows["rcdl"].get("error")
    rcdl = rows["rcdl"]
    assert rcdl["accuracy"] == rcdl["extra"]["trained_accuracy"]
    assert 0 < rcdl["bits_per_activation"] <= 4.0   # 4-bit activations, a Huffman code is never longer than the 4-bit fixed code
    assert 0 < rcdl["bits_per_weight"] < 8.5
    assert results["sweeps"][0]["reference_accuracy"] > 0.8
    assert results["environment"]["threads"] == 1


def test_mlp_digits_needs_scikit_learn(monkeypatch):
    tasks_module.digits_data.cache_clear()
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    try:
        with pytest.raises(CdlInputError, match="needs scikit-learn"):
            get_task("mlp-digits")
    finally:
        tasks_module.digits_data.cache_clear()


def test_unknown_task_names_the_known_ones():
    with pytest.raises(CdlInputError, match="lenet5-mnist"):
        get_task("resnet-imagenet")


def test_cdl_needs_a_task_with_architecture(toy_task):
    result = run_sweep(toy_task, [{"method": "rcdl", "bits": 4, "epochs": 1}], quiet=True)
    assert "CDL training needs a built-in task" in result["rows"][0]["error"]


def test_activation_rate_of_float_models_is_32(toy_task):
    from cdlcodec.evaluation.rates import activation_bits_per_element

    assert activation_bits_per_element(toy_task.reference_model(), torch.zeros(2, 32)) == 32.0
    assert np.isfinite(activation_bits_per_element(toy_task.reference_model(), None))
