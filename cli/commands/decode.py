"""`cdlcodec decode`: .cdl container -> model file."""
import click


@click.command("decode")
@click.argument("container", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False),
              help="Output model: .pt/.pth (state_dict), .safetensors, .onnx (needs a graph in the "
                   "container) or .pt2 (needs a torch.export program in the container).")
@click.option("--weights", type=click.Choice(["float", "qdq"]), default=None,
              help="ONNX output only: float initializers (default) or integer initializers + "
                   "DequantizeLinear (int4 with opset 21 where levels fit in 4 bits, else int8/int16/int32).")
@click.option("--no-int4", is_flag=True, help="With --weights qdq: never use int4 (keeps the model's opset).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary.")
def command(container, output, weights, no_int4, quiet):
    """Decode CONTAINER back into a model file with the original names, shapes and dtypes."""
    from cdlcodec.api import decode

    options = {"weights": weights}
    if no_int4:
        options["int4"] = False
    model = decode(container, output, quiet=quiet, **options)
    if not quiet:
        click.echo(f"{container} -> {output}: {len(model.records)} tensors, "
                   f"{sum(r.numel for r in model.records):,} params")
