"""The CDL / R-CDL checkpoint format (formats/cdl-checkpoint.md), read with numpy only.

A checkpoint is a plain state_dict plus one entry METADATA_KEY holding UTF-8 JSON as a uint8
tensor; the metadata names, per quantized layer, the tensors of its learned step, sharpness and
bit width. This module recognises checkpoints (`is_cdl_checkpoint`, `is_cdl_records`), parses and
checks their metadata with the learned quantizer parameters (`read_cdl_metadata`) and computes the
eval-mode levels (`hard_levels`, `dequantize`). Values may be numpy arrays or torch tensors; torch
is never imported, so the encoder, the quantizers and the torch-free decoders can use it. Writing
checkpoints and rebuilding the torch model live in cdlcodec.cdl.checkpoint.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from .errors import CdlInputError

METADATA_KEY = "cdl.metadata"
# Optional: a checkpoint of a model outside cdlcodec.models carries its own graph in this uint8 entry
# (ONNX, weights stripped, GRAPH_INFO_KEY in its metadata_props; formats/cdl-checkpoint.md).
GRAPH_KEY = "cdl.graph"
GRAPH_INFO_KEY = "cdlcodec.cdl_graph"
FORMAT_NAME = "cdlcodec-cdl-checkpoint"
FORMAT_VERSION = 1
CDL_MODES = ("cdl", "rcdl")


@dataclass(frozen=True)
class WeightQuantizerInfo:
    """One quantized weight tensor: levels k in [-2^(b-1), 2^(b-1)-1], value float32(k)*float32(q)."""

    module: str          # module path, e.g. "conv1"
    weight: str          # state_dict key of the float weight it quantizes, e.g. "conv1.weight"
    q: float             # learned step (a float32 value, exact in a Python float)
    alpha: float         # learned sharpness of the CPMF (eq. 12)
    bits: int
    q_key: str
    alpha_key: str
    bits_key: str

    @property
    def level_range(self) -> tuple[int, int]:
        return -(1 << (self.bits - 1)), (1 << (self.bits - 1)) - 1


@dataclass(frozen=True)
class ActivationQuantizerInfo:
    """One activation quantizer y = clip(round(relu(x)/s), 0, 2^b-1) * s, replacing a ReLU module."""

    module: str          # module path of the replaced nn.ReLU, e.g. "relu1"
    index: int           # position among the activation quantizers, in forward order (0 = first)
    after: str | None    # the quantized weight layer whose output (after ReLU) it quantizes
    s: float
    beta: float
    bits: int
    s_key: str
    beta_key: str
    bits_key: str

    @property
    def level_range(self) -> tuple[int, int]:
        return 0, (1 << self.bits) - 1


@dataclass(frozen=True)
class CdlMetadata:
    format: str
    version: int
    mode: str                      # "cdl" or "rcdl"
    architecture: str              # name in cdlcodec.models
    architecture_kwargs: dict
    bits: int
    first_last_bits: int | None
    activation_window: int
    weights: tuple[WeightQuantizerInfo, ...]
    activations: tuple[ActivationQuantizerInfo, ...]


def _as_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):          # a torch tensor, converted without importing torch
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def _metadata_json(tensors: Mapping[str, Any]) -> dict | None:
    if METADATA_KEY not in tensors:
        return None
    raw = _as_numpy(tensors[METADATA_KEY])
    if raw.dtype != np.uint8 or raw.ndim != 1:
        raise CdlInputError(f"{METADATA_KEY!r} must be a 1-D uint8 tensor of UTF-8 JSON")
    try:
        meta = json.loads(raw.tobytes().decode("utf-8"))
    except (ValueError, RecursionError) as exc:  # bad UTF-8 or JSON, 4,300+ digit numbers, deep nesting
        raise CdlInputError(f"{METADATA_KEY!r} is not valid UTF-8 JSON: {str(exc)[:120]}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT_NAME:
        raise CdlInputError(f"{METADATA_KEY!r} does not describe a {FORMAT_NAME}")
    return meta


def is_cdl_checkpoint(tensors: Mapping[str, Any]) -> bool:
    """True when the state_dict carries CDL metadata with mode "cdl" or "rcdl"."""
    try:
        meta = _metadata_json(tensors)
    except CdlInputError:
        return False
    return meta is not None and meta.get("mode") in CDL_MODES


def records_as_tensors(records) -> dict[str, np.ndarray]:
    """{name: array} of TensorRecords, the mapping the readers here take."""
    return {r.name: r.array for r in records}


def is_cdl_records(records) -> bool:
    """is_cdl_checkpoint for TensorRecords (cheap: looks for the metadata entry by name first)."""
    return any(r.name == METADATA_KEY for r in records) and is_cdl_checkpoint(records_as_tensors(records))


def _scalar(tensors: Mapping[str, Any], key: str, kind: type):
    if key not in tensors:
        raise CdlInputError(f"CDL checkpoint lacks tensor {key!r} named in its metadata")
    arr = _as_numpy(tensors[key])
    if arr.size != 1:
        raise CdlInputError(f"CDL checkpoint tensor {key!r} must hold one value, has shape {arr.shape}")
    value = arr.reshape(()).item()
    if kind is int:
        if not np.issubdtype(arr.dtype, np.integer) or not 1 <= value <= 16:
            raise CdlInputError(f"CDL checkpoint tensor {key!r} must be an integer bit width in 1..16")
        return int(value)
    value = float(np.float32(value))
    if not np.isfinite(value) or value <= 0:
        raise CdlInputError(f"CDL checkpoint tensor {key!r} must be positive and finite, is {value}")
    return value


def read_cdl_metadata(tensors: Mapping[str, Any]) -> CdlMetadata:
    """Parse and check the metadata of a CDL/R-CDL checkpoint; CdlInputError if it is not one."""
    meta = _metadata_json(tensors)
    if meta is None:
        raise CdlInputError(f"not a CDL checkpoint: no {METADATA_KEY!r} entry")
    if meta.get("version") != FORMAT_VERSION:
        raise CdlInputError(f"unsupported CDL checkpoint version {meta.get('version')!r} "
                            f"(this cdlcodec reads version {FORMAT_VERSION})")
    if meta.get("mode") not in CDL_MODES:
        raise CdlInputError(f"CDL checkpoint mode must be one of {CDL_MODES}, is {meta.get('mode')!r}")
    try:
        weights = []
        for w in meta["weight_quantizers"]:
            if w["weight"] not in tensors:
                raise CdlInputError(f"CDL checkpoint lacks weight tensor {w['weight']!r}")
            weights.append(WeightQuantizerInfo(
                module=str(w["module"]), weight=str(w["weight"]),
                q=_scalar(tensors, w["q"], float), alpha=_scalar(tensors, w["alpha"], float),
                bits=_scalar(tensors, w["bits"], int), q_key=w["q"], alpha_key=w["alpha"],
                bits_key=w["bits"]))
        acts = []
        for a in meta["activation_quantizers"]:
            acts.append(ActivationQuantizerInfo(
                module=str(a["module"]), index=int(a["index"]), after=a.get("after"),
                s=_scalar(tensors, a["s"], float), beta=_scalar(tensors, a["beta"], float),
                bits=_scalar(tensors, a["bits"], int), s_key=a["s"], beta_key=a["beta"],
                bits_key=a["bits"]))
        return CdlMetadata(
            format=meta["format"], version=int(meta["version"]), mode=meta["mode"],
            architecture=str(meta["architecture"]),
            architecture_kwargs=dict(meta.get("architecture_kwargs") or {}),
            bits=int(meta["bits"]), first_last_bits=meta.get("first_last_bits"),
            activation_window=int(meta.get("activation_window", 5)),
            weights=tuple(weights), activations=tuple(sorted(acts, key=lambda a: a.index)))
    except (KeyError, TypeError, ValueError) as exc:
        raise CdlInputError(f"malformed CDL checkpoint metadata: {exc!r}") from exc


def hard_levels(w: np.ndarray, q: float, bits: int, *, signed: bool = True) -> np.ndarray:
    """Eval-mode levels: argmax_k P_α(kq | w) = clip(rint(float32(w) / float32(q)), lo, hi), int64.

    The argmax of the CPMF of eq. 12 is the alphabet point nearest to w (α only scales the
    logits), i.e. rounding w/q and clipping to A (signed, eq. 10a) or B (unsigned, eq. 10b).
    Division in float32 and round-half-to-even match the torch eval path bit for bit.
    """
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    ratio = np.asarray(w, dtype=np.float32) / np.float32(q)
    return np.clip(np.rint(ratio), lo, hi).astype(np.int64)


def dequantize(levels: np.ndarray, q: float) -> np.ndarray:
    """float32(k) * float32(q): exactly the weight the eval-mode model uses."""
    return np.asarray(levels).astype(np.float32) * np.float32(q)
