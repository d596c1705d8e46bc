"""Run an ONNX graph with onnxruntime, with any of its weights replaced by trial values.

Weights of the main graph that the encoder may change are declared as graph inputs as well as
initializers, which makes them overridable: one session serves every trial, and a trial feeds only
the tensors it changes (the others keep their original values). Weights inside control-flow
subgraphs (If / Loop bodies) cannot be fed; a trial that changes one of them runs a session built
for it. The session can also return the inputs of chosen nodes (the activations entering each
MatMul) for error-compensating quantization.
"""
from __future__ import annotations

import numpy as np

from ..errors import CdlInputError
from ..records import ModelFile, TensorRecord
from .inputs import Inputs

BATCH = 16
_NUMPY_OF_ONNX = {1: np.float32, 10: np.float16, 11: np.float64}


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise CdlInputError("checking the decoded model needs onnxruntime: pip install 'cdlcodec[onnx]'") from None
    return onnxruntime


def make_session(proto, initializers=()):
    """A session of `proto`; `initializers` (name, array) are used in place of the model's
    initializers of those names (onnxruntime reads the arrays without copying them: they must stay
    alive and unchanged as long as the session)."""
    ort = _ort()
    options = ort.SessionOptions()
    options.log_severity_level = 4  # fatal only: a failed run is reported as a CdlInputError, not as its log lines
    values = [(name, ort.OrtValue.ortvalue_from_numpy(array)) for name, array in initializers]
    for name, value in values:
        options.add_initializer(name, value)
    try:
        session = ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own exception types
        raise CdlInputError(f"onnxruntime cannot load the model: {str(exc).splitlines()[0][:300]}") from None
    session.cdlcodec_initializers = values  # onnxruntime keeps pointers to them: they live as long as it
    return session


def feedable_weights(stripped_proto) -> dict[str, str]:
    """Record name -> main-graph initializer name, for stored float initializers a feed can replace."""
    from ..io.onnx_model import reference_of

    out = {}
    for init in stripped_proto.graph.initializer:
        ref = reference_of(init)
        if ref is not None and init.data_type in _NUMPY_OF_ONNX:
            out[ref] = init.name
    return out


