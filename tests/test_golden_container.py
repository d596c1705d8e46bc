"""Golden files pin the container's exact bytes: the encoder's output for a fixed input must not
change unless the format version changes (then regenerate deliberately with
CDL_REGENERATE_GOLDEN=1 pytest tests/test_golden_container.py and review the diff)."""
from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from cdlcodec.api import encode
from cdlcodec.codec import decode_container
from cdlcodec.dtypes import from_float64, to_float64
from cdlcodec.io.safetensors_file import read_safetensors_tensors, write_safetensors_tensors
from cdlcodec.quantizers.uniform import UniformQuantizer

GOLDEN = Path(__file__).parent / "golden"
INPUT = GOLDEN / "container_input.safetensors"
REGENERATE = os.environ.get("CDL_REGENERATE_GOLDEN") == "1"


def _make_input() -> None:
    rng = np.random.default_rng(2026)
    f32 = lambda *s: (rng.standard_normal(s) * 0.1).astype(np.float32)
    tensors = [
        ("conv.weight", f32(4, 2, 3, 3), "float32"),
        ("conv.bias", f32(4), "float32"),
        ("fc.weight", f32(16, 24).astype(np.float16), "float16"),
        ("emb.weight", from_float64(f32(8, 4).astype(np.float64), "bfloat16"), "bfloat16"),
        ("steps", np.array([7], dtype=np.int64), "int64"),
    ]
    write_safetensors_tensors(str(INPUT), tensors)


CASES = {"raw": "raw", "huffman": "huffman", "cabac": "cabac", "auto": "auto"}


@pytest.mark.parametrize("backend", sorted(CASES))
def test_encoder_output_is_pinned(tmp_path, backend):
    if REGENERATE and not INPUT.exists():
        _make_input()
    golden = GOLDEN / f"container_{backend}.cdl"
    out = tmp_path / "out.cdl"
    encode(str(INPUT), str(out), quantizer=UniformQuantizer(rel_step=0.25), backend=backend)
    if REGENERATE:
        golden.write_bytes(out.read_bytes())
    assert out.read_bytes() == golden.read_bytes(), f"encoder output for {backend} changed: a format event"


@pytest.mark.parametrize("backend", sorted(CASES))
def test_golden_files_decode_to_the_documented_values(backend):
    model = decode_container(str(GOLDEN / f"container_{backend}.cdl"))
    original = {n: (a, d) for n, a, d in read_safetensors_tensors(str(INPUT))}
    assert [r.name for r in model.records] == list(original)
    for rec in model.records:
        arr, dtype = original[rec.name]
        assert rec.dtype == dtype and rec.shape == arr.shape
        if rec.quant is not None and rec.quant.get("scheme") == "uniform":
            step = rec.quant["step"]
            expect = from_float64(np.rint(to_float64(arr, dtype) / step) * step, dtype)
            # compared as values: level 0 decodes to +0.0 where rint gave -0.0
            assert np.array_equal(to_float64(rec.array, dtype), to_float64(expect, dtype)), rec.name
        else:
            assert np.array_equal(rec.array, arr), rec.name
