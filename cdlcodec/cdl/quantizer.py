"""The probabilistic quantizer Qp and its soft deterministic approximation Qd (CDL paper, Section IV).

A value θ is quantized to a level k·q of a uniform alphabet with the CPMF of eq. 4 / 12 / 13

    P(k | θ) = softmax_k( -α (θ - k q)² ),   k ∈ A = {-2^(b-1) … 2^(b-1)-1} (weights, eq. 10a)
                                            k ∈ B = {0 … 2^b - 1}          (activations, eq. 10b)

Qp draws one level from that CPMF (eq. 7); Qd is its mean (eq. 8). `QuantizeFunction` implements
both with one backward: the analytic derivatives of Qd (Lemma 1, eq. 9a for θ, eq. 9b for the
step) plus the derivative with respect to the sharpness α:

    ∂Qd/∂α = Σ_k kq ∂P_k/∂α = Σ_k kq P_k (d_k - E[d]),  d_k = -(θ - kq)²
           = -Cov(X, (θ - X)²),   X ~ P(· | θ).

CDL uses the sample in the forward pass and Qd's derivatives backward (eq. 16-24); R-CDL uses Qd
forward and backward (eq. 40). Eval mode uses `hard_quantize`: the most probable level, which for
this CPMF is the alphabet point nearest to θ.

Window: the CPMF may be restricted to the `window` levels nearest to θ (Section VI-B-1, five for
activations), renormalised. The window is a piecewise-constant function of θ, so the same moment
formulas give the exact derivatives of the windowed quantizer. Only an `[elements, window]` block
is ever built, never `[elements, 2^b]`: the full alphabet of the weights (window=None) is computed
over the few levels around the nearest one that carry any probability at float64 precision
(`effective_window`: 5 of 16 or 256 levels at the default sharpness αq² = 8).

Kernels: `QuantizeFunction` runs numba loops on CPU (cdl/_kernels.py) or torch operations on any
device (cdl/_torch_kernels.py), chosen by `set_kernel_path` / CDLCODEC_CDL_KERNELS; both give the
same values and gradients (tests/test_cdl_torch_quantizer.py). `torch.compile` is not used: it
costs seconds at first use and needs a C++ compiler on CPU (where numba runs anyway); whether it
pays on a GPU is not measured yet.
"""
from __future__ import annotations

import functools
import math
import os

import numpy as np
from ..optional import require
require("torch", "CDL training")
import torch

from . import _torch_kernels


def alphabet_bounds(bits: int, signed: bool) -> tuple[int, int]:
    """Smallest and largest index of A (eq. 10a, signed) or B (eq. 10b, unsigned)."""
    if signed:
        return -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    return 0, (1 << bits) - 1


def _window_indices(theta: torch.Tensor, step: torch.Tensor, lo: int, hi: int, window: int | None):
    """Integer indices [..., K] of the levels the CPMF is spread over (full alphabet or a window)."""
    size = hi - lo + 1
    if window is None or window >= size:
        base = torch.arange(lo, hi + 1, device=theta.device, dtype=theta.dtype)
        return base.expand(*theta.shape, size)
    half = window // 2
    # The nearest level, moved inward so the whole window stays inside the alphabet.
    centre = torch.round(theta.detach() / step.detach()).clamp(lo + half, hi - (window - 1 - half))
    offsets = torch.arange(-half, window - half, device=theta.device, dtype=theta.dtype)
    return centre.unsqueeze(-1) + offsets


