"""Progress bars that show on a terminal and stay silent otherwise (or when asked to be quiet).

A tiny dependency-free bar: tqdm would add start-up time and a dependency for one line of output.
"""
from __future__ import annotations

import sys
import time


class Progress:
    """Context manager: `with Progress(total, "encoding") as bar: bar.update(n)`.

    Draws on stderr only when stderr is a terminal and `quiet` is False; redraws at most 10 times a
    second so a tight loop is not slowed by terminal output.
    """

    def __init__(self, total: float, label: str, *, quiet: bool = False, unit: str = ""):
        self.total = max(float(total), 1e-12)
        self.label = label
        self.unit = unit
        self.done = 0.0
        self.enabled = not quiet and sys.stderr.isatty()
        self._last = 0.0
        self._start = time.perf_counter()

    def __enter__(self) -> "Progress":
        self._draw(force=True)
        return self

    def update(self, amount: float = 1.0, note: str = "") -> None:
        self.done += amount
        self._draw(note=note)

    def _draw(self, *, force: bool = False, note: str = "") -> None:
        if not self.enabled:
            return
        now = time.perf_counter()
        if not force and now - self._last < 0.1 and self.done < self.total:
            return
        self._last = now
        frac = min(self.done / self.total, 1.0)
        width = 28
        filled = int(frac * width)
        elapsed = now - self._start
        sys.stderr.write(
            f"\r{self.label:<18} [{'#' * filled}{'.' * (width - filled)}] {frac * 100:5.1f}% "
            f"{elapsed:6.1f}s {note}"[:120].ljust(80)
        )
        sys.stderr.flush()

    def __exit__(self, *exc) -> None:
        if self.enabled:
            self._draw(force=True)
            sys.stderr.write("\n")
            sys.stderr.flush()
