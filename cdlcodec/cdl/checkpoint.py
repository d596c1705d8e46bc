"""CDL / R-CDL checkpoints: writing them and rebuilding the model (torch).

A checkpoint is a plain state_dict (every value a tensor, loadable with `torch.load(...,
weights_only=True)`) plus one entry METADATA_KEY holding UTF-8 JSON as a uint8 tensor. The format
is specified in formats/cdl-checkpoint.md; reading it without torch (`is_cdl_checkpoint`,
`read_cdl_metadata`, `hard_levels`, `dequantize`) lives in cdlcodec.cdl_format. `save_checkpoint`,
`cdl_state_dict`, `load_checkpoint` and `build_model_from_checkpoint` import torch when called.
"""
from __future__ import annotations

import json
import warnings
from typing import Any, Mapping

import numpy as np

from ..atomic import atomic_open
from ..cdl_format import FORMAT_NAME, FORMAT_VERSION, GRAPH_KEY, METADATA_KEY, read_cdl_metadata
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
            quantizer = model.get_submodule(name)
            act = {"module": name, "index": len(acts), "after": last_weight, "function": "relu",
                   "s": f"{name}.s", "beta": f"{name}.beta", "bits": f"{name}.bits"}
            if getattr(quantizer, "upper", None) is not None:   # ReLU6 / hardtanh(0, upper)
                act.update(function="hardtanh", max=quantizer.upper)
            acts.append(act)
    return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "mode": modes.pop(),
            "architecture": architecture, "architecture_kwargs": architecture_kwargs or {},
            "bits": int(bits), "first_last_bits": first_last_bits,
            "activation_window": ACTIVATION_WINDOW,
            "weight_quantizers": weights, "activation_quantizers": acts}


def _registered(architecture: str) -> bool:
    from ..models import names

    return architecture.partition(":")[0] in names()


def cdl_state_dict(model, *, architecture: str, bits: int, first_last_bits: int | None,
                   architecture_kwargs: dict | None = None, example_input=None) -> dict:
    """The checkpoint dict: the model's state_dict (detached, CPU) plus the metadata entry.

    `architecture` names a cdlcodec.models entry, from which encode rebuilds the graph. For any other
    model (your own class, after `convert`) give `example_input` (a tensor, or its shape): the float
    graph of the converted model is exported now and stored as the uint8 entry "cdl.graph", so that
    `cdlcodec encode` / `decode -o x.onnx` need neither the class nor an unpickler.
    """
    import torch

    meta = _build_metadata(model, architecture=architecture, architecture_kwargs=architecture_kwargs,
                           bits=bits, first_last_bits=first_last_bits)
    state = {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}
    blob = json.dumps(meta, sort_keys=True, separators=(",", ":")).encode("utf-8")
    state[METADATA_KEY] = torch.frombuffer(bytearray(blob), dtype=torch.uint8).clone()
    if example_input is None and not _registered(architecture):
        if getattr(model, "example_input_shape", None) is None:
            raise CdlInputError(f"architecture {architecture!r} is not in cdlcodec.models: give example_input "
                                "(a tensor or its shape) so that the checkpoint carries the model's graph")
    if example_input is not None or not _registered(architecture):
        state[GRAPH_KEY] = _graph_entry(model, state, architecture, example_input)
    return state


def _graph_entry(model, state: dict, architecture: str, example_input):
    """The converted model's float graph, weights stripped, as the uint8 tensor of GRAPH_KEY."""
    import torch

    from ..io.cdl_graph import graph_with_info
    from ..io.torch_checkpoint import tensor_to_record
    from .export import export_cdl_graph

    shape = None
    if example_input is not None:
        shape = tuple(example_input.shape) if hasattr(example_input, "shape") else tuple(example_input)
    was_training = model.training
    try:
        records = [tensor_to_record(name, value) for name, value in state.items()]
        (_, _, data), meta, tensors = export_cdl_graph(model, records, architecture, shape)
    except CdlInputError:
        raise
    except Exception as exc:  # the exporter refused the forward: say so in one line
        raise CdlInputError(f"cannot export the converted model's graph to ONNX: {type(exc).__name__}: "
                            f"{' '.join(str(exc).split())[:300]}") from None
    finally:
        model.train(was_training)
    blob = graph_with_info(data, meta, tensors)
    return torch.frombuffer(bytearray(blob), dtype=torch.uint8).clone()


def atomic_torch_save(obj, path: str) -> None:
    """torch.save through cdlcodec.atomic: a temporary file in the target directory, then a rename."""
    import torch

    with atomic_open(path, suffix=".pt") as fh:
        torch.save(obj, fh)


def save_checkpoint(model, path: str, *, architecture: str, bits: int, first_last_bits: int | None,
                    architecture_kwargs: dict | None = None, example_input=None) -> dict:
    """Write a CDL checkpoint atomically; returns the dict written (`example_input`: see cdl_state_dict)."""
    state = cdl_state_dict(model, architecture=architecture, bits=bits, first_last_bits=first_last_bits,
                           architecture_kwargs=architecture_kwargs, example_input=example_input)
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


def build_model_from_checkpoint(tensors: Mapping[str, Any], model=None):
    """The CDL model described by the checkpoint, weights and quantizers loaded, in eval mode.

    Its eval forward is the checkpoint's eval forward: hard weight levels float32(k)*float32(q)
    and activation quantizers clip(round(relu(x)/s), 0, 2^b-1)*s. `model`: a fresh float instance of
    your own architecture (the checkpoint's "architecture" is then only a name); by default the
    architecture is built from cdlcodec.models.
    """
    import torch

    from ..models import build
    from .convert import convert

    meta = read_cdl_metadata(tensors)
    if model is None:
        if not _registered(meta.architecture):
            raise CdlInputError(f"the checkpoint's architecture {meta.architecture!r} is not in cdlcodec.models: "
                                "rebuild it with cdlcodec.cdl.checkpoint.build_model_from_checkpoint(state, "
                                "model=YourModel()), or decode it to .onnx")
        model = build(meta.architecture, **meta.architecture_kwargs)
    with warnings.catch_warnings():   # a model that fx cannot trace was converted the same way when saved
        warnings.simplefilter("ignore")
        model = convert(model, bits=meta.bits, first_last_bits=meta.first_last_bits, mode=meta.mode)
    state = {}
    for key, value in tensors.items():
        if key in (METADATA_KEY, GRAPH_KEY):
            continue
        state[key] = value if isinstance(value, torch.Tensor) else torch.from_numpy(np.array(value))
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CdlInputError(f"checkpoint does not match architecture {meta.architecture!r}: "
                            f"{' '.join(str(exc).split())[:400]}") from exc
    return model.eval()
