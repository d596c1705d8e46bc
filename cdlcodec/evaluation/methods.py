"""Codec methods a sweep can evaluate: a method turns a task's model + settings into a compressed,
decoded, runnable model and the sizes it took.

A method is a `Method(name, defaults, run)`; `run(task, settings, workdir) -> Compressed`. Methods
that produce a .cdl write it under `workdir`, decode it with the ordinary decoder and measure the
container (rates.py), so what is evaluated is exactly what a user gets back. Register your own with
`register(Method(...))`.

nearest, rd and trellis apply to torch tasks and to ONNX model tasks (`onnx_task.py`); fidelity
only to ONNX model tasks; the others only to torch tasks (`Method.kinds`).

Built-in methods:
- fp32               the uncompressed reference (32 bits per weight).
- nearest            post-training uniform quantization, nearest rounding (rel_step or bits,
                     granularity tensor|channel), any lossless backend.
- rd                 post-training rate-distortion quantization (DeepCABAC eq. 11, λ = lam).
- trellis            dependent (trellis-coded) quantization.
- cdl, rcdl          train with CDL / R-CDL (cdlcodec.cdl) for `epochs`, starting from the trained
                     FP weights (init="fp") or from scratch (init="scratch"), with b = `bits`,
                     λ = `lam` and γ = `gamma` (default: γ = λ), then encode the checkpoint with
                     its learned steps.
- checkpoint         encode a CDL / R-CDL checkpoint file given by `path`.
- fidelity           (ONNX model tasks) the fidelity encoder: the smallest container whose decoded
                     model meets `target` in the task's measure on its calibration inputs.
- fp16, int8-zlib, int8-lzma   general-purpose baselines (`cdlcodec eval --compare`).
"""
from __future__ import annotations

import importlib
import lzma
import os
import time
import zlib
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from ..errors import CdlInputError
from ..quantizers.base import make
from .rates import container_rates
from .tasks import Task


@dataclass
class Compressed:
    """One compressed-then-decoded model and what it cost."""

    model: object                 # what task.evaluate takes: a torch module in eval mode with the decoded
                                  # weights, or for an ONNX model task the decoded ModelFile
    file_bytes: int
    num_params: int
    num_weights: int              # elements of the quantized weight tensors
    weight_bits: float            # bits the file spends on them (eq. 41a numerator)
    encode_seconds: float
    decode_seconds: float
    extra: dict = field(default_factory=dict)


@dataclass
class Method:
    name: str
    defaults: dict
    run: Callable[[Task, dict, str], Compressed]
    description: str = ""
    needs: str | None = None      # module that must import for the method to be available
    kinds: tuple[str, ...] = ("torch",)  # Task.kind values the method applies to

    def available(self) -> bool:
        if self.needs is None:
            return True
        try:
            importlib.import_module(self.needs)
        except ImportError:
            return False
        return True

    def settings(self, given: dict) -> dict:
        """`given` completed with the defaults; CdlInputError for a key the method does not know."""
        unknown = sorted(set(given) - set(self.defaults))
        if unknown:
            raise CdlInputError(f"method {self.name!r} has no setting {', '.join(map(repr, unknown))} "
                                f"(settings: {', '.join(self.defaults) or 'none'})")
        out = dict(self.defaults)
        out.update(given)
        return out


METHODS: dict[str, Method] = {}


def register(method: Method) -> Method:
    METHODS[method.name] = method
    return method


def get_method(name: str) -> Method:
    if name not in METHODS:
        raise CdlInputError(f"unknown method {name!r} (known: {', '.join(METHODS)})")
    method = METHODS[name]
    if not method.available():
        raise CdlInputError(f"method {name!r} is not available in this build (needs {method.needs})")
    return method


# ------------------------------------------------------------------ helpers shared by methods

def _state_records(state: dict):
    from ..io.torch_checkpoint import tensor_to_record

    return [tensor_to_record(k, v) for k, v in state.items()]


def _state_model(state: dict):
    """A state_dict as the model file its reader would give (a CDL checkpoint with its sections)."""
    from ..io.cdl_checkpoint import cdl_model_file
    from ..records import ModelFile

    records = _state_records(state)
    return cdl_model_file(records) or ModelFile(records)


def _state_of(model) -> dict:
    return {k: v.detach().cpu().clone() for k, v in model.state_dict().items()}


def _load_plain(task: Task, state: dict):
    model = task.fresh_copy()
    model.load_state_dict(state, strict=True)
    return model.eval()


