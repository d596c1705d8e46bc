"""Library errors name parameters (`step`, `fp_epochs`); a command names them as its flags."""
import contextlib
import re


@contextlib.contextmanager
def parameters_as_flags(flags: dict):
    """Re-raise a library error about parameters (quantizers.base.parameter_error) with each
    parameter named as the command's flag."""
    from cdlcodec.errors import CdlInputError

    try:
        yield
    except CdlInputError as exc:
        params = [p for p in getattr(exc, "params", ()) if p in flags]
        if not params:
            raise
        pattern = re.compile(r"\b(" + "|".join(map(re.escape, sorted(params, key=len, reverse=True))) + r")\b")
        raise CdlInputError(pattern.sub(lambda m: flags[m.group(1)], str(exc))) from None


def progress_option(command):
    """`--progress auto|bar|lines|none` for a long-running command. Sets the mode for the whole run
    (cdlcodec.progress); the command's own `quiet` flag, when given, means `none`."""
    import functools

    import click

    from cdlcodec import progress

    @functools.wraps(command)
    def run(*args, progress_mode, **kwargs):
        progress.set_mode("none" if kwargs.get("quiet") else progress_mode)
        try:
            return command(*args, **kwargs)
        finally:
            progress.set_mode(None)

    return click.option(
        "--progress", "progress_mode", type=click.Choice(progress.MODES), default="auto", show_default=True,
        help="auto: a bar on a terminal, else a line every few seconds; bar; lines; none.")(run)
