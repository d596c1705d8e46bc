"""`cdlcodec eval`: rate-accuracy sweeps (table, CSV, JSON, PNG) and the CI regression gate."""
import click

from cdlcodec.cli.flags import progress_option


def _numbers(text, kind):
    from cdlcodec.errors import CdlInputError

    try:
        return [kind(v) for v in text.split(",") if v.strip()] if text else []
    except ValueError:
        raise CdlInputError(f"not a comma-separated list of {kind.__name__}s: {text!r}") from None


def _floats(text):
    return _numbers(text, float)


def _ints(text):
    return _numbers(text, int)


def _strings(text):
    return [v.strip() for v in text.split(",") if v.strip()] if text else []


def _one_or_list(values):
    return values[0] if len(values) == 1 else values


def build_points(methods, rel_steps, bits, lambdas, granularities, backends, cdl_bits, cdl_lambdas, epochs,
                 checkpoints, compare, targets=(), reference=True):
    """Recipe points for the command-line options (see `cdlcodec eval --help`); `reference`: start with
    the float32 point (an ONNX model is scored against its own outputs instead)."""
    points = [{"method": "fp32"}] if reference else []
    step_rule = {"bits": _one_or_list(bits)} if bits else {"rel_step": _one_or_list(rel_steps)}
    common = {}
    if granularities != ["tensor"]:
        common["granularity"] = _one_or_list(granularities)
    if backends != ["auto"]:
        common["backend"] = _one_or_list(backends)
    for method in methods:
        if method == "nearest":
            points.append(dict({"method": "nearest"}, **step_rule, **common))
        elif method in ("rd", "trellis"):
            points.append(dict({"method": method, "lam": _one_or_list(lambdas)}, **step_rule, **common))
        elif method == "fidelity":
            point = {"method": "fidelity", "target": _one_or_list(list(targets))} if targets else {"method": "fidelity"}
            if backends != ["auto"]:
                point["backend"] = _one_or_list(backends)
            points.append(point)
        elif method in ("cdl", "rcdl"):
            point = {"method": method, "bits": _one_or_list(cdl_bits), "epochs": epochs}
            if cdl_lambdas != [0.0]:
                point["lam"] = _one_or_list(cdl_lambdas)
            if backends != ["auto"]:
                point["backend"] = _one_or_list(backends)
            points.append(point)
        else:
            points.append({"method": method})
    for path in checkpoints:
        points.append({"method": "checkpoint", "path": path})
    if compare:
        from cdlcodec.evaluation.methods import COMPARE_METHODS

        points.extend({"method": m} for m in COMPARE_METHODS if m not in methods)
    return points


@click.command("eval")
@click.argument("task", required=False)
@click.option("-c", "--config", "recipe_path", type=click.Path(dir_okay=False, exists=True),
              help="A sweep recipe (JSON, e.g. benchmarks/ci_sweep.json) instead of the grid options.")
@click.option("-m", "--method", "methods", multiple=True, metavar="NAME",
              help="Method to sweep (repeatable): nearest, rd, trellis, cdl, rcdl, fp16, int8-zlib, "
                   "int8-lzma. Default: nearest and rd.")
@click.option("--rel-step", "rel_steps", default="0.05,0.1,0.2,0.35,0.5,0.75", show_default=True, metavar="LIST",
              help="Steps relative to each tensor's std (comma-separated) for nearest / rd / trellis.")
@click.option("--bits", default=None, metavar="LIST", help="Symmetric B-bit steps instead of --rel-step.")
@click.option("--lambda", "lambdas", default="0.1", show_default=True, metavar="LIST",
              help="Rate-distortion lambdas for rd / trellis.")
@click.option("--granularity", "granularities", default="tensor", show_default=True, metavar="LIST",
              help="tensor and/or channel.")
@click.option("--backend", "backends_opt", default="auto", show_default=True, metavar="LIST",
              help="Lossless backends (auto, raw, huffman, cabac).")
@click.option("--cdl-bits", default="2,3,4", show_default=True, metavar="LIST",
              help="Bit widths b for the cdl / rcdl methods.")
@click.option("--cdl-lambda", default="0", show_default=True, metavar="LIST", help="lambda = gamma of cdl / rcdl training (price of a bit of H(w) and H(x), eq. 30).")
@click.option("--epochs", default=2, show_default=True, type=click.IntRange(1, 200),
              help="Training epochs of cdl / rcdl points (they start from the trained FP weights).")
@click.option("--checkpoint", "checkpoints", multiple=True, type=click.Path(dir_okay=False, exists=True),
              help="Also evaluate this CDL / R-CDL checkpoint file (repeatable).")
