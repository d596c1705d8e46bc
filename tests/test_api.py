"""The Python API: cdlcodec.encode from a path, a state_dict or an nn.Module, and cdlcodec.decode."""
import os

import numpy as np
import pytest
import torch
from torch import nn

import cdlcodec
from cdlcodec import api
from cdlcodec.codec import EncodeOptions, decode_container, encode_records
from cdlcodec.errors import CdlInputError
from cdlcodec.io.model_files import read_model
from cdlcodec.quantizers.uniform import UniformQuantizer


def _mlp(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval()


def test_the_package_exports_the_api_lazily():
    assert (cdlcodec.encode, cdlcodec.decode, cdlcodec.load, cdlcodec.load_into) == \
        (api.encode, api.decode, api.load, api.load_into)
    assert {"encode", "decode", "load", "load_into"} <= set(cdlcodec.__all__)


def test_encode_a_path_writes_what_the_record_pipeline_writes(tmp_path):
    src = tmp_path / "mlp.pt"
    torch.save(_mlp().state_dict(), src)
    summary = cdlcodec.encode(src, tmp_path / "api.cdl", quantizer=UniformQuantizer(rel_step=0.2), backend="huffman")
    model = read_model(str(src))
    encode_records(model.records, str(tmp_path / "ref.cdl"),
                   EncodeOptions(UniformQuantizer(rel_step=0.2), "huffman", (), True), model.metadata, model.sections)
    assert (tmp_path / "api.cdl").read_bytes() == (tmp_path / "ref.cdl").read_bytes()
    assert summary.num_params == 16 * 32 + 32 + 32 * 4 + 4 and summary.num_quantized_params == 16 * 32 + 32 * 4
    assert summary.fidelity is None  # a state_dict file has no graph to run


def test_encode_a_state_dict_of_tensors_and_arrays(tmp_path):
    rng = np.random.default_rng(0)
    state = {"w": torch.randn(8, 8), "half": torch.randn(4, 4).to(torch.bfloat16),
             "b": rng.standard_normal(8).astype(np.float32), "steps": np.arange(5, dtype=np.int16)}
    cdlcodec.encode(state, tmp_path / "s.cdl", quantizer="uniform")
    decoded = {r.name: r for r in decode_container(str(tmp_path / "s.cdl")).records}
    assert [(n, decoded[n].dtype, decoded[n].shape) for n in state] == [
        ("w", "float32", (8, 8)), ("half", "bfloat16", (4, 4)), ("b", "float32", (8,)), ("steps", "int16", (5,))]
    np.testing.assert_array_equal(decoded["b"].array, state["b"])          # 1-D: stored exactly
    np.testing.assert_array_equal(decoded["steps"].array, state["steps"])  # integers: exact
    w = state["w"].numpy()
    assert np.abs(decoded["w"].array - w).max() <= 0.05 * w.std() + 1e-7  # rel_step 0.1: error <= step / 2


def test_a_state_dict_entry_that_is_no_tensor_is_named(tmp_path):
    with pytest.raises(CdlInputError, match="'c'.*complex"):
        cdlcodec.encode({"c": np.zeros((2, 2), np.complex64)}, tmp_path / "x.cdl")
    with pytest.raises(CdlInputError, match="'n' is a int"):
        cdlcodec.encode({"n": 3}, tmp_path / "x.cdl")
    assert not (tmp_path / "x.cdl").exists()


def test_a_module_without_example_input_encodes_its_state_dict(tmp_path):
    module = _mlp()
    summary = cdlcodec.encode(module, tmp_path / "m.cdl", backend="raw")
    names = [r.name for r in decode_container(str(tmp_path / "m.cdl")).records]
    assert names == list(module.state_dict()) and summary.fidelity is None


def test_a_module_with_example_input_and_calibration_batches_meets_the_cosine_target(tmp_path):
    import onnxruntime as ort

    module = _mlp(1)
    gen = torch.Generator().manual_seed(2)
    batches = [torch.randn(8, 16, generator=gen) for _ in range(4)]
    summary = cdlcodec.encode(module, tmp_path / "m.cdl", example_input=torch.zeros(1, 16),
                              target=("cosine", 0.999), calibration=batches)
    assert summary.fidelity.checked >= 0.999
    assert summary.fidelity.inputs == "32 calibration samples (given in memory)"
    cdlcodec.decode(tmp_path / "m.cdl", tmp_path / "m.onnx")
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    x = torch.cat(batches)
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})[0]  # the batch axis is dynamic
    with torch.no_grad():
        want = module(x).numpy()
    cosine = np.sum(got * want, axis=1) / (np.linalg.norm(got, axis=1) * np.linalg.norm(want, axis=1))
    assert cosine.mean() >= 0.999
    assert summary.num_quantized_params == 16 * 32 + 32 * 4  # both weight matrices, fewer bits than float32
    assert sum(summary.coded_bits.values()) < 32 * summary.num_params / 2


