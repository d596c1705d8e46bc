"""LeNet-5 end to end: encode --arch, then torch / ONNX float / ONNX QDQ / .pt2 decodes agree (issue 6)."""
from __future__ import annotations

import io
import json
import zipfile

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

import cdlcodec
from cdlcodec.cli.main import main as cli_main
from cdlcodec.api import decode, encode
from cdlcodec.codec import EncodeOptions, encode_records
from cdlcodec.data.mnist import load_mnist_5k
from cdlcodec.errors import CdlInputError
from cdlcodec.io.model_files import read_model
from cdlcodec.models import build
from cdlcodec.training import train_classifier


def cli(*args) -> int:
    with pytest.raises(SystemExit) as exit_info:
        cli_main([str(a) for a in args])
    return exit_info.value.code


def ort_run(path, x, accuracy_level="0"):
    so = ort.SessionOptions()
    so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", accuracy_level)
    sess = ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


@pytest.fixture(scope="module")
def lenet(tmp_path_factory):
    """A LeNet-5 trained for one epoch, its checkpoint, two containers and the MNIST test split."""
    root = tmp_path_factory.mktemp("lenet")
    (x_train, y_train), (x_test, y_test) = load_mnist_5k()
    torch.manual_seed(0)  # fixed initialisation: the accuracy check below must not depend on luck
    model = train_classifier(build("lenet5"), x_train, y_train, epochs=1, quiet=True)
    torch.save(model.state_dict(), root / "lenet.pt")
    assert cli("encode", root / "lenet.pt", "-o", root / "lenet.cdl", "--arch", "lenet5", "--backend", "huffman", "-q") == 0
    assert cli("encode", root / "lenet.pt", "-o", root / "lenet4.cdl", "--arch", "lenet5", "--bits", 4,
               "--backend", "huffman", "-q") == 0
    return root, model, np.ascontiguousarray(x_test, dtype=np.float32), np.asarray(y_test)


def torch_logits(module, x):
    with torch.no_grad():
        return module.eval()(torch.from_numpy(x)).numpy()


def decoded_lenet(path):
    module = build("lenet5")
    module.load_state_dict(torch.load(path, weights_only=True), strict=True)
    return module.eval()


@pytest.mark.parametrize("container", ["lenet.cdl", "lenet4.cdl"])
def test_torch_onnx_float_and_qdq_agree(lenet, container):
    root, original, x, y = lenet
    cdl = root / container
    stem = container.split(".")[0]
    assert cli("decode", cdl, "-o", root / f"{stem}.pt", "-q") == 0
    assert cli("decode", cdl, "-o", root / f"{stem}_f.onnx", "-q") == 0
    assert cli("decode", cdl, "-o", root / f"{stem}_q.onnx", "--weights", "qdq", "-q") == 0
    ref = torch_logits(decoded_lenet(root / f"{stem}.pt"), x)
    acc = float((ref.argmax(1) == y).mean())
    for name in (f"{stem}_f.onnx", f"{stem}_q.onnx"):
        onnx.checker.check_model(onnx.load(str(root / name)), full_check=True)
        out = ort_run(root / name, x)
        assert np.abs(out - ref).max() < 1e-4, name
        assert float((out.argmax(1) == y).mean()) == acc, name
        # onnxruntime's default optimisations too (LeNet has Conv/Gemm only: no int8 activation fusion)
        assert float((ort_run(root / name, x, "4").argmax(1) == y).mean()) == acc
    q = onnx.load(str(root / f"{stem}_q.onnx"))
    weight_types = {t.data_type for t in q.graph.initializer if t.name.endswith("_quantized")}
    assert weight_types == ({onnx.TensorProto.INT4} if stem == "lenet4" else {onnx.TensorProto.INT8})
    # the container's accuracy is the original model's to within 0.5 points at the default step
    if stem == "lenet":
        assert abs(acc - float((torch_logits(original, x).argmax(1) == y).mean())) <= 0.005


