"""Progress on stderr: a bar on a terminal, plain lines elsewhere (CI logs, nohup, notebooks).

A tiny dependency-free bar: tqdm would add start-up time and a dependency for one line of output.

The command line sets one mode for the whole run (`--progress`, `set_mode`):
- "bar":   a redrawn bar (at most 10 redraws a second so a tight loop is not slowed);
- "lines": one line at most every LINE_INTERVAL seconds while work goes on, so a short step prints
           nothing and a long one shows it is alive, without flooding a log file;
- "auto":  "bar" when stderr is a terminal, else "lines";
- "none":  nothing (`--quiet` means this too).
Per-epoch reports (`Progress.log`) and the first-compile notice (`compiling_soon`) print in every
mode but "none". Library callers that never set a mode keep the old behaviour: a bar on a terminal only, and
no notices.
"""
from __future__ import annotations

import sys
import time

MODES = ("auto", "bar", "lines", "none")
LINE_INTERVAL = 5.0

_mode: str | None = None  # None: not set by a command line (library use)
_compile_pending = False   # a kernel module with nothing cached was imported; not announced yet
_compile_announced = False  # once a process is enough
_shown = 0                 # progress displays showing now


def set_mode(mode: str | None) -> None:
    if mode is not None and mode not in MODES:
        raise ValueError(f"progress mode must be one of {', '.join(MODES)}, not {mode!r}")
    global _mode, _compile_pending
    _mode = mode
    _compile_pending = False  # kernels imported before a command started are not this command's compile


def style(quiet: bool = False) -> str | None:
    """What a progress display draws now: "bar", "lines" or None (nothing)."""
    if quiet or _mode == "none":
        return None
    if _mode in ("bar", "lines"):
        return _mode
    if sys.stderr.isatty():
        return "bar"
    return "lines" if _mode == "auto" else None


_COMPILING = ("cdlcodec: compiling numba kernels for their first use (once; later runs load them from the "
              "cache; up to about a minute on 2 cores)")


def compiling_soon() -> None:
    """A kernel module with nothing in numba's cache was imported, so this run compiles: said once,
    now if a progress display is showing, else when the next one starts (not at import, so that a
    command that fails on its input still prints only its error)."""
    global _compile_pending
    _compile_pending = True
    if _shown:
        _announce_compile()


def _announce_compile() -> None:
    global _compile_pending, _compile_announced
    if _compile_pending and _mode is not None and not _compile_announced:
        _compile_pending = False
        _compile_announced = True
        _write_line(_COMPILING)


def _write_line(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


class Progress:
    """Context manager: `with Progress(total, "encoding") as bar: bar.update(n)`."""

    def __init__(self, total: float, label: str, *, quiet: bool = False, unit: str = ""):
        self.total = max(float(total), 1e-12)
        self.label = label
        self.unit = unit
        self.done = 0.0
        self.style = style(quiet)
        self.enabled = self.style is not None
        self._start = time.perf_counter()
        self._last = self._start
        self._lines = 0
        self._note = ""

    def __enter__(self) -> "Progress":
        global _shown
        if self.style is not None:
            _shown += 1
            _announce_compile()
        if self.style == "bar":
            self._draw_bar(force=True)
        return self

    def update(self, amount: float = 1.0, note: str = "") -> None:
        self.done += amount
        self._note = note or self._note
        if self.style == "bar":
            self._draw_bar(note=note)
        elif self.style == "lines":
            now = time.perf_counter()
            if now - self._last >= LINE_INTERVAL:
                self._last = now
                self._line(now)

    def log(self, text: str) -> None:
        """A line that is always shown with the progress (a finished epoch and its figures)."""
        if self.style == "bar":
            sys.stderr.write("\r" + " " * 80 + "\r")
            _write_line(f"{self.label}: {text}")
            self._draw_bar(force=True)
        elif self.style == "lines":
            _write_line(f"{self.label}: {text}")
            self._last = time.perf_counter()

    def _fraction(self) -> float:
        return min(self.done / self.total, 1.0)

    def _line(self, now: float) -> None:
        self._lines += 1
        note = f" {self._note}" if self._note else ""
        _write_line(f"{self.label}: {self._fraction() * 100:.0f}% ({self.done:g}/{self.total:g}{self.unit}) "
                    f"after {now - self._start:.0f} s{note}")

    def _draw_bar(self, *, force: bool = False, note: str = "") -> None:
        now = time.perf_counter()
        if not force and now - self._last < 0.1 and self.done < self.total:
            return
        self._last = now
        frac = self._fraction()
        width = 28
        filled = int(frac * width)
        elapsed = now - self._start
        sys.stderr.write(
            f"\r{self.label:<18} [{'#' * filled}{'.' * (width - filled)}] {frac * 100:5.1f}% "
            f"{elapsed:6.1f}s {note}"[:120].ljust(80)
        )
        sys.stderr.flush()

    def __exit__(self, *exc) -> None:
        global _shown
        if self.style is not None:
            _shown -= 1
        if self.style == "bar":
            self._draw_bar(force=True)
            sys.stderr.write("\n")
            sys.stderr.flush()
        elif self.style == "lines" and self._lines and exc[0] is None:
            _write_line(f"{self.label}: done in {time.perf_counter() - self._start:.0f} s")
