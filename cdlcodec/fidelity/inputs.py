"""Inputs to run a model on while encoding: the user's calibration data, or generated stand-ins.

Calibration data is an .npz file with one array per graph input, named after it, whose first axis
counts samples (`np.load(..., allow_pickle=False)`: an .npz never runs code). A sample is fed as
`array[i:i+1]` when the array has the graph input's rank (the model has a batch axis), or as
`array[i]` when it has one axis more (inputs without a batch axis, such as a sample rate or a
recurrent state laid out [layers, batch, units]).

Without calibration data, inputs are generated from the graph's declared types and shapes: floats
from N(0, 1), integer inputs that index a table (Gather) uniformly over its rows, masks as ones, other
integers as zeros; unknown dimensions become 1 (the first) or GENERATED_DIM. That checks the decoded
model on inputs of the right form but not of the right distribution, and the encoder says so.
"""
from __future__ import annotations

import os
import zipfile
from dataclasses import dataclass

import numpy as np

from ..errors import CdlInputError

GENERATED_SAMPLES = 16
GENERATED_DIM = 32
_ONNX_NUMPY = {1: np.float32, 10: np.float16, 11: np.float64, 7: np.int64, 6: np.int32, 9: np.bool_,
               2: np.uint8, 3: np.int8, 5: np.int16, 4: np.uint16, 12: np.uint32, 13: np.uint64}


@dataclass
class Inputs:
    """Feeds for a graph, one dict per sample, and where they came from."""

    samples: list[dict[str, np.ndarray]]
    source: str  # "calibration" or "generated"
    path: str | None = None

    def split(self, holdout: float) -> tuple["Inputs", "Inputs"]:
        """(first part, last `holdout` fraction) for checks on inputs the encoder did not tune on."""
        n_hold = int(round(len(self.samples) * holdout))
        if n_hold <= 0 or n_hold >= len(self.samples):
            return self, self
        cut = len(self.samples) - n_hold
        return (Inputs(self.samples[:cut], self.source, self.path), Inputs(self.samples[cut:], self.source, self.path))

    def describe(self) -> str:
        if self.source == "generated":
            return f"{len(self.samples)} generated inputs (no calibration data: right form, not real data)"
        if self.path is None:
            return f"{len(self.samples)} calibration samples (given in memory)"
        return f"{len(self.samples)} calibration samples from {os.path.basename(self.path)}"

    @classmethod
    def from_batches(cls, proto, batches, max_samples: int | None = None) -> "Inputs":
        """Per-sample feeds from example batches held in memory (the Python API's `calibration`).

        Each batch is one array (a torch tensor or anything numpy converts) for a graph with one
        input, or a tuple/list of them in the order of the graph's inputs. Batches are joined along
        their first axis and read like the arrays of a calibration .npz (module docstring)."""
        names = [v.name for v in graph_inputs(proto)]
        parts: list[list[np.ndarray]] = [[] for _ in names]
        for number, batch in enumerate(batches):
            arrays = list(batch) if isinstance(batch, (tuple, list)) else [batch]
            if len(arrays) != len(names):
                raise CdlInputError(f"calibration batch #{number} holds {len(arrays)} arrays; the graph has "
                                    f"{len(names)} inputs ({', '.join(names)})")
            for part, array in zip(parts, arrays):
                part.append(_as_array(array))
        if not parts or not parts[0]:
            raise CdlInputError("calibration: no batches given")
        arrays = {}
        for name, part in zip(names, parts):
            try:
                arrays[name] = np.concatenate(part) if all(a.ndim for a in part) else np.stack(part)
            except ValueError as exc:
                raise CdlInputError(f"calibration batches for input {name!r} do not fit together: {exc}") from None
        return samples_from_arrays(arrays, proto, "calibration batches", max_samples, None)


def graph_inputs(proto) -> list:
    """The graph's real inputs (ValueInfoProto), leaving out initializers listed as inputs."""
    inits = {t.name for t in proto.graph.initializer}
    return [v for v in proto.graph.input if v.name not in inits]


def _declared(value_info) -> tuple[int, list]:
    t = value_info.type.tensor_type
    dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim] if t.HasField("shape") else None
    return t.elem_type, dims


def load_calibration(path: str, proto, max_samples: int | None = None) -> Inputs:
    """Per-sample feeds from an .npz whose arrays are named after the graph inputs."""
    if not os.path.isfile(path):
        raise CdlInputError(f"calibration data {path}: no such file")
    try:
        data = np.load(path, allow_pickle=False)
        arrays = {k: data[k] for k in data.files}
    except (ValueError, OSError, zipfile.BadZipFile, EOFError) as exc:
        raise CdlInputError(f"calibration data {path}: not a readable .npz file without pickles ({exc})") from None
    return samples_from_arrays(arrays, proto, f"calibration data {path}", max_samples, path)


def _as_array(value) -> np.ndarray:
    """A torch tensor (detached, on the CPU) or anything numpy converts, as an ndarray."""
    if hasattr(value, "detach"):
        value = value.detach().cpu().numpy()
    return np.asarray(value)