def _torch_state(decoded) -> dict:
    from ..io.torch_checkpoint import record_to_tensor

    return {r.name: record_to_tensor(r) for r in decoded.records}


def _encode_decode(task: Task, model, quantizer, backend: str, workdir: str, stem: str,
                   rebuild: Callable[[str, object], object]) -> Compressed:
    """encode_records -> file -> decode_container -> what the task evaluates; times and container sizes.
    `model`: a records.ModelFile (sections and metadata travel into the container);
    `rebuild(path, decoded ModelFile)`: the model `task.evaluate` takes."""
    from ..codec import EncodeOptions, encode_records

    path = os.path.join(workdir, f"{stem}.cdl")
    start = time.perf_counter()
    encode_records(model.records, path, EncodeOptions(quantizer, backend, (), True), model.metadata, model.sections)
    return _decoded(path, time.perf_counter() - start, rebuild)


def _decoded(path: str, encode_s: float, rebuild: Callable[[str, object], object]) -> Compressed:
    """Decode the written container (timed), rebuild what the task evaluates, read the container's sizes."""
    from ..codec import decode_container

    start = time.perf_counter()
    decoded = decode_container(path)
    decode_s = time.perf_counter() - start
    rates = container_rates(path)
    return Compressed(rebuild(path, decoded), rates.file_bytes, rates.num_params, rates.num_weights,
                      rates.weight_bits, encode_s, decode_s, {"path": path})


def _decoded_model_file(path: str, decoded):
    return decoded  # an ONNX model task scores the decoded ModelFile itself


def _post_training(task: Task, quantizer, settings: dict, workdir: str, stem: str) -> Compressed:
    """Encode the task's model with `quantizer` and decode it: an ONNX model task's own model file
    (graph included), else the torch reference's state_dict."""
    if task.kind == "onnx":
        return _encode_decode(task, task.model_file(), quantizer, settings["backend"], workdir, stem,
                              _decoded_model_file)
    model = _state_model(_state_of(task.reference_model()))
    return _encode_decode(task, model, quantizer, settings["backend"], workdir, stem,
                          lambda path, decoded: _load_plain(task, _torch_state(decoded)))


def _step_rule(settings: dict) -> dict:
    """rel_step or bits (bits wins where both are set), as quantizer keyword arguments."""
    if settings.get("bits") is not None:
        return {"bits": int(settings["bits"])}
    return {"rel_step": float(settings["rel_step"])}


# ------------------------------------------------------------------ reference and post-training

def _run_fp32(task: Task, settings: dict, workdir: str) -> Compressed:
    model = task.reference_model()
    params = [p for p in model.state_dict().values() if p.is_floating_point()]
    weights = [p for p in params if p.ndim >= 2]
    n = sum(p.numel() for p in params)
    nw = sum(p.numel() for p in weights)
    return Compressed(model, 4 * n, n, nw, 32.0 * nw, 0.0, 0.0)


NEAREST_QUANTIZERS = {"tensor": "uniform", "channel": "channel"}  # granularity -> registered quantizer


def _run_nearest(task: Task, settings: dict, workdir: str) -> Compressed:
    if settings["granularity"] not in NEAREST_QUANTIZERS:
        raise CdlInputError(f"granularity must be tensor or channel, not {settings['granularity']!r}")
    quantizer = make(NEAREST_QUANTIZERS[settings["granularity"]], **_step_rule(settings))
    return _post_training(task, quantizer, settings, workdir, "nearest")


def _run_rd(task: Task, settings: dict, workdir: str) -> Compressed:
    quantizer = make("rd", lam=float(settings["lam"]), granularity=settings["granularity"], **_step_rule(settings))
    return _post_training(task, quantizer, settings, workdir, "rd")


def _run_trellis(task: Task, settings: dict, workdir: str) -> Compressed:
    quantizer = make("trellis", lam=float(settings["lam"]), granularity=settings["granularity"],
                     states=int(settings["states"]), **_step_rule(settings))
    return _post_training(task, quantizer, settings, workdir, "trellis")


def _run_fidelity(task: Task, settings: dict, workdir: str) -> Compressed:
    """The fidelity encoder (cdlcodec.fidelity) at `target` in the task's measure; it checks the
    container it writes itself, and the sweep scores it again on all of the task's inputs."""
    from ..codec import EncodeOptions
    from ..fidelity.measures import Target
    from ..fidelity.search import FidelityOptions, encode_to_target

    target = Target(task.measure, float(settings["target"]))
    path = os.path.join(workdir, "fidelity.cdl")
    start = time.perf_counter()
    _, report = encode_to_target(task.model_file(), path,
                                 FidelityOptions(target, task.calibration, gptq=bool(settings["gptq"]), quiet=True),
                                 EncodeOptions(backend=settings["backend"], quiet=True))
    out = _decoded(path, time.perf_counter() - start, _decoded_model_file)
    out.extra.update({"target": target.describe(), "checked_by_encoder": report.checked, "model_runs": report.runs})
    return out


