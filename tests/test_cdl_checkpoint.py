"""CDL checkpoints: weights_only round trip, torch-free metadata reading, bit-exact eval weights."""
import json

import numpy as np
import pytest
import torch

from cdlcodec.cdl.checkpoint import build_model_from_checkpoint, load_checkpoint, save_checkpoint
from cdlcodec.cdl.convert import activation_quantizers, calibrate, convert, weight_quantizers
from cdlcodec.cdl.optim import cdl_param_groups
from cdlcodec.cdl_format import METADATA_KEY, dequantize, hard_levels, is_cdl_checkpoint, read_cdl_metadata
from cdlcodec.errors import CdlInputError
from cdlcodec.models import build


def _model(mode="cdl", bits=4):
    torch.manual_seed(0)
    model = convert(build("lenet5"), bits=bits, first_last_bits=8, mode=mode)
    x = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    calibrate(model, x)
    with torch.no_grad():   # make the learned values differ from their initial ones
        for _, m in weight_quantizers(model):
            m.q.mul_(1.3)
            m.alpha.add_(17.0)
        for _, a in activation_quantizers(model):
            a.beta.add_(3.0)
    return model.eval(), x


def test_convert_lenet5_layout():
    model, _ = _model()
    bits = {n: int(m.bits) for n, m in weight_quantizers(model)}
    assert bits == {"conv1": 8, "conv2": 4, "fc1": 4, "fc2": 4, "fc3": 8}
    assert [n for n, _ in activation_quantizers(model)] == ["relu1", "relu2", "relu3", "relu4"]


@pytest.mark.parametrize("mode", ["cdl", "rcdl"])
def test_checkpoint_round_trip_weights_only(tmp_path, mode):
    model, x = _model(mode)
    path = tmp_path / "ckpt.pt"
    save_checkpoint(model, str(path), architecture="lenet5", bits=4, first_last_bits=8)
    state = torch.load(path, weights_only=True)
    assert all(isinstance(v, torch.Tensor) for v in state.values())
    assert state["conv2.bits"].dtype == torch.int64 and int(state["conv2.bits"]) == 4
    assert state[METADATA_KEY].dtype == torch.uint8
    meta_json = json.loads(bytes(state[METADATA_KEY].tolist()).decode())
    assert meta_json["mode"] == mode and meta_json["architecture"] == "lenet5"

    # The reading API works on numpy arrays alone.
    arrays = {k: v.numpy() for k, v in state.items()}
    assert is_cdl_checkpoint(arrays) and is_cdl_checkpoint(state)
    meta = read_cdl_metadata(arrays)
    assert meta.mode == mode and meta.bits == 4 and meta.first_last_bits == 8
    assert [w.weight for w in meta.weights] == ["conv1.weight", "conv2.weight", "fc1.weight",
                                                "fc2.weight", "fc3.weight"]
    assert [w.bits for w in meta.weights] == [8, 4, 4, 4, 8]
    assert [(a.module, a.index, a.after) for a in meta.activations] == [
        ("relu1", 0, "conv1"), ("relu2", 1, "conv2"), ("relu3", 2, "fc1"), ("relu4", 3, "fc2")]
    for w in meta.weights:
        layer = model.get_submodule(w.module)
        assert w.q == float(layer.q.detach()) and w.alpha == float(layer.alpha.detach())
        # hard_levels / dequantize reproduce the eval-mode weight bit for bit.
        levels = hard_levels(arrays[w.weight], w.q, w.bits)
        lo, hi = w.level_range
        assert levels.dtype == np.int64 and levels.min() >= lo and levels.max() <= hi
        eval_weight = layer.quantized_weight().detach().numpy()
        assert np.array_equal(dequantize(levels, w.q).view(np.uint32), eval_weight.view(np.uint32))
    for a in meta.activations:
        module = model.get_submodule(a.module)
        assert a.s == float(module.s.detach()) and a.beta == float(module.beta.detach()) and a.bits == 4

    # The rebuilt model predicts exactly what the checkpoint's eval mode predicts.
    rebuilt = build_model_from_checkpoint(arrays)
    assert not rebuilt.training
    with torch.no_grad():
        assert torch.equal(rebuilt(x), model(x))
    assert torch.equal(build_model_from_checkpoint(load_checkpoint(str(path)))(x), model(x))


