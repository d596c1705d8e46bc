"""CDL / R-CDL checkpoints: writing them, reading them without torch, and rebuilding the model.

A checkpoint is a plain state_dict (every value a tensor, loadable with `torch.load(...,
weights_only=True)`) plus one entry METADATA_KEY holding UTF-8 JSON as a uint8 tensor. The format
is specified in formats/cdl-checkpoint.md.

The reading half (`is_cdl_checkpoint`, `read_cdl_metadata`, `hard_levels`, `dequantize`) needs only
numpy, so the encoder and the torch-free decoders can use it; it accepts numpy arrays or torch
tensors as values. `save_checkpoint`, `cdl_state_dict`, `load_checkpoint` and
`build_model_from_checkpoint` import torch when called.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np

from ..atomic import atomic_open
from ..errors import CdlInputError

METADATA_KEY = "cdl.metadata"
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


# ---------------------------------------------------------------- torch-free reading

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


def is_cdl_records(records) -> bool:
    """is_cdl_checkpoint for TensorRecords (cheap: looks for the metadata entry by name first)."""
    return any(r.name == METADATA_KEY for r in records) and is_cdl_checkpoint({r.name: r.array for r in records})


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


# ---------------------------------------------------------------- writing (torch)

def _build_metadata(model, *, architecture: str, architecture_kwargs: dict | None, bits: int,
                    first_last_bits: int | None) -> dict:
    from .convert import activation_quantizers, weight_quantizers
    from .layers import ACTIVATION_WINDOW, WEIGHT_LAYERS, ActivationQuantizer

    modes = {m.mode for m in model.modules() if isinstance(m, WEIGHT_LAYERS + (ActivationQuantizer,))}
    if len(modes) != 1:
        raise CdlInputError(f"model has no CDL quantizers or mixed modes: {sorted(modes)}")
    weights = [{"module": n, "weight": f"{n}.weight", "q": f"{n}.q", "alpha": f"{n}.alpha",
                "bits": f"{n}.bits"} for n, _ in weight_quantizers(model)]
    # "after": the last weight layer registered before the activation (forward order for
    # sequentially written models such as the registry's LeNet-5).
    order = [(n, "w") for n, _ in weight_quantizers(model)] + [(n, "a") for n, _ in activation_quantizers(model)]
    position = {n: i for i, (n, _) in enumerate(m for m in model.named_modules())}
    order.sort(key=lambda item: position[item[0]])
    acts, last_weight = [], None
    for name, kind in order:
        if kind == "w":
            last_weight = name
        else:
            acts.append({"module": name, "index": len(acts), "after": last_weight, "function": "relu",
                         "s": f"{name}.s", "beta": f"{name}.beta", "bits": f"{name}.bits"})
    return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "mode": modes.pop(),
            "architecture": architecture, "architecture_kwargs": architecture_kwargs or {},
            "bits": int(bits), "first_last_bits": first_last_bits,
            "activation_window": ACTIVATION_WINDOW,
            "weight_quantizers": weights, "activation_quantizers": acts}


def cdl_state_dict(model, *, architecture: str, bits: int, first_last_bits: int | None,
                   architecture_kwargs: dict | None = None) -> dict:
    """The checkpoint dict: the model's state_dict (detached, CPU) plus the metadata entry."""
    import torch

    meta = _build_metadata(model, architecture=architecture, architecture_kwargs=architecture_kwargs,
                           bits=bits, first_last_bits=first_last_bits)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    blob = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode("utf-8")
    state[METADATA_KEY] = torch.frombuffer(bytearray(blob), dtype=torch.uint8).clone()
    return state


def atomic_torch_save(obj, path: str) -> None:
    """torch.save through cdlcodec.atomic: a temporary file in the target directory, then a rename."""
    import torch

    with atomic_open(path, suffix=".pt") as fh:
        torch.save(obj, fh)


def save_checkpoint(model, path: str, *, architecture: str, bits: int, first_last_bits: int | None,
                    architecture_kwargs: dict | None = None) -> dict:
    """Write a CDL checkpoint atomically; returns the dict written."""
    state = cdl_state_dict(model, architecture=architecture, bits=bits, first_last_bits=first_last_bits,
                           architecture_kwargs=architecture_kwargs)
    atomic_torch_save(state, path)
    return state


def load_checkpoint(path: str) -> dict:
    """torch.load(path, weights_only=True), with clean errors for files that are not state_dicts."""
    import torch

    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except (OSError, FileNotFoundError):
        raise
    except Exception as exc:  # pickle / zip problems: not a loadable checkpoint
        raise CdlInputError(f"{path}: not a torch checkpoint loadable with weights_only=True ({exc})") from exc
    if not isinstance(state, dict) or not all(hasattr(v, "shape") for v in state.values()):
        raise CdlInputError(f"{path}: expected a state_dict of tensors")
    return state


def build_model_from_checkpoint(tensors: Mapping[str, Any]):
    """The CDL model described by the checkpoint, weights and quantizers loaded, in eval mode.

    Its eval forward is the checkpoint's eval forward: hard weight levels float32(k)*float32(q)
    and activation quantizers clip(round(relu(x)/s), 0, 2^b-1)*s.
    """
    import torch

    from ..models import build
    from .convert import convert

    meta = read_cdl_metadata(tensors)
    model = build(meta.architecture, **meta.architecture_kwargs)
    convert(model, bits=meta.bits, first_last_bits=meta.first_last_bits, mode=meta.mode)
    state = {}
    for key, value in tensors.items():
        if key == METADATA_KEY:
            continue
        state[key] = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.array(value))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CdlInputError(f"checkpoint does not match architecture {meta.architecture!r}: {exc}") from exc
    return model.eval()
