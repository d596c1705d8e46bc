"""Turn an ordinary model into a CDL / R-CDL model, and helpers that act on all its quantizers."""
from __future__ import annotations

from ..optional import require
require("torch", "CDL training")
import warnings
from dataclasses import dataclass, field

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

from .layers import (ActivationQuantizer, CDLConv1d, CDLConv2d, CDLLinear, MIN_POSITIVE, WEIGHT_LAYERS,
                     _check_mode, initial_step, mse_step, scaled_sharpness)


def _set_submodule(model: nn.Module, path: str, module: nn.Module) -> None:
    parent_path, _, name = path.rpartition(".")
    parent = model.get_submodule(parent_path) if parent_path else model
    setattr(parent, name, module)


class BoundedActivationQuantizer(ActivationQuantizer):
    """Q(min(relu(x), upper)): replaces ReLU6 / hardtanh(0, upper), whose cap the plain quantizer's
    alphabet [0, (2^b-1)·s] need not reproduce. No state beyond ActivationQuantizer's: `upper` is
    part of the architecture and re-derived when a checkpoint is rebuilt."""

    def __init__(self, bits: int = 4, *, upper: float, **kwargs):
        super().__init__(bits, **kwargs)
        self.upper = float(upper)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return super().forward(torch.clamp(x, max=self.upper))   # relu(min(x, u)) = min(relu(x), u)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", upper={self.upper}"


# Unsigned activations (the paper's alphabet B starts at 0): these become activation quantizers.
# Signed ones (GELU, SiLU, LeakyReLU, tanh, ...) stay float and are listed in the report: B has no
# negative levels, and a signed alphabet is not part of the method.
_RELU_FUNCTIONS = {F.relu, torch.relu, torch.relu_, F.relu_}
_RELU6_FUNCTIONS = {F.relu6}
_HARDTANH_FUNCTIONS = {F.hardtanh, F.hardtanh_}
_RELU_METHODS = {"relu", "relu_"}
_SIGNED_MODULES = (nn.GELU, nn.SiLU, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.Tanh, nn.Mish,
                   nn.Hardswish, nn.PReLU, nn.Softplus, nn.Sigmoid, nn.Hardsigmoid, nn.Tanhshrink)
_SIGNED_FUNCTIONS = {F.gelu, F.silu, F.leaky_relu, F.elu, F.selu, F.celu, F.mish, F.hardswish,
                     torch.tanh, F.tanh, torch.sigmoid, F.sigmoid, F.softplus, F.hardsigmoid, F.prelu}
_SIGNED_METHODS = {"tanh", "sigmoid"}
_FLOAT_WEIGHT_FUNCTIONS = {F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose2d}
_CONV_TYPES = (nn.Conv1d, nn.Conv2d)


@dataclass
class ConversionReport:
    """What `convert` did: `converted.cdl_report` (printable with `str`).

    weight_layers: module paths that became CDL layers. activations: (quantizer path, what it
    replaced), e.g. ("layer1.0.act_relu", "F.relu in layer1.0"). left_float: (where, what) that
    stays float — signed activations, functional convolutions / linears, Conv3d / transposed
    convolutions. traced: whether torch.fx traced the forward; when not, `trace_error` says why
    and only activation modules were replaced. rewritten: the forward was rewritten (functional
    activations, a module called at several places): the returned model is a torch.fx.GraphModule.
    """
    weight_layers: list = field(default_factory=list)
    activations: list = field(default_factory=list)
    left_float: list = field(default_factory=list)
    traced: bool = False
    trace_error: str | None = None
    rewritten: bool = False

    def __str__(self) -> str:
        lines = [f"CDL conversion: {len(self.weight_layers)} weight layers, {len(self.activations)} "
                 f"activation quantizers, {len(self.left_float)} left float"
                 + ("" if self.traced else f" (torch.fx could not trace the forward: {self.trace_error};"
                    " only activation modules were replaced)")]
        lines += [f"  quantized activation {path}: {what}" for path, what in self.activations]
        lines += [f"  left float {where}: {what}" for where, what in self.left_float]
        return "\n".join(lines)


def _activation_kind(module: nn.Module) -> tuple[str, float | None] | None:
    """("relu", None) / ("relu6", 6.0) / ("hardtanh", max) for the unsigned activations we quantize."""
    if isinstance(module, nn.ReLU):
        return "relu", None
    if isinstance(module, nn.ReLU6):
        return "relu6", 6.0
    if isinstance(module, nn.Hardtanh) and module.min_val == 0 and module.max_val > 0:
        return "hardtanh", float(module.max_val)
    return None


