"""The CDL / R-CDL training driver (Algorithm 1) and the built-in `lenet5-mnist` task.

The loop is Algorithm 1 with Adam in place of plain gradient descent: per mini-batch, quantize
weights and activations (sampled for CDL, soft for R-CDL), take the objective of eq. 30/40, step
every parameter with the layer-wise learning rates of eq. 39, then keep steps and sharpnesses
positive. "fp" runs the same loop on the unconverted model, so timings compare like with like.

Sharpness schedule (default "anneal", a cdlcodec addition): training starts with soft quantizers,
α·q² = β·s² = `sharpness_start` (0.5), and a floor on α·q², β·s² rises geometrically to
`sharpness_constant` (8) over the first `anneal_fraction` of the steps (α, β stay trainable above
it). Measured on LeNet-5 from scratch (docs/cdl.md, "From scratch"): at α·q² = 8 from the first
step ∂Qd/∂θ = 2α·Var(Qp) is ≈ 0 for every value near a level, the gradient reaches few weights
and activations, and 8 epochs end at 54 % (R-CDL) / 72 % (CDL); soft quantizers first train like
FP, and the final, sharp epochs adapt the model to the hard quantizer used at eval.

A run that collapses (non-finite loss, a layer whose weights or activations all quantize to zero,
accuracy near chance) raises `TrainingCollapsed` naming the likely cause: no checkpoint is written
unless `allow_collapse` is set.
"""
from __future__ import annotations

import math
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
from .convert import (STEP_INITS, activation_quantizers, calibrate, convert, project_parameters,
                      rescale_sharpness, set_entropy_tracking, set_generator, weight_quantizers)
from .loss import cdl_loss
from .metrics import activation_levels, average_bits, entropy_bits_per_weight, weight_levels
from .optim import CDLAdam, cdl_param_groups

TRAIN_MODES = ("fp", "cdl", "rcdl")
SHARPNESS_INITS = ("paper", "scaled")
SHARPNESS_SCHEDULES = ("anneal", "constant")
TASKS = {"lenet5-mnist": "lenet5", "resnet20-mnist": "resnet20:in_channels=1"}  # task -> cdlcodec.models spec
# Accuracy is judged against chance only after this many steps: shorter runs (smoke tests, quick
# trials) may legitimately still be near chance.
MIN_STEPS_TO_JUDGE = 100


class TrainingCollapsed(CdlInputError):
    """Training ended near chance, diverged, or quantized a whole layer to zero (settings to blame)."""


@dataclass
class TrainConfig:
    mode: str = "rcdl"
    bits: int = 4
    first_last_bits: int | None = 8
    # λ, price (in nats of cross-entropy) of one bit of H(w), the whole model's weight entropy
    # (eq. 30): λ·|w| is the price of one bit per weight. γ likewise for H(x) of one sample.
    lam: float = 0.0
    gamma: float = 0.0
    epochs: int = 5
    batch_size: int = 64
    lr: float = 2e-3           # η_w, Adam
    # Base rates of eq. 39 (before the per-layer 1/sqrt(...) factors). With Adam a parameter moves
    # about its learning rate per step, so α/β (≈500) get base rates on their own scale.
    # η_q = η_s = 0.003, not 0.01: at 0.01 the steps of LeNet-5's 8-bit first/last layers and of its
    # fully connected activations move 1.7-3.3 % of their value per Adam step, so the grid jitters
    # under the weights; from scratch (LeNet-5, 8 epochs, 6 seeds) 0.003 gained 1.3 points for CDL
    # and 1.2 for R-CDL on average, 0.03 collapsed CDL (benchmarks/results/cdl_scratch.md).
    lr_q: float = 0.003
    lr_s: float = 0.003
    lr_alpha: float = 100.0
    lr_beta: float = 100.0
    alpha0: float = 500.0      # used when sharpness_init == "paper" (Section VI-B-3)
    beta0: float = 500.0
    # "scaled": α0 = c/q0², β0 = c/s0² with c = sharpness_constant (scale-aware; see layers.py).
    # Default "scaled": measured +12 to +20 accuracy points at b=2 over "paper" (benchmarks/results/cdl.md).
    sharpness_init: str = "scaled"
    sharpness_constant: float = 8.0
    # "anneal": α·q², β·s² start at sharpness_start and are floored by a geometric ramp up to
    # sharpness_constant, reached after anneal_fraction of the steps; "constant": c from the start.
    sharpness_schedule: str = "anneal"
    sharpness_start: float = 0.5
    anneal_fraction: float = 0.75
    allow_collapse: bool = False   # return / write a collapsed model anyway (with a warning)
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
        if self.sharpness_schedule not in SHARPNESS_SCHEDULES:
            raise CdlInputError(f"sharpness schedule must be one of {', '.join(SHARPNESS_SCHEDULES)}, "
                                f"not {self.sharpness_schedule!r}")
        if not (np.isfinite(self.sharpness_start) and 0 < self.sharpness_start <= self.sharpness_constant):
            raise CdlInputError("the sharpness start must be finite, > 0 and at most the sharpness constant")
        if not 0 < self.anneal_fraction <= 1:
            raise CdlInputError(f"the anneal fraction must be in (0, 1], not {self.anneal_fraction}")
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
    train_accuracy: float | None = None   # last epoch, on the training batches as seen (soft / sampled)
    collapse: str | None = None           # the diagnosis when allow_collapse let a collapsed run through

    @property
    def seconds_per_step(self) -> float:
        return self.train_seconds / max(self.steps, 1)