def cpmf(theta: torch.Tensor, step: torch.Tensor, sharpness: torch.Tensor, lo: int, hi: int,
         window: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(probabilities [..., K], level indices [..., K]) of eq. 12/13; differentiable (autograd)."""
    idx = _window_indices(theta, step, lo, hi, window)
    logits = -sharpness * (theta.unsqueeze(-1) - idx * step) ** 2
    return torch.softmax(logits, dim=-1), idx


# entropy_bits' clamp and ln 2 (the entropy terms, eq. 26 / 28, taken inside QuantizeFunction)
MIN_P = 1e-30
LOG2 = math.log(2.0)

# Kernel paths: "numba" (cdl/_kernels.py, CPU float32/float64 only) or "torch" (cdl/_torch_kernels.py,
# any device). "auto" picks numba where it applies (faster on CPU, see benchmarks/bench_cdl_step.py)
# and torch elsewhere. CDLCODEC_CDL_KERNELS sets the initial choice; set_kernel_path changes it.
KERNEL_PATHS = ("auto", "numba", "torch")
_kernel_path = os.environ.get("CDLCODEC_CDL_KERNELS", "auto").strip().lower() or "auto"
if _kernel_path not in KERNEL_PATHS:
    raise ValueError(f"CDLCODEC_CDL_KERNELS must be one of {KERNEL_PATHS}, not {_kernel_path!r}")

# The window the full weight alphabet is computed over (window=None): levels whose logit is at least
# this far below the nearest level's carry a relative probability under e^-40 ≈ 4e-18, which changes
# no float64 result; with the default sharpness (αq² = 8) that is 5 levels instead of 2^b. Values
# computed in float32 (float32 θ, and float16/bfloat16 on the torch path) need e^-24 ≈ 4e-11, a
# thousandth of float32's rounding: 5 levels down to αq² = 4 (where float64 needs 7 below 6.67).
_NEGLIGIBLE_LOGIT = 40.0
_NEGLIGIBLE_LOGIT_FLOAT32 = 24.0


def _negligible_logit(dtype) -> float:
    """_NEGLIGIBLE_LOGIT for values of `dtype` (a torch dtype; None: float64's)."""
    return _NEGLIGIBLE_LOGIT if dtype is None or dtype == torch.float64 else _NEGLIGIBLE_LOGIT_FLOAT32


def set_kernel_path(path: str) -> None:
    """Choose the quantizer kernels: "auto" (numba on CPU, torch elsewhere), "numba" or "torch"."""
    global _kernel_path
    if path not in KERNEL_PATHS:
        raise ValueError(f"kernel path must be one of {KERNEL_PATHS}, not {path!r}")
    _kernel_path = path


def get_kernel_path() -> str:
    return _kernel_path


_KERNELS = None


def _numba_kernels():
    """cdl/_kernels.py, imported at first use (numba is optional; an import per call cost a few µs)."""
    global _KERNELS
    if _KERNELS is None:
        from . import _kernels
        _KERNELS = _kernels
    return _KERNELS


@functools.lru_cache(maxsize=1)
def _numba_available() -> bool:
    try:
        from . import _kernels  # noqa: F401
    except ImportError:
        return False
    return True


def cpu_speed_note() -> str | None:
    """One line for whoever trains on a CPU without numba: the torch kernels work there, but slower."""
    if _kernel_path == "auto" and not _numba_available():
        return ("numba is not installed: the CDL quantizers run with the torch kernels, several times slower on "
                "a CPU (pip install \"cdlcodec[fast]\")")
    return None


def _use_numba(theta: torch.Tensor) -> bool:
    fits = theta.device.type == "cpu" and theta.dtype in (torch.float32, torch.float64)
    if _kernel_path == "numba":
        if not fits:
            raise ValueError(f"the numba quantizer kernels take CPU float32/float64 tensors, not "
                             f"{theta.dtype} on {theta.device}")
        return True
    return _kernel_path == "auto" and fits and _numba_available()


def effective_window(step: torch.Tensor, sharpness: torch.Tensor, lo: int, hi: int,
                     window: int | None, dtype: torch.dtype | None = None) -> tuple[int, bool]:
    """(K, windowed): the levels each element's CPMF is computed over.

    An explicit `window` is used as given (activations, Section VI-B-1). window=None means the
    full alphabet (weights, eq. 12); it is computed over the 2h+1 levels around the nearest one,
    with h the smallest integer ≥ 2 for which every level left out has a logit at least
    _NEGLIGIBLE_LOGIT below the nearest level's (for |θ/q - n| ≤ 1/2 the first level left out,
    at h+1 from n, is at least αq²·h(h+1) below), so results equal the full alphabet's to the
    precision of `dtype`, θ's (None: float64's). Never fewer than 5 levels (h ≥ 2): a sharper CPMF
    would need only 3, but the 5-level kernels are the fast ones and the two extra levels change
    nothing. One host synchronisation (αq²) per call.
    """
    size = hi - lo + 1
    if window is not None:
        return (window, True) if window < size else (size, False)
    return _window_for_spread(float((sharpness.detach() * step.detach() ** 2).clamp_min(0)), size, dtype)


def _window_for_spread(spread: float, size: int, dtype) -> tuple[int, bool]:
    """`effective_window` of a weight alphabet of `size` levels from αq² (`spread`) and θ's dtype."""
    negligible = _negligible_logit(dtype)
    h = 2
    while 2 * h + 1 < size and spread * h * (h + 1) < negligible:
        h += 1
    k = 2 * h + 1
    return (k, True) if k < size else (size, False)


def _window_from_floats(step: torch.Tensor, sharpness: torch.Tensor, q: float, a: float, lo: int, hi: int,
                        window: int | None, theta_dtype: torch.dtype) -> tuple[int, bool]:
    """`effective_window` from the step and sharpness already read as floats (the numba path): αq² in
    the tensors' dtype with numpy scalars (the same float operations), no tensor operations."""
    size = hi - lo + 1
    if window is not None:
        return (window, True) if window < size else (size, False)
    dtype = torch.promote_types(step.dtype, sharpness.dtype)
    if dtype not in (torch.float32, torch.float64) or step.dtype != dtype:
        return effective_window(step, sharpness, lo, hi, window, theta_dtype)
    dt = np.float32 if dtype == torch.float32 else np.float64
    qq = dt(q)
    spread = float(dt(a) * (qq * qq))
    return _window_for_spread(spread if not spread < 0.0 else 0.0, size, theta_dtype)


def _uniforms(theta: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """One uniform per element for Qp (eq. 7), drawn from `generator` on its own device, so samples
    are reproducible from a generator on the tensor's device (or a CPU generator for any device)."""
    device = generator.device if generator is not None else theta.device
    dtype = torch.float32 if device.type == "mps" else torch.float64
    u = torch.rand(theta.numel(), generator=generator, dtype=dtype, device=device)
    return u.to(theta.device)


def _numba_exp(kernels, t, q, a, lo, hi, k, windowed):
    """E = exp(2A·w) per element (see _kernels.exp_args), float64."""
    x = np.empty(t.size)
    kernels.exp_args(t, q, a, lo, hi, k, windowed, x)
    torch.from_numpy(x).exp_()
    return x


_NO_UNIFORMS = np.zeros(1)


def _grad_scalar(value: float, like: torch.Tensor) -> torch.Tensor:
    """The gradient of a one-value parameter (step or sharpness) as a tensor of its dtype and shape."""
    g = torch.scalar_tensor(value, dtype=like.dtype)
    return g if like.dim() == 0 else g.reshape(like.shape)


def _five(k, windowed) -> bool:
    """The branch-free kernels for windows of 5 levels apply: every activation quantizer, and weights
    from the sharpness where 5 levels hold all the CPMF (`effective_window`) upward."""
    return windowed and k == 5


def _numba_forward(t, q, a, lo, hi, k, windowed, u, sample, want_sums, relu, consts):
    """The numba forward on θ's values `t` (a flat numpy array): (y, MPMF sums or None, what the backward
    reuses), numpy arrays; no tensor operations (a training step makes ~20 of these calls, so the
    host-side glue is kept to numpy allocations and one kernel call)."""
    _kernels = _numba_kernels()
    y = np.empty_like(t)
    if _five(k, windowed):
        # Takes its exps itself and keeps nothing: backward5 recomputes the CPMFs from θ. `relu`: the
        # kernel quantizes relu(θ), the ReLU's zeros left out of its loops.
        chunks = _kernels.chunk_count(t.size)
        kernel = _kernels.for_chunks(_kernels.forward5_relu if relu else _kernels.forward5, chunks)
        sums = kernel(t, q, a, lo, hi, consts, u, sample, want_sums, chunks, y)
        return y, sums if want_sums else None, None
    if relu:
        t = torch.relu(torch.from_numpy(t)).numpy()
    stats = np.empty((3, t.size), dtype=t.dtype)
    E = _numba_exp(_kernels, t, q, a, lo, hi, k, windowed)
    sums = _kernels.forward(t, q, a, lo, hi, k, windowed, E, consts, u, sample, want_sums,
                            _kernels.chunk_count(t.size), y, stats)
    # With the MPMF, E is kept for the backward (8 bytes per element), which would otherwise redo the exps.
    return y, sums if want_sums else None, (stats, E if want_sums else None)


def _numba_backward(t, q, a, lo, hi, k, windowed, saved, gy, has_grad_y, gs, has_grad_sums, relu, consts):
    """(∂/∂θ, ∂/∂q, ∂/∂α) from the numba kernels: a numpy array of θ's shape-less values and two floats.
    `saved`: what _numba_forward returned for the backward; `gy`: ∂/∂y as a flat numpy array of θ's
    dtype; `gs`: ∂/∂sums (float64); placeholders when absent."""
    _kernels = _numba_kernels()
    g_theta = np.empty_like(t)
    if _five(k, windowed):
        chunks = _kernels.chunk_count(t.size)
        kernel = _kernels.for_chunks(_kernels.backward5_relu if relu else _kernels.backward5, chunks)
        g_q, g_a = kernel(t, q, a, lo, hi, consts, gy, has_grad_y, gs, has_grad_sums, chunks, g_theta)
        return g_theta, g_q, g_a
    stats, exps = saved
    x = torch.relu(torch.from_numpy(t)).numpy() if relu else t
    if not has_grad_sums:
        E = np.zeros(1)
    else:
        E = exps if exps is not None else _numba_exp(_kernels, x, q, a, lo, hi, k, windowed)
    g_q, g_a = _kernels.backward(x, q, a, lo, hi, k, windowed, stats, E, consts, gy, has_grad_y, gs,
                                 has_grad_sums, _kernels.chunk_count(t.size), g_theta)
    if relu:
        _kernels._relu_mask(t, g_theta)
    return g_theta, g_q, g_a


def _flat_values(tensor: torch.Tensor) -> np.ndarray:
    """A CPU tensor's values as a flat numpy array (a view when it is contiguous)."""
    values = tensor.detach()
    if not values.is_contiguous():
        values = values.contiguous()
    return values.numpy().reshape(-1)


class QuantizeFunction(torch.autograd.Function):
    """y = Qd(θ) (sample=False) or y ~ Qp(θ) (sample=True); backward is always Qd's (Lemma 1).

    Arguments: theta (any shape), step (0-dim, q or s), sharpness (0-dim, α or β), lo, hi (alphabet
    indices), window (None = full alphabet), sample (bool), generator (torch.Generator or None),
    with_mpmf (bool), entropy_scale (float or None), relu (bool). With `with_mpmf` it returns
    (y, sums), sums[l] = Σ_i P(l | θ_i) over the alphabet (eq. 25 before dividing by the count), from
    the same pass over the CPMFs, and one backward pass serves both outputs. With `entropy_scale` it
    returns (y, scale · H(MPMF) in bits) instead (eq. 26 / 28; `entropy.quantize_with_entropy_bits`),
    the entropy and its closed-form gradient taken inside this node (no autograd node of its own).
    With `relu` the values quantized are relu(θ) (an activation quantizer after a ReLU, fused: θ is the
    ReLU's input, and ∂/∂θ is zero where relu(θ) <= 0, as torch's ReLU backward gives).
    Runs the numba kernels (cdl/_kernels.py) or the torch kernels (cdl/_torch_kernels.py), see
    `set_kernel_path`; results are on theta's device and dtype. What the forward keeps for the
    backward besides θ: the numba 5-level kernels nothing (backward5 recomputes each element's CPMF
    from θ, cheaper than the memory traffic of keeping it); the general numba and the torch kernels
    three numbers per element (level mean, variance, third moment), the general numba kernels with
    the MPMF also E = exp(2A·w), so that their MPMF gradient needs no exps in the backward.
    """

    @staticmethod
    def forward(ctx, theta, step, sharpness, lo, hi, window, sample, generator, with_mpmf=False,
                entropy_scale=None, relu=False):
        ctx.set_materialize_grads(False)   # an unused output (y or sums) costs no backward work
        with_mpmf = with_mpmf or entropy_scale is not None
        uniforms = _uniforms(theta, generator) if sample else None
        ctx.entropy = None
        if _use_numba(theta):
            return _forward_numba(ctx, theta, step, sharpness, lo, hi, window, uniforms, with_mpmf, entropy_scale,
                                  relu)
        flat = theta.detach().contiguous().reshape(-1)
        k, windowed = effective_window(step, sharpness, lo, hi, window, _torch_kernels.compute_dtype(theta.dtype))
        y, stats, sums = _torch_kernels.forward(torch.relu(flat) if relu else flat, step, sharpness, lo, hi,
                                                k, windowed, uniforms, with_mpmf)
        ctx.save_for_backward(theta, step, sharpness, stats)
        ctx.config = (lo, hi, k, windowed, False, relu)
        y = y.reshape(theta.shape)
        if not with_mpmf:
            return y
        sums = sums.to(theta.dtype)
        if entropy_scale is None:
            return y, sums
        # entropy._SumsEntropyBits' operations (the same values bit for bit).
        count = max(theta.numel(), 1)
        pmf = sums / count
        logp = torch.log(pmf.clamp_min(MIN_P))
        ctx.entropy = (pmf, logp, count, float(entropy_scale))
        return y, entropy_scale * (-(pmf * logp).sum() / LOG2)

    @staticmethod
    def backward(ctx, grad_y, grad_sums=None):
        lo, hi, k, windowed, numba, relu = ctx.config
        if grad_y is None and grad_sums is None:
            return (None,) * 11
        if numba:
            return _backward_numba(ctx, grad_y, grad_sums)
        theta, step, sharpness, stats = ctx.saved_tensors
        if grad_sums is not None and ctx.entropy is not None:
            # grad_sums is the gradient of scale·H: the sums' gradient in closed form (as _SumsEntropyBits).
            pmf, logp, count, scale = ctx.entropy
            inside = (pmf >= MIN_P).to(pmf.dtype)
            grad_sums = (logp + inside) * (grad_sums * (-scale / (LOG2 * count)))
        flat = theta.detach().contiguous().reshape(-1)
        g_theta, g_q, g_a = _torch_kernels.backward(torch.relu(flat) if relu else flat, step, sharpness, lo,
                                                    hi, k, windowed, stats, grad_y, grad_sums)
        if relu:
            g_theta = g_theta.masked_fill(flat.to(g_theta.device) <= 0, 0.0)
        return (g_theta.to(theta.dtype).reshape(theta.shape),
                g_q.to(step.dtype).reshape(step.shape) if ctx.needs_input_grad[1] else None,
                g_a.to(sharpness.dtype).reshape(sharpness.shape) if ctx.needs_input_grad[2] else None,
                None, None, None, None, None, None, None, None)


def _forward_numba(ctx, theta, step, sharpness, lo, hi, window, uniforms, with_mpmf, entropy_scale, relu):
    """QuantizeFunction.forward on the numba kernels. The host-side glue is kept small (a training step
    makes ~20 of these calls): step and sharpness read once, numpy arrays throughout (stats and the
    arrays the backward reuses stay numpy on ctx), H and its gradient factor in float64 numpy."""
    kernels = _numba_kernels()
    qf, af = step.item(), sharpness.item()
    k, windowed = _window_from_floats(step, sharpness, qf, af, lo, hi, window, theta.dtype)
    consts = kernels.level_constants(qf, af, k)
    t = _flat_values(theta)
    u = uniforms.cpu().numpy() if uniforms is not None else _NO_UNIFORMS
    y, sums, saved = _numba_forward(t, qf, af, lo, hi, k, windowed, u, uniforms is not None, with_mpmf, relu, consts)
    ctx.save_for_backward(theta, step, sharpness)
    ctx.numba = (qf, af, consts, saved)
    ctx.config = (lo, hi, k, windowed, True, relu)
    y = torch.from_numpy(y.reshape(theta.shape))
    if entropy_scale is not None:
        factor = np.empty_like(sums)
        bits = kernels.entropy_bits_of_sums(sums, max(t.size, 1), float(entropy_scale), MIN_P, factor)
        ctx.entropy = factor
        return y, torch.scalar_tensor(bits, dtype=theta.dtype)
    if not with_mpmf:
        return y
    return y, torch.from_numpy(sums).to(theta.dtype)


def _backward_numba(ctx, grad_y, grad_sums):
    """QuantizeFunction.backward on the numba kernels (see _forward_numba)."""
    theta, step, sharpness = ctx.saved_tensors
    lo, hi, k, windowed, _, relu = ctx.config
    qf, af, consts, saved = ctx.numba
    t = _flat_values(theta)
    if grad_y is None:
        gy = np.zeros(1, t.dtype)
    else:
        gy = _flat_values(grad_y if grad_y.dtype == theta.dtype else grad_y.to(theta.dtype))
    if grad_sums is None:
        gs = np.zeros(1)
    elif ctx.entropy is not None:
        # grad_sums is the gradient of scale·H: the sums' gradient in closed form (as _SumsEntropyBits).
        gs = ctx.entropy * float(grad_sums)
    else:
        gs = _flat_values(grad_sums.to(torch.float64))
    g_theta, g_q, g_a = _numba_backward(t, qf, af, lo, hi, k, windowed, saved, gy, grad_y is not None, gs,
                                        grad_sums is not None, relu, consts)
    return (torch.from_numpy(g_theta.reshape(theta.shape)),
            _grad_scalar(g_q, step) if ctx.needs_input_grad[1] else None,
            _grad_scalar(g_a, sharpness) if ctx.needs_input_grad[2] else None,
            None, None, None, None, None, None, None, None)


def reference_soft_quantize(theta, step, sharpness, lo, hi, window=None):
    """Qd(θ) = Σ_k P(k|θ)·kq written with plain torch operations (autograd differentiates it);
    the closed form the analytic backward is tested against."""
    prob, idx = cpmf(theta, step, sharpness, lo, hi, window)
    return (prob * idx * step).sum(-1)


def soft_quantize(theta, step, sharpness, lo, hi, window=None, *, relu=False):
    """Qd(θ), eq. 8 / 15, with the analytic backward of Lemma 1; Qd(relu(θ)) with `relu`."""
    return QuantizeFunction.apply(theta, step, sharpness, lo, hi, window, False, None, False, None, relu)


def sample_quantize(theta, step, sharpness, lo, hi, window=None, generator=None, *, relu=False):
    """A sample of Qp(θ) (eq. 7) whose backward is Qd's (the proxy of eq. 18-24); of Qp(relu(θ)) with `relu`."""
    return QuantizeFunction.apply(theta, step, sharpness, lo, hi, window, True, generator, False, None, relu)


def quantize_with_mpmf(theta, step, sharpness, lo, hi, window=None, *, sample=False, generator=None):
    """(Qd(θ) or a Qp sample, MPMF over the alphabet (eq. 25)) from one pass over the CPMFs: what a
    training forward with the entropy term needs, at the cost of one quantizer call."""
    y, sums = QuantizeFunction.apply(theta, step, sharpness, lo, hi, window, sample, generator, True)
    return y, sums / max(theta.numel(), 1)


def hard_levels(theta: torch.Tensor, step: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """argmax_k P(k | θ): the nearest alphabet point, clip(round_half_even(θ / q), lo, hi), int64.

    Computed in float32 exactly like `cdlcodec.cdl_format.hard_levels` (numpy), so encoder and
    eval mode agree level for level. (Exact midpoints are ties of the argmax; both break them to even.)
    """
    ratio = theta.detach().float() / step.detach().float()
    return torch.round(ratio).clamp(lo, hi).to(torch.int64)


def hard_quantize(theta: torch.Tensor, step: torch.Tensor, lo: int, hi: int) -> torch.Tensor:
    """Eval-mode quantizer: float32(k) * float32(q), the value a decoder reproduces bit-exactly."""
    return hard_levels(theta, step, lo, hi).float() * step.detach().float()
