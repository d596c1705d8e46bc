"""`cdlcodec encode`: model file -> .cdl container."""
import click

from cdlcodec.cli.flags import parameters_as_flags, progress_option

# Library parameters (quantizers.base.parameter_error) as this command's flags, for error messages.
FLAGS = {"rel_step": "--rel-step", "step": "--step", "bits": "--bits", "lam": "--lambda",
         "granularity": "--granularity", "mode": "--cpmf", "cdl_quantizer": "--cpmf", "seed": "--seed",
         "arch": "--arch", "grid": "--deploy"}


@click.command("encode")
@click.argument("model", type=click.Path())  # a folder: a sharded safetensors checkpoint
@click.option("-o", "--output", required=True, type=click.Path(dir_okay=False), help="Output .cdl file.")
@click.option("--rel-step", type=float, default=None,
              help="Step = R x standard deviation of each tensor (default 0.1).")
@click.option("--step", type=float, default=None, help="One absolute step for every quantized tensor.")
@click.option("--bits", type=int, default=None, help="Symmetric quantization with levels that fit in B signed bits.")
@click.option("--deploy", type=click.Choice(["int8", "int4"]), default=None,
              help="Put every quantized weight on a per-output-channel symmetric int8 (int4) grid, scales chosen "
                   "for least error, so that decode --weights qdq writes int8 (int4) weights exact to the coded "
                   "ones. With a fidelity target (the ONNX default) the search picks steps on that grid.")
@click.option("--backend", default="auto", show_default=True,
              help="Lossless backend: auto (smallest per tensor), raw, huffman, cabac.")
@click.option("--keep", multiple=True, metavar="GLOB",
              help="Store tensors whose name matches GLOB losslessly (repeatable; a GLOB that matches no "
                   "tensor is named in a warning).")
@click.option("--arch", default=None, metavar="NAME",
              help="The state_dict is this registered architecture (lenet5, resnet20, resnet18, mobilenetv2, bert; "
                   "torchvision / transformers key names, sizes read from the shapes, options as bert:heads=12): "
                   "checked at encode time, its ONNX graph is stored so that decode -o model.onnx and "
                   "cdlcodec.load work.")
@click.option("--lambda", "lam", type=float, default=None,
              help="Rate-distortion quantization (DeepCABAC eq. 11): per weight the level minimising "
                   "(w - k*step)^2/step^2 + LAMBDA * bits(k), bits from the backend's rate model. 0 = nearest.")
@click.option("--granularity", type=click.Choice(["tensor", "channel"]), default="tensor", show_default=True,
              help="One step per tensor or one per output channel (axis 0).")
@click.option("--trellis", is_flag=True,
              help="Dependent (trellis-coded) quantization, 8 states; its rate term is --lambda (default 0: "
                   "the trellis levels nearest to the weights).")
@click.option("--cpmf", type=click.Choice(["argmax", "sample"]), default=None,
              help="CDL checkpoints: most probable level (default) or a draw from the learned CPMF. "
                   "Refused for other models; the step options are refused for CDL checkpoints.")
@click.option("--seed", type=int, default=None, help="Seed for --cpmf sample (default 0).")
@click.option("--target-cosine", type=float, default=None, metavar="C",
              help="Smallest file whose decoded model keeps mean output cosine >= C on the calibration "
                   "inputs, checked by running it (models with a graph). Default for ONNX input: 0.999.")
@click.option("--target-agreement", type=float, default=None, metavar="A",
              help="Like --target-cosine, for classifiers: top-1 agreement with the original >= A.")
@click.option("--target-rel-mse", type=float, default=None, metavar="M",
              help="Like --target-cosine: relative output MSE (sum |dy|^2 / sum |y|^2) <= M.")
@click.option("--calibration", type=click.Path(dir_okay=False), default=None, metavar="DATA.npz",
              help="Inputs for the fidelity check: one array per graph input (or .pt2 program input), named "
                   "after it, samples first. Without it inputs are generated from the graph's declared shapes "
                   "(weaker; a .pt2 program needs it).")
@click.option("--no-gptq", is_flag=True, help="With a fidelity target: round to nearest instead of "
                                              "error-compensating (GPTQ) rounding of MatMul/Gemm weights.")
