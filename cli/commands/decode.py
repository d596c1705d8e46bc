"""`cdlcodec decode`: .cdl container -> model file."""
import click


@click.command("decode")
@click.argument("container", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Output model: .pt/.pth (state_dict) or .safetensors.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary.")
def command(container, output, quiet):
    """Decode CONTAINER back into a model file with the original names, shapes and dtypes."""
    from ...codec import decode_file

    model = decode_file(container, output, quiet=quiet)
    if not quiet:
        click.echo(f"{container} -> {output}: {len(model.records)} tensors, "
                   f"{sum(r.numel for r in model.records):,} params")