# ------------------------------------------------------------------ CDL / R-CDL

def _rebuild_cdl(path: str, decoded):
    from ..cdl.checkpoint import build_model_from_checkpoint
    from ..cdl_format import is_cdl_checkpoint
    from ..io.torch_checkpoint import record_to_tensor

    state = {r.name: record_to_tensor(r) for r in decoded.records}
    if not is_cdl_checkpoint(state):
        raise CdlInputError(f"{path}: the decoder did not rebuild a CDL model from the container")
    return build_model_from_checkpoint(state).eval()


def _encode_cdl_state(task: Task, state: dict, settings: dict, workdir: str, stem: str) -> Compressed:
    model = _state_model(state)  # read as a CDL checkpoint: its learned quantizers (cpmf argmax) apply
    return _encode_decode(task, model, None, settings["backend"], workdir, stem, _rebuild_cdl)


def train_cdl(task: Task, settings: dict, mode: str):
    """Train a CDL / R-CDL model on the task; returns (model in eval mode, checkpoint state, seconds)."""
    import copy

    import torch

    from ..cdl.checkpoint import cdl_state_dict
    from ..cdl.train import TrainConfig, train_model
    from ..models import build

    if task.architecture is None or task.data is None:
        raise CdlInputError(f"task {task.name!r} has no named architecture and data: CDL training "
                            "needs a built-in task (or a Task with architecture= and data=)")
    data = task.data()
    config = TrainConfig(mode=mode, bits=int(settings["bits"]), lam=float(settings["lam"]),
                         gamma=float(settings["lam"] if settings["gamma"] is None else settings["gamma"]), epochs=int(settings["epochs"]),
                         seed=int(settings["seed"]), quiet=True)
    if settings["init"] == "fp":
        model = copy.deepcopy(task.reference_model()).train()
    elif settings["init"] == "scratch":
        torch.manual_seed(config.seed)
        model = build(task.architecture)
    else:
        raise CdlInputError(f"init must be fp or scratch, not {settings['init']!r}")
    start = time.perf_counter()
    result = train_model(model, data.x_train, data.y_train, data.x_test, data.y_test, config)
    seconds = time.perf_counter() - start
    state = cdl_state_dict(result.model, architecture=task.architecture, bits=config.bits,
                           first_last_bits=config.first_last_bits)
    return result.model, result.test_accuracy, state, seconds


def _cdl_runner(mode: str):
    def run(task: Task, settings: dict, workdir: str) -> Compressed:
        _, trained_accuracy, state, seconds = train_cdl(task, settings, mode)
        out = _encode_cdl_state(task, state, settings, workdir, mode)
        out.extra.update({"trained_accuracy": trained_accuracy, "train_seconds": round(seconds, 2)})
        return out
    return run


def _run_checkpoint(task: Task, settings: dict, workdir: str) -> Compressed:
    from ..cdl.checkpoint import load_checkpoint
    from ..cdl_format import is_cdl_checkpoint

    if not settings["path"]:
        raise CdlInputError("method 'checkpoint' needs path=<CDL checkpoint file>")
    state = load_checkpoint(settings["path"])
    if not is_cdl_checkpoint(state):
        raise CdlInputError(f"{settings['path']}: not a CDL / R-CDL checkpoint (use method 'nearest' "
                            "or 'rd' for ordinary checkpoints)")
    return _encode_cdl_state(task, state, settings, workdir, "checkpoint")


# ------------------------------------------------------------------ general-purpose baselines

def _run_fp16(task: Task, settings: dict, workdir: str) -> Compressed:
    start = time.perf_counter()
    half = {k: (v.half() if v.is_floating_point() else v) for k, v in _state_of(task.reference_model()).items()}
    encode_s = time.perf_counter() - start
    start = time.perf_counter()
    state = {k: (v.float() if v.is_floating_point() else v) for k, v in half.items()}
    decode_s = time.perf_counter() - start
    n = sum(v.numel() for v in half.values())
    nw = sum(v.numel() for v in half.values() if v.is_floating_point() and v.ndim >= 2)
    nbytes = sum(v.numel() * v.element_size() for v in half.values())
    return Compressed(_load_plain(task, state), nbytes, n, nw, 16.0 * nw, encode_s, decode_s)


