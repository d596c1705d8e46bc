"""Issue 14 item 6: built-in architectures beyond LeNet-5 (ResNet-20/18, MobileNetV2, a BERT encoder)
with the state_dict key names of torchvision / transformers, encoded from a bare state_dict with
--arch, decoded to ONNX and run in onnxruntime against the torch module."""
from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

import cdlcodec
from cdlcodec import models
from cdlcodec.cli.main import main
from cdlcodec.errors import CdlInputError

BERT_SMALL = {"vocab_size": 100, "hidden": 64, "layers": 2, "intermediate": 128, "max_positions": 32}
# arch, build options (sizes a checkpoint's shapes restore), input, backend (raw keeps the big ones fast)
CASES = {
    "resnet20": ({}, lambda: torch.randn(2, 3, 32, 32), "auto"),
    "resnet18": ({"num_classes": 7}, lambda: torch.randn(1, 3, 64, 64), "raw"),
    "mobilenetv2": ({"num_classes": 5}, lambda: torch.randn(1, 3, 64, 64), "raw"),
    "bert": (BERT_SMALL, lambda: torch.randint(0, 100, (2, 12)), "auto"),
}


def call(capsys, *args):
    with pytest.raises(SystemExit) as exc:
        main([str(a) for a in args])
    out, err = capsys.readouterr()
    return exc.value.code, out, err


def random_state_dict(arch: str, **options) -> dict:
    torch.manual_seed(0)
    state = models.build(arch, **options).state_dict()
    for name, tensor in state.items():  # BN statistics away from 0 / 1, so that their placement matters
        if name.endswith("running_var"):
            tensor.uniform_(0.5, 2.0)
        elif name.endswith(("running_mean", "bias")):
            tensor.normal_(0, 0.1)
    return state


@pytest.mark.parametrize("arch", list(CASES))
def test_state_dict_with_arch_decodes_to_onnx_that_matches_the_torch_module(tmp_path, capsys, arch):
    options, make_input, backend = CASES[arch]
    torch.save(random_state_dict(arch, **options), tmp_path / "w.pt")
    code, _, err = call(capsys, "encode", tmp_path / "w.pt", "-o", tmp_path / "m.cdl", "--arch", arch,
                        "--backend", backend, "-q")
    assert code == 0, err
    code, _, err = call(capsys, "decode", tmp_path / "m.cdl", "-o", tmp_path / "m.onnx", "-q")
    assert code == 0, err
    # every weight of the graph is a coded tensor (none left as exported, e.g. BN folded into a conv)
    assert "onnx.unmatched_initializers" not in cdlcodec.decode(tmp_path / "m.cdl", tmp_path / "m.pt").metadata
    onnx.checker.check_model(str(tmp_path / "m.onnx"), full_check=True)

    module = cdlcodec.load(tmp_path / "m.cdl")  # sized from the decoded shapes, weights loaded strictly
    assert type(module).__name__ == type(models.build(arch)).__name__ and not module.training
    x = make_input()
    with torch.no_grad():
        expected = module(x)
    expected = expected if isinstance(expected, tuple) else (expected,)
    session = ort.InferenceSession(str(tmp_path / "m.onnx"), providers=["CPUExecutionProvider"])
    got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
    assert len(got) == len(expected)
    for g, e in zip(got, expected):
        assert g.shape == tuple(e.shape)
        np.testing.assert_allclose(g, e.numpy(), rtol=1e-4, atol=1e-5 * float(e.abs().max()))


def test_key_names_are_torchvision_and_transformers_ones():
    resnet18 = models.build("resnet18").state_dict()
    assert len(resnet18) == 122  # torchvision.models.resnet18().state_dict()
    assert {"conv1.weight", "bn1.num_batches_tracked", "layer2.0.downsample.0.weight",
            "layer4.1.bn2.running_var", "fc.bias"} <= set(resnet18)
    mobilenet = models.build("mobilenetv2").state_dict()
    assert len(mobilenet) == 314  # torchvision.models.mobilenet_v2().state_dict()
    assert {"features.0.0.weight", "features.1.conv.0.0.weight", "features.1.conv.1.weight",
            "features.2.conv.0.0.weight", "features.2.conv.3.running_mean", "features.18.1.bias",
            "classifier.1.weight"} <= set(mobilenet)
    resnet20 = models.build("resnet20").state_dict()
    assert resnet20["conv1.weight"].shape == (16, 3, 3, 3) and resnet20["fc.weight"].shape == (10, 64)
    assert "layer3.2.bn2.weight" in resnet20 and "layer2.0.downsample.1.weight" in resnet20
    bert = models.build("bert", **BERT_SMALL).state_dict()
    layer = [name[len("encoder.layer.0."):] for name in bert if name.startswith("encoder.layer.0.")]
    assert layer == [f"{m}.{p}" for m in ("attention.self.query", "attention.self.key", "attention.self.value",
                                           "attention.output.dense", "attention.output.LayerNorm",
                                           "intermediate.dense", "output.dense", "output.LayerNorm")
                     for p in ("weight", "bias")]
    assert [n for n in bert if not n.startswith("encoder.")] == [
        "embeddings.word_embeddings.weight", "embeddings.position_embeddings.weight",
        "embeddings.token_type_embeddings.weight", "embeddings.LayerNorm.weight", "embeddings.LayerNorm.bias",
        "pooler.dense.weight", "pooler.dense.bias"]
    assert models.build("bert").state_dict()["embeddings.word_embeddings.weight"].shape == (30522, 768)


def test_sizes_come_from_the_checkpoint_and_options_from_the_name(tmp_path):
    state = random_state_dict("bert", pooler=False, **BERT_SMALL)
    shapes = {name: tuple(t.shape) for name, t in state.items()}
    built = models.build("bert:heads=4", shapes=shapes)
    built.load_state_dict(state, strict=True)
    assert built.encoder.layer[1].attention.self.heads == 4 and built.pooler is None
    assert models.build("resnet18", shapes={"fc.weight": (3, 512)}).fc.out_features == 3

    # the options travel in the container: load rebuilds 4 heads, which changes the outputs
    cdlcodec.encode(state, tmp_path / "b.cdl", arch="bert:heads=4", backend="raw")
    loaded, x = cdlcodec.load(tmp_path / "b.cdl"), torch.randint(0, 100, (1, 6))
    one_head, four_heads = (models.build("bert", shapes=shapes, heads=h).eval() for h in (1, 4))
    for module in (one_head, four_heads):
        module.load_state_dict(loaded.state_dict())
    with torch.no_grad():
        assert torch.equal(loaded(x), four_heads(x)) and not torch.allclose(loaded(x), one_head(x))


@pytest.mark.parametrize("spec, message", [
    ("resnet99", "unknown architecture 'resnet99'.*resnet18"),
    ("bert:heads=two", "KEY=INTEGER"),
    ("bert:depth=2", "unexpected keyword argument 'depth'"),
    ("bert:heads=5", "not a multiple of 5 heads"),
])
def test_bad_architecture_names_are_input_errors(tmp_path, capsys, spec, message):
    with pytest.raises(CdlInputError, match=message):
        models.build(spec)
    torch.save(random_state_dict("resnet20"), tmp_path / "w.pt")
    code, _, err = call(capsys, "encode", tmp_path / "w.pt", "-o", tmp_path / "m.cdl", "--arch", spec, "-q")
    assert code == 2 and err.startswith("cdlcodec: error:") and "Traceback" not in err, err
    assert not (tmp_path / "m.cdl").exists()
