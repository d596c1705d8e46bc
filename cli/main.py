"""The `cdlcodec` command: a thin click layer over the library.

Each sub-command lives in its own module under `cli/commands/` and exposes a click command named
`command`. Modules are discovered by name and imported only when their command runs (or when help
lists them), so `cdlcodec info` never pays for importing torch's training stack. Command modules
therefore import only click at module level.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import pkgutil
import signal
import sys
import threading
import types

import click

from cdlcodec import __version__
from cdlcodec.errors import CdlError
from cdlcodec.optional import as_missing_dependency
from cdlcodec.cli import commands as _commands_pkg


def _command_names() -> list[str]:
    return sorted(m.name.replace("_", "-") for m in pkgutil.iter_modules(_commands_pkg.__path__)
                  if not m.name.startswith("_"))


class _LazyGroup(click.Group):
    def list_commands(self, ctx):
        return _command_names()

    def get_command(self, ctx, name):
        if name not in _command_names():
            return None
        module = importlib.import_module(f"{_commands_pkg.__name__}.{name.replace('-', '_')}")
        return module.command


@click.group(cls=_LazyGroup, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="cdlcodec")
def cli() -> None:
    """Compress trained neural networks into compact .cdl bitstreams and back into runnable models."""


class _Terminated(BaseException):
    """Raised by the SIGTERM handler. A BaseException, like KeyboardInterrupt, so that no
    `except Exception` on the way up swallows it, while every `finally` and atomic writer's cleanup
    still runs (no temporary file is left behind)."""


def _raise_terminated(signum, frame):
    signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a second SIGTERM must not cut the cleanup short
    raise _Terminated


@contextlib.contextmanager
def _terminate_like_interrupt():
    """SIGTERM (kill, timeout, a job scheduler) unwinds like Ctrl-C instead of killing outright."""
    if threading.current_thread() is not threading.main_thread():  # handlers live in the main thread
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _call(fn, *args, **kwargs):
    return fn(*args, **kwargs)


# CPython 3.11+ keeps frames in 16 KB data-stack chunks and frees a chunk as soon as the frame at its
# base returns, so a deep recursion that keeps crossing a chunk boundary maps and unmaps 16 KB each
# time: numba's inliner (copy.deepcopy of IR) did that 2.8 M times in a first `encode --trellis
# --lambda`, 10 s of system time on a loaded machine (BENCHMARKS.md, cold start). A frame that
# reserves 64 Ki stack slots gets a fresh 1 MB chunk of its own, and what it calls runs in that
# chunk's free half, far from any boundary. The reserved slots are never written, so no memory is
# touched; on other Pythons it is an ordinary call with a large frame.
_call_on_roomy_stack = types.FunctionType(_call.__code__.replace(co_stacksize=1 << 16), globals(),
                                          "_call_on_roomy_stack")


@contextlib.contextmanager
def _own_warnings_as_lines():
    """Warnings cdlcodec itself raises (an ignored entry of a checkpoint, ...) print as one
    "cdlcodec: warning: ..." line, like its errors, not as Python's "FILE:LINE: UserWarning: ..."
    followed by the source line that raised it; other packages' warnings print as before."""
    import warnings

    import cdlcodec
    import cdlcodec.cli
    import cdlcodec.formats

    roots = tuple(os.path.join(os.path.dirname(os.path.abspath(m.__file__)), "")
                  for m in (cdlcodec, cdlcodec.formats, cdlcodec.cli))
    previous = warnings.formatwarning

    def formatted(message, category, filename, lineno, line=None):
        if os.path.abspath(str(filename)).startswith(roots):
            return f"cdlcodec: warning: {message}\n"
        return previous(message, category, filename, lineno, line)

    # the format, not the display: warnings recorded by catch_warnings(record=True) stay recorded
    warnings.formatwarning = formatted
    try:
        yield
    finally:
        if warnings.formatwarning is formatted:
            warnings.formatwarning = previous


def main(argv: list[str] | None = None) -> None:
    """Entry point: runs the group and turns library errors into one clean line and exit status 2."""
    try:
        with _terminate_like_interrupt(), _own_warnings_as_lines():
            # Without standalone mode click returns ctx.exit()'s code instead of exiting with it.
            status = _call_on_roomy_stack(cli.main, args=argv, prog_name="cdlcodec", standalone_mode=False)
        if isinstance(status, int) and not isinstance(status, bool) and status != 0:
            sys.exit(status)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.ClickException as exc:  # bad usage: the same one-line form as every other error
        hint = ""
        if isinstance(exc, click.UsageError) and exc.ctx is not None:
            hint = f" (see '{exc.ctx.command_path} --help')"
        click.echo(f"cdlcodec: error: {exc.format_message()}{hint}", err=True)
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        click.echo("cdlcodec: aborted", err=True)
        sys.exit(130)
    except KeyboardInterrupt:
        click.echo("cdlcodec: interrupted", err=True)
        sys.exit(130)
    except _Terminated:
        click.echo("cdlcodec: terminated", err=True)
        sys.exit(128 + signal.SIGTERM)
    except CdlError as exc:
        click.echo(f"cdlcodec: error: {exc}", err=True)
        sys.exit(2)
    except MemoryError:
        click.echo("cdlcodec: error: out of memory", err=True)
        sys.exit(2)
    except OSError as exc:  # unreadable input, full disk, permission denied ...
        name = f": {exc.filename}" if getattr(exc, "filename", None) else ""
        click.echo(f"cdlcodec: error: {exc.strerror or exc}{name}", err=True)
        sys.exit(2)
    except ImportError as exc:  # an optional package (torch, numba, ...) this command needs is missing
        missing = as_missing_dependency(exc, _command_label(argv))
        if missing is None:
            _internal_error(exc)
        click.echo(f"cdlcodec: error: {missing}", err=True)
        sys.exit(2)
    except Exception as exc:
        _internal_error(exc)
    sys.exit(0)


def _command_label(argv: list[str] | None) -> str:
    """'cdlcodec train' for the command line being run (the first word that is not an option)."""
    words = [a for a in (sys.argv[1:] if argv is None else argv) if not a.startswith("-")]
    return f"'cdlcodec {words[0]}'" if words else "cdlcodec"


def _internal_error(exc: Exception) -> None:
    """A bug in cdlcodec: still one line and exit 3, traceback only on request."""
    if os.environ.get("CDLCODEC_DEBUG"):
        raise exc
    click.echo(f"cdlcodec: error: internal error ({type(exc).__name__}: {exc}); "
               "set CDLCODEC_DEBUG=1 for a traceback and please report it", err=True)
    sys.exit(3)


if __name__ == "__main__":
    main()
