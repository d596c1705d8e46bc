"""`cdlcodec concat`: part containers -> one .cdl container, without re-coding."""
import click


@click.command("concat")
@click.argument("parts", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Output .cdl file.")
@click.option("--metadata", "chosen", multiple=True, metavar="KEY=VALUE",
              help="Metadata value to use where parts disagree (or to add); repeatable.")
@click.option("-q", "--quiet", is_flag=True, help="No summary.")
def command(parts, output, chosen, quiet):
    """Join PARTS (containers of disjoint tensor groups, e.g. written by separate tasks or machines)
    into one container: tensors and sections are copied as they are coded, in the order given,
    with their checksums checked on the way (docs/scale.md)."""
    from cdlcodec.errors import CdlInputError
    from cdlcodec.formats import concat_containers

    metadata = {}
    for item in chosen:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CdlInputError(f"--metadata takes KEY=VALUE, got {item!r}")
        metadata[key] = value
    result = concat_containers(parts, output, metadata=metadata)
    if not quiet:
        click.echo(f"{result.num_parts} parts -> {output}: {result.num_tensors} tensors, "
                   f"{result.num_sections} sections, {result.size:,} bytes")
