"""`cdlcodec verify`: check .cdl containers completely without writing anything."""
import click


@click.command("verify")
@click.argument("containers", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("--quick", is_flag=True,
              help="Skip decoding the payloads: structure, checksums, limits, quantization parameters "
                   "and sections only.")
@click.pass_context
def command(ctx, containers, quick):
    """Check each CONTAINER: every checksum, every limit, the payload sizes against the level counts,
    the quantization parameters, the sections (ONNX, JSON, torch.export) and, unless --quick, that
    every payload decodes. Prints 'FILE: OK (...)' per good file; exit status 2 if any file fails."""
    from cdlcodec.errors import CdlError
    from cdlcodec.verify import verify_container

    failed = 0
    for path in containers:
        try:
            report = verify_container(path, quick=quick)
        except CdlError as exc:
            if len(containers) == 1:
                raise
            click.echo(f"cdlcodec: error: {path}: {exc}", err=True)
            failed += 1
            continue
        click.echo(report.summary())
    if failed:
        ctx.exit(2)
