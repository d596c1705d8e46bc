"""Deployable integer grids (`encode --deploy int8|int4`): every quantized weight lies on a symmetric
per-output-channel grid whose levels fit int8 ([-127, 127]) or int4 ([-7, 7]), so that `decode
--weights qdq` writes int8 / int4 DequantizeLinear that reproduces the coded weights exactly.

- Scale: per output channel (the axis read from the ONNX graph, fidelity.roles.output_axes; the
  last axis, one scale per feature, for Gather tables: on MiniLM's word embeddings per-feature scales
  gave a higher output cosine than per-row ones (0.99949 vs 0.99933) and a 1.4 MB smaller file;
  axis 0 where the graph says nothing), chosen for fidelity: the clip ratio r in [0.3, 1] of
  step = r * max|w_c| / q_max that minimises the channel's squared rounding + clipping error
  (`deploy_min_steps`). A coarser step from the user's step rule (--rel-step / --step) wins where
  it is coarser; --bits B asks for a B-bit grid (B <= the deploy width), searched the same way.
- Exactness: each step is rounded to the tensor's own float type, so DequantizeLinear's product
  float(level) * scale in that type equals the decoder's float64 product rounded once to it
  (|level| <= 127 has 7 significant bits: level * step is exact in float64, and IEEE multiplication
  in float32 / float16 is that exact product correctly rounded).
- Levels are clamped to ±q_max (`clamp_levels`) and then entropy-coded like any other levels.

It lives with the graph-aware encoding (not in quantizers/) because its scale axes come from the
graph's roles; the registry names it ("deploy") like the fidelity search's planned quantizer.

For a step search that must stay on the deploy grid (e.g. the fidelity search): `channel_axes(graph)`
gives each tensor's scale axis, `deploy_min_steps(weight, axis, bits)` the smallest step per channel
(never go below it), `representable_steps(steps, dtype)` rounds chosen steps so that QDQ stays exact,
and `clamp_levels(levels, bits)` keeps the levels on the grid.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..dtypes import from_float64, to_float64
from ..errors import CdlInputError
from ..quantizers.base import DEFAULT_REL_STEP, Quantizer, parameter_error
from ..quantizers.channel import broadcast_steps, channel_steps
from ..quantizers.params import ChannelParams
from ..quantizers.uniform import UniformQuantizer

GRIDS = {"int8": 8, "int4": 4}
CLIP_RATIOS = np.linspace(0.3, 1.0, 36)   # steps of 0.02; 1.0 is the max-abs grid
SEARCH_BLOCK = 1 << 22                    # elements per ratio pass: bounds the search's scratch memory


def level_bound(bits: int) -> int:
    """Largest level magnitude of a symmetric `bits`-bit grid (127 for int8, 7 for int4)."""
    return 2 ** (bits - 1) - 1


def clamp_levels(levels: np.ndarray, bits: int) -> np.ndarray:
    """Levels clamped to the symmetric `bits`-bit grid [-q_max, q_max] (a new int64 array)."""
    bound = level_bound(bits)
    return np.clip(levels, -bound, bound).astype(np.int64)


def deploy_min_steps(weight: np.ndarray, axis: int, bits: int) -> np.ndarray:
    """Per-channel (along `axis`) step of the symmetric `bits`-bit grid with the least squared error
    sum_c (w - clamp(rint(w / step_c)) * step_c)^2: clip ratio r * max|w_c| / q_max, r in CLIP_RATIOS.
    A smaller step would put levels off the grid. All-zero channels get step 1.0."""
    bound = level_bound(bits)
    rows = np.moveaxis(np.asarray(weight, dtype=np.float64), axis, 0).reshape(weight.shape[axis], -1)
    peak = np.max(np.abs(rows), axis=1) if rows.shape[1] else np.zeros(rows.shape[0])
    best = np.full(rows.shape[0], np.inf)
    steps = np.where(peak > 0, peak / bound, 1.0)
    per_block = max(1, SEARCH_BLOCK // max(rows.shape[1], 1))
    for start in range(0, rows.shape[0], per_block):
        block, top = rows[start:start + per_block], peak[start:start + per_block]
        for ratio in CLIP_RATIOS:
            step = np.where(top > 0, ratio * top / bound, 1.0)[:, None]
            error = np.sum((block - np.clip(np.rint(block / step), -bound, bound) * step) ** 2, axis=1)
            better = error < best[start:start + per_block]
            best[start:start + per_block][better] = error[better]
            steps[start:start + per_block][better] = step[better, 0]
    return steps


def channel_axes(stripped_graph) -> dict[str, int]:
    """Record name -> the axis that gets one scale per index (negative: from the end), read from the
    graph: output channels of Conv/ConvTranspose/MatMul/Gemm/LSTM weights, features of Gather tables.
    Tensors it does not name use axis 0."""
    from .roles import graph_roles, output_axes

    axes = {name: -1 for name, role in graph_roles(stripped_graph).items() if role == "embedding"}
    axes.update(output_axes(stripped_graph))
    return axes


def representable_steps(steps: np.ndarray, dtype: str) -> np.ndarray:
    """Steps rounded to `dtype` (the scale type DequantizeLinear uses for this tensor), never to zero."""
    rounded = to_float64(from_float64(np.asarray(steps, dtype=np.float64), dtype), dtype)
    return np.where(np.isfinite(rounded) & (rounded > 0), rounded, 1.0)


@dataclass(frozen=True)
class DeployQuantizer(Quantizer):
    """Nearest rounding on a per-channel int8 / int4 grid (module docstring)."""

    uses_step_rule = True

    grid: str = "int8"
    rel_step: float | None = DEFAULT_REL_STEP
    step: float | None = None
    bits: int | None = None
    axes: tuple = ()  # ((record name, channel axis; negative counts from the end), ...) from prepare()

    def __post_init__(self):
        if self.grid not in GRIDS:
            raise parameter_error(f"grid must be one of {', '.join(GRIDS)}, got {self.grid!r}", "grid")
        if self.bits is not None and not 2 <= self.bits <= GRIDS[self.grid]:
            raise parameter_error(f"bits must be between 2 and {GRIDS[self.grid]} for an {self.grid} grid, "
                                  f"got {self.bits}", "bits")
        self.rule  # validates the step options

    @property
    def rule(self) -> UniformQuantizer:
        return UniformQuantizer(rel_step=self.rel_step if self.step is None and self.bits is None else None,
                                step=self.step, bits=self.bits)

    @property
    def grid_bits(self) -> int:
        return self.bits if self.bits is not None else GRIDS[self.grid]

    def describe(self) -> str:
        return f"deploy {self.grid} per-channel ({self.rule.describe()})"

    def prepare(self, model, backend: str) -> "DeployQuantizer":
        from ..io.onnx_model import stripped_graph

        graph = stripped_graph(model)
        if graph is None:
            return self
        axes = tuple(sorted(channel_axes(graph).items()))
        return DeployQuantizer(self.grid, self.rel_step, self.step, self.bits, axes)

    def steps_for(self, w32: np.ndarray, axis: int, dtype: str = "float32") -> np.ndarray:
        """One step per channel along `axis`: the deploy grid's, or the step rule's where coarser."""
        steps = deploy_min_steps(w32, axis, self.grid_bits)
        if self.bits is None:  # rel_step / step: the user's step unless it leaves the grid
            steps = np.maximum(steps, channel_steps(self.rule, w32, axis))
        return representable_steps(steps, dtype)

    def quantize_record(self, record, values64: np.ndarray, w32: np.ndarray, backend: str):
        if not np.all(np.isfinite(w32)):
            raise CdlInputError("tensor holds NaN or infinite values; keep it lossless with --keep")
        if w32.ndim < 1 or w32.size == 0:
            levels, quant = self.rule.quantize(values64, w32)
            return levels, quant, None
        axis = dict(self.axes).get(record.name, 0) % w32.ndim
        steps = self.steps_for(w32, axis, record.dtype)
        levels = clamp_levels(np.rint(values64 / broadcast_steps(steps, w32.shape, axis)), self.grid_bits)
        return levels.ravel(), ChannelParams(axis, tuple(float(s) for s in steps)).to_json(), None

    def quantize(self, values64: np.ndarray, w32: np.ndarray) -> tuple[np.ndarray, dict]:
        from ..records import TensorRecord

        levels, quant, _ = self.quantize_record(TensorRecord("", w32, "float32"), values64, w32, "")
        return levels, quant

