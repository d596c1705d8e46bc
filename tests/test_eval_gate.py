"""The rate-accuracy gate: it must fail on real regressions (exit status 1) and pass otherwise."""
from __future__ import annotations

import copy
import json
import os

import pytest

from cdlcodec.errors import CdlInputError
from cdlcodec.evaluation import gate
from cdlcodec.evaluation.sweep import RESULTS_FORMAT, expand, load_recipe


ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _row(key, bpw, acc, bpp=None):
    task, method, label = key.split("/")
    return {"key": key, "task": task, "method": method, "label": label, "bits_per_weight": bpw,
            "bits_per_param": bpp if bpp is not None else bpw + 1.0, "bits_per_activation": 32.0,
            "accuracy": acc, "accuracy_drop": 0.0}


@pytest.fixture
def results():
    rows = [_row("t/fp32/default", 32.0, 0.97), _row("t/nearest/rel_step=0.1", 4.5, 0.969),
            _row("t/nearest/rel_step=0.5", 2.4, 0.95), _row("t/rcdl/bits=4", 2.6, 0.965)]
    return {"format": RESULTS_FORMAT, "version": 1, "sweeps": [{"task": "t", "reference_accuracy": 0.97, "rows": rows}]}


def _doctor(results, key, **changes):
    out = copy.deepcopy(results)
    for row in out["sweeps"][0]["rows"]:
        if row["key"] == key:
            for field, factor_or_delta in changes.items():
                if field == "accuracy":
                    row[field] += factor_or_delta
                else:
                    row[field] *= factor_or_delta
    return out


def test_unmodified_results_pass(results):
    report = gate.compare(results, gate.make_baseline(results))
    assert report.passed and not report.failures
    assert "PASSED" in report.text()


def test_three_percent_more_bits_fails(results):
    bad = _doctor(results, "t/nearest/rel_step=0.5", bits_per_weight=1.03)
    report = gate.compare(bad, gate.make_baseline(results))
    assert not report.passed
    assert [f.key for f in report.failures] == ["t/nearest/rel_step=0.5"]
    assert "bits/weight 2.4000 -> 2.4720 (+3.00 %)" in report.text()


def test_within_tolerance_passes_and_gains_are_reported(results):
    base = gate.make_baseline(results)
    assert gate.compare(_doctor(results, "t/rcdl/bits=4", bits_per_weight=1.015, accuracy=-0.004), base).passed
    better = gate.compare(_doctor(results, "t/rcdl/bits=4", bits_per_weight=0.9), base)
    assert better.passed and [f.status for f in better.findings if f.key == "t/rcdl/bits=4"] == ["improved"]


def test_accuracy_drop_file_overhead_missing_and_failed_points_fail(results):
    base = gate.make_baseline(results)
    assert not gate.compare(_doctor(results, "t/fp32/default", accuracy=-0.006), base).passed
    assert not gate.compare(_doctor(results, "t/fp32/default", bits_per_param=1.05), base).passed
    missing = copy.deepcopy(results)
    missing["sweeps"][0]["rows"].pop(1)
    report = gate.compare(missing, base)
    assert [f.message for f in report.failures] == ["missing from the new results"]
    failed = copy.deepcopy(results)
    failed["sweeps"][0]["rows"][1] = {"key": "t/nearest/rel_step=0.1", "method": "nearest", "error": "boom"}
    assert not gate.compare(failed, base).passed
    with pytest.raises(CdlInputError, match="failed points"):
        gate.make_baseline(failed)


def test_accuracy_is_a_fraction_gated_in_points_and_shown_in_percent(tmp_path, results, cli):
    base = gate.make_baseline(results)
    assert base["points"]["t/fp32/default"]["accuracy"] == 0.97  # the baseline keeps the fraction
    report = gate.compare(_doctor(results, "t/fp32/default", accuracy=-0.006), base)
    assert "accuracy 97.00 -> 96.40 % (-0.60 points), limit -0.50" in report.text()
    # the tolerance stays in percentage points: a 0.4-point drop passes at 0.5 and fails at 0.3
    dropped = _doctor(results, "t/rcdl/bits=4", accuracy=-0.004)
    assert gate.compare(dropped, base).passed
    assert not gate.compare(dropped, base, {"accuracy_points": 0.3}).passed
    baseline, doctored = tmp_path / "baseline.json", tmp_path / "dropped.json"
    baseline.write_text(json.dumps(base))
    doctored.write_text(json.dumps(dropped))
    assert cli("gate", doctored, "--baseline", baseline)[0] == 0
    code, out, _ = cli("gate", doctored, "--baseline", baseline, "--accuracy-tolerance", "0.3")
    assert code == 1 and "accuracy 96.50 -> 96.10 % (-0.40 points), limit -0.30" in out


def test_a_baseline_in_percent_is_refused_not_misread(results):
    base = gate.make_baseline(results)
    base["points"]["t/fp32/default"]["accuracy"] = 97.0
    with pytest.raises(CdlInputError, match="baseline point t/fp32/default: accuracy 97 is not a fraction in"):
        gate.compare(results, base)
    with pytest.raises(CdlInputError, match="results row t/fp32/default: accuracy 97 is not a fraction in"):
        gate.compare(_doctor(results, "t/fp32/default", accuracy=96.03), gate.make_baseline(results))


def test_gate_command_exit_status(tmp_path, results, run_cli):
    baseline = tmp_path / "baseline.json"
    baseline.write_text(json.dumps(gate.make_baseline(results)))
    good = tmp_path / "good.json"
    good.write_text(json.dumps(results))
    doctored = tmp_path / "doctored.json"
    doctored.write_text(json.dumps(_doctor(results, "t/nearest/rel_step=0.1", bits_per_weight=1.03)))

    ok = run_cli("gate", good, "--baseline", baseline)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "result: PASSED" in ok.stdout

    bad = run_cli("gate", doctored, "--baseline", baseline)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "FAIL     t/nearest/rel_step=0.1" in bad.stdout and "+3.00 %" in bad.stdout

    # the same through `cdlcodec eval --results ... --gate ...` (no sweep is run)
    via_eval = run_cli("eval", "--results", doctored, "--gate", baseline, "--no-plot", "-q")
    assert via_eval.returncode == 1 and "result: FAILED" in via_eval.stdout

    loose = run_cli("gate", doctored, "--baseline", baseline, "--bits-tolerance", "0.05")
    assert loose.returncode == 0

    not_results = run_cli("gate", baseline, "--baseline", baseline)
    assert not_results.returncode == 2 and "not a results file" in not_results.stderr


def test_committed_baseline_matches_the_ci_recipe():
    """Every point of benchmarks/ci_sweep.json is gated, and nothing else (they must not drift apart)."""
    recipe = load_recipe(os.path.join(ROOT, "benchmarks", "ci_sweep.json"))
    with open(os.path.join(ROOT, "benchmarks", "rate_accuracy_baseline.json"), encoding="utf-8") as fh:
        baseline = json.load(fh)
    gate.check_baseline(baseline)
    keys = {spec.key(sweep["task"]) for sweep in recipe["sweeps"] for p in sweep["points"] for spec in expand(p)}
    assert keys == set(baseline["points"])
    assert baseline["tolerances"] == {"bits_rel": 0.02, "accuracy_points": 0.5}
    assert all(0.0 <= p["accuracy"] <= 1.0 for p in baseline["points"].values())  # fractions, like results.json
    assert baseline["recipe"]["sweeps"] == recipe["sweeps"]
