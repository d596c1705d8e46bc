"""Python API for getting a model back: `load(path)` and `load_into(module, path)`.

    import cdlcodec
    model = cdlcodec.load("lenet.cdl")          # nn.Module (eval mode) when the container has a graph
    cdlcodec.load_into(my_module, "model.cdl")  # any container: weights into your own module

What `load` returns depends on what the container carries (docs/decoders.md):
1. a torch.export program (encoded from a .pt2 file): its module, `ExportedProgram.module()`;
2. a CDL checkpoint (metadata "cdl.mode"): the CDL model rebuilt by cdlcodec.cdl, eval mode;
3. a registered architecture (metadata "architecture", e.g. from `encode --arch lenet5`): that
   module from cdlcodec.models, weights loaded with strict=True, eval mode;
4. otherwise (a plain state_dict, or an ONNX model, which has no torch module): an ordered
   state_dict {name: tensor}. Decode ONNX containers to .onnx to run them.
"""
from __future__ import annotations

from collections import OrderedDict

from .errors import CdlInputError
from .formats.container import Limits
from .records import ModelFile


def _state_dict(model: ModelFile) -> "OrderedDict":
    from .io.torch_checkpoint import record_to_tensor

    return OrderedDict((r.name, record_to_tensor(r)) for r in model.records)


def load(path: str, *, limits: Limits = Limits()):
    """Decode the container at `path` into an nn.Module where it says how to build one, else a state_dict."""
    from .codec import decode_container
    from .io.torch_export import program_from_model, program_section

    model = decode_container(path, limits=limits)
    if program_section(model) is not None:
        return program_from_model(model).module()
    state = _state_dict(model)
    if _is_cdl(state):
        from .cdl.checkpoint import build_model_from_checkpoint

        return build_model_from_checkpoint(state).eval()
    arch = model.metadata.get("architecture")
    if arch:
        from . import models

        module = models.build(arch)
        _strict_load(module, state, path)
        return module.eval()
    return state


def load_into(module, path: str, *, strict: bool = True, limits: Limits = Limits()):
    """Load the container's tensors into `module` (load_state_dict with `strict`); returns `module`."""
    from .codec import decode_container

    state = _state_dict(decode_container(path, limits=limits))
    if strict:
        _strict_load(module, state, path)
    else:
        module.load_state_dict(state, strict=False)
    return module


def _strict_load(module, state, path: str) -> None:
    try:
        module.load_state_dict(state, strict=True)
    except RuntimeError as exc:
        raise CdlInputError(f"{path}: the decoded tensors do not fit the module: "
                            f"{' '.join(str(exc).split())[:400]}") from None


def _is_cdl(state) -> bool:
    try:
        from .cdl.checkpoint import is_cdl_checkpoint
    except ImportError:  # CDL support not installed in this build
        return False
    return is_cdl_checkpoint(state)