class SharpnessAnneal:
    """The "anneal" schedule: after step t of T, α·q² and β·s² are at least
    c(t) = start·(end/start)^min(1, t/(fraction·T)) (a projection, like `project_parameters`)."""

    def __init__(self, start: float, end: float, total_steps: int, fraction: float = 0.75):
        self.start, self.end = float(start), float(end)
        self.ramp_steps = max(1.0, fraction * total_steps)

    def constant_at(self, step: int) -> float:
        return self.start * (self.end / self.start) ** min(1.0, step / self.ramp_steps)

    @torch.no_grad()
    def apply(self, model: nn.Module, step: int) -> None:
        c = self.constant_at(step)
        for _, m in weight_quantizers(model):
            m.alpha.copy_(torch.maximum(m.alpha, c / m.q.clamp_min(1e-6) ** 2))
        for _, a in activation_quantizers(model):
            a.beta.copy_(torch.maximum(a.beta, c / a.s.clamp_min(1e-6) ** 2))


def _diverged(step: int, epoch: int, value: float, config: TrainConfig) -> TrainingCollapsed:
    cause = ("lam or gamma is too large for this model (their scale: see `cdlcodec train --help`)"
             if config.lam > 0 or config.gamma > 0 else "the learning rate is too large")
    exc = TrainingCollapsed(f"training diverged: the loss became {value} at step {step} (epoch {epoch}); "
                            f"likely cause: {cause}; lower lr (now {config.lr:g})"
                            + (f", lam ({config.lam:g}) and gamma ({config.gamma:g})"
                               if config.lam > 0 or config.gamma > 0 else ""))
    exc.params = ("lr", "lam", "gamma")
    return exc