def test_calibration_batches_follow_the_graph_inputs(tmp_path):
    from onnx import TensorProto, helper

    from cdlcodec.fidelity.inputs import Inputs

    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["y"])], "two",
        [helper.make_tensor_value_info("a", TensorProto.FLOAT, ["n", 3]),
         helper.make_tensor_value_info("b", TensorProto.FLOAT, ["n", 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 3])])
    proto = helper.make_model(graph)
    batches = [(torch.ones(2, 3), np.zeros((2, 3), np.float64)), (torch.full((1, 3), 2.0), np.ones((1, 3)))]
    inputs = Inputs.from_batches(proto, batches)
    assert len(inputs.samples) == 3 and inputs.path is None
    assert [s["a"][0, 0] for s in inputs.samples] == [1.0, 1.0, 2.0]
    assert all(s["b"].dtype == np.float32 and s["b"].shape == (1, 3) for s in inputs.samples)
    assert len(Inputs.from_batches(proto, batches, max_samples=2).samples) == 2
    with pytest.raises(CdlInputError, match="batch #0 holds 1 arrays; the graph has 2 inputs"):
        Inputs.from_batches(proto, [torch.ones(2, 3)])
    with pytest.raises(CdlInputError, match="no batches"):
        Inputs.from_batches(proto, [])


def test_arch_stores_the_graph_of_a_registered_architecture(tmp_path):
    from cdlcodec import models

    module = models.build("lenet5")
    cdlcodec.encode(module.state_dict(), tmp_path / "l.cdl", arch="lenet5")
    loaded = cdlcodec.load(str(tmp_path / "l.cdl"))
    assert isinstance(loaded, nn.Module) and type(loaded) is type(module)
    cdlcodec.decode(tmp_path / "l.cdl", tmp_path / "l.onnx")
    assert (tmp_path / "l.onnx").stat().st_size > 0


def test_contradictory_arguments_are_refused_before_any_work(tmp_path):
    src = tmp_path / "mlp.pt"
    torch.save(_mlp().state_dict(), src)
    with pytest.raises(CdlInputError, match="example_input applies to an nn.Module"):
        cdlcodec.encode(src, tmp_path / "x.cdl", example_input=torch.zeros(1, 16))
    with pytest.raises(CdlInputError, match="chooses the steps itself"):
        cdlcodec.encode(src, tmp_path / "x.cdl", quantizer="uniform", target=("cosine", 0.99))
    with pytest.raises(CdlInputError, match="no graph to run"):
        cdlcodec.encode(src, tmp_path / "x.cdl", target=("cosine", 0.99))
    with pytest.raises(CdlInputError, match="a model file path, a state_dict or a torch nn.Module"):
        cdlcodec.encode(42, tmp_path / "x.cdl")
    with pytest.raises(CdlInputError, match="is the input file"):
        cdlcodec.encode(src, src, quantizer="uniform")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mlp.pt"]


def test_decode_writes_the_model_and_refuses_a_bad_output_name_first(tmp_path):
    module = _mlp()
    cdlcodec.encode(module, tmp_path / "m.cdl", quantizer=UniformQuantizer(rel_step=0.05))
    model = cdlcodec.decode(tmp_path / "m.cdl", tmp_path / "m.safetensors")
    assert [r.name for r in model.records] == list(module.state_dict())
    back = cdlcodec.load_into(_mlp(5), str(tmp_path / "m.cdl"))
    assert torch.equal(back[0].bias, module[0].bias)  # 1-D tensors are exact
    with pytest.raises(CdlInputError, match="unknown extension '.txt'"):
        cdlcodec.decode(tmp_path / "missing.cdl", tmp_path / "m.txt")
    with pytest.raises(CdlInputError, match="option weights does not apply to safetensors"):
        cdlcodec.decode(tmp_path / "m.cdl", tmp_path / "q.safetensors", weights="qdq")


def test_the_readme_python_api_example_runs(tmp_path, monkeypatch):
    import re
    from pathlib import Path

    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text(encoding="utf-8")
    section = readme[readme.index("### Python API"):]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    monkeypatch.chdir(tmp_path)
    exec(compile(code, "README.md (Python API)", "exec"), {})
    assert {"mlp.cdl", "mlp.onnx", "weights.cdl", "model.cdl", "restored.safetensors"} <= set(os.listdir(tmp_path))
