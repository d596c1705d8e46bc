"""cdlcodec.cdl.convert on your own model (issue 17, point 4): functional activations found by
torch.fx, one quantizer per call, signed activations left float and reported, the module fallback
when tracing fails; fine-tuning with your own loader and loss; a converted model's checkpoint that
carries its own graph encodes and decodes to ONNX, and onnxruntime matches the rebuilt model."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from cdlcodec.cdl.convert import BoundedActivationQuantizer, activation_quantizers, calibrate, convert  # noqa: E402
from cdlcodec.cdl.layers import ActivationQuantizer, CDLConv1d, CDLConv2d, CDLLinear  # noqa: E402
from cdlcodec.errors import CdlInputError  # noqa: E402


class FunctionalNet(nn.Module):
    """Every kind of activation convert knows, plus a signed one it must leave float."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, padding=1)
        self.shared = nn.ReLU()          # called twice: each call needs its own quantizer
        self.gelu = nn.GELU()
        self.conv1d = nn.Conv1d(4, 4, 1)
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        a = F.relu(self.conv(x))
        b = torch.relu(self.conv(x) - 0.1)
        x = self.shared(a + b) + self.shared(self.gelu(a - b))
        x = F.relu6(x * 8.0)
        x = F.hardtanh(x, 0.0, 3.0)
        x = x.mean(3)
        x = self.conv1d(x)
        x.relu_()                        # in place: the next line must read the quantized values
        return self.fc(x.mean(2))


def _outputs(model, x):
    """{quantizer path: its eval output} through forward hooks."""
    seen = {}
    hooks = [m.register_forward_hook(lambda mod, inp, out, name=name: seen.__setitem__(name, out.detach()))
             for name, m in activation_quantizers(model)]
    try:
        with torch.no_grad():
            model(x)
    finally:
        for h in hooks:
            h.remove()
    return seen


def test_functional_activations_each_call_gets_a_quantizer_and_signed_ones_stay_float():
    torch.manual_seed(0)
    model = convert(FunctionalNet(), bits=3, first_last_bits=None)
    report = model.cdl_report
    assert isinstance(model, torch.fx.GraphModule) and report.traced and report.rewritten
    assert report.weight_layers == ["conv", "conv1d", "fc"]
    assert isinstance(model.conv, CDLConv2d) and isinstance(model.conv1d, CDLConv1d) and isinstance(model.fc, CDLLinear)
    replaced = dict(report.activations)
    assert set(replaced) == {"act_relu", "act_relu_1", "shared", "shared_1", "act_relu6", "act_hardtanh", "act_relu_2"}
    assert replaced["act_relu"] == "F.relu in forward" and replaced["act_relu_1"] == "torch.relu in forward"
    assert replaced["act_relu_2"] == "Tensor.relu_ in forward"
    assert replaced["shared_1"] == "ReLU module 'shared', call 2 of 2"
    assert report.left_float == [("gelu", "GELU (signed activation)")]
    assert isinstance(model.gelu, nn.GELU)
    assert [type(m) for _, m in activation_quantizers(model)].count(BoundedActivationQuantizer) == 2
    assert "left float gelu" in str(report)
    # the state_dict keeps the float model's names, plus the quantizers'
    assert {"conv.weight", "conv.bias", "conv1d.weight", "fc.weight", "shared.s", "shared_1.s", "act_relu_2.beta"} \
        <= set(model.state_dict())

    x = torch.randn(8, 1, 6, 6)
    calibrate(model, x)
    model.eval()
    seen = _outputs(model, x)
    assert len(seen) == 7                                  # every quantizer ran: none was left unused
    for name, q in activation_quantizers(model):
        levels = seen[name] / q.s.detach()
        assert torch.allclose(levels, levels.round(), atol=1e-4), name     # on the unsigned grid
        assert levels.min() >= 0 and levels.max() <= 7 + 1e-4
    # the cap comes before the rounding: at most half a step above it
    for name, cap in (("act_relu6", 6.0), ("act_hardtanh", 3.0)):
        assert seen[name].max() <= cap + model.get_submodule(name).s.item() / 2
    # the shared module's two calls learned their own steps
    assert model.shared.s.item() != model.shared_1.s.item()


def test_in_place_activation_is_read_by_the_code_after_it():
    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 2)

        def forward(self, x):
            x = self.a(x)
            F.relu(x, inplace=True)      # the result is not assigned: x itself changed
            return self.b(x)

    model = convert(InPlace(), bits=4)
    x = torch.randn(16, 4)
    calibrate(model, x)
    model.eval()
    seen = {}
    model.b.register_forward_hook(lambda mod, inp, out: seen.__setitem__("b_input", inp[0]))
    quantized = _outputs(model, x)["act_relu"]
    assert torch.equal(seen["b_input"], quantized)


def test_untraceable_forward_falls_back_to_modules_and_says_so():
    class DataDependent(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc, self.relu, self.out = nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)

        def forward(self, x):
            if x.sum() > 0:              # torch.fx cannot trace a branch on a value
                x = -x
            return self.out(F.relu(self.relu(self.fc(x))))

    original = DataDependent()
    with pytest.warns(UserWarning, match="torch.fx cannot trace"):
        model = convert(original, bits=4)
    assert model is original and not model.cdl_report.traced
    assert "TraceError" in model.cdl_report.trace_error or "Proxy" in model.cdl_report.trace_error
    assert isinstance(model.relu, ActivationQuantizer) and dict(model.cdl_report.activations) == {"relu": "ReLU module"}
    model.eval()
    assert model(torch.randn(3, 4)).shape == (3, 2)


