"""Encode to a fidelity target: find the smallest container whose decoded model meets it, and prove it.

1. Read the graph: roles (what to quantize), output-channel axes, MatMul/Gemm activations.
2. Run the original model on the inputs (calibration data or generated), capturing H = XᵀX for
   every MatMul/Gemm weight.
3. Measure each tensor's sensitivity: the relative output MSE with only that tensor quantized.
4. Search the distortion budget B: for each B the allocator picks per-tensor steps by equal slope;
   the tensors are rounded (GPTQ where an H is known, nearest elsewhere) and dequantized exactly
   as the decoder will; the model runs on them and the target measure is scored. The largest B
   that meets the target wins (geometric bisection).
5. Write the container with those levels and check it: decode the written file, run the decoded
   model with onnxruntime's default session and score it again; a miss deletes the file.
"""
from __future__ import annotations

import functools
import math
import os
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace

import numpy as np

from ..dtypes import to_float64
from ..errors import CdlInputError
from ..jit import HAVE_NUMBA
from ..progress import LINE_INTERVAL
from ..quantizers import Dequantizer
from ..quantizers.base import Quantizer, make
from ..records import ModelFile, TensorRecord
from .allocate import (EXACT, REF_REL, Candidate, DeployGrid, Plan, TensorCurve, plan_for_budget, unit_steps,
                       tensor_curve)
from .dependent import BLOCK as DEPENDENT_BLOCK
from .dependent import TABLE_SAMPLE, RowTrellis, spread_stretches
from .decisions import KEEP_MARGIN, checkable, decision_kinds, describe_decisions, margin_shortfall
from .pieces import OutputParts, output_parts
from .gptq import gptq_levels, inverse_cholesky
from .inputs import Inputs, UncheckableInputs, generate_inputs, load_calibration, outputs_alike
from .measures import Target, rel_mse
from .roles import gemm_layout, graph_roles, output_axes

MIN_ELEMENTS = 16          # smaller tensors are stored exactly: their bits do not matter
SEARCH_RUNS = 8            # model runs at most for the budget search
SENSITIVITY_SAMPLES = 16   # samples used to measure each tensor's sensitivity (at most)
# ... or fewer, down to MIN_SENSITIVITY_SAMPLES, once their outputs hold this many values: a detector or a
# dense map gives hundreds of thousands per sample, and the phase (one model run per tensor) took 87 % of a
# 1.8 M-parameter layout detector's encode at 16 samples; at 4 the plan and the real-input results were the
# same (BENCHMARKS.md). Counted from the outputs, not timed, so the bytes do not depend on the machine.
SENSITIVITY_VALUES = 1_000_000
MIN_SENSITIVITY_SAMPLES = 4
SENSITIVITY_FLOOR = 1e-3   # no tensor counts as less sensitive than this share of the median tensor
MIN_SPLIT = 8              # fewer calibration samples: GPTQ and the search share them
# Trellis-coded candidates: their Viterbi search runs only compiled (as plain Python it would take hours).
DEPENDENT = HAVE_NUMBA
CLOSE_BITS = 0.01          # with decisions checked, the search stops when a failing plan is this close in size
ALL_SAMPLE_RUNS = 5        # runs on every calibration sample at most, after the search
MAX_CALIBRATION = 128      # samples used from a calibration file (the first ones); half fit GPTQ, half score plans
DEFAULT_TARGET = Target("cosine", 0.999)
# Without a decision to check, 0.999 let a YOLOX glyph detector's box count change on 5 of 32 held-apart
# images (its score threshold is in the user's code); 0.9999 changed none (BENCHMARKS.md).
UNCHECKED_DEFAULT = Target("cosine", 0.9999)


def describe_target(target: Target, same_decisions: bool, deploy: str | None) -> str:
    """The promise as stored in the container: "cosine >= 0.999, same decisions, int8 grid"."""
    return target.describe() + (", same decisions" if same_decisions else "") + (f", {deploy} grid" if deploy else "")


@dataclass
class FidelityOptions:
    target: Target = DEFAULT_TARGET
    calibration: str | Inputs | None = None  # an .npz path, or inputs already in memory (Python API)
    max_samples: int = MAX_CALIBRATION
    gptq: bool = True
    quiet: bool = False
    keep: tuple[str, ...] = ()      # name patterns stored exactly (as encode --keep)
    same_decisions: bool = False    # also: no calibration sample's decision (argmax / sigmoid side) changes
    deploy: str | None = None       # "int8" / "int4": quantized weights on a per-channel symmetric grid of that width
    threads: int | None = None      # tensors rounded at once (None: every core), as encode --threads
    # The default's target when no output decides anything a check can read (a raw detector head, a
    # dense map): the promise then rests on the measure alone, so it is stricter (None: keep `target`).
    unchecked_target: Target | None = None

    def describe(self) -> str:
        return describe_target(self.target, self.same_decisions, self.deploy)


@dataclass
class FidelityReport:
    target: Target
    achieved: float
    checked: float | None
    inputs: str
    quantized: int
    kept: int
    runs: int
    seconds: float
    steps: dict[str, str] = field(default_factory=dict)
    same_decisions: bool = False
    deploy: str | None = None

    def describe_target(self) -> str:
        return describe_target(self.target, self.same_decisions, self.deploy)

    def summary_line(self) -> str:
        checked = self.checked if self.checked is not None else self.achieved
        return (f"fidelity: {self.target.measure} {checked:.6g} (target {self.describe_target()}) on {self.inputs}, "
                f"checked by decoding the written file; {self.quantized} tensors quantized, {self.kept} stored exactly")

    def metadata(self) -> dict[str, str]:
        meta = {"fidelity.target": self.describe_target(), "fidelity.achieved": f"{self.achieved:.6g}",
                "fidelity.inputs": self.inputs}
        if self.deploy:  # the QDQ writer keeps to this width (no int4 opset upgrade for an int8 grid)
            meta["deploy.grid"] = self.deploy
        return meta