def _fit(model: nn.Module, x, y, config: TrainConfig, epochs: int, gen, label: str, history: list,
         anneal: SharpnessAnneal | None = None) -> tuple[int, float, float]:
    """`epochs` passes of Algorithm 1 (Adam, eq. 39 groups, eq. 30/40 loss); (steps, seconds,
    training accuracy of the last epoch). Raises TrainingCollapsed as soon as the loss is not finite."""
    groups = cdl_param_groups(model, lr_w=config.lr, lr_q=config.lr_q, lr_s=config.lr_s,
                              lr_alpha=config.lr_alpha, lr_beta=config.lr_beta,
                              sharpness_reference=config.alpha0 if config.sharpness_init == "scaled" else None)
    opt = CDLAdam(groups)     # torch.optim.Adam's values, its one-value groups updated as one vector
    steps_per_epoch = (len(y) + config.batch_size - 1) // config.batch_size
    total_steps = epochs * steps_per_epoch
    model.train()
    start = time.perf_counter()
    step = 0
    meter = EpochMeter()
    with Progress(total_steps, f"training {label}", quiet=config.quiet) as bar:
        for epoch in range(epochs):
            meter = EpochMeter()
            for xb, yb in batches(x, y, config.batch_size, gen):
                logits = model(xb)
                parts = cdl_loss(model, logits, yb, lam=config.lam, gamma=config.gamma)
                total = float(parts.total.detach())
                if not math.isfinite(total):
                    raise _diverged(step + 1, epoch + 1, total, config)
                opt.zero_grad(set_to_none=True)
                parts.total.backward()
                opt.step()
                project_parameters(model)
                step += 1
                if anneal is not None:
                    anneal.apply(model, step)
                note = f"epoch {epoch + 1}/{epochs} ce {parts.cross_entropy:.3f}"
                if parts.weight_bits_per_element is not None:
                    note += f" H(w) {parts.weight_bits_per_element:.2f} b/w"
                meter.add(logits, yb)
                bar.update(1, note=note)
            bar.log(meter.summary(epoch + 1, epochs, f"ce {parts.cross_entropy:.3f}"))
            history.append({"phase": label, "epoch": epoch + 1, "cross_entropy": parts.cross_entropy,
                            "weight_bits_per_element": parts.weight_bits_per_element,
                            "activation_bits_per_element": parts.activation_bits_per_element,
                            "train_accuracy": meter.correct / max(meter.seen, 1)})
    return total_steps, time.perf_counter() - start, meter.correct / max(meter.seen, 1)


@torch.no_grad()
def _dead_layers(model: nn.Module, probe: torch.Tensor) -> list[str]:
    """Layers whose eval-mode output cannot depend on the input: every weight quantized to level 0,
    or every activation of the probe batch quantized to 0."""
    dead = [f"{name} (all weights quantize to 0)" for name, levels in weight_levels(model).items() if not levels.any()]
    return dead + [f"{name} (all activations quantize to 0)"
                   for name, levels in activation_levels(model, probe).items() if not levels.any()]


def diagnose_collapse(model: nn.Module, accuracy: float, chance: float, steps: int,
                      train_accuracy: float | None, config: TrainConfig, probe: torch.Tensor) -> str | None:
    """Why a trained model is useless, or None: non-finite parameters, dead layers, or test accuracy
    near chance (at most 1.5× chance) after at least MIN_STEPS_TO_JUDGE steps, or after a last epoch
    whose (soft / sampled) training accuracy was far above it."""
    bad = [n for n, p in model.named_parameters() if not bool(torch.isfinite(p).all())]
    if bad:
        return f"parameters became non-finite ({', '.join(bad[:3])}): lower lr (now {config.lr:g})"
    rate_term = config.lam > 0 or config.gamma > 0
    dead = _dead_layers(model, probe) if config.mode != "fp" else []
    near_chance = accuracy <= 1.5 * chance
    trained_well = train_accuracy is not None and train_accuracy >= 0.5 and train_accuracy > 2 * chance
    if not dead and not (near_chance and (steps >= MIN_STEPS_TO_JUDGE or trained_well)):
        return None
    what = (f"test accuracy {100 * accuracy:.1f} % (chance {100 * chance:.1f} %)" if near_chance
            else f"test accuracy {100 * accuracy:.1f} %")
    if dead:
        what += "; dead layers: " + ", ".join(dead)
    if rate_term and (dead or not trained_well):
        weights = sum(m.weight.numel() for _, m in weight_quantizers(model))
        activations = sum(a.numel_per_sample or 0 for _, a in activation_quantizers(model))
        cause = (f"the entropy term outweighs the cross-entropy: lam = {config.lam:g} and gamma = "
                 f"{config.gamma:g} price one bit of the whole model's H(w) and of one sample's H(x), "
                 f"so one bit per weight costs {config.lam * weights:.3g} and one bit per activation "
                 f"{config.gamma * activations:.3g} (|w| = {weights:,}, |x| = {activations:,}); "
                 "lower lam and gamma (e.g. by 10x)")
    elif trained_well and near_chance:
        cause = (f"the training accuracy was {100 * train_accuracy:.1f} % with soft / sampled quantizers "
                 "but the hard eval quantizer loses it: end training sharper (sharpness_constant, "
                 "the anneal schedule)")
    elif config.mode != "fp" and config.sharpness_schedule == "constant" and config.sharpness_init == "scaled":
        cause = ("sharp quantizers from the first step pass almost no gradient: use the anneal "
                 "sharpness schedule, or a warm start (fp_epochs)")
    else:
        cause = f"the model did not learn: lower lr (now {config.lr:g}) or train longer (epochs)"
    return f"training collapsed: {what}. Likely cause: {cause}"


