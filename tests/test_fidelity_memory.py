"""The fidelity search's memory: the rounder keeps narrow levels of the plans it can still choose,
and that changes no level and no byte of the written file."""
from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("onnx")
pytest.importorskip("onnxruntime")

from cdlcodec.fidelity import search as search_mod  # noqa: E402
from cdlcodec.fidelity.allocate import Candidate, steps_for  # noqa: E402
from cdlcodec.fidelity.dependent import RowTrellis, dependent_levels, table_sample  # noqa: E402
from cdlcodec.fidelity.gptq import gptq_levels, inverse_cholesky  # noqa: E402
from cdlcodec.fidelity.search import FidelityOptions, _Rounder, _Search, encode_to_target, narrowest  # noqa: E402
from cdlcodec.io.model_files import read_model  # noqa: E402
from cdlcodec.quantizers import dequantize  # noqa: E402
from cdlcodec.records import TensorRecord  # noqa: E402
from test_fidelity import _embedding_model  # noqa: E402


def _plain_levels(w, cand, u=None, in_axis=None):
    """The levels as the search formed them before (whole tensors, int64): np.rint / GPTQ / trellis."""
    steps = steps_for(w, cand)
    if cand.dependent:
        step = float(steps)
        if in_axis == 0:
            return gptq_levels(w, u, step, trellis=RowTrellis(table_sample(w), step)).ravel()
        return dependent_levels(w, step)[0].ravel()
    if u is not None:
        w2, s2 = (w, steps) if in_axis == 0 else (w.T, np.transpose(steps))
        flat = np.asarray(s2, dtype=np.float64).reshape(-1)
        levels = gptq_levels(w2, u, flat if flat.size > 1 else float(flat[0]))
        return np.ascontiguousarray(levels if in_axis == 0 else levels.T).ravel()
    return np.clip(np.rint(w / steps), -(2**31 - 1), 2**31 - 1).astype(np.int64).ravel()


def test_rounded_levels_are_the_whole_tensor_formulas_in_narrow_integers(monkeypatch):
    """Rounding a block of rows, trellis coding a stretch of the scan at a time, factoring H once and
    dropping it: the levels are those of the whole-tensor formulas, stored in the narrowest integer
    type, and decode to dequantize()'s values."""
    monkeypatch.setattr(search_mod, "ROUND_BLOCK", 1000)                # 10 rows of the table a block
    monkeypatch.setattr(search_mod, "DEPENDENT_STRETCH", 3 * 4096 + 5)  # three trellis stretches
    monkeypatch.setattr(search_mod, "DECODE_BLOCK", 777)
    rng = np.random.default_rng(3)
    table = (rng.laplace(size=(300, 96)) * 0.05).astype(np.float32)   # Gather table: no H
    w_in = (rng.standard_normal((48, 20)) * 0.1).astype(np.float32)    # MatMul [in, out]
    w_out = (rng.standard_normal((20, 48)) * 0.1).astype(np.float32)   # Gemm transB [out, in]
    x = rng.standard_normal((400, 48)) @ (np.eye(48) + 0.3 * rng.standard_normal((48, 48)))
    h = x.T @ x  # one activation feeds both weights: one H, factored once
    records = {n: TensorRecord(n, a, "float32") for n, a in (("table", table), ("w_in", w_in), ("w_out", w_out))}
    rounder = _Rounder(records, {"w_in": (h, 0), "w_out": (h, 1)}, use_gptq=True)
    rounder.factor_all()
    assert not rounder._h and len(rounder._u) == 1  # H dropped once factored, the factor shared
    u = inverse_cholesky(h)
    cases = [("table", Candidate(0.02, None), None), ("table", Candidate(0.3, 0), None),
             ("table", Candidate(0.1, 1), None), ("table", Candidate(0.05, None, True), None),
             ("w_in", Candidate(0.1, None), 0), ("w_in", Candidate(0.2, 1), 0), ("w_in", Candidate(0.1, None, True), 0),
             ("w_out", Candidate(0.1, 0), 1)]
    for name, cand, in_axis in cases:
        w = np.asarray(records[name].array, dtype=np.float64)
        for compensate in (True, False):
            levels, quant = rounder.get(name, cand, compensate)
            gptq = compensate and in_axis is not None
            expected = _plain_levels(w, cand, u if gptq else None, in_axis if gptq else None)
            assert np.array_equal(levels, expected), (name, cand, compensate)
            assert levels.dtype == narrowest(expected).dtype and levels.dtype.itemsize < 8
            values = rounder.values(name, cand, compensate)
            assert values.dtype == np.float32
            assert np.array_equal(values, dequantize(expected, quant, w.shape, "float32", name))
    assert narrowest(np.array([-128, 127])).dtype == np.int8
    assert narrowest(np.array([-129.0, 5.0])).dtype == np.int16
    assert narrowest(np.array([40000])).dtype == np.int32
    rounder.retain([])
    assert not rounder._cache and rounder.cached_bytes() == 0


def _search(model, options):
    """fidelity_plan's steps, keeping the search (and its rounder) for inspection."""
    search = _Search(model, options)
    search.measure_sensitivities()
    budget, plan, scored = search.search_budget()
    if not search.searched_all:
        plan, scored = search.check_all_samples(budget, plan)
    return search, plan


def test_the_search_keeps_only_the_plans_it_can_still_choose_and_writes_the_same_file(tmp_path, monkeypatch):
    from cdlcodec.codec import EncodeOptions

    path = _embedding_model(str(tmp_path / "e.onnx"), vocab=512, n_out=24)
    rng = np.random.default_rng(4)
    np.savez(tmp_path / "c.npz", ids=rng.integers(0, 512, (40, 12)).astype(np.int64))
    model = read_model(path)
    options = FidelityOptions(search_mod.DEFAULT_TARGET, str(tmp_path / "c.npz"), quiet=True, same_decisions=True,
                              threads=2)
    search, plan = _search(model, options)
    names = len(search.names)
    assert search.runs >= 4  # sensitivities and several plans were tried
    # at most the best, the last and the two plans around the goal: 4 entries per tensor
    assert 0 < len(search.rounder._cache) <= 4 * names
    assert all(search.rounder._key(n, c, True) in search.rounder._cache for n, c in plan.choice.items() if not c.exact)
    total = sum(r.numel for r in model.records)
    assert search.rounder.cached_bytes() <= 4 * 2 * total  # int8 / int16 levels here, never a float copy
    assert all(levels.dtype.itemsize <= 2 for levels, _ in search.rounder._cache.values() if levels is not None)
    # the runner's session reads the overridable weights from the records' arrays (no copy of its own)
    records = {r.name: r.array for r in model.records}
    shared = dict(search.runner._shared)
    assert shared and all(np.shares_memory(shared[init], records[rec]) for rec, init in search.runner.names.items())

    written = []
    for keep_all in (False, True):
        if keep_all:  # the old behaviour: every (tensor, candidate) ever tried stays cached
            monkeypatch.setattr(_Rounder, "retain", lambda self, plans: None)
            kept, _ = _search(model, options)
            assert len(kept.rounder._cache) > len(search.rounder._cache)
        out = str(tmp_path / f"keep{keep_all}.cdl")
        encode_to_target(model, out, options, EncodeOptions(quiet=True, threads=2))
        written.append(open(out, "rb").read())
    assert written[0] == written[1]
