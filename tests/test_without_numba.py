"""Without numba the kernels run as plain Python: the same code, so the same bytes (only slower)."""
from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest

from cdlcodec import backends
from cdlcodec.backends import EncodeHint

# Runs in a child process where `import numba` fails, as on a device without numba.
_CHILD = r"""
import sys
sys.modules["numba"] = None
import json, numpy as np
from cdlcodec import backends
from cdlcodec.backends import EncodeHint
from cdlcodec.jit import HAVE_NUMBA
assert not HAVE_NUMBA
cases = json.loads(sys.stdin.read())
out = {}
for key, (name, levels, shape) in cases.items():
    lv = np.array(levels, dtype=np.int64)
    payload, params = backends.get(name).encode(lv, EncodeHint(shape=tuple(shape) if shape else None))
    back = backends.get(name).decode(payload, params, lv.size, tuple(shape) if shape else None)
    out[key] = [payload.hex(), params.hex(), back.tolist()]
print(json.dumps(out))
"""


def _cases():
    rng = np.random.default_rng(7)
    arrays = {
        "laplace": (np.rint(rng.laplace(0, 2, 1200)).astype(np.int64), [40, 30]),
        "sparse": (((rng.random(900) < 0.1) * rng.integers(-40, 40, 900)).astype(np.int64), None),
        "extremes": (np.array([2**31 - 1, -(2**31 - 1), 0, 5, 5, 5], dtype=np.int64), None),
        "empty": (np.zeros(0, np.int64), None),
        "constant": (np.full(300, -3, np.int64), None),
    }
    return {f"{b}/{k}": (b, v[0].tolist(), v[1]) for b in ("raw", "huffman", "cabac") for k, v in arrays.items()}


def test_pure_python_kernels_give_identical_bytes():
    cases = _cases()
    child = subprocess.run([sys.executable, "-c", _CHILD], input=json.dumps(cases), capture_output=True,
                           text=True, timeout=600)
    assert child.returncode == 0, child.stderr[-2000:]
    result = json.loads(child.stdout)
    for key, (name, levels, shape) in cases.items():
        lv = np.array(levels, dtype=np.int64)
        payload, params = backends.get(name).encode(lv, EncodeHint(shape=tuple(shape) if shape else None))
        assert result[key][0] == payload.hex() and result[key][1] == params.hex(), key
        assert result[key][2] == levels, key


def _decode_without_numba(cdl, out) -> dict:
    """Decode `cdl` and write it to the .safetensors `out` in a child process where numba cannot be
    imported; the written arrays by name."""
    from cdlcodec.io.safetensors_file import read_safetensors_tensors

    code = ("import sys; sys.modules['numba'] = None\n"
            "from cdlcodec.jit import HAVE_NUMBA\n"
            "assert not HAVE_NUMBA\n"
            "from cdlcodec.codec import decode_container\n"
            "from cdlcodec.io.safetensors_file import write_safetensors_tensors\n"
            f"m = decode_container({str(cdl)!r})\n"
            f"write_safetensors_tensors({str(out)!r}, [(r.name, r.array, r.dtype) for r in m.records])\n")
    child = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert child.returncode == 0, child.stderr[-2000:]
    return {name: array for name, array, _ in read_safetensors_tensors(str(out))}


def test_container_decodes_without_numba(tmp_path, state_dict_file):
    from cdlcodec.api import encode
    from cdlcodec.codec import decode_container

    cdl = tmp_path / "m.cdl"
    encode(str(state_dict_file), str(cdl))
    expected = {r.name: r.array for r in decode_container(str(cdl)).records}
    got = _decode_without_numba(cdl, tmp_path / "out.safetensors")
    assert set(got) == set(expected)
    for name in expected:
        assert np.array_equal(got[name], expected[name]), name


def test_dependent_container_decodes_without_numba(tmp_path):
    """A trellis ("dependent") container decodes where numba is missing: the state machine's kernel
    comes through cdlcodec.jit like every other kernel (it used to import numba directly)."""
    from cdlcodec.codec import EncodeOptions, decode_container, encode_records
    from cdlcodec.quantizers import make
    from cdlcodec.records import TensorRecord

    rng = np.random.default_rng(3)
    records = [TensorRecord("w", (rng.standard_normal((12, 20)) * 0.1).astype(np.float32), "float32"),
               TensorRecord("v", (rng.standard_normal((6, 9)) * 0.1).astype(np.float32), "float32")]
    for granularity in ("tensor", "channel"):
        cdl = tmp_path / f"{granularity}.cdl"
        encode_records(records, str(cdl), EncodeOptions(make("trellis", lam=0.1, granularity=granularity),
                                                        "cabac", (), True))
        expected = decode_container(str(cdl)).records
        assert all(r.quant["scheme"] == "dependent" for r in expected)
        got = _decode_without_numba(cdl, tmp_path / f"{granularity}.safetensors")
        for rec in expected:
            assert np.array_equal(got[rec.name], rec.array), (granularity, rec.name)
