"""`cdlcodec info`: what a .cdl container holds, as a table or JSON."""
import click


@click.command("info")
@click.argument("container", type=click.Path(dir_okay=False))
@click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON instead of a table.")
def command(container, as_json):
    """Show the format version, sizes and per-tensor coding of CONTAINER (validates its structure)."""
    import json

    from cdlcodec.codec import container_summary

    info = container_summary(container)
    if as_json:
        click.echo(json.dumps(info, indent=2))
        return
    click.echo(f"{info['path']}: .cdl format {info['format_version']}, {info['total_bytes']:,} bytes, "
               f"{info['num_params']:,} params ({info['num_quantized_params']:,} quantized), "
               f"{info['bits_per_param']:.3f} bits/param")
    for key, value in info["metadata"].items():
        click.echo(f"  {key}: {value if len(value) < 80 else value[:77] + '...'}")
    for s in info["sections"]:
        click.echo(f"  section {s['name']} ({s['kind']}): {s['bytes']:,} bytes")
    rows = [(t["name"], "x".join(map(str, t["shape"])) or "scalar", t["dtype"], t["backend"],
             _step_text(t), f"{t['bytes']:,}", f"{t['bits_per_param']:.3f}") for t in info["tensors"]]
    head = ("tensor", "shape", "dtype", "backend", "step", "bytes", "bits/param")
    widths = [max(len(r[i]) for r in [head, *rows]) for i in range(len(head))]
    for row in [head, *rows]:
        click.echo("  " + "  ".join(c.ljust(w) if i < 4 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))


def _step_text(tensor: dict) -> str:
    """One step, "per-channel (N) min-max", or "-" for tensors stored exactly."""
    if tensor["step"] is not None:
        return f"{tensor['step']:.4g}"
    steps = tensor.get("steps")
    if steps:
        return f"per-channel ({steps['count']}) {steps['min']:.4g}-{steps['max']:.4g}"
    return "-"