@click.option("--compare", is_flag=True, help="Add general-purpose baselines: fp16, int8 + zlib, int8 + lzma.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the reference training.")
@click.option("--threads", default=None, type=click.IntRange(1, 256),
              help="torch threads (results depend on it; default: the recipe's, else 2).")
@click.option("-o", "--out-dir", default="eval-results", show_default=True, type=click.Path(file_okay=False),
              help="Writes results.json, results.csv, results.md and rate_accuracy.png here.")
@click.option("--png", "png_path", default=None, type=click.Path(dir_okay=False), help="Also write the plot here.")
@click.option("--markdown", "md_path", default=None, type=click.Path(dir_okay=False), help="Also write the Markdown table here.")
@click.option("--min-accuracy", default=None, type=float, help="Lower end of the plot's accuracy axis, in percent.")
@click.option("--no-plot", is_flag=True, help="Skip the PNG (no matplotlib needed).")
@click.option("--results", "results_path", default=None, type=click.Path(dir_okay=False, exists=True),
              help="Do not sweep: reuse this results.json (re-plot, gate or update the baseline).")
@click.option("--gate", "gate_path", default=None, type=click.Path(dir_okay=False, exists=True),
              help="Compare with this baseline; exit status 1 and a diff if any point regressed.")
@click.option("--update-baseline", "update_path", default=None, type=click.Path(dir_okay=False),
              help="Write the results as the new baseline to this file (commit it with the change).")
@click.option("--onnx", "onnx_path", default=None, metavar="MODEL.onnx",
              help="Sweep your own ONNX model instead of a built-in task (needs --calibration); methods nearest, "
                   "rd, trellis, fidelity (default: nearest and fidelity).")
@click.option("--calibration", default=None, metavar="DATA.npz",
              help="With --onnx: inputs named after the graph inputs, samples first; every point's decoded model "
                   "runs on them.")
@click.option("--measure", default=None, metavar="NAME",
              help="With --onnx: cosine (default), agreement or rel_mse against the original model's outputs.")
@click.option("--targets", default=None, metavar="LIST",
              help="With --onnx: targets of the fidelity method in the measure (default 0.99,0.999; rel_mse 0.01,0.001).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no table.")
