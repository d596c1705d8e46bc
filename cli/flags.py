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
