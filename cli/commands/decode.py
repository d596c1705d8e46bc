"""`cdlcodec decode`: .cdl container -> model file."""
import click

from cdlcodec.cli.flags import progress_option


@click.command("decode")
@click.argument("container", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(),
              help="Output model: .pt/.pth (state_dict), .safetensors, .onnx (needs a graph in the "
                   "container), .pt2 (needs a torch.export program in the container), or a folder (a new or "
                   "empty one, or a name without extension) for a container encoded from a sharded "
                   "safetensors folder: the same shard files, index and carried files.")
@click.option("--weights", type=click.Choice(["float", "qdq"]), default=None,
              help="ONNX output only: float initializers (default) or integer initializers + "
                   "DequantizeLinear (the narrowest of int4/int8/int16/int32 that holds the levels; the "
                   "model keeps its opset unless int4/int16 levels need opset 21, which is said on stderr).")
@click.option("--no-int4", is_flag=True, help="With --weights qdq: never use int4 (int8 where the levels fit).")
@click.option("--keep-opset", is_flag=True,
              help="With --weights qdq: never change the model's opset (no int4; int16 levels as int16 -> Cast -> "
                   "Mul, the same values).")
@click.option("--matmul-nbits", is_flag=True,
              help="With --weights qdq: MatMul weights that fit 4/8 bits become onnxruntime's com.microsoft "
                   "MatMulNBits with float activations (runs only in onnxruntime; same outputs under its "
                   "default session options, integer kernel).")
@click.option("--matmul-integer", is_flag=True,
              help="With --weights qdq: MatMul weights that fit int8 become DynamicQuantizeLinear -> MatMulInteger "
                   "(the coded int8 weights; activations quantized to uint8 on every run, so outputs differ from "
                   "the float decode by that rounding; MiniLM 1.7-1.9x faster than fp32 in onnxruntime on x86).")
@click.option("--threads", type=click.IntRange(min=1), default=None, metavar="N",
              help="Tensors coded at once (default: every core). The output is the same for any N; memory "
                   "holds about N+1 tensors, never the whole model.")
@click.option("--only", multiple=True, metavar="GLOB",
              help="Decode only the tensors whose name matches GLOB (repeatable; e.g. 'model.layers.3.*'), reading "
                   "just their payloads, to a .safetensors or .pt file; says how many bytes were read.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary.")
@progress_option
def command(container, output, weights, no_int4, keep_opset, matmul_nbits, matmul_integer, only, quiet, threads):
    """Decode CONTAINER back into a model file with the original names, shapes and dtypes."""
    import warnings

    from cdlcodec.api import decode
    from cdlcodec.io.onnx_writer import OnnxOutputNote

    options = {"weights": weights}
    if no_int4:
        options["int4"] = False
    if keep_opset:
        options["keep_opset"] = True
    if matmul_nbits:
        options["matmul_nbits"] = True
    if matmul_integer:
        options["matmul_integer"] = True
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", OnnxOutputNote)
        model = decode(container, output, quiet=quiet, only=only, threads=threads, **options)
    for warning in caught:  # notes are said even with -q: they describe what was written
        if issubclass(warning.category, OnnxOutputNote):
            click.echo(f"cdlcodec: note: {warning.message}", err=True)
        else:
            warnings.showwarning(warning.message, warning.category, warning.filename, warning.lineno)
    if not quiet:
        click.echo(f"{container} -> {output}: {len(model.records)} tensors, "
                   f"{sum(r.numel for r in model.records):,} params")
        if only:
            click.echo(f"read {model.bytes_read:,} of {model.file_size:,} bytes "
                       f"({100 * model.bytes_read / max(model.file_size, 1):.1f} %)")