def _int8_codec(compress: Callable[[bytes], bytes], decompress: Callable[[bytes], bytes]):
    """Symmetric per-tensor int8 (scale = max|w| / 127) for ndim >= 2 floats, then a byte compressor."""
    def run(task: Task, settings: dict, workdir: str) -> Compressed:
        import torch

        state = _state_of(task.reference_model())
        start = time.perf_counter()
        weights, rest, scales = [], [], {}
        for name, v in state.items():
            a = v.numpy()
            if v.is_floating_point() and v.ndim >= 2:
                peak = float(np.max(np.abs(a))) or 1.0
                scales[name] = np.float32(peak / 127.0)
                weights.append(np.clip(np.rint(a / scales[name]), -127, 127).astype(np.int8).tobytes())
            else:
                rest.append(a.tobytes())
        weight_blob = compress(b"".join(weights))
        rest_blob = compress(b"".join(rest) + np.array(list(scales.values()), np.float32).tobytes())
        encode_s = time.perf_counter() - start
        start = time.perf_counter()
        raw = decompress(weight_blob)
        offset, decoded = 0, {}
        for name, v in state.items():
            if name in scales:
                q = np.frombuffer(raw, np.int8, v.numel(), offset).reshape(tuple(v.shape))
                offset += v.numel()
                decoded[name] = torch.from_numpy(q.astype(np.float32) * scales[name])
            else:
                decoded[name] = v
        decode_s = time.perf_counter() - start
        n = sum(v.numel() for v in state.values())
        nw = sum(v.numel() for k, v in state.items() if k in scales)
        return Compressed(_load_plain(task, decoded), len(weight_blob) + len(rest_blob), n, nw,
                          8.0 * len(weight_blob), encode_s, decode_s)
    return run


BACKEND_DEFAULT = "auto"
STEP_DEFAULTS = {"rel_step": 0.05, "bits": None, "granularity": "tensor", "backend": BACKEND_DEFAULT}
CDL_DEFAULTS = {"bits": 4, "lam": 0.0, "gamma": None, "epochs": 2, "init": "fp", "seed": 0,
                "backend": BACKEND_DEFAULT}

register(Method("fp32", {}, _run_fp32, "uncompressed float32 reference"))
BOTH_KINDS = ("torch", "onnx")
register(Method("nearest", dict(STEP_DEFAULTS), _run_nearest, "post-training, nearest rounding", kinds=BOTH_KINDS))
register(Method("rd", dict(STEP_DEFAULTS, lam=0.1), _run_rd, "post-training, rate-distortion (DeepCABAC eq. 11)",
                needs="cdlcodec.quantizers.rd", kinds=BOTH_KINDS))
register(Method("trellis", dict(STEP_DEFAULTS, lam=0.1, states=8), _run_trellis,
                "post-training, dependent (trellis) quantization", needs="cdlcodec.quantizers.trellis",
                kinds=BOTH_KINDS))
register(Method("fidelity", {"target": 0.999, "gptq": True, "backend": BACKEND_DEFAULT}, _run_fidelity,
                "the fidelity encoder: smallest verified container meeting a target", needs="onnxruntime",
                kinds=("onnx",)))
register(Method("cdl", dict(CDL_DEFAULTS), _cdl_runner("cdl"), "trained with CDL (sampled quantizer)",
                needs="cdlcodec.quantizers.cpmf"))
register(Method("rcdl", dict(CDL_DEFAULTS), _cdl_runner("rcdl"), "trained with R-CDL (soft quantizer)",
                needs="cdlcodec.quantizers.cpmf"))
register(Method("checkpoint", {"path": "", "backend": BACKEND_DEFAULT}, _run_checkpoint,
                "a CDL / R-CDL checkpoint file", needs="cdlcodec.quantizers.cpmf"))
register(Method("fp16", {}, _run_fp16, "baseline: every float tensor as float16"))
register(Method("int8-zlib", {}, _int8_codec(lambda b: zlib.compress(b, 9), zlib.decompress),
                "baseline: per-tensor int8 + zlib -9"))
register(Method("int8-lzma", {}, _int8_codec(lambda b: lzma.compress(b, preset=9), lzma.decompress),
                "baseline: per-tensor int8 + lzma -9"))

COMPARE_METHODS = ("fp16", "int8-zlib", "int8-lzma")
