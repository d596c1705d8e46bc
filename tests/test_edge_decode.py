"""Decoding to ONNX on a device without torch: a subprocess in which `import torch` fails."""
from __future__ import annotations

import os
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from cdlcodec.codec import EncodeOptions, encode_records
from cdlcodec.io.model_files import read_model
from cdlcodec.io.onnx_model import architecture_graph_section
from cdlcodec.models import build
from cdlcodec.quantizers.uniform import UniformQuantizer

NO_TORCH = "import sys\nsys.modules['torch'] = None  # any `import torch` now raises ImportError\n"


@pytest.fixture(scope="module")
def lenet_container(tmp_path_factory):
    root = tmp_path_factory.mktemp("edge")
    torch.manual_seed(0)
    torch.save(build("lenet5").state_dict(), root / "lenet.pt")
    source = read_model(str(root / "lenet.pt"))
    section, meta = architecture_graph_section("lenet5", source.records)
    encode_records(source.records, str(root / "lenet.cdl"),
                   EncodeOptions(UniformQuantizer(rel_step=None, bits=4), "huffman", (), True),
                   {**source.metadata, **meta}, [section])
    (root / "shim").mkdir()
    (root / "shim" / "sitecustomize.py").write_text(NO_TORCH)
    return root


def run_without_torch(root, *args):
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(root / "shim"), *sys.path]))
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, env=env, cwd=root)


def test_the_shim_really_removes_torch(lenet_container):
    proc = run_without_torch(lenet_container, "-c", "import torch")
    assert proc.returncode != 0 and "ImportError" in proc.stderr or "ModuleNotFoundError" in proc.stderr


@pytest.mark.parametrize("weights", ["float", "qdq"])
def test_decode_to_onnx_without_torch(lenet_container, weights):
    root = lenet_container
    out = root / f"edge_{weights}.onnx"
    script = ("import sys\nfrom cdlcodec.cli.main import main\n"
              "assert sys.modules.get('torch', 'absent') is None\n"
              f"main(['decode', 'lenet.cdl', '-o', {str(out)!r}, '--weights', {weights!r}, '-q'])\n")
    proc = run_without_torch(root, "-c", script)
    assert proc.returncode == 0, proc.stderr
    model = onnx.load(str(out))
    onnx.checker.check_model(model, full_check=True)
    # same weights as a decode made with torch available, and it runs
    module = build("lenet5")
    state = torch.load(root / "lenet.pt", weights_only=True)
    x = np.random.default_rng(0).standard_normal((4, 1, 28, 28)).astype(np.float32)
    logits = ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    assert logits.shape == (4, 10) and np.all(np.isfinite(logits))
    module.load_state_dict(state)
    assert np.abs(logits - module(torch.from_numpy(x)).detach().numpy()).max() < 1.0  # 4-bit weights: close, not equal
    if weights == "qdq":
        assert {t.data_type for t in model.graph.initializer if t.name.endswith("_quantized")} == {onnx.TensorProto.INT4}


def test_torch_outputs_fail_cleanly_without_torch(lenet_container):
    proc = run_without_torch(lenet_container, "-m", "cdlcodec", "decode", "lenet.cdl", "-o", "x.pt")
    assert proc.returncode == 2 and "needs torch" in proc.stderr and "Traceback" not in proc.stderr
