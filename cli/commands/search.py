"""`cdlcodec search`: the quantizer setting with the fewest bits within an accuracy tolerance, or for
your own ONNX model (--onnx) the smallest container whose decoded model meets a fidelity measure."""
import click

from cdlcodec.cli.flags import progress_option


@click.command("search")
@click.argument("model", type=click.Path(dir_okay=False), required=False)
@click.option("--task", type=click.Choice(["lenet5-mnist"]), default="lenet5-mnist", show_default=True,
              help="Built-in evaluation: the model is a LeNet-5 state_dict scored on the bundled MNIST test split.")
@click.option("--method", type=click.Choice(["nearest", "rd", "channel", "rd-channel", "trellis"]), default="rd",
              show_default=True, help="Quantizer family searched (rd: step, then lambda).")
@click.option("--tolerance", type=float, default=0.5, show_default=True,
              help="Largest accepted accuracy drop, in percentage points.")
@click.option("--backend", default="auto", show_default=True, help="Lossless backend (auto, raw, huffman, cabac).")
@click.option("--iterations", type=int, default=6, show_default=True, help="Bisection steps per parameter.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None,
              help="Also write the best setting's container here.")
@click.option("--onnx", "onnx_path", default=None, metavar="MODEL.onnx",
              help="Search your own ONNX model instead (needs --calibration and --min or --max).")
@click.option("--calibration", default=None, metavar="DATA.npz",
              help="With --onnx: inputs named after the graph inputs, samples first (the first 128 are used).")
@click.option("--measure", default=None, metavar="NAME",
              help="With --onnx: cosine (default), agreement or rel_mse against the original model's outputs.")
@click.option("--min", "minimum", type=float, default=None, help="With --onnx: the cosine / agreement to reach.")
@click.option("--max", "maximum", type=float, default=None, help="With --onnx: the largest rel_mse accepted.")
@click.option("-q", "--quiet", is_flag=True, help="Only the final JSON line.")
@progress_option
def command(model, task, method, tolerance, backend, iterations, output, onnx_path, calibration, measure, minimum,
            maximum, quiet):
    """Bisection search (DeepCABAC's grid search, with bisection) over the step and lambda.

    MODEL is a LeNet-5 state_dict scored on the bundled MNIST test split. Prints one JSON line: the
    baseline accuracy, the best setting, its bits per parameter and accuracy.

    With --onnx MODEL.onnx --calibration DATA.npz --measure cosine --min 0.99 it finds the smallest
    container whose decoded model meets the measure: the fidelity encoder's, or nearest rounding at
    the largest step found by bisection, whichever is smaller; both are checked by decoding and
    running them. Prints one JSON line with both candidates.
    """
    import json

    from cdlcodec.codec import EncodeOptions, encode_records
    from cdlcodec.errors import CdlInputError
    from cdlcodec.search import lenet_task, make_quantizer, search

    if iterations < 1:
        raise CdlInputError("--iterations must be at least 1")
    onnx_options = {"--calibration": calibration, "--measure": measure, "--min": minimum, "--max": maximum}
    if onnx_path is not None:
        click.echo(json.dumps(_search_onnx(model, onnx_path, calibration, measure or "cosine", minimum, maximum,
                                           backend, iterations, output, quiet)))
        return
    if any(v is not None for v in onnx_options.values()):
        given = next(k for k, v in onnx_options.items() if v is not None)
        raise CdlInputError(f"{given} applies to your own ONNX model: give --onnx MODEL.onnx with it")
    if model is None:
        raise CdlInputError("give MODEL (a LeNet-5 state_dict), or --onnx MODEL.onnx --calibration DATA.npz")

    if not 0 <= tolerance <= 100:
        raise CdlInputError("--tolerance is in percentage points, between 0 and 100")
    records, evaluate = lenet_task(model)
    result = search(records, evaluate, method=method, tolerance=tolerance / 100.0, backend=backend,
                    iterations=iterations)
    if not quiet:
        for t in result.trials:
            click.echo(f"  rel_step {t.params['rel_step']:.4g} lambda {t.params['lambda']:.4g}: "
                       f"{t.bits_per_param:.3f} bits/param, accuracy {t.score:.4f} {'ok' if t.ok else '--'}", err=True)
    out = result.as_dict()
    if result.best is not None and output:
        best = result.best.params
        encode_records(records, output, EncodeOptions(make_quantizer(method, best["rel_step"], best["lambda"]),
                                                      backend, (), True))
        out["output"] = output
    click.echo(json.dumps(out))
    if result.best is None:
        raise CdlInputError(f"no setting keeps the accuracy within {tolerance} points of {result.baseline:.4f}")


def _search_onnx(model, onnx_path, calibration, measure, minimum, maximum, backend, iterations, output, quiet):
    from click.core import ParameterSource

    from cdlcodec.errors import CdlInputError
    from cdlcodec.fidelity.measures import Target, higher_is_better
    from cdlcodec.fidelity.onnx_search import search_onnx

    ctx = click.get_current_context()
    for name, flag in (("task", "--task"), ("method", "--method"), ("tolerance", "--tolerance")):
        if ctx.get_parameter_source(name) not in (None, ParameterSource.DEFAULT):
            raise CdlInputError(f"{flag} does not apply to --onnx (it searches for a fidelity target: "
                                "--measure with --min or --max)")
    if model is not None:
        raise CdlInputError("give the model once: --onnx MODEL.onnx takes the place of MODEL")
    if calibration is None:
        raise CdlInputError("--onnx needs --calibration DATA.npz (inputs named after the graph inputs, samples first)")
    Target(measure, 1.0)  # an unknown measure fails before the bound is checked
    wanted, wrong = ("--min", "--max") if higher_is_better(measure) else ("--max", "--min")
    value, other = (minimum, maximum) if wanted == "--min" else (maximum, minimum)
    if other is not None or value is None:
        raise CdlInputError(f"the {measure} measure needs {wanted} VALUE (and no {wrong})")
    log = None if quiet else (lambda msg: click.echo(f"  {msg}", err=True))
    return search_onnx(onnx_path, calibration, Target(measure, value), output, backend=backend,
                       iterations=iterations, log=log)