def test_load_returns_the_registered_module(lenet):
    root, _, x, _ = lenet
    module = cdlcodec.load(str(root / "lenet.cdl"))
    assert type(module).__name__ == "LeNet5" and not module.training
    cli("decode", root / "lenet.cdl", "-o", root / "again.pt", "-q")
    np.testing.assert_array_equal(torch_logits(module, x[:50]), torch_logits(decoded_lenet(root / "again.pt"), x[:50]))
    target = cdlcodec.load_into(build("lenet5"), str(root / "lenet.cdl"))
    np.testing.assert_array_equal(torch_logits(target, x[:50]), torch_logits(module, x[:50]))


def test_plain_state_dict_loads_as_state_dict_and_strictly(tmp_path):
    net = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    net(torch.randn(8, 1, 8, 8))  # move the BatchNorm running statistics
    torch.save(net.state_dict(), tmp_path / "net.pt")
    assert cli("encode", tmp_path / "net.pt", "-o", tmp_path / "net.cdl", "--backend", "huffman", "-q") == 0
    state = cdlcodec.load(str(tmp_path / "net.cdl"))
    assert list(state) == list(net.state_dict())                 # every buffer kept, in order
    assert int(state["1.num_batches_tracked"]) == 1
    assert cli("decode", tmp_path / "net.cdl", "-o", tmp_path / "back.pt", "-q") == 0
    fresh = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4 * 6 * 6, 3))
    fresh.load_state_dict(torch.load(tmp_path / "back.pt", weights_only=True), strict=True)
    with pytest.raises(CdlInputError, match="do not fit the module"):
        cdlcodec.load_into(build("lenet5"), str(tmp_path / "net.cdl"))
    assert cli("decode", tmp_path / "net.cdl", "-o", tmp_path / "net.onnx", "-q") == 2  # no graph: clean error


def test_arch_must_match_the_checkpoint(tmp_path, capsys):
    state = build("lenet5").state_dict()
    state.pop("fc3.bias")
    torch.save(state, tmp_path / "partial.pt")
    assert cli("encode", tmp_path / "partial.pt", "-o", tmp_path / "x.cdl", "--arch", "lenet5", "-q") == 2
    assert "does not match architecture 'lenet5'" in capsys.readouterr().err
    assert cli("encode", tmp_path / "partial.pt", "-o", tmp_path / "x.cdl", "--arch", "nosuchnet", "-q") == 2
    assert not (tmp_path / "x.cdl").exists()


# ------------------------------------------------------------------------------------------- torch.export

@pytest.fixture(scope="module")
def exported(lenet):
    root, model, x, _ = lenet
    batch = torch.export.Dim("batch")
    program = torch.export.export(model.eval(), (torch.from_numpy(x[:2]),), dynamic_shapes={"x": {0: batch}})
    torch.export.save(program, root / "lenet.pt2")
    return root / "lenet.pt2"


def test_pt2_round_trip(lenet, exported):
    root, _, x, _ = lenet
    assert cli("encode", exported, "-o", root / "p.cdl", "--backend", "huffman", "-q") == 0
    assert cli("decode", root / "p.cdl", "-o", root / "p_back.pt2", "-q") == 0
    assert cli("decode", root / "p.cdl", "-o", root / "p_back.pt", "-q") == 0
    ref = torch_logits(decoded_lenet(root / "p_back.pt"), x[:64])
    back = torch.export.load(root / "p_back.pt2").module()
    with torch.no_grad():
        np.testing.assert_allclose(back(torch.from_numpy(x[:64])).numpy(), ref, atol=1e-5)
        np.testing.assert_allclose(cdlcodec.load(str(root / "p.cdl"))(torch.from_numpy(x[:64])).numpy(), ref, atol=1e-5)
    assert (root / "p.cdl").stat().st_size < 0.5 * exported.stat().st_size


def _rewrite_pt2(src, dst, schema_major):
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for name in zin.namelist():
            data = zin.read(name)
            if name.endswith("models/model.json"):
                doc = json.loads(data)
                doc["schema_version"] = {"major": schema_major, "minor": 0}
                data = json.dumps(doc).encode()
            zout.writestr(name, data)


