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
import torch
from torch import nn

from ..errors import CdlInputError
from ..progress import Progress
from ..training import batches, evaluate, seed_everything
from .checkpoint import atomic_torch_save, save_checkpoint
from .convert import calibrate, convert, project_parameters, set_entropy_tracking, set_generator
from .loss import cdl_loss
from .metrics import activation_levels, average_bits, entropy_bits_per_weight, weight_levels
from .optim import cdl_param_groups

TRAIN_MODES = ("fp", "cdl", "rcdl")
TASKS = {"lenet5-mnist": "lenet5"}


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
    alpha0: float = 500.0
    beta0: float = 500.0
    seed: int = 0
    quiet: bool = False
    activation_batch: int = 256   # training images whose activations give bits_per_activation
    train_samples: int | None = None  # use only the first N training images (quick trials)

    def check(self) -> None:
        if self.mode not in TRAIN_MODES:
            raise CdlInputError(f"--mode must be one of {', '.join(TRAIN_MODES)}, not {self.mode!r}")
        if not 2 <= self.bits <= 8:
            raise CdlInputError(f"--bits must be between 2 and 8, not {self.bits}")
        if self.first_last_bits is not None and not 2 <= self.first_last_bits <= 16:
            raise CdlInputError(f"first/last layer bits must be between 2 and 16, not {self.first_last_bits}")
        if self.lam < 0 or self.gamma < 0 or not np.isfinite(self.lam) or not np.isfinite(self.gamma):
            raise CdlInputError("--lambda and --gamma must be finite and >= 0")
        if self.epochs < 1:
            raise CdlInputError(f"--epochs must be at least 1, not {self.epochs}")
        if not self.lr > 0:
            raise CdlInputError(f"--lr must be positive, not {self.lr}")
        if self.train_samples is not None and self.train_samples < 1:
            raise CdlInputError(f"--train-samples must be at least 1, not {self.train_samples}")
        if self.batch_size < 1:
            raise CdlInputError(f"--batch-size must be at least 1, not {self.batch_size}")


@dataclass
class TrainResult:
    model: nn.Module
    test_accuracy: float
    steps: int
    train_seconds: float
    history: list = field(default_factory=list)

    @property
    def seconds_per_step(self) -> float:
        return self.train_seconds / max(self.steps, 1)


def train_model(model: nn.Module, x_train, y_train, x_test, y_test, config: TrainConfig) -> TrainResult:
    """Convert (unless fp) and train `model`; returns it in eval mode with its test accuracy."""
    config.check()
    gen = seed_everything(config.seed)
    x = torch.as_tensor(x_train)
    y = torch.as_tensor(y_train)
    if config.mode != "fp":
        convert(model, bits=config.bits, first_last_bits=config.first_last_bits, mode=config.mode,
                alpha0=config.alpha0, beta0=config.beta0)
        # s0 from the first batch the loop will see (Section VI-B-3).
        first_idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(config.seed))
        calibrate(model, x[first_idx[:config.batch_size]])
        set_generator(model, torch.Generator().manual_seed(config.seed + 1))
        set_entropy_tracking(model, config.gamma > 0)
    groups = cdl_param_groups(model, lr_w=config.lr, lr_q=config.lr_q, lr_s=config.lr_s,
                              lr_alpha=config.lr_alpha, lr_beta=config.lr_beta)
    opt = torch.optim.Adam(groups)
    steps_per_epoch = (len(y) + config.batch_size - 1) // config.batch_size
    total_steps = config.epochs * steps_per_epoch
    history = []
    model.train()
    start = time.perf_counter()
    with Progress(total_steps, f"training {config.mode}", quiet=config.quiet) as bar:
        for epoch in range(config.epochs):
            for xb, yb in batches(x, y, config.batch_size, gen):
                parts = cdl_loss(model, model(xb), yb, lam=config.lam, gamma=config.gamma)
                opt.zero_grad(set_to_none=True)
                parts.total.backward()
                opt.step()
                project_parameters(model)
                note = f"epoch {epoch + 1}/{config.epochs} ce {parts.cross_entropy:.3f}"
                if parts.weight_bits_per_element is not None:
                    note += f" H(w) {parts.weight_bits_per_element:.2f} b/w"
                bar.update(1, note=note)
            history.append({"epoch": epoch + 1, "cross_entropy": parts.cross_entropy,
                            "weight_bits_per_element": parts.weight_bits_per_element,
                            "activation_bits_per_element": parts.activation_bits_per_element})
    seconds = time.perf_counter() - start
    set_entropy_tracking(model, False)
    model.eval()
    acc = evaluate(model, x_test, y_test)
    return TrainResult(model, acc, total_steps, seconds, history)


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
