"""CDL / R-CDL checkpoints: writing them and rebuilding the model (torch).

A checkpoint is a plain state_dict (every value a tensor, loadable with `torch.load(...,
weights_only=True)`) plus one entry METADATA_KEY holding UTF-8 JSON as a uint8 tensor. The format
is specified in formats/cdl-checkpoint.md; reading it without torch (`is_cdl_checkpoint`,
`read_cdl_metadata`, `hard_levels`, `dequantize`) lives in cdlcodec.cdl_format. `save_checkpoint`,
`cdl_state_dict`, `load_checkpoint` and `build_model_from_checkpoint` import torch when called.
"""
from __future__ import annotations

import json
from typing import Any, Mapping

import numpy as np

from ..atomic import atomic_open
from ..cdl_format import FORMAT_NAME, FORMAT_VERSION, METADATA_KEY, read_cdl_metadata
from ..errors import CdlInputError


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
