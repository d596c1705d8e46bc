"""`cdlcodec train`: train a built-in task in full precision, with CDL or with R-CDL."""
from __future__ import annotations

import click

from cdlcodec.cli.flags import parameters_as_flags, progress_option


@click.command("train")
@click.argument("task", metavar="TASK")
@click.option("--mode", default="rcdl", show_default=True, type=click.Choice(["fp", "cdl", "rcdl"]),
              help="fp: ordinary training; cdl: sampled quantizers (Qp); rcdl: soft quantizers (Qd).")
@click.option("--bits", "-b", default=4, show_default=True, type=int,
              help="Bit width b of weights and activations (first and last layer: --first-last-bits).")
@click.option("--first-last-bits", default=8, show_default=True, type=int,
              help="Bit width of the first and last weight layer (Section VI-B-2).")
@click.option("--lambda", "lam", default=0.0, show_default=True, type=float,
              help="λ: price (nats of cross-entropy) of one bit of H(w), the entropy of ALL the model's "
                   "quantized weights (eq. 30). A price per bit of a total: λ·|w| is the price of one bit "
                   "per weight, so the useful λ shrinks as the model grows (LeNet-5, |w| = 61,470: "
                   "3e-6 to 1e-4, i.e. λ·|w| = 0.18 to 6). The JSON reports lambda_per_weight = λ·|w|.")
@click.option("--gamma", default=0.0, show_default=True, type=float,
              help="γ: price of one bit of H(x), the entropy of ONE sample's quantized activations "
                   "(eq. 30); γ·|x| (|x| = activations per sample, LeNet-5: 6,508) is the price of one bit "
                   "per activation, reported as gamma_per_activation.")
@click.option("--epochs", default=5, show_default=True, type=int)
@click.option("--batch-size", default=64, show_default=True, type=int)
@click.option("--lr", default=2e-3, show_default=True, type=float, help="Adam learning rate of the weights.")
@click.option("--fp-epochs", default=0, show_default=True, type=int,
              help="Warm start: train in full precision for N epochs, then convert and train "
                   "--epochs more with CDL/R-CDL (the paper's pretrained setting).")
@click.option("--sharpness-init", default="scaled", show_default=True, type=click.Choice(["paper", "scaled"]),
              help="paper: α0 = β0 = 500 (Section VI-B-3); scaled: α0 = C/q0², β0 = C/s0².")
@click.option("--sharpness-constant", default=8.0, show_default=True, type=float,
              help="C of --sharpness-init scaled.")
@click.option("--sharpness-schedule", default="anneal", show_default=True,
              type=click.Choice(["anneal", "constant"]),
              help="anneal: α·q², β·s² start at --sharpness-start and rise geometrically to "
                   "--sharpness-constant over the first 3/4 of the steps (trains from scratch); "
                   "constant: --sharpness-constant from the first step.")
@click.option("--sharpness-start", default=0.5, show_default=True, type=float,
              help="α·q² = β·s² at the first step with --sharpness-schedule anneal.")
@click.option("--allow-collapse", is_flag=True,
              help="Write the checkpoint even when training collapsed (diverged, dead layers, accuracy "
                   "near chance); without it such a run is an error and nothing is written.")
@click.option("--step-init", default="mse", show_default=True, type=click.Choice(["paper", "mse"]),
              help="paper: q0, s0 = 2·mean|v|/sqrt(2^(b-1)); mse: the steps with least rounding error.")
@click.option("--train-samples", default=None, type=int,
              help="Train on the first N of the 4,000 training images only (quick trials).")
@click.option("--seed", default=0, show_default=True, type=int)
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False, writable=True),
              help="Checkpoint to write (a state_dict; see formats/cdl-checkpoint.md).")
@click.option("--quiet", "-q", is_flag=True, help="No progress bar.")
@progress_option
def command(task, mode, bits, first_last_bits, lam, gamma, epochs, batch_size, lr, fp_epochs, sharpness_init,
            sharpness_constant, sharpness_schedule, sharpness_start, allow_collapse, step_init, train_samples,
            seed, output, quiet):
    """Train TASK (lenet5-mnist or resnet20-mnist) and print one JSON line with accuracy and rates.

    The JSON holds test_accuracy, bits_per_weight and bits_per_activation (Huffman-coded averages,
    eq. 41, of the hard-quantized weights and of a batch of training activations) and
    entropy_bits_per_weight (H(w)/|w| from the learned MPMFs, eq. 26).

    A run that collapses (loss not finite, a layer quantized entirely to zero, test accuracy near
    chance) is an error naming the likely cause, and writes no checkpoint (unless --allow-collapse).
    """
    import json
    import os

    from cdlcodec.cdl.train import TASKS, TrainConfig, run_task
    from cdlcodec.errors import CdlInputError

    if task not in TASKS:
        raise CdlInputError(f"unknown task {task!r} (known: {', '.join(TASKS)})")
    directory = os.path.dirname(os.path.abspath(output))
    if not os.path.isdir(directory):
        raise CdlInputError(f"output directory does not exist: {directory}")
    config = TrainConfig(mode=mode, bits=bits, first_last_bits=first_last_bits, lam=lam, gamma=gamma,
                         epochs=epochs, batch_size=batch_size, lr=lr, seed=seed, quiet=quiet,
                         train_samples=train_samples, fp_epochs=fp_epochs, sharpness_init=sharpness_init,
                         sharpness_constant=sharpness_constant, sharpness_schedule=sharpness_schedule,
                         sharpness_start=sharpness_start, allow_collapse=allow_collapse, step_init=step_init)
    flags = {"mode": "--mode", "bits": "--bits", "lam": "--lambda", "gamma": "--gamma", "epochs": "--epochs",
             "lr": "--lr", "train_samples": "--train-samples", "fp_epochs": "--fp-epochs", "batch_size": "--batch-size",
             "allow_collapse": "--allow-collapse"}
    if mode != "fp":
        from cdlcodec.cdl.quantizer import cpu_speed_note

        note = cpu_speed_note()
        if note:
            click.echo(f"cdlcodec: note: {note}", err=True)
    with parameters_as_flags(flags):
        report = run_task(task, config, output)
    if report.get("collapse"):
        click.echo(f"cdlcodec: warning: {report['collapse']} (written anyway: --allow-collapse)", err=True)
    click.echo(json.dumps(report, sort_keys=False))
