"""The CI gate: compare a sweep's results with the committed baseline, point by point.

A reference point fails when its bits per weight (or bits per parameter, which also covers the
container's own overhead) grow by more than `bits_rel` (relative), or its accuracy drops by more
than `accuracy_points` percentage points (accuracies are fractions in the results and the baseline,
so the gate compares 100 x their difference), or it is missing / failed in the new results. Points that
got better beyond the tolerance are reported as improvements (refresh the baseline with
`cdlcodec eval ... --update-baseline` and commit it with the change that earned it).

The tolerances (2 % and 0.5 points) are issue 7's limits; the measured run-to-run noise of the CI
sweep is far below them (docs/evaluation.md, "Noise").
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field

from ..errors import CdlInputError
from .report import percent
from .sweep import RESULTS_FORMAT, all_rows

BASELINE_FORMAT = "cdlcodec-rate-accuracy-baseline"
BASELINE_VERSION = 1
DEFAULT_TOLERANCES = {"bits_rel": 0.02, "accuracy_points": 0.5}
GATED_RATES = (("bits_per_weight", "bits/weight"), ("bits_per_param", "bits/param"))


def make_baseline(results: dict, tolerances: dict | None = None) -> dict:
    """The baseline document for `results` (every successful row becomes a reference point)."""
    check_results(results)
    check_gateable(results)
    failed = [r["key"] for r in all_rows(results) if "error" in r]
    if failed:
        raise CdlInputError(f"refusing to write a baseline from a sweep with failed points: {', '.join(failed)}")
    points = {}
    for row in all_rows(results):
        points[row["key"]] = {"bits_per_weight": row["bits_per_weight"], "bits_per_param": row["bits_per_param"],
                              "accuracy": row["accuracy"], "bits_per_activation": row.get("bits_per_activation")}
    return {"format": BASELINE_FORMAT, "version": BASELINE_VERSION,
            "tolerances": dict(tolerances or DEFAULT_TOLERANCES),
            "environment": results.get("environment", {}), "recipe": results.get("recipe"),
            "points": points}


def check_results(results) -> None:
    if not isinstance(results, dict) or results.get("format") != RESULTS_FORMAT:
        raise CdlInputError(f"not a results file of `cdlcodec eval` (expected format {RESULTS_FORMAT!r})")


def check_gateable(results: dict) -> None:
    """The gate compares accuracy: sweeps that measure output fidelity (ONNX model tasks) have none."""
    measured = [s.get("task") for s in results.get("sweeps", []) if s.get("measure") is not None]
    if measured:
        raise CdlInputError(f"the gate compares accuracy; task {measured[0]!r} measures output fidelity "
                            "(cdlcodec eval --onnx) and cannot be gated")


def check_baseline(baseline) -> None:
    if not isinstance(baseline, dict) or baseline.get("format") != BASELINE_FORMAT:
        raise CdlInputError(f"not a rate-accuracy baseline (expected format {BASELINE_FORMAT!r})")
    if baseline.get("version") != BASELINE_VERSION:
        raise CdlInputError(f"unsupported baseline version {baseline.get('version')!r}")
    if not isinstance(baseline.get("points"), dict) or not baseline["points"]:
        raise CdlInputError("the baseline has no reference points")


@dataclass
class Finding:
    key: str
    status: str          # "FAIL", "improved", "ok", "new"
    message: str


@dataclass
class GateReport:
    tolerances: dict
    findings: list[Finding] = field(default_factory=list)

    @property
    def failures(self) -> list[Finding]:
        return [f for f in self.findings if f.status == "FAIL"]

    @property
    def passed(self) -> bool:
        return not self.failures

    def text(self, verbose: bool = False) -> str:
        t = self.tolerances
        gated = sum(1 for f in self.findings if f.status != "new")
        lines = [f"rate-accuracy gate: {gated} reference points; fail if bits grow > {100 * t['bits_rel']:.1f} % "
                 f"or accuracy drops > {t['accuracy_points']:.2f} points"]
        order = {"FAIL": 0, "improved": 1, "new": 2, "ok": 3}
        width = max((len(f.key) for f in self.findings), default=0)
        for f in sorted(self.findings, key=lambda f: order[f.status]):
            if f.status == "ok" and not verbose:
                continue
            lines.append(f"  {f.status:<8} {f.key:<{width}}  {f.message}")
        n_ok = sum(1 for f in self.findings if f.status == "ok")
        improved = sum(1 for f in self.findings if f.status == "improved")
        if self.passed:
            lines.append(f"result: PASSED ({n_ok} unchanged within tolerance, {improved} improved"
                         + ("; refresh the baseline with --update-baseline to lock the gains in)" if improved else ")"))
        else:
            lines.append(f"result: FAILED ({len(self.failures)} of {gated} reference points regressed)")
        return "\n".join(lines) + "\n"


def _pct(new: float, old: float) -> float:
    return 100.0 * (new - old) / old if old else (0.0 if new == old else float("inf"))


def _fraction(accuracy, where: str) -> float:
    """An accuracy of the results or the baseline: a fraction, never percent (an older file's)."""
    value = float(accuracy)
    if not 0.0 <= value <= 1.0:
        raise CdlInputError(f"{where}: accuracy {value:g} is not a fraction in [0, 1] (percent, from an older "
                            "cdlcodec? re-run the sweep, or refresh the baseline with --update-baseline)")
    return value


def compare(results: dict, baseline: dict, tolerances: dict | None = None) -> GateReport:
    """Every baseline point against the results; tolerances default to the baseline's own."""
    check_results(results)
    check_gateable(results)
    check_baseline(baseline)
    tol = dict(DEFAULT_TOLERANCES)
    tol.update(baseline.get("tolerances") or {})
    tol.update(tolerances or {})
    report = GateReport(tol)
    rows = {r["key"]: r for r in all_rows(results)}
    for key, ref in baseline["points"].items():
        row = rows.get(key)
        if row is None:
            report.findings.append(Finding(key, "FAIL", "missing from the new results"))
            continue
        if "error" in row:
            report.findings.append(Finding(key, "FAIL", f"failed: {row['error']}"))
            continue
        problems, gains, notes = [], [], []
        for field_name, label in GATED_RATES:
            old, new = float(ref[field_name]), float(row[field_name])
            change = _pct(new, old)
            text = f"{label} {old:.4f} -> {new:.4f} ({change:+.2f} %)"
            if new > old * (1 + tol["bits_rel"]):
                problems.append(text + f", limit +{100 * tol['bits_rel']:.1f} %")
            elif new < old * (1 - tol["bits_rel"]):
                gains.append(text)
            elif field_name == "bits_per_weight":
                notes.append(text)
        old = _fraction(ref["accuracy"], f"baseline point {key}")
        new = _fraction(row["accuracy"], f"results row {key}")
        change = percent(new - old)  # percentage points, the unit of the tolerance
        text = f"accuracy {percent(old):.2f} -> {percent(new):.2f} % ({change:+.2f} points)"
        if change < -tol["accuracy_points"]:
            problems.append(text + f", limit -{tol['accuracy_points']:.2f}")
        elif change > tol["accuracy_points"]:
            gains.append(text)
        else:
            notes.append(text)
        if problems:
            report.findings.append(Finding(key, "FAIL", "; ".join(problems)))
        elif gains:
            report.findings.append(Finding(key, "improved", "; ".join(gains)))
        else:
            report.findings.append(Finding(key, "ok", "; ".join(notes)))
    for key in rows:
        if key not in baseline["points"]:
            report.findings.append(Finding(key, "new", "not in the baseline (not gated)"))
    return report


def read_json(path: str, what: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except json.JSONDecodeError as exc:
        raise CdlInputError(f"{path}: the {what} is not valid JSON ({exc})") from None
