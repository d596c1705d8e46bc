"""numba when it is installed, plain Python when it is not.

Every kernel is written once, in the subset of Python that numba compiles. Without numba (an edge
device, or CDLCODEC_NO_NUMBA=1) the same functions run as ordinary Python: much slower, but they
produce the same bytes by construction, because there is only one implementation.
"""
from __future__ import annotations

import os

try:
    if os.environ.get("CDLCODEC_NO_NUMBA"):
        raise ImportError("disabled by CDLCODEC_NO_NUMBA")
    import numba as _numba

    HAVE_NUMBA = True
except ImportError:  # pragma: no cover - exercised in a subprocess test
    _numba = None
    HAVE_NUMBA = False


def njit(*args, **kwargs):
    """numba.njit, or the identity decorator without numba. Use as @njit(cache=True) or @njit."""
    if HAVE_NUMBA:
        return _numba.njit(*args, **kwargs)
    if len(args) == 1 and callable(args[0]) and not kwargs:
        return args[0]
    return lambda fn: fn


prange = _numba.prange if HAVE_NUMBA else range
