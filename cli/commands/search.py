"""`cdlcodec search`: the quantizer setting with the fewest bits within an accuracy tolerance."""
import click


@click.command("search")
@click.argument("model", type=click.Path(dir_okay=False))
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
@click.option("-q", "--quiet", is_flag=True, help="Only the final JSON line.")
def command(model, task, method, tolerance, backend, iterations, output, quiet):
    """Bisection search (DeepCABAC's grid search, with bisection) over the step and lambda.

    Prints one JSON line: the baseline accuracy, the best setting, its bits per parameter and accuracy.
    """
    import json

    from cdlcodec.codec import EncodeOptions, encode_records
    from cdlcodec.errors import CdlInputError
    from cdlcodec.search import lenet_task, make_quantizer, search

    if not 0 <= tolerance <= 100:
        raise CdlInputError("--tolerance is in percentage points, between 0 and 100")
    if iterations < 1:
        raise CdlInputError("--iterations must be at least 1")
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