class _Log:
    def __init__(self, quiet: bool):
        self.quiet = quiet
        self.start = time.perf_counter()

    def __call__(self, msg: str) -> None:
        if not self.quiet:
            print(f"[{time.perf_counter() - self.start:6.1f}s] {msg}", file=sys.stderr, flush=True)


class _Rounder:
    """Levels of a tensor for a candidate, cached (the search revisits candidates).

    Memory (MiniLM's default encode peaked at 3.4 GB when every (tensor, candidate) ever tried was kept
    as int64 levels, decoded values and a float64 copy of the weights): levels are kept in the
    narrowest integer type that holds them and decoded on demand (`values`, cheap), weights are
    converted to float64 when a tensor is rounded, each H is dropped once factored, and `retain`
    drops the entries the search can no longer choose. Dropping an entry costs only time: rounding
    is deterministic, so a candidate rounded again gets the same levels."""

    def __init__(self, records: dict[str, TensorRecord], hessians: dict[str, tuple[np.ndarray, int]], use_gptq: bool,
                 grid: DeployGrid | None = None):
        self.records = records
        self.use_gptq = use_gptq
        self.grid = grid
        # Weights fed by one activation (a layer's query, key and value) share one H
        # (fidelity.search._hessians), so they share one factorisation too: one group per H.
        self.in_axis: dict[str, int] = {name: in_axis for name, (_, in_axis) in hessians.items()}
        groups: dict[int, int] = {}
        self._group: dict[str, int] = {name: groups.setdefault(id(h), len(groups)) for name, (h, _) in hessians.items()}
        self._h: dict[int, np.ndarray] = {self._group[name]: h for name, (h, _) in hessians.items()}
        self._u: dict[int, np.ndarray] = {}  # group -> the inverse Cholesky factor of its H
        self._units: dict[tuple, np.ndarray] = {}  # (name, channel axis) -> allocate.unit_steps
        self._cache: dict[tuple, tuple[np.ndarray, dict]] = {}

    def weights(self, name: str) -> np.ndarray:
        """The tensor in float64 (a fresh copy: kept only while it is used)."""
        r = self.records[name]
        return to_float64(np.asarray(r.array), r.dtype)

    def _key(self, name: str, cand: Candidate, compensate: bool) -> tuple:
        return name, cand, compensate and self.use_gptq and name in self.in_axis  # else both round alike

    def get(self, name: str, cand: Candidate, compensate: bool = True):
        """(levels, quant): levels flat in the narrowest integer type that holds them (None for
        exact storage); GPTQ rounding where an H is known and `compensate`."""
        key = self._key(name, cand, compensate)
        if key not in self._cache:
            self._cache[key] = self._round(*key)
        return self._cache[key]

    def values(self, name: str, cand: Candidate, compensate: bool = True) -> np.ndarray:
        """The decoded values of `get`'s levels, exactly as the decoder forms them."""
        rec = self.records[name]
        if cand.exact:
            return rec.array
        levels, quant = self.get(name, cand, compensate)
        return decoded_values(levels, quant, rec)

    def retain(self, plans) -> None:
        """Keep only the entries of `plans` (the candidates the search can still choose)."""
        keep = {self._key(name, cand, True) for plan in plans for name, cand in plan.choice.items()}
        for key in [key for key in self._cache if key not in keep]:
            del self._cache[key]

    def cached_bytes(self) -> int:
        return sum(levels.nbytes for levels, _ in self._cache.values() if levels is not None)

    def prefetch(self, wanted, threads: int) -> None:
        """Round every (name, candidate, compensate) of `wanted` not cached yet, on `threads` threads
        (GPTQ's and the trellis's kernels and the BLAS updates release the GIL). The results are what
        `get` would compute one by one: rounding one tensor does not depend on another."""
        todo = [key for key in dict.fromkeys(self._key(*w) for w in wanted) if key not in self._cache and not key[1].exact]
        if threads <= 1 or len(todo) <= 1:
            return
        shared = {self._group[name]: name for name, _, compensate in todo if compensate}
        with ThreadPoolExecutor(min(threads, len(todo))) as pool:
            list(pool.map(self.inverse, shared.values()))  # each H factored once, before the tensors it feeds
            for key, result in zip(todo, pool.map(lambda key: self._round(*key), todo)):
                self._cache[key] = result

    def factor_all(self) -> None:
        """Factor every H now, one after another (each H dropped once factored, and one
        factorisation's temporaries at a time: ~5 copies of an H), before any tensor is rounded."""
        for name in {group: name for name, group in self._group.items()}.values():
            self.inverse(name)

    def inverse(self, name: str) -> np.ndarray:
        """GPTQ's factor of H⁻¹ for `name` (shared by the weights fed by one activation); H itself is
        not needed after it."""
        group = self._group[name]
        if group not in self._u:
            self._u[group] = inverse_cholesky(self._h[group])
            del self._h[group]
        return self._u[group]

    def _round(self, name: str, cand: Candidate, compensate: bool):
        rec = self.records[name]
        if cand.exact:
            return None, None
        in_axis = self.in_axis.get(name) if self.use_gptq and compensate else None
        if cand.dependent:
            return self._round_dependent(rec, float(cand.rel * self._unit(name, None)), in_axis)
        if in_axis is None and self.grid is None:
            steps = cand.rel * self._unit(name, cand.channel_axis)  # allocate.steps_for
            return self._nearest(rec, steps), _uniform(cand, steps)
        w = self.weights(name)
        on_grid = self.grid is not None and cand.channel_axis is not None and cand.channel_axis == self.grid.axis(name, w)
        steps = self.grid.steps(name, w, cand.rel, rec.dtype) if on_grid else cand.rel * self._unit(name, cand.channel_axis, w)
        limit = self.grid.bound if on_grid else 2**31 - 1
        if in_axis is not None:
            w2 = w if in_axis == 0 else w.T
            s2 = steps if in_axis == 0 else np.transpose(steps)
            flat_steps = np.asarray(s2, dtype=np.float64).reshape(-1)
            levels = gptq_levels(w2, self.inverse(name), flat_steps if flat_steps.size > 1 else float(flat_steps[0]),
                                 limit=limit)
            levels = levels if in_axis == 0 else levels.T
        else:  # np.clip(np.rint(w / steps), -limit, limit), in place (a big table's temporaries are its size)
            levels = np.divide(w, steps, out=w)
            np.rint(levels, out=levels)
            np.clip(levels, -limit, limit, out=levels)
        del w
        if levels.size and max(levels.max(), -levels.min()) > 2**31 - 1:
            raise CdlInputError(f"tensor {name!r}: step too small")
        return narrowest(levels), _uniform(cand, steps)

    def _unit(self, name: str, axis: int | None, w: np.ndarray | None = None) -> np.ndarray:
        """allocate.unit_steps of the tensor, once per tensor and axis (it takes float64 temporaries
        of the tensor's size)."""
        key = (name, axis)
        if key not in self._units:
            self._units[key] = unit_steps(self.weights(name) if w is None else w, axis)
        return self._units[key]

    def _nearest(self, rec: TensorRecord, steps) -> np.ndarray:
        """np.clip(np.rint(w / steps), -limit, limit) (limit 2**31 - 1), a block of rows at a time:
        the float64 temporaries are a block's, not a big table's."""
        array = np.asarray(rec.array)
        steps = np.asarray(steps)
        levels = np.empty(array.shape, np.int32)  # within ±(2**31 - 1)
        rows = max(1, ROUND_BLOCK // max(1, array.size // max(1, array.shape[0])))
        for r0 in range(0, array.shape[0], rows):
            part = to_float64(array[r0:r0 + rows], rec.dtype)
            np.divide(part, steps[r0:r0 + rows] if steps.ndim and steps.shape[0] > 1 else steps, out=part)
            np.rint(part, out=part)
            np.clip(part, -(2**31 - 1), 2**31 - 1, out=part)
            levels[r0:r0 + rows] = part
        return narrowest(levels)

    def _round_dependent(self, rec: TensorRecord, step: float, in_axis: int | None):
        """Trellis-coded levels; inside GPTQ's row loop when the tensor has an H and its rows are
        consecutive stretches of the scan (MatMul weights [in, out]); elsewhere along the scan a
        stretch at a time (dependent.dependent_levels's levels, without its temporaries)."""
        flat = np.asarray(rec.array).reshape(-1)
        trellis = RowTrellis(np.concatenate([to_float64(x, rec.dtype) for x in spread_stretches(flat, TABLE_SAMPLE)]),
                             step)
        if in_axis == 0:
            levels = gptq_levels(self.weights(rec.name), self.inverse(rec.name), step, trellis=trellis)
            return narrowest(levels), trellis.quant()
        # The Viterbi search decides blocks of dependent.BLOCK positions, each from the state the last
        # ended in: stretches that are whole blocks give the levels of one pass over the tensor.
        stretch = DEPENDENT_STRETCH - DEPENDENT_STRETCH % DEPENDENT_BLOCK
        parts = [narrowest(trellis.next(to_float64(flat[i:i + stretch], rec.dtype))[0])
                 for i in range(0, flat.size, stretch)]
        return narrowest(np.concatenate(parts)) if len(parts) != 1 else parts[0], trellis.quant()


def _uniform(cand: Candidate, steps) -> dict:
    if cand.channel_axis is None:
        return {"scheme": "uniform", "step": float(steps)}
    return {"scheme": "uniform", "axis": cand.channel_axis, "steps": [float(s) for s in np.asarray(steps).ravel()]}


def release_freed_memory() -> None:
    """Hand the heap pages freed so far back to the OS (glibc's malloc_trim; elsewhere nothing).
    The search frees big short-lived arrays (a plan's decoded weights, onnxruntime's outputs) from
    several threads; glibc keeps the freed pages, and on MiniLM the process then stays ~200 MB above
    what it holds."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


@functools.cache
def _malloc_trim():
    try:
        import ctypes

        return ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError, TypeError):  # not glibc (macOS, musl without it, Windows)
        return None


ROUND_BLOCK = 1 << 20         # values rounded to nearest at once (float64 temporaries of 8 MB)
DEPENDENT_STRETCH = 1 << 20   # values trellis-coded at once outside GPTQ (bounds the float64 and int64 temporaries)
DECODE_BLOCK = 1 << 20        # levels widened and dequantized at once


def narrowest(levels: np.ndarray) -> np.ndarray:
    """Integer levels (or integral floats) flat, C order, in the narrowest of int8 / int16 / int32 /
    int64 that holds them: the values do not change, a cached plan takes 1-2 bytes a parameter."""
    lo, hi = (int(levels.min()), int(levels.max())) if levels.size else (0, 0)
    for kind in (np.int8, np.int16, np.int32, np.int64):
        info = np.iinfo(kind)
        if info.min <= lo and hi <= info.max:
            return np.ascontiguousarray(levels, dtype=kind).reshape(-1)
    raise CdlInputError("levels outside the int64 range")


def decoded_values(levels: np.ndarray, quant: dict, rec: TensorRecord) -> np.ndarray:
    """dequantize(levels as int64, ...), widening a block of levels at a time (the decoder's values
    do not depend on how its levels come in blocks)."""
    values = Dequantizer(quant, rec.shape, rec.dtype, rec.name)
    for i in range(0, max(levels.size, 1), DECODE_BLOCK):
        values.add(levels[i:i + DECODE_BLOCK].astype(np.int64))
    return values.result()


class NothingToQuantize(CdlInputError):
    """The graph has no tensor the search may quantize: every target is met by storing it exactly."""


def _inputs_for(proto, options: FidelityOptions, log) -> Inputs:
    if isinstance(options.calibration, Inputs):
        inputs = options.calibration
    elif options.calibration:
        inputs = load_calibration(options.calibration, proto, options.max_samples)
    else:
        inputs = generate_inputs(proto)
        log("no calibration data: checking on generated inputs of the declared shapes; this verifies far less "
            "than real data (give --calibration DATA.npz)")
    return inputs


def fidelity_plan(model: ModelFile, options: FidelityOptions):
    """Search the plan; returns (quantizer replaying the chosen levels, report, inputs)."""
    search = _Search(model, options)
    search.measure_sensitivities()
    budget, plan, scored = search.search_budget()
    if not search.searched_all:
        plan, scored = search.check_all_samples(budget, plan)
    return search.result(plan, scored.value)


class _Search:
    """The state one fidelity search shares between its steps (see the module docstring)."""

    def __init__(self, model: ModelFile, options: FidelityOptions):
        from ..codec import role_of
        from ..io.onnx_model import reference_of, stripped_graph
        from .runner import OnnxRunner

        from ..codec import default_threads

        self.model, self.options, self.target = model, options, options.target
        self.threads = options.threads or default_threads()
        self.log = _Log(options.quiet)
        self.start = time.perf_counter()
        stripped = stripped_graph(model)
        if stripped is None:
            raise CdlInputError("a fidelity target needs the model's graph: encode an ONNX model (or a torch module "
                                "through the Python API with an example input)")
        self.roles = graph_roles(stripped)
        self.axes = output_axes(stripped)
        self.records = {r.name: r for r in model.records}
        self.names = [r.name for r in model.records
                      if self.roles.get(r.name) in ("weight", "embedding") and role_of(r, options.keep) == "quantized"
                      and r.array.ndim >= 2 and r.numel >= MIN_ELEMENTS
                      and np.all(np.isfinite(np.asarray(r.array, dtype=np.float64)))]
        if not self.names:
            raise NothingToQuantize("the graph has no weights to quantize (no Conv/Gemm/MatMul/LSTM/Gather weights "
                                    f"of {MIN_ELEMENTS} or more values)")
        self.inputs = _inputs_for(stripped, options, self.log)
        init_to_record = {init.name: reference_of(init) for init in stripped.graph.initializer
                          if reference_of(init) is not None}
        layout = {init: spec for init, spec in (gemm_layout(stripped) if options.gptq else {}).items()
                  if init in init_to_record}
        # The measure compares outputs, or the pieces a Concat assembles an output from (pieces.py);
        # sensitivity is read where the model is still linear-ish: a softmax or sigmoid value is
        # replaced by its input (saturated probabilities hide how much a tensor's rounding moved the logits).
        self.parts = output_parts(stripped)
        self.runner = OnnxRunner(model, stripped, self.inputs, capture=[act for _, act, _ in layout.values()],
                                 probes=self.parts.probes)
        self.n_real = len(stripped.graph.output)
        # GPTQ fits its compensation to the activations it sees; with a few thousand activation rows per
        # layer it overfits them, so the search scores its plans on samples GPTQ did not see. GPTQ
        # gains more from data than the score loses: 3/4 fit, 1/4 score (MiniLM: ~1 % fewer bits
        # at equal held-apart cosine than a half split).
        n = len(self.inputs.samples)
        cut = n * 3 // 4
        self.fit, self.check = (slice(0, cut), slice(cut, n)) if n >= MIN_SPLIT and layout \
            else (slice(None), slice(None))
        self.log(f"running the original model on {self.inputs.describe()}")
        self.reference = self.runner.run({})
        self.runs = 1
        if self.inputs.source == "generated" and outputs_alike(self._real(self.reference)):
            raise UncheckableInputs("the model's outputs are the same for every generated input, so a check "
                                    "would see nothing")
        # Only decisions a check can read count (a 196,608-pixel map does not): with any, plans run on all samples.
        kinds = decision_kinds(stripped) if options.same_decisions else {}
        self.kinds = checkable(kinds, self._real(self.reference))
        if self.kinds:
            self.log("decisions kept on every calibration sample, each with at least half its margin: "
                     + describe_decisions(self.kinds, [o.name for o in stripped.graph.output]))
        elif options.unchecked_target is not None:
            self.options = options = replace(options, target=options.unchecked_target)
            self.target = options.target
            self.log(f"no output decides anything a check can read (a dense map, a raw detector head): the "
                     f"default holds {options.target.describe()} instead")
        elif kinds:
            self.log("no output decides anything a check can read (a dense map): the target's measure alone is held")
        hessians = self._hessians(layout, init_to_record) if layout else {}
        self.grid = DeployGrid(options.deploy, stripped) if options.deploy else None
        self.rounder = _Rounder(self.records, hessians, options.gptq, self.grid)
        del hessians
        self.rounder.factor_all()
        release_freed_memory()  # the session's build, the H sums and factors left ~70 MB of freed heap (MiniLM)
        self.curves: list[TensorCurve] = []

    # -- views of one run's outputs ---------------------------------------------------------------
    def _real(self, outs):
        return [s[:self.n_real] for s in outs]

    def _distortion_view(self, outs):
        return self.parts.view(outs, self.parts.distortion)

    def _evaluate(self, reference, decoded) -> "Scored":
        """`reference`, `decoded`: runs' outputs and probes (the decisions read the outputs, the measure its parts)."""
        return evaluate(self.target, self.kinds, reference, decoded, self.parts.positions(self.target.measure))

    def _run(self, plan: Plan, part: slice = slice(None)):
        self.rounder.prefetch([(name, cand, True) for name, cand in plan.choice.items()], self.threads)
        release_freed_memory()  # the rounding threads' temporaries, before the plan's decoded weights
        overrides = {name: self.rounder.values(name, cand) for name, cand in plan.choice.items() if not cand.exact}
        self.runs += 1
        outputs = self.runner.run(overrides, part=part)
        del overrides
        release_freed_memory()
        return outputs

    # -- the steps --------------------------------------------------------------------------------
    def _hessians(self, layout, init_to_record) -> dict[str, tuple[np.ndarray, int]]:
        """H = XᵀX of the activations entering each MatMul/Gemm weight, on the fitting samples."""
        sums: dict[str, np.ndarray] = {}

        def accumulate(act_name, value):
            x = np.asarray(value, dtype=np.float64)
            x = x.reshape(-1, x.shape[-1]) if x.ndim >= 1 else x.reshape(1, 1)
            sums[act_name] = sums.get(act_name, 0.0) + x.T @ x

        self.runner.run({}, on_capture=accumulate, part=self.fit)
        hessians = {}
        for init, (_, act, in_axis) in layout.items():
            rec = init_to_record[init]
            if act in sums and rec in self.names and self.records[rec].array.ndim == 2:
                h = np.asarray(sums[act])
                if h.ndim == 2 and h.shape[0] == self.records[rec].shape[in_axis]:
                    hessians[rec] = (h, in_axis)
        return hessians

    def measure_sensitivities(self) -> None:
        """One run per tensor, rounded alone at REF_REL: its output distortion per unit of weight MSE.
        Rounded as the plan will round it (GPTQ where an H is known), so a tensor whose rounding error
        the compensation hides is charged for what reaches the output, not for its raw weight error;
        measured on samples GPTQ was not fitted on (it would look better on its own data)."""
        start = self.check.start or 0
        part = slice(start, min(start + sensitivity_samples(self._distortion_view(self.reference[start:start + 1])),
                                len(self.inputs.samples)))
        n_sens = part.stop - part.start
        self.log(f"measuring the output sensitivity of {len(self.names)} tensors on {n_sens} samples")
        reference = self._distortion_view(self.reference[part])
        with ThreadPoolExecutor(self.threads) as pool:  # each curve on its own: rounding and trellis kernels release the GIL
            curves = list(pool.map(self._curve, self.names))
        ref, ref_dependent = Candidate(REF_REL, None), Candidate(REF_REL, None, True)
        self.rounder.prefetch([(c.name, cand, compensate) for c in curves for compensate in (True, False)
                               for cand in ((ref, ref_dependent) if any(x.dependent for x in c.candidates) else (ref,))],
                              self.threads)
        shown = time.perf_counter()
        for i, (name, curve) in enumerate(zip(self.names, curves)):
            if time.perf_counter() - shown >= LINE_INTERVAL:  # a long phase shows it is alive
                shown = time.perf_counter()
                self.log(f"sensitivity: {i} of {len(curves)} tensors measured")
            curve.sensitivity = self._sensitivity(name, Candidate(REF_REL, None), reference, part)
            if any(c.dependent for c in curve.candidates):
                # Measured apart: on outlier-heavy convolutions the trellis's errors land where rounding's
                # do not (its rate term prices large levels), costing up to 20x more output per unit MSE.
                curve.sensitivity_dependent = self._sensitivity(name, Candidate(REF_REL, None, True), reference, part)
            self.curves.append(curve)
        self.rounder.retain([])  # the reference-step levels: the budget search starts afresh
        release_freed_memory()
        # "No effect measured" is not "free": at the reference step a tensor's rounding can vanish in the
        # activations (ocr_det: two 144-value depthwise kernels measured 0), while the coarsest step the
        # allocator would then give it moves the output (cosine stuck at 0.99982 however fine the rest).
        measured = [x for c in self.curves for x in (c.sensitivity, c.sensitivity_dependent) if x > 0]
        floor = SENSITIVITY_FLOOR * float(np.median(measured)) if measured else 1.0
        for c in self.curves:
            c.sensitivity = max(c.sensitivity, floor)
            if any(x.dependent for x in c.candidates):
                c.sensitivity_dependent = max(c.sensitivity_dependent, floor)

    def _curve(self, name: str) -> TensorCurve:
        w = self.rounder.weights(name)
        bits = 8 * self.records[name].array.dtype.itemsize
        if self.grid is not None:  # only steps on the deploy grid (and exact storage)
            return self.grid.curve(name, w, self.records[name].dtype, bits)
        axis = self.axes.get(name) if self.roles[name] == "weight" else None
        for unit_axis in dict.fromkeys((None, axis)):  # while w is at hand: rounding then needs no float64 copy
            self.rounder._unit(name, unit_axis, w)
        return tensor_curve(name, w, axis, bits, dependent=self._trellis_pays(name))

    def _trellis_pays(self, name: str) -> bool:
        """Trellis candidates where its scan runs across the outputs a weight feeds: Gather tables (along
        a token's features) and MatMul weights [in, out] (along the outputs, inside GPTQ's row loop).
        Along a convolution's scan the trellis's errors fall within one output's dot product and add up
        there: on a YOLOX detector its plans needed 13-50 % more bits at equal output cosine."""
        if not DEPENDENT:
            return False
        if self.roles.get(name) == "embedding":
            return True
        return self.rounder.in_axis.get(name) == 0

    def _sensitivity(self, name: str, cand: Candidate, reference, part: slice) -> float:
        """Output distortion of `name` rounded alone as `cand` rounds it (with GPTQ where it applies),
        per unit of the weight MSE the curves use for that family (rounding, or trellis coding, without
        compensation)."""
        d = rel_mse(reference, self._distortion_view(self.runner.run({name: self.rounder.values(name, cand)},
                                                                     part=part)))
        self.runs += 1
        rec = self.records[name]
        err = to_float64(self.rounder.values(name, cand, compensate=False), rec.dtype).reshape(-1)
        weights = np.asarray(rec.array).reshape(-1)
        for i in range(0, err.size, ROUND_BLOCK):  # err - w, without a float64 copy of a big table
            np.subtract(err[i:i + ROUND_BLOCK], to_float64(weights[i:i + ROUND_BLOCK], rec.dtype),
                        out=err[i:i + ROUND_BLOCK])
        ref_mse = float(np.mean(np.multiply(err, err, out=err).reshape(rec.shape))) or 1e-30  # the shape summed before
        return max(d, 0.0) / ref_mse if math.isfinite(d) else 1e30

    def search_budget(self) -> tuple[float, Plan, "Scored"]:
        """Secant search on log(deficit) against log(budget): the deficit (how far the target's
        measure and the decisions' margins have gone towards what they may lose, 1 = at the bound)
        grows roughly like a power of the predicted distortion budget."""
        total = _total(self.model)
        scored: dict[tuple, Scored] = {}
        tried: list[tuple[float, float]] = []
        plans: list[tuple[Plan, Scored]] = []
        best: tuple[float, Plan, Scored] | None = None
        budget, result, evaluations = _initial_budget(self.target), None, 0
        for _ in range(4 * SEARCH_RUNS):
            plan = plan_for_budget(self.curves, budget)
            key = tuple(sorted(plan.choice.items(), key=lambda kv: kv[0]))
            if key not in scored:  # else a budget step too small to change any tensor's step
                scored[key] = self._evaluate_plan(plan)
                evaluations += 1
                self.log(f"budget {budget:.3g}: {plan.bits / total:.3f} bits/param predicted, "
                         f"{scored[key].describe(self.target.measure)}")
            result = scored[key]
            tried.append((budget, result.ratio))
            plans.append((plan, result))
            if result.met and (best is None or plan.bits < best[1].bits):
                best = (budget, plan, result)
            self.rounder.retain(_bracket(tried, [p for p, _ in plans], best and best[1]))
            if best is not None and 0.9 <= best[2].ratio <= 1.0:
                break  # close enough below the target: more runs would gain little
            if self.kinds and best is not None:
                # A margin can jump from kept to flipped between two close budgets: stop once a
                # failing plan is within CLOSE_BITS of the best passing one's size.
                above = [p for p, r in plans if not r.met and p.bits < best[1].bits]
                if above and best[1].bits - max(p.bits for p in above) <= CLOSE_BITS * best[1].bits:
                    break
            if best is None and self.kinds:  # margins move like the output error, √budget: aim at 0.9 of the bound
                budget = budget * min(max((0.9 / result.ratio) ** 2, 1 / 64.0), 1 / 3.0)
            else:
                budget = _next_budget(tried, 1.0)
            if budget is None or evaluations >= (SEARCH_RUNS if best is not None else 2 * SEARCH_RUNS):
                break
        if best is None:  # nothing the search tried passes: the weights are stored exactly (always passes)
            self.log(f"no step plan tried meets {self.options.describe()} (best "
                     f"{result.describe(self.target.measure)}): storing the weights exactly")
            plan = self._exact_plan()
            return 0.0, plan, self._evaluate(self.reference, self._run(plan))
        return best

    def _evaluate_plan(self, plan: Plan) -> Scored:
        """Score a plan on the held-back samples, or, when decisions are checked, on every sample:
        a decision can involve all of them (an embedding's nearest other sample has thinner margins
        among 128 samples than among 32), and rounding a plan's tensors costs more than running the
        model on all samples. The measure must then hold on the held-back samples too (GPTQ's
        compensation looks better on the samples it was fitted on)."""
        if not self.kinds:
            return self._evaluate(self.reference[self.check], self._run(plan, self.check))
        decoded = self._run(plan)
        reference = self.reference
        whole = self._evaluate(reference, decoded)
        if self.check == slice(None):
            return whole
        held = evaluate(self.target, {}, reference[self.check], decoded[self.check],
                        self.parts.positions(self.target.measure))
        return Scored(whole.value, max(whole.ratio, held.ratio), whole.met and held.met, whole.kept)

    @property
    def searched_all(self) -> bool:
        """Whether the search's plans were already judged on every calibration sample."""
        return bool(self.kinds) or self.check == slice(None)

    def check_all_samples(self, budget: float, plan: Plan) -> tuple[Plan, "Scored"]:
        """The figure stored in the file covers every calibration sample: when the samples GPTQ was
        fitted on miss the target that the held-back quarter met (rare: the fit favours them), lower
        the budget, aiming at the bound with the deficit moving at least like √budget."""
        reference = self.reference
        n = len(self.inputs.samples)
        tried: list[tuple[float, float]] = []
        plans: list[Plan] = []
        best: tuple[Plan, Scored] | None = None
        for _ in range(ALL_SAMPLE_RUNS):
            result = self._evaluate(reference, self._run(plan))
            self.log(f"all {n} samples, budget {budget:.3g}: {plan.bits / _total(self.model):.3f} bits/param "
                     f"predicted, {result.describe(self.target.measure)}")
            tried.append((budget, result.ratio))
            plans.append(plan)
            if result.met:
                if best is None or plan.bits < best[0].bits:
                    best = (plan, result)
            self.rounder.retain(_bracket(tried, plans, best and best[0]))
            if result.met:
                if result.ratio >= 0.75 or len(tried) == 1:
                    break  # near the bound (or the search's own plan holds): more runs would gain little
            failing = [(b, r) for b, r in tried if r > 1.0]
            if best is None:  # r ≈ (B / B*)^(1/2) or steeper: aim at 0.9 of the bound, at most 64x lower per run
                b, r = min(failing)
                budget = b * max((0.9 / r) ** 2, 1 / 64.0)
            else:
                budget = _next_budget(tried, 1.0)
                if budget is None:
                    break
            plan = plan_for_budget(self.curves, budget)
        if best is not None:
            return best
        # A decision at a near-tie can flip under any rounding: store every tensor exactly (the
        # decoded model is then the original) rather than fail.
        self.log(f"no plan keeps every calibration sample within {self.options.describe()}: storing the weights exactly")
        plan = self._exact_plan()
        return plan, self._evaluate(reference, self._run(plan))

    def _exact_plan(self) -> Plan:
        return Plan({name: EXACT for name in self.names})

    def result(self, plan: Plan, score: float):
        n_coded = sum(not cand.exact for cand in plan.choice.values())
        report = FidelityReport(self.target, score, None, self.inputs.describe(), n_coded,
                                len(self.model.records) - n_coded, self.runs, time.perf_counter() - self.start,
                                same_decisions=self.options.same_decisions, deploy=self.options.deploy)
        for name, cand in plan.choice.items():
            report.steps[name] = "exact" if cand.exact else f"{cand.rel:.3g}×std" + (
                f" per channel (axis {cand.channel_axis})" if cand.channel_axis is not None else "") + (
                " trellis" if cand.dependent else "")
        chosen = {name: self.rounder.get(name, cand) for name, cand in plan.choice.items() if not cand.exact}
        return make("fidelity", chosen=chosen, target=self.options.describe()), report, self.inputs


def sensitivity_samples(first_sample) -> int:
    """How many samples the sensitivity phase runs: SENSITIVITY_SAMPLES, or fewer (not below
    MIN_SENSITIVITY_SAMPLES) when that many already give SENSITIVITY_VALUES output values.
    `first_sample`: one sample's measured outputs (a list holding one list of arrays)."""
    per_sample = sum(int(np.asarray(a).size) for a in first_sample[0]) if first_sample else 0
    if per_sample <= 0:
        return SENSITIVITY_SAMPLES
    return max(MIN_SENSITIVITY_SAMPLES, min(SENSITIVITY_SAMPLES, -(-SENSITIVITY_VALUES // per_sample)))


def _bracket(tried: list[tuple[float, float]], plans: list[Plan], best: Plan | None) -> list[Plan]:
    """The plans whose rounded tensors the budget search may still use: the best passing plan, the
    last plan, and the two around the goal (the passing one of the largest budget, the failing one of
    the smallest). A tensor's step only grows with the budget (the allocator's equal slope), so a plan
    between those two reuses their candidates and none of the others'."""
    keep = [plans[-1]] + ([best] if best is not None else [])
    passing = [(b, i) for i, (b, r) in enumerate(tried) if r <= 1.0]
    failing = [(b, i) for i, (b, r) in enumerate(tried) if r > 1.0]
    if passing:
        keep.append(plans[max(passing)[1]])
    if failing:
        keep.append(plans[min(failing)[1]])
    return keep


def _total(model: ModelFile) -> int:
    return max(1, sum(r.numel for r in model.records))


def _deficit(target: Target, score: float) -> float:
    """How far from perfect a score is: 1 - score for cosine and agreement, the score for rel_mse."""
    if not math.isfinite(score):
        return math.inf
    return max(score if target.measure == "rel_mse" else 1.0 - score, 1e-15)


def _next_budget(tried: list[tuple[float, float]], goal: float) -> float | None:
    """The next budget to try: bracket the goal deficit by factors of 4 to 8 first, then interpolate
    log(deficit) against log(budget) inside the bracket; None once the bracket is narrow."""
    passing = [(b, d) for b, d in tried if d <= goal]
    failing = [(b, d) for b, d in tried if d > goal]
    if not passing:
        b, d = min(failing)
        return b / (3.0 if d < 4 * goal else 8.0)
    lo = max(passing)
    if not failing:
        return lo[0] * (4.0 if lo[1] < goal / 4 else 1.6)
    hi = min(failing)
    if hi[0] <= lo[0]:  # not monotone (noise): nothing sensible left to try
        return None
    if hi[0] / lo[0] < 1.05:
        return None
    a, b = math.log(lo[0]), math.log(hi[0])
    t = 0.5
    if 0 < lo[1] < hi[1] and math.isfinite(hi[1]):
        t = (math.log(0.97 * goal) - math.log(lo[1])) / (math.log(hi[1]) - math.log(lo[1]))
    return math.exp(a + min(max(t, 0.15), 0.85) * (b - a))


def _initial_budget(target: Target) -> float:
    # For a small error in a random direction 1 - cos ≈ relMSE / 2; other measures start generously.
    if target.measure == "cosine":
        return max(2.0 * (1.0 - target.value), 1e-9)
    if target.measure == "rel_mse":
        return target.value
    return 0.01


class PlannedQuantizer(Quantizer):
    """Replays the levels the search chose; every other tensor is stored exactly (registered as
    quantizers.make("fidelity", chosen=..., target=...))."""

    def __init__(self, chosen: dict[str, tuple[np.ndarray, dict]], target: str):
        self.chosen = chosen
        self.target = target

    def describe(self) -> str:
        return f"fidelity target {self.target} (per-tensor steps by output sensitivity, GPTQ rounding)"

    def quantize(self, values64, w32):  # pragma: no cover - encode_records calls quantize_record
        raise CdlInputError("the planned quantizer codes only the tensors it planned")

    def quantize_record(self, record, values64, w32, backend):
        if record.name not in self.chosen:
            return None
        levels, quant = self.chosen[record.name]
        return levels.astype(np.int64), quant, None  # kept narrow until now (fidelity.search.narrowest)


@dataclass
class Scored:
    """A decoded model's outputs judged against the original's."""

    value: float   # the target's measure
    ratio: float   # how far towards the bound: max(deficit / allowed deficit, margin shortfall / allowed); 1 at it
    met: bool      # the target holds and every checked decision keeps its margin
    kept: float | None = None  # the worst checked decision's kept share of its margin (None: none checked)

    def describe(self, measure: str) -> str:
        kept = "" if self.kept is None else f", worst decision keeps {max(self.kept, -9.99):.0%} of its margin"
        return f"{measure} {self.value:.6g}{kept}" + ("" if self.met else " (miss)")


def evaluate(target: Target, kinds, reference, decoded, measured: list[int] | None = None) -> Scored:
    """The target's measure over the values at `measured` of each sample's list (all when None) and,
    with `kinds`, the margins of the decisions of the outputs they index."""
    if measured is not None:
        value = target.score([[s[k] for k in measured] for s in reference], [[s[k] for k in measured] for s in decoded])
    else:
        value = target.score(reference, decoded)
    ratio = _deficit(target, value) / _deficit(target, target.value)
    met = target.met(value)
    ratio = min(ratio, 1.0) if met else max(ratio, 1.0 + 1e-6)
    if not kinds:
        return Scored(value, ratio, met)
    shortfall = margin_shortfall(reference, decoded, kinds)
    kept_all = shortfall <= (1.0 - KEEP_MARGIN) + 1e-9  # decisions._kept's bound
    margin_ratio = shortfall / (1.0 - KEEP_MARGIN)
    ratio = max(ratio, margin_ratio if kept_all else max(margin_ratio, 1.0 + 1e-6))
    return Scored(value, ratio, met and kept_all, 1.0 - shortfall)


def _score(target: Target, kinds, reference, decoded, measured: list[int] | None = None) -> float:
    """The target's measure; a changed decision (when they are checked) makes it a miss."""
    scored = evaluate(target, kinds, reference, decoded, measured)
    if scored.met or not target.met(scored.value):
        return scored.value  # the measure itself already says pass or miss
    miss = target.value * 1.0001 if target.measure == "rel_mse" else target.value - 1e-9
    return max(scored.value, miss) if target.measure == "rel_mse" else min(scored.value, miss)


def check_container(path: str, model: ModelFile, inputs: Inputs, target: Target, kinds=None,
                    parts: OutputParts | None = None) -> float:
    """Decode the written container, run it with onnxruntime's default session, score it (on the
    values `parts` measures, as the search did)."""
    from ..codec import decode_container

    probes = parts.probes if parts is not None else []
    reference = _default_session_outputs(model, inputs, probes)
    release_freed_memory()
    return _score(target, kinds or {}, reference, _default_session_outputs(decode_container(path), inputs, probes),
                  parts.positions(target.measure) if parts is not None else None)


def _default_session_outputs(model: ModelFile, inputs: Inputs, probes: list[str] = ()):
    """OnnxScorer.run of the model's ONNX form (onnxruntime's default session, one sample at a time),
    without holding the model proto while it runs: the session has its own copy of the weights."""
    from ..io.onnx_writer import build_onnx
    from .runner import _run, add_outputs, make_session

    proto = build_onnx(model, weights="float")
    add_outputs(proto, probes)
    del model  # a decoded model's records: the proto holds their values now
    session = make_session(proto)
    del proto
    return [list(_run(session, feed, inputs.source)) for feed in inputs.samples]


def encode_to_target(model: ModelFile, output: str, options: FidelityOptions, encode_options=None):
    """Plan, write and check a container; returns (EncodeSummary, FidelityReport)."""
    from ..codec import EncodeOptions, encode_records

    start = time.perf_counter()
    quantizer, report, inputs = fidelity_plan(model, options)
    options = replace(options, target=report.target)  # the default's stricter target where it applied
    encode_options = replace(encode_options or EncodeOptions(), quantizer=quantizer)
    summary = encode_records(model.records, output, encode_options, {**model.metadata, **report.metadata()},
                             model.sections)
    del quantizer, encode_options  # the chosen levels are written: not held while the file is checked
    from ..io.onnx_model import stripped_graph

    stripped = stripped_graph(model)
    kinds = decision_kinds(stripped) if options.same_decisions else {}
    checked = check_container(output, model, inputs, options.target, kinds, output_parts(stripped))
    return settle(output, options, checked, summary, report, start, "when decoded")


def settle(output: str, options: FidelityOptions, checked: float, summary, report, start: float, how: str):
    """Record the checked figure; a written container that misses the target is removed (an error)."""
    report.checked = checked
    summary.seconds = report.seconds = time.perf_counter() - start
    if not options.target.met(checked):
        os.unlink(output)
        raise CdlInputError(f"the written container misses the target {how} ({options.target.measure} "
                            f"{checked:.6g}, wanted {options.describe()}); nothing was written")
    return summary, report