@click.option("--same-decisions", is_flag=True,
              help="With a fidelity target: also every calibration decision is kept with at least half its "
                   "margin (argmax of softmax outputs or logits, side of 0.5 of probabilities, nearest other "
                   "sample of embeddings; docs/fidelity.md). Part of the default target.")
@click.option("--lossless", is_flag=True,
              help="Quantize nothing: every tensor is stored exactly, bit for bit (float tensors with the exact "
                   "float coder where it is smaller, docs/backends.md).")
@click.option("--threads", type=click.IntRange(min=1), default=None, metavar="N",
              help="Tensors coded at once (default: every core). The output is the same for any N; memory "
                   "holds about N+1 tensors, never the whole model.")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar and no summary.")
@progress_option
def command(model, output, rel_step, step, bits, backend, keep, arch, lam, granularity, trellis, cpmf, seed,
            target_cosine, target_agreement, target_rel_mse, calibration, no_gptq, same_decisions, lossless, quiet,
            deploy, threads):
    """Quantize and entropy-code MODEL (.onnx, .pt/.pth state_dict or checkpoint, .safetensors, .pt2, or a sharded safetensors folder) into a .cdl file.

    Tensors with two or more dimensions are quantized to integers k = round(w / step); 1-D tensors
    (biases, norms) and integer tensors are stored losslessly. --lambda, --granularity channel and
    --trellis choose the levels by rate-distortion (docs/quantization.md). CDL / R-CDL checkpoints
    (from `cdlcodec train`) are recognised and quantized with their learned steps (--cpmf).

    Models with a graph (ONNX) are by default encoded to a fidelity target: per-tensor steps chosen
    by output sensitivity so that the decoded model, run with onnxruntime, keeps mean output cosine
    >= 0.999 and every decision on the calibration inputs with half its margin (docs/fidelity.md); weights, biases and
    norms are told apart by the graph, not by their rank. A bare state_dict has nothing to run: it gets the conservative
    data-free default (per output channel, step 0.02 x std) and the result is reported as unverified.
    """
    import os

    from cdlcodec.codec import EncodeOptions
    from cdlcodec.errors import CdlInputError
    from cdlcodec.quantizers import make

    step_rule = {"rel_step": rel_step, "step": step, "bits": bits}
    step_options = [FLAGS[k] for k, v in step_rule.items() if v is not None] + \
        (["--lambda"] if lam is not None else []) + (["--trellis"] if trellis else []) + \
        (["--granularity"] if granularity != "tensor" else [])
    # "quantizer" in a library error is whichever of these the user gave (a CDL checkpoint refuses them)
    flags = {**FLAGS, "quantizer": " and ".join(step_options + (["--deploy"] if deploy else []))}
    if seed is not None and cpmf != "sample":
        raise CdlInputError("--seed applies to --cpmf sample only")
    with parameters_as_flags(flags):
        quantizer = None  # no step option: the model's default (uniform, or a CDL checkpoint's own)
        if deploy is not None:
            _check_deploy(deploy, lam, trellis, lossless)
            if step_options or arch is not None or cpmf is not None:  # else the fidelity search takes the grid
                quantizer = make("deploy", grid=deploy, **step_rule)
        elif trellis:
            quantizer = make("trellis", lam=lam or 0.0, granularity=granularity, **step_rule)
        elif lam is not None or granularity != "tensor":
            quantizer = make("rd", lam=lam or 0.0, granularity=granularity, **step_rule)
        elif step_options:
            quantizer = make("uniform", **step_rule)
        cdl_quantizer = None if cpmf is None else make("cpmf", mode=cpmf, seed=seed or 0)
    options = EncodeOptions(quantizer, backend, tuple(keep), quiet, cdl_quantizer, lossless=lossless, threads=threads)
    if lossless:  # nothing is quantized, so nothing that chooses or checks quantization applies
        given = step_options + [flag for flag, value in (
            ("--cpmf", cpmf), ("--target-cosine", target_cosine), ("--target-agreement", target_agreement),
            ("--target-rel-mse", target_rel_mse), ("--calibration", calibration), ("--no-gptq", no_gptq),
            ("--same-decisions", same_decisions)) if value is not None and value is not False]
        if given:
            raise CdlInputError(f"--lossless quantizes nothing; drop {', '.join(given)}")
    targets = [(flag, measure, value) for flag, measure, value in (
        ("--target-cosine", "cosine", target_cosine), ("--target-agreement", "agreement", target_agreement),
        ("--target-rel-mse", "rel_mse", target_rel_mse)) if value is not None]
    if len(targets) > 1:
        raise CdlInputError(f"choose one fidelity target (got {' and '.join(t[0] for t in targets)})")
    if targets and step_options:
        raise CdlInputError(f"{targets[0][0]} chooses the steps itself; drop {', '.join(step_options)}")
    if (calibration or no_gptq or same_decisions) and not targets and step_options:
        raise CdlInputError("--calibration, --no-gptq and --same-decisions apply to fidelity targets, not to "
                            f"{', '.join(step_options)}")
    with parameters_as_flags(flags):
        summary = _encode(model, output, options, arch, targets, calibration, no_gptq, same_decisions, quiet,
                          fidelity=not lossless and (bool(targets) or (arch is None and not step_options and cpmf is None)),
                          deploy=deploy)
    for pattern in summary.unmatched_keep:
        click.echo(f"cdlcodec: warning: --keep {pattern!r} matches no tensor of {model}", err=True)
    for note in summary.notes:
        click.echo(f"cdlcodec: note: {note}", err=True)
    if not quiet and summary.report:
        from cdlcodec.quantizers.cpmf import format_report

        click.echo(f"CDL checkpoint ({summary.report['mode']}, cpmf={summary.report['cpmf']}): coded bits "
                   "per layer next to the training entropy H(w_l) (eq. 26)")
        click.echo(format_report(summary.report))
    if not quiet:  # sizes as docs/measures.md defines them: the input file, the container, all parameters
        original = os.path.getsize(model)
        click.echo(f"{model} -> {output}: {original:,} -> {summary.coded_bytes:,} bytes "
                   f"({original / max(summary.coded_bytes, 1):.1f}x), "
                   f"{summary.bits_per_param:.3f} bits/param, {summary.num_params:,} params "
                   f"({summary.num_quantized_params:,} quantized) in {summary.seconds:.2f} s")