def test_pt2_from_an_incompatible_torch_is_a_clean_error(lenet, exported, tmp_path, capsys):
    root, model, _, _ = lenet
    _rewrite_pt2(exported, tmp_path / "future.pt2", 999)
    assert cli("encode", tmp_path / "future.pt2", "-o", tmp_path / "f.cdl", "-q") == 2
    err = capsys.readouterr().err
    assert err.startswith("cdlcodec: error:") and "cannot be loaded by torch.export" in err and "Traceback" not in err
    # a container whose stored program this torch cannot load: .pt2 output fails cleanly, .pt still works
    buf = io.BytesIO()
    _rewrite_pt2(exported, buf, 999)
    source = read_model(str(root / "lenet.pt"))
    encode_records(source.records, str(tmp_path / "g.cdl"), EncodeOptions(backend="huffman", quiet=True),
                   {"torch.version": "99.0"}, [("model.pt2", "torch.export", buf.getvalue())])
    with pytest.raises(CdlInputError, match=r"exported with torch 99\.0"):
        decode(str(tmp_path / "g.cdl"), str(tmp_path / "g.pt2"))
    assert not (tmp_path / "g.pt2").exists()
    decode(str(tmp_path / "g.cdl"), str(tmp_path / "g.pt"))
    decoded_lenet(tmp_path / "g.pt")


def test_pt2_without_float_weights_is_refused(tmp_path):
    class Index(nn.Module):
        def __init__(self):
            super().__init__()
            self.register_buffer("table", torch.arange(4))

        def forward(self, i):
            return self.table[i]

    torch.export.save(torch.export.export(Index(), (torch.tensor([1, 2]),)), tmp_path / "idx.pt2")
    with pytest.raises(CdlInputError, match="no float parameters"):
        encode(str(tmp_path / "idx.pt2"), str(tmp_path / "idx.cdl"))


# ------------------------------------------------------------------------------- CDL activation quantizers

def test_activation_section_becomes_qdq_with_clip(lenet, tmp_path):
    """A "cdl.activations" section (formats/graph-sections.md) -> QuantizeLinear/Clip/DequantizeLinear
    on the named ReLU outputs; ONNX matches y = clip(round(relu(x)/s), 0, 2^b-1) * s in torch."""
    root, _, x, _ = lenet
    acts = [{"module": "relu1", "s": 0.25, "bits": 4}, {"module": "relu3", "s": 0.125, "bits": 8}]
    source = read_model(str(root / "lenet.pt"))
    from cdlcodec.io.onnx_model import architecture_graph_section

    section, meta = architecture_graph_section("lenet5", source.records)
    doc = json.dumps({"version": 1, "activations": acts}).encode()
    encode_records(source.records, str(tmp_path / "a.cdl"), EncodeOptions(backend="huffman", quiet=True),
                   {**source.metadata, **meta}, [section, ("cdl.activations", "json", doc)])
    decode(str(tmp_path / "a.cdl"), str(tmp_path / "a.onnx"))
    decode(str(tmp_path / "a.cdl"), str(tmp_path / "a.pt"))
    graph = onnx.load(str(tmp_path / "a.onnx"))
    onnx.checker.check_model(graph, full_check=True)
    ops = [n.op_type for n in graph.graph.node]
    assert ops.count("QuantizeLinear") == 2 and ops.count("Clip") == 1   # Clip only where b < 8

    class Quant(nn.Module):
        def __init__(self, s, bits):
            super().__init__()
            self.s, self.hi = s, (1 << bits) - 1

        def forward(self, v):
            return torch.clamp(torch.round(torch.relu(v) / self.s), 0, self.hi) * self.s

    module = decoded_lenet(tmp_path / "a.pt")
    module.relu1, module.relu3 = Quant(0.25, 4), Quant(0.125, 8)
    ref = torch_logits(module, x[:200])
    out = ort_run(tmp_path / "a.onnx", x[:200])
    assert np.abs(out - ref).max() < 1e-4
    assert np.array_equal(out.argmax(1), ref.argmax(1))