def _function_kind(node) -> tuple[str, float | None, bool] | None:
    """(kind, upper, in place) of an fx call_function / call_method node that is an unsigned activation."""
    args, kwargs = node.args, node.kwargs
    if node.op == "call_method":
        if node.target in _RELU_METHODS and len(args) == 1 and not kwargs:
            return "relu", None, node.target.endswith("_")
        return None
    if node.op != "call_function":
        return None
    target = node.target
    inplace = bool(kwargs.get("inplace", False)) or target in (torch.relu_, F.relu_, F.hardtanh_)
    if target in _RELU_FUNCTIONS:
        if len(args) > 1:
            inplace = bool(args[1])
        return "relu", None, inplace
    if target in _RELU6_FUNCTIONS:
        if len(args) > 1:
            inplace = bool(args[1])
        return "relu6", 6.0, inplace
    if target in _HARDTANH_FUNCTIONS:
        lo = args[1] if len(args) > 1 else kwargs.get("min_val", -1.0)
        hi = args[2] if len(args) > 2 else kwargs.get("max_val", 1.0)
        if len(args) > 3:
            inplace = bool(args[3])
        if isinstance(lo, (int, float)) and isinstance(hi, (int, float)) and lo == 0 and hi > 0:
            return "hardtanh", float(hi), inplace
    return None


def _function_name(node) -> str:
    if node.op == "call_method":
        return f"Tensor.{node.target}"
    fn = node.target
    module = {"torch.nn.functional": "F", "torch._C._nn": "F", "torch": "torch"}.get(
        getattr(fn, "__module__", None) or "torch", getattr(fn, "__module__", "?"))
    return f"{module}.{getattr(fn, '__name__', str(fn))}"


def _owner(node) -> str:
    """Module path whose forward made the call (fx records the stack of modules being traced)."""
    stack = node.meta.get("nn_module_stack") or {}
    return next(reversed(stack.values()))[0] if stack else ""


def _fresh_path(model: nn.Module, owner: str, name: str, taken: set) -> str:
    base = f"{owner}.{name}" if owner else name
    path, n = base, 0
    while path in taken:
        n += 1
        path = f"{base}_{n}"
    taken.add(path)
    return path


def _new_quantizer(kind: str, upper: float | None, bits: int, mode: str, beta0: float) -> ActivationQuantizer:
    if upper is None:
        return ActivationQuantizer(bits, mode=mode, beta0=beta0)
    return BoundedActivationQuantizer(bits, upper=upper, mode=mode, beta0=beta0)


def _trace(model: nn.Module):
    try:
        return torch.fx.symbolic_trace(model), None
    except Exception as exc:  # data-dependent control flow and the like: fall back to modules
        return None, f"{type(exc).__name__}: {' '.join(str(exc).split())[:200]}"


def convert(model: nn.Module, bits: int = 4, first_last_bits: int | None = 8, mode: str = "rcdl", *,
            alpha0: float = 500.0, beta0: float = 500.0, activation_bits: int | None = None,
            quantize_activations: bool = True) -> nn.Module:
    """Make `model` a CDL / R-CDL model and return it. **Use the returned module.**

    Every nn.Linear / nn.Conv1d / nn.Conv2d becomes its CDL version, in place (biases and
    BatchNorm stay float). Unsigned activations become ActivationQuantizers: nn.ReLU, nn.ReLU6,
    nn.Hardtanh(0, m), and, found by torch.fx symbolic tracing, F.relu / torch.relu / relu_ /
    Tensor.relu / F.relu6 / F.hardtanh(x, 0, m) in `forward` (ReLU6 and hardtanh keep their cap:
    BoundedActivationQuantizer). Signed activations (GELU, SiLU, LeakyReLU, tanh, ...) stay float:
    the paper's activation alphabet is unsigned. A module used once is replaced in place; functional
    activations and a module called at several places (each call gets its own quantizer) need the
    forward rewritten, and then the result is a torch.fx.GraphModule sharing the parameters and
    submodules (same state_dict names); `model`'s own forward still calls the float functional
    activations, so keep using the returned module. When the forward cannot
    be traced, only activation modules are replaced (a shared one gives one shared quantizer) and a
    warning says so. `converted.cdl_report` (ConversionReport) lists what was converted and what not.

    The first and the last weight layer (in registration order) get `first_last_bits` (8 in the
    paper, Section VI-B-2; None = same as `bits`). Activations use `activation_bits` (default
    `bits`). α0 = β0 = 500 and q0 = 2·mean|w|/sqrt(2^(b-1)) as in Section VI-B-3; call `calibrate`
    with a first batch to set s0.
    """
    _check_mode(mode)
    activation_bits = bits if activation_bits is None else activation_bits
    report = ConversionReport()
    graph_module, report.trace_error = _trace(model)
    report.traced = graph_module is not None

    weight_paths = [name for name, m in model.named_modules()
                    if isinstance(m, (nn.Linear,) + _CONV_TYPES) and not isinstance(m, WEIGHT_LAYERS)]
    for i, path in enumerate(weight_paths):
        layer_bits = bits
        if first_last_bits is not None and i in (0, len(weight_paths) - 1):
            layer_bits = first_last_bits
        old = model.get_submodule(path)
        cls = CDLLinear if isinstance(old, nn.Linear) else CDLConv1d if isinstance(old, nn.Conv1d) else CDLConv2d
        _set_submodule(model, path, cls.from_module(old, bits=layer_bits, mode=mode, alpha0=alpha0))
        report.weight_layers.append(path)
    for name, m in model.named_modules():
        if isinstance(m, (nn.Conv3d, nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)):
            report.left_float.append((name, type(m).__name__))

    if graph_module is None:
        if quantize_activations:
            _replace_activation_modules(model, report, activation_bits, mode, beta0)
        for name, m in model.named_modules():
            if isinstance(m, _SIGNED_MODULES):
                report.left_float.append((name, f"{type(m).__name__} (signed activation)"))
        warnings.warn(f"cdlcodec.cdl.convert: {report.trace_error}; torch.fx cannot trace the forward, so only "
                      "activation modules were replaced (functional activations stay float)", stacklevel=2)
    else:
        model = _convert_traced(model, graph_module, report, activation_bits, mode, beta0,
                                quantize_activations)
    model.cdl_report = report
    return model


