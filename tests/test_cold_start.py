"""Cold start (issue 18): each kernel compiles once per use, not once more for a literal argument,
and an encode compiles only what it runs.

numba types a call argument that is a literal int (`pos = 0` before a loop, `f(x, 1)`) as
Literal[int](0) and compiles the callee for it, then again for int64 when the variable changes: the
chunk encoder of `cabac`, its biggest kernel, used to be compiled twice on every first encode.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

import pytest

from cdlcodec.jit import HAVE_NUMBA

_CHILD = r"""
import gc, json
import numpy as np
from numba.core import types
from numba.core.dispatcher import Dispatcher
from cdlcodec.codec import EncodeOptions, decode_container, encode_records
from cdlcodec.quantizers import make
from cdlcodec.records import TensorRecord

rng = np.random.default_rng(0)
records = [TensorRecord("w", (rng.standard_normal((24, 70)) * 0.1).astype(np.float32), "float32"),
           TensorRecord("v", (rng.standard_normal(300) * 0.1).astype(np.float32), "float32")]
out = __import__("sys").argv[1]
for quantizer in (make("uniform", rel_step=0.1), make("rd", lam=0.01), make("trellis", lam=0.1)):
    for backend in ("raw", "huffman", "cabac"):
        encode_records(records, out, EncodeOptions(quantizer, backend, (), True))
        decode_container(out)

duplicates = {}
for obj in gc.get_objects():
    if isinstance(obj, Dispatcher) and obj.py_func.__module__.startswith("cdlcodec"):
        plain = [tuple(types.unliteral(t) for t in sig) for sig in obj.overloads]
        if len(set(plain)) < len(plain):
            duplicates[obj.py_func.__module__ + "." + obj.__name__] = [str(s) for s in obj.overloads]
print(json.dumps(duplicates))
"""


@pytest.mark.skipif(not HAVE_NUMBA, reason="numba is not installed: nothing is compiled")
def test_no_kernel_is_compiled_twice_for_a_literal(tmp_path):
    with tempfile.TemporaryDirectory() as cache:  # a fresh cache: everything compiles in the child
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        child = subprocess.run([sys.executable, "-c", _CHILD, str(tmp_path / "x.cdl")], capture_output=True,
                               text=True, env=env, timeout=900)
    assert child.returncode == 0, child.stderr[-3000:]
    assert json.loads(child.stdout.strip().splitlines()[-1]) == {}


_TRELLIS_CHILD = r"""
import gc, json
import numpy as np
from numba.core.dispatcher import Dispatcher
from cdlcodec.quantizers import make

w = (np.random.default_rng(0).standard_normal((40, 60)) * 0.1).astype(np.float32)
make("trellis", lam=0.0, rel_step=0.1).quantize(w.astype(np.float64), w)
compiled = sorted(obj.py_func.__module__ + "." + obj.__name__ for obj in gc.get_objects()
                  if isinstance(obj, Dispatcher) and obj.overloads)
print(json.dumps(compiled))
"""


@pytest.mark.skipif(not HAVE_NUMBA, reason="numba is not installed: nothing is compiled")
def test_a_trellis_without_rate_term_compiles_no_rate_model():
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        child = subprocess.run([sys.executable, "-c", _TRELLIS_CHILD], capture_output=True, text=True, env=env,
                               timeout=600)
    assert child.returncode == 0, child.stderr[-3000:]
    compiled = json.loads(child.stdout.strip().splitlines()[-1])
    assert "cdlcodec.quantizers.trellis.viterbi_scan_distortion" in compiled
    assert not [name for name in compiled if "cabac_binarization" in name], compiled  # no rate model


def _recurse(n):
    return 0 if n == 0 else 1 + _recurse(n - 1)


def _deep_recursions(times=2000, depth=300):
    """Minor page faults of `times` recursions `depth` frames deep (about 45 KB of frames each)."""
    import resource

    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    for _ in range(times):
        _recurse(depth)
    return resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before


@pytest.mark.skipif(sys.version_info < (3, 11) or not sys.platform.startswith("linux"),
                    reason="CPython 3.11+ data-stack chunks; page-fault counts from Linux getrusage")
def test_commands_run_where_deep_recursion_does_not_map_fresh_stack_chunks():
    """The CLI runs each command in a frame that reserves a large data-stack chunk, so a recursion that
    goes deep and returns, again and again (numba's inliner deep-copying IR), stays inside it instead
    of mapping and unmapping a fresh 16 KB chunk each time (10 s of system time in a first
    `encode --trellis --lambda` on a loaded machine). Counted in page faults, not timed."""
    from cdlcodec.cli import main as cli_main

    assert cli_main._call_on_roomy_stack(lambda a, b=0: a + b, 1, b=2) == 3  # arguments and result pass through
    with pytest.raises(KeyError):
        cli_main._call_on_roomy_stack({}.__getitem__, "x")
    outside = _deep_recursions()
    inside = cli_main._call_on_roomy_stack(_deep_recursions)
    assert outside >= 2000 and inside < outside / 10, (outside, inside)