@progress_option
def command(task, recipe_path, methods, rel_steps, bits, lambdas, granularities, backends_opt, cdl_bits, cdl_lambda,
            epochs, checkpoints, compare, seed, threads, out_dir, png_path, md_path, min_accuracy, no_plot,
            results_path, gate_path, update_path, onnx_path, calibration, measure, targets, quiet):
    """Sweep codec settings on TASK and report bits per weight / activation, size, accuracy and speed.

    TASK is a built-in task: lenet5-mnist (default) or mlp-digits; or give your own ONNX model with
    --onnx and --calibration, scored by a fidelity measure instead of accuracy. Without --config the
    sweep is the grid of the options (float32 reference + every method x setting). Examples:

    \b
      cdlcodec eval lenet5-mnist --compare
      cdlcodec eval lenet5-mnist -m nearest -m rcdl --cdl-bits 2,4 --epochs 1
      cdlcodec eval --config benchmarks/ci_sweep.json --gate benchmarks/rate_accuracy_baseline.json
      cdlcodec eval --onnx model.onnx --calibration inputs.npz -m nearest -m fidelity --targets 0.99,0.999

    See docs/evaluation.md for the definitions (CDL paper eq. 41) and the gate.
    """
    import os
    import sys

    from cdlcodec.errors import CdlInputError
    from cdlcodec.evaluation import gate, report
    from cdlcodec.evaluation.sweep import load_recipe, run_recipe

    onnx_options = {"--calibration": calibration, "--measure": measure, "--targets": targets}
    if onnx_path is None and any(v is not None for v in onnx_options.values()):
        given = next(k for k, v in onnx_options.items() if v is not None)
        raise CdlInputError(f"{given} applies to your own ONNX model: give --onnx MODEL.onnx with it")
    if onnx_path is not None:
        _refuse_with_onnx()
        if calibration is None:
            raise CdlInputError("--onnx needs --calibration DATA.npz (inputs named after the graph inputs, "
                                "samples first)")
        recipe, make_task = _onnx_sweep(onnx_path, calibration, measure or "cosine", targets, list(methods),
                                        _floats(rel_steps), _ints(bits), _floats(lambdas), _strings(granularities),
                                        _strings(backends_opt))
        results = run_recipe(recipe, quiet=quiet, threads=threads, task_factory=make_task)
        report.write_text(os.path.join(out_dir, "results.json"), report.json_text(results))
        report.write_text(os.path.join(out_dir, "results.csv"), report.csv_text(results))
    elif results_path:
        if recipe_path or task:
            raise CdlInputError("--results reuses a finished sweep: give no TASK and no --config with it")
        results = gate.read_json(results_path, "results file")
        gate.check_results(results)
    else:
        if recipe_path:
            if task or methods or checkpoints or compare:
                raise CdlInputError("--config describes the whole sweep: give no TASK, --method, --checkpoint "
                                    "or --compare with it")
            recipe = load_recipe(recipe_path)
        else:
            chosen = list(methods) or ["nearest", "rd"]
            points = build_points(chosen, _floats(rel_steps), _ints(bits), _floats(lambdas), _strings(granularities),
                                  _strings(backends_opt), _ints(cdl_bits), _floats(cdl_lambda), epochs,
                                  list(checkpoints), compare)
            recipe = {"sweeps": [{"task": task or "lenet5-mnist", "seed": seed, "points": points}]}
        results = run_recipe(recipe, quiet=quiet, threads=threads)
        report.write_text(os.path.join(out_dir, "results.json"), report.json_text(results))
        report.write_text(os.path.join(out_dir, "results.csv"), report.csv_text(results))
    table_md = report.markdown(results)
    if not results_path:
        report.write_text(os.path.join(out_dir, "results.md"), table_md)
    if md_path:
        report.write_text(md_path, table_md)
    if not quiet:
        click.echo(report.table(results), nl=False)
    if not no_plot:
        from cdlcodec.evaluation.plot import plot

        pngs = [png_path] if png_path else []
        if not results_path:
            pngs.append(os.path.join(out_dir, "rate_accuracy.png"))
        for target in pngs:
            plot(results, target, min_accuracy=min_accuracy)
    if not quiet and not results_path:
        click.echo(f"wrote {out_dir}/results.json, results.csv, results.md"
                   + ("" if no_plot else ", rate_accuracy.png") + f" ({results['seconds']:.0f} s)")
    if update_path:
        report.write_text(update_path, report.json_text(gate.make_baseline(results)))
        click.echo(f"wrote the new baseline {update_path}: commit it with the change that earned it")
    if gate_path:
        outcome = gate.compare(results, gate.read_json(gate_path, "baseline"))
        click.echo(outcome.text(), nl=False)
        if not outcome.passed:
            sys.exit(1)  # not click.exceptions.Exit: cdlcodec.cli.main drops its code in non-standalone mode


# Options that describe built-in tasks, training or the accuracy gate: refused with --onnx rather than ignored.
NOT_WITH_ONNX = {"task": "TASK", "recipe_path": "--config", "results_path": "--results", "checkpoints": "--checkpoint",
                 "compare": "--compare", "gate_path": "--gate", "update_path": "--update-baseline",
                 "cdl_bits": "--cdl-bits", "cdl_lambda": "--cdl-lambda", "epochs": "--epochs", "seed": "--seed",
                 "min_accuracy": "--min-accuracy"}


def _refuse_with_onnx() -> None:
    from click.core import ParameterSource

    from cdlcodec.errors import CdlInputError

    ctx = click.get_current_context()
    for name, flag in NOT_WITH_ONNX.items():
        if ctx.get_parameter_source(name) not in (None, ParameterSource.DEFAULT):
            raise CdlInputError(f"{flag} does not apply to --onnx (an ONNX model is scored against its own "
                                "outputs with --measure)")


def _onnx_sweep(onnx_path, calibration, measure, targets, methods, rel_steps, bits, lambdas, granularities, backends):
    """(recipe, task factory) of `eval --onnx`: the task reads the model and runs it once, so a bad model,
    calibration file or measure fails here, before any point."""
    from cdlcodec.evaluation.onnx_task import DEFAULT_TARGETS, onnx_task
    from cdlcodec.fidelity.measures import Target

    from cdlcodec.evaluation.sweep import method_for

    task = onnx_task(onnx_path, calibration, measure)
    for name in methods:
        method_for(task, name)  # before the grid of a method that does not apply is built
    target_values = _floats(targets) or list(DEFAULT_TARGETS[measure])
    for value in target_values:
        Target(measure, value)  # an impossible target fails now, not once per point
    points = build_points(methods or ["nearest", "fidelity"], rel_steps, bits, lambdas, granularities, backends,
                          [], [], 1, [], False, targets=target_values, reference=False)
    recipe = {"sweeps": [{"task": task.name, "onnx": onnx_path, "calibration": calibration, "measure": measure,
                          "points": points}]}
    return recipe, lambda name, seed, epochs: task
