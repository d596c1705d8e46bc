"""`cdlcodec eval`: rate-accuracy sweeps (table, CSV, JSON, PNG) and the CI regression gate."""
import click


def _floats(text):
    return [float(v) for v in text.split(",") if v.strip()] if text else []


def _ints(text):
    return [int(v) for v in text.split(",") if v.strip()] if text else []


def _strings(text):
    return [v.strip() for v in text.split(",") if v.strip()] if text else []


def _one_or_list(values):
    return values[0] if len(values) == 1 else values


def build_points(methods, rel_steps, bits, lambdas, granularities, backends, cdl_bits, cdl_lambdas, epochs,
                 checkpoints, compare):
    """Recipe points for the command-line options (see `cdlcodec eval --help`)."""
    points = [{"method": "fp32"}]
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
@click.option("--min-accuracy", default=None, type=float, help="Lower end of the plot's accuracy axis.")
@click.option("--no-plot", is_flag=True, help="Skip the PNG (no matplotlib needed).")
@click.option("--results", "results_path", default=None, type=click.Path(dir_okay=False, exists=True),
              help="Do not sweep: reuse this results.json (re-plot, gate or update the baseline).")
@click.option("--gate", "gate_path", default=None, type=click.Path(dir_okay=False, exists=True),
              help="Compare with this baseline; exit status 1 and a diff if any point regressed.")
@click.option("--update-baseline", "update_path", default=None, type=click.Path(dir_okay=False),
              help="Write the results as the new baseline to this file (commit it with the change).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no table.")
def command(task, recipe_path, methods, rel_steps, bits, lambdas, granularities, backends_opt, cdl_bits, cdl_lambda,
            epochs, checkpoints, compare, seed, threads, out_dir, png_path, md_path, min_accuracy, no_plot,
            results_path, gate_path, update_path, quiet):
    """Sweep codec settings on TASK and report bits per weight / activation, size, accuracy and speed.

    TASK is a built-in task: lenet5-mnist (default) or mlp-digits. Without --config the sweep is
    the grid of the options (float32 reference + every method x setting). Examples:

    \b
      cdlcodec eval lenet5-mnist --compare
      cdlcodec eval lenet5-mnist -m nearest -m rcdl --cdl-bits 2,4 --epochs 1
      cdlcodec eval --config benchmarks/ci_sweep.json --gate benchmarks/rate_accuracy_baseline.json

    See docs/evaluation.md for the definitions (CDL paper eq. 41) and the gate.
    """
    import os
    import sys

    from cdlcodec.errors import CdlInputError
    from cdlcodec.evaluation import gate, report
    from cdlcodec.evaluation.sweep import load_recipe, run_recipe

    if results_path:
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
