"""`cdlcodec gate`: compare a finished sweep (results.json) with the committed baseline."""
import click


@click.command("gate")
@click.argument("results_path", metavar="RESULTS", type=click.Path(dir_okay=False, exists=True))
@click.option("-b", "--baseline", "baseline_path", default="benchmarks/rate_accuracy_baseline.json", show_default=True,
              type=click.Path(dir_okay=False, exists=True), help="The baseline to compare with.")
@click.option("--bits-tolerance", type=click.FloatRange(0, 1), default=None,
              help="Allowed relative growth of bits per weight / per parameter (default: the baseline's, 0.02).")
@click.option("--accuracy-tolerance", type=click.FloatRange(0, 100), default=None,
              help="Allowed accuracy drop in percentage points (default: the baseline's, 0.5).")
@click.option("-v", "--verbose", is_flag=True, help="Also list the points that are unchanged.")
def command(results_path, baseline_path, bits_tolerance, accuracy_tolerance, verbose):
    """Fail (exit status 1) if any reference point of the baseline regressed in RESULTS.

    RESULTS is the results.json of `cdlcodec eval`. A point regresses when its bits per weight or
    bits per parameter grow beyond the tolerance, its accuracy drops beyond the tolerance, or it is
    missing or failed. Prints a readable diff either way.
    """
    import sys

    from cdlcodec.evaluation import gate

    tolerances = {}
    if bits_tolerance is not None:
        tolerances["bits_rel"] = bits_tolerance
    if accuracy_tolerance is not None:
        tolerances["accuracy_points"] = accuracy_tolerance
    outcome = gate.compare(gate.read_json(results_path, "results file"), gate.read_json(baseline_path, "baseline"),
                           tolerances)
    click.echo(outcome.text(verbose), nl=False)
    if not outcome.passed:
        sys.exit(1)  # not click.exceptions.Exit: cdlcodec.cli.main drops its code in non-standalone mode