def test_lenet_and_resnet_convert_in_place():
    from cdlcodec.models import build

    for arch in ("lenet5", "resnet20"):
        original = build(arch)
        model = convert(original)
        assert model is original and not model.cdl_report.rewritten and not model.cdl_report.left_float
    assert len(model.cdl_report.activations) == 19         # ResNet-20: stem + 2 per block x 9


class TinyResNet(nn.Module):
    """A user's residual model with functional activations (not in cdlcodec.models)."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(1, 8, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(8)
        self.c1 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(8)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        x = F.relu(self.bn(self.stem(x)))
        y = torch.relu(self.bn1(self.c1(x)))
        x = F.relu(self.bn2(self.c2(y)) + x)
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def _loader(x, y, batch):
    return [(x[i:i + batch], y[i:i + batch]) for i in range(0, len(y), batch)]


def test_finetune_then_encode_decode_onnx_matches_the_rebuilt_model(tmp_path, cli):
    ort = pytest.importorskip("onnxruntime")
    import cdlcodec
    from cdlcodec.cdl.checkpoint import build_model_from_checkpoint, load_checkpoint, save_checkpoint
    from cdlcodec.cdl.finetune import finetune

    torch.manual_seed(0)
    x, y = torch.randn(64, 1, 8, 8), torch.randint(0, 3, (64,))
    model = convert(TinyResNet(), bits=4, mode="rcdl")
    steps = []
    result = finetune(model, _loader(x, y, 16), nn.CrossEntropyLoss(), epochs=2, lam=1e-5, gamma=1e-5,
                      on_step=lambda step, parts: steps.append(parts.cross_entropy))
    assert result.steps == len(steps) == 8 and all(np.isfinite(steps)) and not result.model.training
    assert result.history[-1]["weight_bits_per_element"] > 0 and result.history[-1]["activation_bits_per_element"] > 0
    assert model.act_relu.numel_per_sample == 8 * 8 * 8       # calibrated on the first batch

    with pytest.raises(CdlInputError, match="example_input"):
        save_checkpoint(model, str(tmp_path / "no-graph.pt"), architecture="tinyresnet", bits=4, first_last_bits=8)
    save_checkpoint(model, str(tmp_path / "tiny.pt"), architecture="tinyresnet", bits=4, first_last_bits=8,
                    example_input=torch.zeros(1, 1, 8, 8))
    for args in (("encode", tmp_path / "tiny.pt", "-o", tmp_path / "tiny.cdl"),
                 ("decode", tmp_path / "tiny.cdl", "-o", tmp_path / "tiny.onnx")):
        status, _, err = cli(*args, "-q")
        assert status == 0, err
        assert "no ONNX graph" not in err

    # the container holds the graph, not the "cdl.graph" tensor; load() cannot build a class it lacks
    with pytest.raises(CdlInputError, match="build_model_from_checkpoint"):
        cdlcodec.load(str(tmp_path / "tiny.cdl"))
    decoded = cdlcodec.decode(str(tmp_path / "tiny.cdl"), str(tmp_path / "tiny.safetensors"))
    assert "cdl.graph" not in {r.name for r in decoded.records}
    state = {r.name: torch.from_numpy(np.array(r.array)) for r in decoded.records}
    rebuilt = build_model_from_checkpoint(state, model=TinyResNet())
    original = build_model_from_checkpoint(load_checkpoint(str(tmp_path / "tiny.pt")), model=TinyResNet())

    probe = torch.randn(32, 1, 8, 8)
    with torch.no_grad():
        expected = rebuilt(probe).numpy()
        assert np.array_equal(expected, original(probe).numpy())       # the codec kept the eval model
        assert np.array_equal(expected, model(probe).numpy())
    session = ort.InferenceSession(str(tmp_path / "tiny.onnx"))
    got = session.run(None, {session.get_inputs()[0].name: probe.numpy()})[0]
    # Same arithmetic up to float32 summation order in Conv / BatchNormalization: logits agree to 1e-4
    # of their scale unless such a difference moves an activation across a rounding boundary (then by
    # about a step): asked of all rows but at most one
    close_rows = (np.abs(got - expected) <= 1e-4 * max(1.0, np.abs(expected).max())).all(axis=1)
    assert close_rows.sum() >= len(probe) - 1
    assert (got.argmax(1) == expected.argmax(1)).sum() >= len(probe) - 1
    import onnx

    graph = onnx.load(str(tmp_path / "tiny.onnx")).graph
    assert sum(n.op_type == "QuantizeLinear" for n in graph.node) == len(activation_quantizers(model)) == 3


def test_a_malformed_carried_graph_leaves_the_container_without_one(tmp_path):
    """A checkpoint's "cdl.graph" entry that is not ONNX: a warning, no graph, no tensor of that name."""
    import cdlcodec
    from cdlcodec.cdl.checkpoint import atomic_torch_save, cdl_state_dict
    from cdlcodec.io.cdl_checkpoint import GRAPH_KEY

    model = convert(nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 2)), bits=4)
    state = cdl_state_dict(model, architecture="lenet5", bits=4, first_last_bits=8, example_input=(1, 4))
    assert state[GRAPH_KEY].dtype == torch.uint8 and state[GRAPH_KEY].numel() > 100
    state[GRAPH_KEY] = torch.tensor([1, 2, 3, 250, 251], dtype=torch.uint8)
    atomic_torch_save(state, str(tmp_path / "bad.pt"))
    with pytest.warns(UserWarning, match="no ONNX graph stored.*not an ONNX model"):
        cdlcodec.encode(str(tmp_path / "bad.pt"), str(tmp_path / "bad.cdl"))
    decoded = cdlcodec.decode(str(tmp_path / "bad.cdl"), str(tmp_path / "bad.safetensors"))
    assert GRAPH_KEY not in {r.name for r in decoded.records} and not any(k == "onnx" for _, k, _ in decoded.sections)