def test_hard_levels_match_torch_on_ties_and_extremes():
    from cdlcodec.cdl.quantizer import hard_levels as torch_hard_levels
    q = np.float32(0.1)
    w = np.concatenate([np.arange(-12, 12, dtype=np.float32) * q / 2,            # midpoints
                        np.random.default_rng(0).normal(0, 0.5, 10000).astype(np.float32),
                        np.array([1e30, -1e30, 0.0, -0.0], dtype=np.float32)])
    for bits in (2, 4, 8):
        lo, hi = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        ours = hard_levels(w, float(q), bits)
        ref = torch_hard_levels(torch.from_numpy(w), torch.tensor(q), lo, hi).numpy()
        assert np.array_equal(ours, ref)
    assert np.array_equal(hard_levels(np.array([-1.0, 0.26, 9.0], np.float32), 0.1, 2, signed=False),
                          [0, 3, 3])


def test_not_cdl_and_malformed_metadata():
    plain = {k: v.numpy() for k, v in build("lenet5").state_dict().items()}
    assert not is_cdl_checkpoint(plain)
    with pytest.raises(CdlInputError):
        read_cdl_metadata(plain)
    bad = dict(plain)
    bad[METADATA_KEY] = np.frombuffer(b"{not json", dtype=np.uint8)
    assert not is_cdl_checkpoint(bad)
    with pytest.raises(CdlInputError):
        read_cdl_metadata(bad)
    model, _ = _model()
    from cdlcodec.cdl.checkpoint import cdl_state_dict
    state = {k: v.numpy() for k, v in cdl_state_dict(model, architecture="lenet5", bits=4,
                                                       first_last_bits=8).items()}
    missing = dict(state)
    del missing["fc1.q"]
    with pytest.raises(CdlInputError, match="fc1.q"):
        read_cdl_metadata(missing)
    negative = dict(state)
    negative["fc1.q"] = np.array(-1.0, np.float32)
    with pytest.raises(CdlInputError, match="positive"):
        read_cdl_metadata(negative)



def test_format_reading_needs_no_torch(tmp_path):
    """The format half (cdl_format) and its low-layer users read a checkpoint without importing torch."""
    import subprocess
    import sys

    model, _ = _model()
    from cdlcodec.cdl.checkpoint import cdl_state_dict
    state = cdl_state_dict(model, architecture="lenet5", bits=4, first_last_bits=8)
    np.savez(tmp_path / "state.npz", **{k: v.numpy() for k, v in state.items()})
    script = (
        "import sys, numpy as np\n"
        "import cdlcodec.io.cdl_checkpoint, cdlcodec.quantizers.cpmf\n"
        "from cdlcodec.cdl_format import is_cdl_checkpoint, read_cdl_metadata\n"
        f"tensors = dict(np.load({str(tmp_path / 'state.npz')!r}))\n"
        "assert is_cdl_checkpoint(tensors) and read_cdl_metadata(tensors).bits == 4\n"
        "assert 'torch' not in sys.modules, 'torch imported'\n")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr

def test_eq39_learning_rate_groups():
    model, _ = _model()
    groups = cdl_param_groups(model, lr_w=1e-3, lr_q=1.0, lr_s=2.0, lr_alpha=3.0, lr_beta=4.0)
    by_param = {id(p): g["lr"] for g in groups for p in g["params"]}
    fc1 = model.fc1
    assert by_param[id(fc1.q)] == pytest.approx(1.0 / np.sqrt(48000 * 2 ** 3))      # (39a)
    assert by_param[id(fc1.alpha)] == pytest.approx(3.0 / np.sqrt(48000))           # (39c)
    assert by_param[id(model.conv1.q)] == pytest.approx(1.0 / np.sqrt(150 * 2 ** 7))
    relu1 = model.relu1                                                              # 6x28x28 per sample
    assert by_param[id(relu1.s)] == pytest.approx(2.0 / np.sqrt(4704 * 2 ** 4))      # (39b)
    assert by_param[id(relu1.beta)] == pytest.approx(4.0 / np.sqrt(4704))           # (39d)
    assert by_param[id(fc1.weight)] == 1e-3 and by_param[id(fc1.bias)] == 1e-3
    assert len(by_param) == len(list(model.parameters()))
