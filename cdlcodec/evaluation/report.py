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


def _cells(row: dict) -> list[str]:
    if "error" in row:
        return [row["method"], row["label"], f"error: {row['error']}"] + [""] * (len(COLUMNS) - 3)
    return [fmt.format(row[f]) if row.get(f) is not None else "-" for f, _, fmt in COLUMNS]


def table(results: dict) -> str:
    """A plain-text table per task, aligned for a terminal."""
    out = []
    for sweep in results["sweeps"]:
        out.append(f"{sweep['task']}: {sweep.get('description', '')} "
                   f"(float32 reference accuracy {sweep['reference_accuracy']:.2f} %)")
        rows = [[h for _, h, _ in COLUMNS]] + [_cells(r) for r in sweep["rows"]]
        widths = [max(len(r[i]) for r in rows if not r[2].startswith("error")) for i in range(len(COLUMNS))]
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
        out.append(f"**{sweep['task']}**: {sweep.get('description', '')}; float32 reference accuracy "
                   f"{sweep['reference_accuracy']:.2f} %.\n")
        out.append("| " + " | ".join(h for _, h, _ in COLUMNS) + " |")
        out.append("|" + "|".join("---" if i < 2 else "---:" for i in range(len(COLUMNS))) + "|")
        for row in sweep["rows"]:
            cells = _cells(row)
            out.append("| " + " | ".join(c.replace("|", "/") for c in cells) + " |")
        out.append("")
    return "\n".join(out)


def csv_text(results: dict) -> str:
    buf = io.StringIO()
    writer = csv.DictWriter(buf, CSV_FIELDS, extrasaction="ignore", lineterminator="\n")
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