class OnnxRunner:
    """Runs `model` (records + stripped ONNX graph) on `inputs`; `run(overrides)` replaces weights.

    overrides: record name -> array in the record's storage form (what the decoder produces).
    """

    def __init__(self, model: ModelFile, stripped_proto, inputs: Inputs, capture: list[str] = (),
                 probes: list[str] = ()):
        from onnx import helper

        from ..io.onnx_writer import build_onnx

        self.model = model
        self.inputs = inputs
        self.names = feedable_weights(stripped_proto)
        proto = build_onnx(model, weights="float")
        types = {t.name: t for t in proto.graph.initializer}
        listed = {v.name for v in proto.graph.input}
        for init_name in self.names.values():
            if init_name not in listed:
                t = types[init_name]
                proto.graph.input.append(helper.make_tensor_value_info(init_name, t.data_type, list(t.dims)))
        self._dtypes = {rec: _NUMPY_OF_ONNX[types[init].data_type] for rec, init in self.names.items()}
        # Returned per sample: the graph outputs, then the probes (inner values such as the logits
        # under a softmax); captured values only reach `on_capture`.
        have = {o.name for o in proto.graph.output}
        self.probes = [p for p in dict.fromkeys(probes) if p not in have]
        add_outputs(proto, self.probes)
        self.n_outputs = len(proto.graph.output)
        have = {o.name for o in proto.graph.output}
        self.capture = [c for c in dict.fromkeys(capture) if c not in have]
        add_outputs(proto, self.capture)
        # The session takes the overridable weights from the records' own arrays instead of copying
        # them out of the model (MiniLM: 86 MB less for the whole search; the same values).
        records = {r.name: r for r in model.records}
        self._shared = []
        for rec, init in self.names.items():
            array = np.asarray(records[rec].array)
            if array.dtype == self._dtypes[rec] and tuple(array.shape) == tuple(types[init].dims):
                self._shared.append((init, np.ascontiguousarray(array)))
        self.session = make_session(proto, self._shared)
        del proto
        self.output_names = [o.name for o in self.session.get_outputs()]
        self._batched = self._can_batch(inputs)

    @staticmethod
    def _can_batch(inputs: Inputs) -> bool:
        first = inputs.samples[0]
        return all(a.ndim >= 1 and a.shape[0] == 1 for a in first.values()) and all(
            {k: a.shape for k, a in s.items()} == {k: a.shape for k, a in first.items()} for s in inputs.samples)

    def run(self, overrides: dict[str, np.ndarray] | None = None, on_capture=None,
            part: slice = slice(None)) -> list[list[np.ndarray]]:
        """Model outputs per sample (a list of arrays each) for the inputs in `part` (all by default);
        `on_capture(name, array)` sees the captured values."""
        overrides = overrides or {}
        chosen = self.inputs.samples[part]
        if any(name not in self.names for name in overrides):
            return self._run_rebuilt(overrides, chosen)
        weights = {self.names[k]: np.ascontiguousarray(v, dtype=self._dtypes[k]) for k, v in overrides.items()}
        return self._run_all(self.session, weights, self.n_outputs, on_capture, chosen)

    def _run_rebuilt(self, overrides, samples):
        from ..io.onnx_writer import build_onnx

        records = [TensorRecord(r.name, overrides[r.name], r.dtype) if r.name in overrides else r
                   for r in self.model.records]
        proto = build_onnx(ModelFile(records, self.model.sections, self.model.metadata), weights="float")
        add_outputs(proto, self.probes)
        return self._run_all(make_session(proto), {}, len(proto.graph.output), None, samples)

    def _run_all(self, session, weights, n_outputs, on_capture, samples):
        results: list[list[np.ndarray]] = []
        step = BATCH if self._batched else 1
        i = 0
        while i < len(samples):
            chunk = samples[i:i + step]
            feed = dict(weights)
            if step > 1:
                feed.update({k: np.concatenate([s[k] for s in chunk]) for k in chunk[0]})
            else:
                feed.update(chunk[0])
            try:
                outs = _run(session, feed, self.inputs.source)
            except CdlInputError:
                if step == 1:
                    raise
                self._batched, step = False, 1  # a graph with a fixed batch of 1: sample by sample
                continue
            if step > 1 and any(o.ndim == 0 or o.shape[0] != len(chunk) for o in outs[:n_outputs]):
                self._batched, step = False, 1  # outputs without a batch axis: run sample by sample
                continue
            if on_capture is not None:
                for name, value in zip(self.output_names[n_outputs:], outs[n_outputs:]):
                    on_capture(name, value)
            if step > 1:
                results += [[o[j:j + 1] for o in outs[:n_outputs]] for j in range(len(chunk))]
            else:
                results.append(list(outs[:n_outputs]))
            i += len(chunk)
        return results


def add_outputs(proto, names) -> None:
    """Make inner values graph outputs too; untyped, so onnxruntime infers their types (a float16
    model's values are float16)."""
    from onnx import ValueInfoProto

    have = {o.name for o in proto.graph.output}
    for name in names:
        if name not in have:
            proto.graph.output.add().CopyFrom(ValueInfoProto(name=name))


class ModelRunError(CdlInputError):
    """onnxruntime failed to run the model on the inputs (`source`: "calibration" or "generated")."""

    def __init__(self, source: str, reason: str):
        super().__init__(f"onnxruntime could not run the model on the {source} inputs: {reason}")
        self.source, self.reason = source, reason


def _run(session, feed, source: str):
    try:
        return session.run(None, feed)
    except Exception as exc:
        raise ModelRunError(source, str(exc).splitlines()[0][:300]) from None


def run_proto(proto, inputs: Inputs) -> list[list[np.ndarray]]:
    """Outputs of a complete ModelProto per sample, one sample at a time, default session options."""
    session = make_session(proto)
    return [list(_run(session, feed, inputs.source)) for feed in inputs.samples]
