"""The CDL / R-CDL training driver (Algorithm 1) and the built-in `lenet5-mnist` task.

The loop is Algorithm 1 with Adam in place of plain gradient descent: per mini-batch, quantize
weights and activations (sampled for CDL, soft for R-CDL), take the objective of eq. 30/40, step
every parameter with the layer-wise learning rates of eq. 39, then keep steps and sharpnesses
positive. "fp" runs the same loop on the unconverted model, so timings compare like with like.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field

import numpy as np
from ..optional import require
require("torch", "CDL training")
import torch
from torch import nn

from ..errors import CdlInputError
from ..quantizers.base import parameter_error
from ..progress import Progress
from ..training import EpochMeter, batches, evaluate, seed_everything
from .checkpoint import atomic_torch_save, save_checkpoint
from .convert import (STEP_INITS, calibrate, convert, project_parameters, rescale_sharpness,
                      set_entropy_tracking, set_generator)
from .loss import cdl_loss
from .metrics import activation_levels, average_bits, entropy_bits_per_weight, weight_levels
from .optim import cdl_param_groups

TRAIN_MODES = ("fp", "cdl", "rcdl")
SHARPNESS_INITS = ("paper", "scaled")
TASKS = {"lenet5-mnist": "lenet5", "resnet20-mnist": "resnet20:in_channels=1"}  # task -> cdlcodec.models spec


@dataclass
class TrainConfig:
    mode: str = "rcdl"
    bits: int = 4
    first_last_bits: int | None = 8
    lam: float = 0.0           # λ, price of one bit of H(w) (eq. 30)
    gamma: float = 0.0         # γ, price of one bit of H(x) per sample (eq. 30)
    epochs: int = 5
    batch_size: int = 64
    lr: float = 2e-3           # η_w, Adam
    # Base rates of eq. 39 (before the per-layer 1/sqrt(...) factors). With Adam a parameter moves
    # about its learning rate per step, so α/β (≈500) get base rates on their own scale.
    lr_q: float = 0.01
    lr_s: float = 0.01
    lr_alpha: float = 100.0
    lr_beta: float = 100.0
    alpha0: float = 500.0      # used when sharpness_init == "paper" (Section VI-B-3)
    beta0: float = 500.0
    # "scaled": α0 = c/q0², β0 = c/s0² with c = sharpness_constant (scale-aware; see layers.py).
    # Default "scaled": measured +12 to +20 accuracy points at b=2 over "paper" (benchmarks/results/cdl.md).
    sharpness_init: str = "scaled"
    sharpness_constant: float = 8.0
    step_init: str = "mse"     # "paper" (Section VI-B-3) or "mse" (see convert.calibrate)
    fp_epochs: int = 0         # warm start: this many epochs of ordinary training before converting
    seed: int = 0
    quiet: bool = False
    activation_batch: int = 256   # training images whose activations give bits_per_activation
    train_samples: int | None = None  # use only the first N training images (quick trials)

    def check(self) -> None:
        if self.mode not in TRAIN_MODES:
            raise parameter_error(f"mode must be one of {', '.join(TRAIN_MODES)}, not {self.mode!r}", "mode")
        if not 2 <= self.bits <= 8:
            raise parameter_error(f"bits must be between 2 and 8, not {self.bits}", "bits")
        if self.first_last_bits is not None and not 2 <= self.first_last_bits <= 16:
            raise CdlInputError(f"first/last layer bits must be between 2 and 16, not {self.first_last_bits}")
        if self.lam < 0 or self.gamma < 0 or not np.isfinite(self.lam) or not np.isfinite(self.gamma):
            raise parameter_error("lam and gamma must be finite and >= 0", "lam", "gamma")
        if self.epochs < 1:
            raise parameter_error(f"epochs must be at least 1, not {self.epochs}", "epochs")
        if not self.lr > 0:
            raise parameter_error(f"lr must be positive, not {self.lr}", "lr")
        if self.train_samples is not None and self.train_samples < 1:
            raise parameter_error(f"train_samples must be at least 1, not {self.train_samples}", "train_samples")
        if self.sharpness_init not in SHARPNESS_INITS:
            raise CdlInputError(f"sharpness init must be one of {', '.join(SHARPNESS_INITS)}, "
                                f"not {self.sharpness_init!r}")
        if not (np.isfinite(self.sharpness_constant) and self.sharpness_constant > 0):
            raise CdlInputError("the sharpness constant must be finite and > 0")
        if self.step_init not in STEP_INITS:
            raise CdlInputError(f"step init must be one of {', '.join(STEP_INITS)}, not {self.step_init!r}")
        if self.fp_epochs < 0 or (self.mode == "fp" and self.fp_epochs):
            raise parameter_error("fp_epochs must be >= 0, and 0 with mode fp", "fp_epochs", "mode")
        if self.batch_size < 1:
            raise parameter_error(f"batch_size must be at least 1, not {self.batch_size}", "batch_size")


@dataclass
class TrainResult:
    model: nn.Module
    test_accuracy: float
    steps: int
    train_seconds: float
    history: list = field(default_factory=list)
    # fp_epochs > 0: {"accuracy", "seconds", "state"} of the full-precision model before conversion
    warm_start: dict | None = None

    @property
    def seconds_per_step(self) -> float:
        return self.train_seconds / max(self.steps, 1)


def _fit(model: nn.Module, x, y, config: TrainConfig, epochs: int, gen, label: str, history: list) -> tuple[int, float]:
    """`epochs` passes of Algorithm 1 (Adam, eq. 39 groups, eq. 30/40 loss); (steps, seconds)."""
    groups = cdl_param_groups(model, lr_w=config.lr, lr_q=config.lr_q, lr_s=config.lr_s,
                              lr_alpha=config.lr_alpha, lr_beta=config.lr_beta,
                              sharpness_reference=config.alpha0 if config.sharpness_init == "scaled" else None)
    opt = torch.optim.Adam(groups)
    steps_per_epoch = (len(y) + config.batch_size - 1) // config.batch_size
    total_steps = epochs * steps_per_epoch
    model.train()
    start = time.perf_counter()
    with Progress(total_steps, f"training {label}", quiet=config.quiet) as bar:
        for epoch in range(epochs):
            meter = EpochMeter()
            for xb, yb in batches(x, y, config.batch_size, gen):
                logits = model(xb)
                parts = cdl_loss(model, logits, yb, lam=config.lam, gamma=config.gamma)
                opt.zero_grad(set_to_none=True)
                parts.total.backward()
                opt.step()
                project_parameters(model)
                note = f"epoch {epoch + 1}/{epochs} ce {parts.cross_entropy:.3f}"
                if parts.weight_bits_per_element is not None:
                    note += f" H(w) {parts.weight_bits_per_element:.2f} b/w"
                meter.add(logits, yb)
                bar.update(1, note=note)
            bar.log(meter.summary(epoch + 1, epochs, f"ce {parts.cross_entropy:.3f}"))
            history.append({"phase": label, "epoch": epoch + 1, "cross_entropy": parts.cross_entropy,
                            "weight_bits_per_element": parts.weight_bits_per_element,
                            "activation_bits_per_element": parts.activation_bits_per_element})
    return total_steps, time.perf_counter() - start


def train_model(model: nn.Module, x_train, y_train, x_test, y_test, config: TrainConfig) -> TrainResult:
    """Convert (unless fp) and train `model`; returns it in eval mode with its test accuracy.

    With `config.fp_epochs` > 0 the model is first trained in full precision for that many epochs
    (the pretrained setting of Section VI), then converted, initialised from the trained weights and
    fine-tuned for `config.epochs` epochs. `TrainResult.steps` / `train_seconds` count the CDL phase.
    """
    config.check()
    gen = seed_everything(config.seed)
    x = torch.as_tensor(x_train)
    y = torch.as_tensor(y_train)
    history: list = []
    warm = None
    if config.fp_epochs:
        _, warm_seconds = _fit(model, x, y, config, config.fp_epochs, gen, "fp warm start", history)
        model.eval()
        warm = {"accuracy": evaluate(model, x_test, y_test), "seconds": warm_seconds,
                "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
    if config.mode != "fp":
        convert(model, bits=config.bits, first_last_bits=config.first_last_bits, mode=config.mode,
                alpha0=config.alpha0, beta0=config.beta0)
        # s0 from the first batch the loop will see (Section VI-B-3).
        first_idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(config.seed))
        calibrate(model, x[first_idx[:config.batch_size]], step_init=config.step_init)
        if config.sharpness_init == "scaled":
            rescale_sharpness(model, config.sharpness_constant)
        set_generator(model, torch.Generator().manual_seed(config.seed + 1))
        set_entropy_tracking(model, config.gamma > 0)
    total_steps, seconds = _fit(model, x, y, config, config.epochs, gen, config.mode, history)
    set_entropy_tracking(model, False)
    model.eval()
    acc = evaluate(model, x_test, y_test)
    return TrainResult(model, acc, total_steps, seconds, history, warm)


def rate_report(model: nn.Module, x_train, config: TrainConfig) -> dict:
    """bits_per_weight / bits_per_activation (eq. 41, Huffman) and entropy_bits_per_weight."""
    if config.mode == "fp":
        return {"bits_per_weight": 32.0, "bits_per_activation": 32.0, "entropy_bits_per_weight": None}
    batch = torch.as_tensor(x_train[:config.activation_batch])
    bpw, source = average_bits(weight_levels(model))
    bpa, _ = average_bits(activation_levels(model, batch))
    return {"bits_per_weight": bpw, "bits_per_activation": bpa,
            "entropy_bits_per_weight": entropy_bits_per_weight(model), "huffman": source}


def run_task(task: str, config: TrainConfig, output: str | None) -> dict:
    """Train the named task, write the checkpoint atomically (if `output`), return the report."""
    from ..data.mnist import load_mnist_5k
    from ..models import build

    if task not in TASKS:
        raise CdlInputError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
    config.check()
    (x_train, y_train), (x_test, y_test) = load_mnist_5k()
    if config.train_samples is not None:
        x_train, y_train = x_train[:config.train_samples], y_train[:config.train_samples]
    architecture = TASKS[task]
    torch.manual_seed(config.seed)          # same initial weights for every mode
    model = build(architecture)
    result = train_model(model, x_train, y_train, x_test, y_test, config)
    report = {"task": task, "mode": config.mode, "bits": config.bits if config.mode != "fp" else 32,
              "lambda": config.lam, "gamma": config.gamma, "epochs": config.epochs, "seed": config.seed,
              "test_accuracy": result.test_accuracy}
    report.update(rate_report(result.model, x_train, config))
    if result.warm_start is not None:
        report["warm_start_accuracy"] = result.warm_start["accuracy"]
        report["warm_start_seconds"] = round(result.warm_start["seconds"], 3)
    report.update({"steps": result.steps, "train_seconds": round(result.train_seconds, 3),
                   "seconds_per_step": round(result.seconds_per_step, 5)})
    if output:
        if config.mode == "fp":
            # A plain state_dict, loadable strictly into cdlcodec.models.build(architecture).
            atomic_torch_save({k: v.detach().cpu().clone() for k, v in result.model.state_dict().items()},
                              output)
        else:
            save_checkpoint(result.model, output, architecture=architecture, bits=config.bits,
                            first_last_bits=config.first_last_bits)
        report["output"] = output
    report["config"] = {k: v for k, v in asdict(config).items() if k not in ("quiet",)}
    return report