def _replace_activation_modules(model, report, bits, mode, beta0) -> None:
    for path, m in list(model.named_modules()):
        kind = _activation_kind(m)
        if kind is not None:
            _set_submodule(model, path, _new_quantizer(kind[0], kind[1], bits, mode, beta0))
            report.activations.append((path, f"{type(m).__name__} module"))


def _convert_traced(model, gm, report, bits, mode, beta0, quantize_activations) -> nn.Module:
    """Replace the activations the fx graph calls; rewrite the graph only where a module cannot do."""
    nodes = list(gm.graph.nodes)
    order = {node: i for i, node in enumerate(nodes)}
    calls: dict[str, list] = {}
    for node in nodes:
        if node.op == "call_module":
            calls.setdefault(node.target, []).append(node)
    taken = {name for name, _ in model.named_modules()}
    originals = dict(model.named_modules())   # before the first call of a shared module replaces it
    rewrites = []   # (node, new quantizer path, in place)
    for node in nodes:
        if node.op == "call_module":
            m = originals[node.target]
            kind = _activation_kind(m)
            if kind is None:
                if isinstance(m, _SIGNED_MODULES):
                    report.left_float.append((node.target, f"{type(m).__name__} (signed activation)"))
                continue
            if not quantize_activations:
                continue
            uses = calls[node.target]
            inplace = bool(getattr(m, "inplace", False))
            if len(uses) == 1:
                _set_submodule(model, node.target, _new_quantizer(kind[0], kind[1], bits, mode, beta0))
                report.activations.append((node.target, f"{type(m).__name__} module"))
                continue
            first = uses[0] is node
            path = node.target if first else _fresh_path(model, node.target.rpartition(".")[0],
                                                          node.target.rpartition(".")[2], taken)
            q = _new_quantizer(kind[0], kind[1], bits, mode, beta0)
            if first:
                _set_submodule(model, path, q)
            report.activations.append((path, f"{type(m).__name__} module {node.target!r}, call "
                                             f"{uses.index(node) + 1} of {len(uses)}"))
            rewrites.append((node, path, q, inplace))
        elif node.op in ("call_function", "call_method"):
            kind = _function_kind(node)
            if kind is None:
                if node.target in _SIGNED_FUNCTIONS or (node.op == "call_method" and node.target in _SIGNED_METHODS):
                    report.left_float.append((_owner(node) or "forward", f"{_function_name(node)} (signed activation)"))
                elif node.target in _FLOAT_WEIGHT_FUNCTIONS:
                    report.left_float.append((_owner(node) or "forward", f"{_function_name(node)} (functional layer)"))
                continue
            if not quantize_activations:
                continue
            owner = _owner(node)
            path = _fresh_path(model, owner, f"act_{kind[0]}", taken)
            report.activations.append((path, f"{_function_name(node)} in {owner or 'forward'}"))
            rewrites.append((node, path, _new_quantizer(kind[0], kind[1], bits, mode, beta0), kind[2]))
    if not rewrites:
        return model
    for node, path, q, inplace in rewrites:
        if not _has_submodule(model, path):
            _set_submodule(model, path, q)
    # the GraphModule takes the (converted) submodules of `model` by reference: parameters are shared
    graph = gm.graph
    for node, path, q, inplace in rewrites:
        source = node.args[0]
        with graph.inserting_after(node):
            new = graph.create_node("call_module", path, (source,))  # gm lacks it; the new GraphModule has it
        node.replace_all_uses_with(new)
        if inplace and isinstance(source, torch.fx.Node):
            # x.relu_() mutates x: later readers of x see the activation, so they read the quantizer
            for user in list(source.users):
                if user is not new and order.get(user, -1) > order[node]:
                    user.replace_input_with(source, new)
        graph.erase_node(node)
    report.rewritten = True
    result = torch.fx.GraphModule(model, graph, class_name=f"CDL{type(model).__name__}")
    result.graph.lint()
    for attr in ("example_input_shape", "onnx_dynamic_axes"):
        if hasattr(model, attr):
            setattr(result, attr, getattr(model, attr))
    return result


