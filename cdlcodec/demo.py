"""The main job on an embedded default: train LeNet-5 on the bundled MNIST digits, encode, decode,
and compare size and accuracy. Runs offline in well under a minute on a 2-core CPU."""
from __future__ import annotations

import os
import tempfile
from dataclasses import asdict, dataclass

from .codec import EncodeOptions, decode_container, encode_records
from .quantizers.uniform import UniformQuantizer


@dataclass
class DemoResult:
    num_params: int
    original_bytes: int
    coded_bytes: int
    bits_per_weight: float
    accuracy_before: float
    accuracy_after: float
    backends: dict[str, int]

    def as_dict(self) -> dict:
        return asdict(self)


def run_demo(*, epochs: int = 6, seed: int = 0, rel_step: float | None = None, backend: str = "auto",
             quiet: bool = False, output: str | None = None) -> DemoResult:
    import torch

    from .data.mnist import load_mnist_5k
    from .io.torch_checkpoint import record_to_tensor, tensor_to_record
    from .models import build
    from .training import evaluate, train_classifier

    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    (x_train, y_train), (x_test, y_test) = load_mnist_5k()
    torch.manual_seed(seed)
    model = build("lenet5")
    train_classifier(model, x_train, y_train, epochs=epochs, seed=seed, quiet=quiet)
    before = evaluate(model, x_test, y_test)

    records = [tensor_to_record(k, v) for k, v in model.state_dict().items()]
    quantizer = UniformQuantizer() if rel_step is None else UniformQuantizer(rel_step=rel_step)
    with tempfile.TemporaryDirectory() as tmp:
        path = output or os.path.join(tmp, "lenet5.cdl")
        summary = encode_records(records, path, EncodeOptions(quantizer, backend, (), quiet),
                                 metadata={"architecture": "lenet5", "task": "mnist-5k"})
        decoded = decode_container(path)
        from .formats.container import ContainerReader

        with ContainerReader(path) as reader:
            used: dict[str, int] = {}
            for e in reader.tensors:
                key = e.backend or "plain"
                used[key] = used.get(key, 0) + 1

    restored = build("lenet5")
    restored.load_state_dict({r.name: record_to_tensor(r) for r in decoded.records}, strict=True)
    after = evaluate(restored, x_test, y_test)
    return DemoResult(summary.num_params, summary.original_bytes, summary.coded_bytes,
                      summary.bits_per_param, before, after, used)