def _chance(y_test, num_classes: int) -> float:
    counts = torch.bincount(torch.as_tensor(y_test).reshape(-1).long())
    majority = float(counts.max()) / max(int(counts.sum()), 1) if counts.numel() else 0.0
    return max(majority, 1.0 / max(num_classes, 1))


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
        _, warm_seconds, _ = _fit(model, x, y, config, config.fp_epochs, gen, "fp warm start", history)
        model.eval()
        warm = {"accuracy": evaluate(model, x_test, y_test), "seconds": warm_seconds,
                "state": {k: v.detach().clone() for k, v in model.state_dict().items()}}
    anneal = None
    if config.mode != "fp":
        convert(model, bits=config.bits, first_last_bits=config.first_last_bits, mode=config.mode,
                alpha0=config.alpha0, beta0=config.beta0)
        # s0 from the first batch the loop will see (Section VI-B-3).
        first_idx = torch.randperm(len(y), generator=torch.Generator().manual_seed(config.seed))
        calibrate(model, x[first_idx[:config.batch_size]], step_init=config.step_init)
        if config.sharpness_init == "scaled":
            annealed = config.sharpness_schedule == "anneal"
            rescale_sharpness(model, config.sharpness_start if annealed else config.sharpness_constant)
            if annealed:
                steps = config.epochs * ((len(y) + config.batch_size - 1) // config.batch_size)
                anneal = SharpnessAnneal(config.sharpness_start, config.sharpness_constant, steps,
                                         config.anneal_fraction)
        set_generator(model, torch.Generator().manual_seed(config.seed + 1))
        set_entropy_tracking(model, config.gamma > 0, weights=config.lam > 0)
    total_steps, seconds, train_acc = _fit(model, x, y, config, config.epochs, gen, config.mode, history, anneal)
    set_entropy_tracking(model, False)
    model.eval()
    acc = evaluate(model, x_test, y_test)
    x_probe = torch.as_tensor(x_test[:256])
    with torch.no_grad():
        num_classes = int(model(x_probe[:1]).shape[-1])
    collapse = diagnose_collapse(model, acc, _chance(y_test, num_classes), total_steps, train_acc, config, x_probe)
    if collapse is not None and not config.allow_collapse:
        exc = TrainingCollapsed(collapse + " (allow_collapse keeps the model anyway)")
        exc.params = ("lam", "gamma", "lr", "epochs", "allow_collapse", "fp_epochs")
        raise exc
    return TrainResult(model, acc, total_steps, seconds, history, warm, train_acc, collapse)


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
    if config.mode != "fp":
        # The scale of λ and γ (prices per bit of totals): per bit per weight / per activation.
        weights = sum(m.weight.numel() for _, m in weight_quantizers(result.model))
        activations = sum(a.numel_per_sample or 0 for _, a in activation_quantizers(result.model))
        report["lambda_per_weight"] = config.lam * weights
        report["gamma_per_activation"] = config.gamma * activations
    if result.warm_start is not None:
        report["warm_start_accuracy"] = result.warm_start["accuracy"]
        report["warm_start_seconds"] = round(result.warm_start["seconds"], 3)
    report.update({"steps": result.steps, "train_seconds": round(result.train_seconds, 3),
                   "seconds_per_step": round(result.seconds_per_step, 5)})
    if result.collapse is not None:
        report["collapse"] = result.collapse
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