def samples_from_arrays(arrays: dict[str, np.ndarray], proto, what: str, max_samples: int | None,
                        path: str | None) -> Inputs:
    """Per-sample feeds from one array per graph input, named after it, samples first."""
    wanted = {v.name: v for v in graph_inputs(proto)}
    missing = sorted(set(wanted) - set(arrays))
    extra = sorted(set(arrays) - set(wanted))
    if missing or extra:
        raise CdlInputError(f"{what}: arrays must be named after the graph inputs "
                            f"({', '.join(wanted)}); missing: {', '.join(missing) or '-'}; "
                            f"unknown: {', '.join(extra) or '-'}")
    counts = {k: (a.shape[0] if a.ndim else None) for k, a in arrays.items()}
    if None in counts.values() or len(set(counts.values())) != 1 or not next(iter(counts.values())):
        raise CdlInputError(f"{what}: every array needs the same, non-zero number of samples "
                            f"on its first axis (got {counts})")
    n = next(iter(counts.values()))
    if max_samples:
        n = min(n, max_samples)
    samples = []
    for i in range(n):
        feed = {}
        for name, arr in arrays.items():
            elem, dims = _declared(wanted[name])
            rank = len(dims) if dims is not None else arr.ndim
            if arr.ndim == rank:
                value = arr[i:i + 1]
            elif arr.ndim == rank + 1:
                value = arr[i]
            else:
                raise CdlInputError(f"{what}: array {name!r} has shape {arr.shape}; the graph "
                                    f"input has rank {rank}, so expected rank {rank} or {rank + 1} (samples first)")
            want = _ONNX_NUMPY.get(elem)
            if want is not None and value.dtype != want:
                value = value.astype(want)
            feed[name] = np.ascontiguousarray(value)
        samples.append(feed)
    return Inputs(samples, "calibration", path)


def _gather_rows(proto) -> dict[str, int]:
    """Graph input -> number of rows of the table it indexes (Gather(table, input))."""
    shapes = {t.name: list(t.dims) for t in proto.graph.initializer}
    out = {}
    for node in proto.graph.node:
        if node.op_type == "Gather" and len(node.input) >= 2 and node.input[0] in shapes and shapes[node.input[0]]:
            out[node.input[1]] = int(shapes[node.input[0]][0])
    return out


class UncheckableInputs(CdlInputError):
    """Generated inputs that cannot show anything: the model's outputs are the same for all of them."""


def outputs_alike(outputs: list[list[np.ndarray]]) -> bool:
    """Whether every sample's outputs equal the first sample's, bit for bit (then a check on these
    inputs measures nothing: an audio front end fed 32 generated samples, shorter than one frame, returns
    the same empty features for every one, and 0.94 bits/param passed as "cosine 1")."""
    first = outputs[0] if outputs else []
    return all(len(s) == len(first) and all(np.array_equal(a, b) for a, b in zip(s, first)) for s in outputs[1:])


def generated_inputs_vary(proto) -> bool:
    """Whether `generate_inputs` draws any input at random (a float, or an index into a table). When
    none is drawn (integers fed as zeros, masks as ones: Magika's byte input reaches its one-hot
    encoding through Equal, not Gather) every generated sample is the same input, and a check on them
    sees a single point: encoded to the default on all-zero bytes, Magika's file-type classifier kept
    "cosine 1" at 1.95 bits/param and then changed the label of 114 of 600 real files."""
    rows = _gather_rows(proto)
    for vi in graph_inputs(proto):
        dtype = _ONNX_NUMPY.get(_declared(vi)[0])
        if dtype is not None and (np.issubdtype(dtype, np.floating) or vi.name in rows):
            return True
    return False


def generate_inputs(proto, samples: int = GENERATED_SAMPLES, seed: int = 0) -> Inputs:
    """Stand-in inputs of the declared types and shapes (see the module docstring)."""
    rng = np.random.default_rng(seed)
    rows = _gather_rows(proto)
    feeds = []
    for _ in range(samples):
        feed = {}
        for vi in graph_inputs(proto):
            elem, dims = _declared(vi)
            if dims is None:
                raise UncheckableInputs(f"graph input {vi.name!r} declares no shape, so no inputs can be generated")
            shape = [d if d else (1 if i == 0 else GENERATED_DIM) for i, d in enumerate(dims)]
            dtype = _ONNX_NUMPY.get(elem)
            if dtype is None:
                raise UncheckableInputs(f"graph input {vi.name!r} has a type inputs cannot be generated for")
            if np.issubdtype(dtype, np.floating):
                value = rng.standard_normal(shape).astype(dtype)
            elif vi.name in rows:
                value = rng.integers(0, max(rows[vi.name], 1), size=shape).astype(dtype)
            elif "mask" in vi.name.lower() or dtype == np.bool_:
                value = np.ones(shape, dtype=dtype)
            else:
                value = np.zeros(shape, dtype=dtype)
            feed[vi.name] = value
        feeds.append(feed)
    return Inputs(feeds, "generated")