def _encode(model, output, options, arch, targets, calibration, no_gptq, same_decisions, quiet, fidelity: bool,
            deploy=None):
    """Encode to a fidelity target (or the default one), with --arch's graph, or as the options say."""
    if fidelity:
        from cdlcodec.fidelity.encode import STORED_EXACTLY, UNVERIFIED, encode_path

        summary, report = encode_path(model, output, options, targets[0][1:] if targets else None, calibration,
                                      gptq=not no_gptq, explicit=bool(targets or calibration),
                                      same_decisions=same_decisions, deploy=deploy)
        if not quiet and report is not None:
            click.echo(report.summary_line())
        elif not quiet and not summary.report and not any(UNVERIFIED in note or STORED_EXACTLY in note
                                                          for note in summary.notes):
            from cdlcodec.fidelity.encode import onnxruntime_available

            why, fix = "no graph to run the model with (a state_dict or .pt2 file)", "encode the ONNX model"
            if model.endswith(".onnx") and not onnxruntime_available():  # a core install: nothing runs the graph
                why, fix = "onnxruntime is not installed here", 'pip install "cdlcodec[onnx]"'
            click.echo(f"cdlcodec: note: {why}: {UNVERIFIED}; {fix} for a verified fidelity", err=True)
        return summary
    from cdlcodec.api import encode_with_options

    return encode_with_options(model, output, options, arch=arch)


def _check_deploy(deploy, lam, trellis, lossless):
    """--deploy rounds to the nearest level of its grid; say what does not combine with it."""
    from cdlcodec.errors import CdlInputError

    for flag, given in (("--lambda", lam is not None), ("--trellis", trellis), ("--lossless", lossless)):
        if given:
            raise CdlInputError(f"--deploy {deploy} rounds each weight to the nearest level of its grid; drop {flag}")
