"""The rate-accuracy plot: accuracy against bits per weight and against bits per activation.

One curve per method (points sorted by rate), the Pareto front of all points of a task marked
(no other point is both smaller and at least as accurate). Rendered with matplotlib's Agg backend,
so it works without a display.
"""
from __future__ import annotations

import os

from ..atomic import atomic_path
from ..errors import CdlInputError
from .report import percent

_MARKERS = "osD^v<>pPXh*"


def pareto_front(points: list[tuple[float, float]]) -> list[int]:
    """Indices of the points (rate, accuracy) not dominated by another one (lower rate and
    accuracy at least as high, or equal rate and higher accuracy); sorted by rate."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], -points[i][1]))
    front, best = [], float("-inf")
    for i in order:
        if points[i][1] > best:
            front.append(i)
            best = points[i][1]
    return front


def _shown(field: str, value: float) -> float:
    return percent(value) if field == "accuracy" else value


def _curves(rows: list[dict], rate_field: str, value_field: str = "accuracy") -> dict[str, list[tuple[float, float]]]:
    """Points (rate, value) per method; accuracy (a fraction in the results) in percent, as on the axis."""
    curves: dict[str, list[tuple[float, float]]] = {}
    for row in rows:
        if "error" in row or row.get(rate_field) is None:
            continue
        point = (float(row[rate_field]), _shown(value_field, float(row[value_field])))
        curves.setdefault(row["method"], []).append(point)
    return {m: sorted(p) for m, p in curves.items()}


def _panel(ax, rows: list[dict], rate_field: str, xlabel: str, colors: dict, measure: str | None = None) -> None:
    curves = _curves(rows, rate_field, "accuracy" if measure is None else "fidelity")
    lower_is_better = measure == "rel_mse"
    everything = [p for pts in curves.values() for p in pts]
    for n, (method, pts) in enumerate(curves.items()):
        xs, ys = zip(*pts)
        ax.plot(xs, ys, marker=_MARKERS[n % len(_MARKERS)], ms=4, lw=1.2, label=method, color=colors[method])
    if everything:
        front = pareto_front([(x, -y) if lower_is_better else (x, y) for x, y in everything])
        xs, ys = zip(*[everything[i] for i in front])
        ax.plot(xs, ys, ls="none", marker="o", ms=10, mfc="none", mec="black", mew=1.0, label="Pareto front")
    ax.set_xscale("log", base=2)
    ax.set_xlabel(xlabel)
    if lower_is_better:
        ax.set_yscale("log")
    ax.set_ylabel("test accuracy (%)" if measure is None else f"{measure} vs the original model's outputs")
    ax.grid(True, which="both", alpha=0.3)


def plot(results: dict, path: str, *, task: str | None = None, min_accuracy: float | None = None,
         dpi: int = 80) -> str:
    """Write a PNG for one task (the first one unless `task` is named); returns the path.

    min_accuracy: lower limit of the y axis in percent (points far below it are clipped out of view), so
    that a collapsed low-rate point does not flatten the interesting part of the curves.
    """
    try:
        import matplotlib
    except ImportError:
        raise CdlInputError("plots need matplotlib: pip install 'cdlcodec[plot]'") from None
    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    sweeps = [s for s in results["sweeps"] if task is None or s["task"] == task]
    if not sweeps:
        raise CdlInputError(f"no results for task {task!r}")
    sweep = sweeps[0]
    rows = [r for r in sweep["rows"] if "error" not in r]
    methods = list(dict.fromkeys(r["method"] for r in rows))
    cmap = plt.get_cmap("tab10")
    colors = {m: cmap(i % 10) for i, m in enumerate(methods)}
    with_activations = any(r.get("bits_per_activation", 32.0) < 32.0 for r in rows)
    measure = sweep.get("measure")
    fig, axes = plt.subplots(1, 2 if with_activations else 1, figsize=(10 if with_activations else 6, 4),
                             squeeze=False)
    _panel(axes[0][0], rows, "bits_per_weight", "bits per weight (eq. 41a, log scale)", colors, measure)
    if with_activations:
        _panel(axes[0][1], rows, "bits_per_activation", "bits per activation (eq. 41b, log scale)", colors)
    for ax in axes[0]:
        if min_accuracy is not None and measure is None:
            top = max([percent(r["accuracy"]) for r in rows] + [min_accuracy + 1])
            ax.set_ylim(min_accuracy, top + 0.5)
    axes[0][0].legend(fontsize=7, loc="lower right")
    if measure is None:
        reference = percent(sweep["reference_accuracy"])
        fig.suptitle(f"{sweep['task']}: accuracy vs rate (float32: {reference:.2f} %)", fontsize=10)
    else:
        fig.suptitle(f"{sweep['task']}: {measure} vs rate", fontsize=10)
    fig.tight_layout()
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    try:
        with atomic_path(path, suffix=".png") as tmp:
            fig.savefig(tmp, dpi=dpi)
    finally:
        plt.close(fig)
    return path