def _has_submodule(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False


def weight_quantizers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, WEIGHT_LAYERS)]


def activation_quantizers(model: nn.Module) -> list[tuple[str, ActivationQuantizer]]:
    return [(n, m) for n, m in model.named_modules() if isinstance(m, ActivationQuantizer)]


STEP_INITS = ("paper", "mse")


@torch.no_grad()
def calibrate(model: nn.Module, first_batch: torch.Tensor, *, step_init: str = "paper") -> None:
    """s0 from the activations of the first batch; records |x_l| per sample for eq. 39.

    step_init "paper": s0 = 2·mean|x|/sqrt(2^(b-1)) (Section VI-B-3). "mse": the step minimising
    the squared error of hard quantization of those activations (`mse_step`), and the weight steps
    q0 likewise re-chosen from each layer's weights. Runs the batch with activation quantizers
    passing values through (weights hard-quantized).
    """
    if step_init not in STEP_INITS:
        raise ValueError(f"step_init must be one of {STEP_INITS}, not {step_init!r}")
    if step_init == "mse":
        for _, m in weight_quantizers(model):
            m.q.fill_(mse_step(m.weight, int(m.bits), True, m.q.item()))
    acts = activation_quantizers(model)
    was_training = model.training
    model.eval()
    for _, a in acts:
        a._calibrating = True
        a._keep_values = step_init == "mse"
    try:
        model(first_batch)
    finally:
        for _, a in acts:
            a._calibrating = False
        model.train(was_training)
    for _, a in acts:
        s0 = initial_step(a._mean_abs, int(a.bits))
        if step_init == "mse" and a._values is not None:
            s0 = mse_step(a._values, int(a.bits), False, s0)
        a.s.fill_(s0)
        a._values, a._keep_values = None, False


@torch.no_grad()
def rescale_sharpness(model: nn.Module, constant: float) -> None:
    """α = c/q² and β = c/s² for every quantizer (call after `calibrate`): see `scaled_sharpness`."""
    for m in model.modules():
        if isinstance(m, WEIGHT_LAYERS):
            m.alpha.fill_(scaled_sharpness(m.q.item(), constant))
        elif isinstance(m, ActivationQuantizer):
            m.beta.fill_(scaled_sharpness(m.s.item(), constant))


def set_mode(model: nn.Module, mode: str) -> None:
    """Switch every quantizer between "cdl" (sampled forward) and "rcdl" (soft forward)."""
    _check_mode(mode)
    for m in model.modules():
        if isinstance(m, WEIGHT_LAYERS + (ActivationQuantizer,)):
            m.mode = mode


def set_generator(model: nn.Module, generator: torch.Generator | None) -> None:
    """Make the Qp samples of CDL mode reproducible: every quantizer draws from `generator`."""
    for m in model.modules():
        if isinstance(m, WEIGHT_LAYERS + (ActivationQuantizer,)):
            m.generator = generator


@torch.no_grad()
def project_parameters(model: nn.Module) -> None:
    """Keep steps and sharpnesses positive after an optimizer step (projected gradient descent);
    one foreach clamp over all of them (the values of clamp_ on each)."""
    params = []
    for m in model.modules():
        if isinstance(m, WEIGHT_LAYERS):
            params += (m.q, m.alpha)
        elif isinstance(m, ActivationQuantizer):
            params += (m.s, m.beta)
    if params:
        torch._foreach_clamp_min_(params, MIN_POSITIVE)


def set_entropy_tracking(model: nn.Module, enabled: bool, *, weights: bool = False) -> None:
    """Activation quantizers (`enabled`) and weight layers (`weights`) keep the entropy of their last
    training forward for the loss (eq. 27-29): one quantizer pass gives both values and MPMF."""
    for _, a in activation_quantizers(model):
        a.track_entropy = enabled
        a.last_entropy_bits = None
    for _, m in weight_quantizers(model):
        m.track_entropy = weights
        m.last_entropy_bits = None
