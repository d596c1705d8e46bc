"""Results out: a terminal table, a Markdown table, CSV and JSON (all from the results document)."""
from __future__ import annotations

import csv
import io
import json
import os

from ..atomic import write_bytes_atomic
from .sweep import all_rows

COLUMNS = [  # (field, header, format)
    ("method", "method", "{}"),
    ("label", "settings", "{}"),
    ("bits_per_weight", "bits/weight", "{:.3f}"),
    ("bits_per_activation", "bits/act", "{:.2f}"),
    ("bits_per_param", "bits/param", "{:.3f}"),
    ("file_bytes", "bytes", "{:,}"),
    ("accuracy", "accuracy %", "{:.2f}"),
    ("accuracy_drop", "drop (pts)", "{:+.2f}"),
    ("encode_ms", "encode ms", "{:.1f}"),
    ("decode_ms", "decode ms", "{:.1f}"),
]
CSV_FIELDS = ["key", "task", "method", "label", "bits_per_weight", "bits_per_activation", "bits_per_param",
              "file_bytes", "num_params", "num_weights", "accuracy", "accuracy_drop", "encode_ms", "decode_ms",
              "error"]
MEASURE_FIELDS = ["measure", "fidelity"]  # rows of ONNX model tasks (onnx_task.py): the measure, not accuracy
# Accuracies are fractions in the results (docs/measures.md); the tables show them in percent.
PERCENT_FIELDS = {"accuracy", "accuracy_drop"}


def percent(fraction: float) -> float:
    return 100.0 * fraction


def columns(sweep: dict) -> list[tuple[str, str, str]]:
    """The table's columns: accuracy for built-in tasks; the measure (no bits/act) for ONNX model tasks."""
    if sweep.get("measure") is None:
        return COLUMNS
    measure = ("fidelity", sweep["measure"], "{:.6g}")
    sizes = [c for c in COLUMNS[:-2] if c[0] not in ("bits_per_activation", "accuracy", "accuracy_drop")]
    return sizes + [measure] + COLUMNS[-2:]  # the timings stay last


def heading(sweep: dict) -> str:
    if sweep.get("measure") is None:
        return f"float32 reference accuracy {percent(sweep['reference_accuracy']):.2f} %"
    return f"{sweep['measure']} of the decoded model's outputs against the original's"


def _cells(row: dict, cols: list = COLUMNS) -> list[str]:
    if "error" in row:
        return [row["method"], row["label"], f"error: {row['error']}"] + [""] * (len(cols) - 3)
    return [fmt.format(percent(row[f]) if f in PERCENT_FIELDS else row[f]) if row.get(f) is not None else "-"
            for f, _, fmt in cols]


def table(results: dict) -> str:
    """A plain-text table per task, aligned for a terminal."""
    out = []
    for sweep in results["sweeps"]:
        cols = columns(sweep)
        out.append(f"{sweep['task']}: {sweep.get('description', '')} ({heading(sweep)})")
        rows = [[h for _, h, _ in cols]] + [_cells(r, cols) for r in sweep["rows"]]
        widths = [max(len(r[i]) for r in rows if not r[2].startswith("error")) for i in range(len(cols))]
        for n, cells in enumerate(rows):
            if cells[2].startswith("error"):
                out.append(f"  {cells[0]:<{widths[0]}}  {cells[1]:<{widths[1]}}  {cells[2]}")
                continue
            text = "  ".join(c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths)))
            out.append("  " + text)
            if n == 0:
                out.append("  " + "  ".join("-" * w for w in widths))
        out.append("")
    return "\n".join(out).rstrip() + "\n"


def markdown(results: dict) -> str:
    """The README / docs table (one section per task)."""
    out = []
    for sweep in results["sweeps"]:
        cols = columns(sweep)
        out.append(f"**{sweep['task']}**: {sweep.get('description', '')}; {heading(sweep)}.\n")
        out.append("| " + " | ".join(h for _, h, _ in cols) + " |")
        out.append("|" + "|".join("---" if i < 2 else "---:" for i in range(len(cols))) + "|")
        for row in sweep["rows"]:
            cells = _cells(row, cols)
            out.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
        out.append("")
    return "\n".join(out)


def csv_text(results: dict) -> str:
    buf = io.StringIO()
    with_measure = any(s.get("measure") is not None for s in results.get("sweeps", []))
    fields = CSV_FIELDS[:-1] + MEASURE_FIELDS + CSV_FIELDS[-1:] if with_measure else CSV_FIELDS
    writer = csv.DictWriter(buf, fields, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in all_rows(results):
        writer.writerow(row)
    return buf.getvalue()


def json_text(results: dict) -> str:
    return json.dumps(results, indent=1, sort_keys=False) + "\n"


def write_text(path: str, text: str) -> None:
    """Atomic write (temporary file in the same directory, then rename)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    write_bytes_atomic(path, text.encode("utf-8"))
