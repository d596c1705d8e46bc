"""Reports of a sweep: terminal table, Markdown, CSV, JSON and the PNG plot."""
from __future__ import annotations

import csv
import io
import json

from cdlcodec.evaluation import report
from cdlcodec.evaluation.plot import plot
from cdlcodec.evaluation.sweep import RESULTS_FORMAT


RESULTS = {"format": RESULTS_FORMAT, "version": 1, "sweeps": [{
    "task": "t", "description": "toy", "reference_accuracy": 0.97, "rows": [
        {"key": "t/fp32/default", "task": "t", "method": "fp32", "label": "default", "bits_per_weight": 32.0,
         "bits_per_activation": 32.0, "bits_per_param": 32.0, "file_bytes": 4000, "num_params": 1000,
         "num_weights": 900, "accuracy": 0.97, "accuracy_drop": 0.0, "encode_ms": 0.0, "decode_ms": 0.0},
        {"key": "t/rcdl/bits=2", "task": "t", "method": "rcdl", "label": "bits=2", "bits_per_weight": 1.9,
         "bits_per_activation": 1.5, "bits_per_param": 2.5, "file_bytes": 312, "num_params": 1000,
         "num_weights": 900, "accuracy": 0.955, "accuracy_drop": 0.015, "encode_ms": 3.0, "decode_ms": 1.0},
        {"key": "t/rd/lam=0.1", "task": "t", "method": "rd", "label": "lam=0.1", "error": "rd broke"},
    ]}]}


def test_table_markdown_and_csv():
    text = report.table(RESULTS)
    assert "float32 reference accuracy 97.00 %" in text
    assert "rcdl" in text and "1.900" in text and "error: rd broke" in text
    md = report.markdown(RESULTS)
    assert "| rcdl | bits=2 | 1.900 | 1.50 | 2.500 | 312 | 95.50 | +1.50 | 3.0 | 1.0 |" in md
    rows = list(csv.DictReader(io.StringIO(report.csv_text(RESULTS))))
    assert [r["key"] for r in rows] == ["t/fp32/default", "t/rcdl/bits=2", "t/rd/lam=0.1"]
    assert rows[2]["error"] == "rd broke" and float(rows[1]["bits_per_weight"]) == 1.9
    # the machine outputs keep the fraction; only the tables above show percent
    assert (float(rows[1]["accuracy"]), float(rows[1]["accuracy_drop"])) == (0.955, 0.015)
    assert json.loads(report.json_text(RESULTS)) == RESULTS


def test_plot_writes_a_small_png(tmp_path):
    path = plot(RESULTS, str(tmp_path / "curve.png"), min_accuracy=90.0)
    data = open(path, "rb").read()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and 5_000 < len(data) < 100_000


def test_eval_results_mode_replots_without_sweeping(tmp_path, run_cli):
    src = tmp_path / "results.json"
    src.write_text(json.dumps(RESULTS))
    png, md = tmp_path / "out.png", tmp_path / "table.md"
    done = run_cli("eval", "--results", src, "--png", png, "--markdown", md)
    assert done.returncode == 0, done.stderr
    assert png.read_bytes()[:4] == b"\x89PNG" and "| rcdl | bits=2 |" in md.read_text()
    assert "rcdl" in done.stdout
    clash = run_cli("eval", "lenet5-mnist", "--results", src)
    assert clash.returncode == 2 and "--results reuses a finished sweep" in clash.stderr
