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
    """numba.njit, or the identity decorator without numba. Use as @njit(cache=True) or @njit.

    numba compiles a kernel on its first call (only what a file needs: per backend, scheme and
    argument types) and, with cache=True, keeps the machine code for later runs. When a module
    defines a kernel that has nothing cached yet, the next progress display says it will compile.
    """
    if HAVE_NUMBA:
        # Kernels release the GIL (they touch no Python object): tensors coded on several threads
        # (--threads) then run side by side instead of taking turns.
        kwargs.setdefault("nogil", True)
        if len(args) == 1 and callable(args[0]):
            return _announce_if_uncached(_numba.njit(args[0], **kwargs))
        decorate = _numba.njit(*args, **kwargs)
        return lambda fn: _announce_if_uncached(decorate(fn))
    if len(args) == 1 and callable(args[0]) and not kwargs:
        return args[0]
    return lambda fn: fn


def _announce_if_uncached(dispatcher):
    if not _is_cached(dispatcher):
        from .progress import compiling_soon

        compiling_soon()
    return dispatcher


def _is_cached(dispatcher) -> bool:
    """Whether numba's cache holds any kernel of this dispatcher's module: a module used before has
    its kernels cached as they were needed, one never used has none. (numba has no public API for
    this: any surprise in its internals counts as cached, so at worst the notice is not shown.)"""
    try:
        folder = os.path.dirname(dispatcher._cache._cache_file._index_path)
        prefix = dispatcher.py_func.__module__.rsplit(".", 1)[-1] + "."
        return any(name.startswith(prefix) and name.endswith(".nbi") for name in os.listdir(folder))
    except FileNotFoundError:  # no cache folder yet
        return False
    except (AttributeError, OSError):
        return True


prange = _numba.prange if HAVE_NUMBA else range
