"""The torch quantizer kernels (any device) against the numba ones and the closed forms (issue 17)."""
import contextlib

import pytest
import torch

from cdlcodec.cdl import quantizer
from cdlcodec.cdl.entropy import entropy_bits, mpmf, reference_mpmf
from cdlcodec.cdl.quantizer import (alphabet_bounds, effective_window, quantize_with_mpmf,
                                    reference_soft_quantize, sample_quantize, soft_quantize)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CASES = [  # (alpha, bits, q, window, signed)
    (5.0, 3, 0.5, None, True),
    (60.0, 4, 0.2, None, True),
    (800.0, 4, 0.1, None, True),      # αq² = 8, the default sharpness: 5-level weight window
    (3200.0, 8, 0.05, None, True),    # 8-bit first/last layer: window of 5 of 256 levels
    (30000.0, 4, 0.2, None, True),    # αq² = 1200: 3 levels, every exp taken directly in numba
    (20.0, 4, 0.3, 5, False),         # activation: 5-level window, unsigned alphabet
    (20.0, 2, 0.3, 5, False),         # window wider than the 4-level alphabet
]


@contextlib.contextmanager
def kernel_path(path):
    saved = quantizer.get_kernel_path()
    quantizer.set_kernel_path(path)
    try:
        yield
    finally:
        quantizer.set_kernel_path(saved)


def _inputs(alpha, q, n=40, seed=0, device="cpu", dtype=torch.float64, zeros=True):
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(n, generator=g, dtype=torch.float64) * q * 3
    if zeros:
        theta[::5] = 0.0                       # exact zeros (ReLU outputs) take a shortcut in numba
    theta[1] = 40 * q                          # far beyond the alphabet: clipped
    theta = theta.to(device=device, dtype=dtype).requires_grad_()
    step = torch.tensor(q, dtype=dtype, device=device, requires_grad=True)
    sharp = torch.tensor(alpha, dtype=dtype, device=device, requires_grad=True)
    return theta, step, sharp


def _grads(fn, theta, step, sharp, weights):
    out = fn(theta, step, sharp)
    return (out.detach(),) + torch.autograd.grad((out * weights).sum(), (theta, step, sharp))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("alpha,bits,q,window,signed", CASES)
def test_torch_path_gradcheck_and_closed_form(device, alpha, bits, q, window, signed):
    lo, hi = alphabet_bounds(bits, signed)
    theta, step, sharp = _inputs(alpha, q, n=15, device=device)
    with kernel_path("torch"):
        assert torch.autograd.gradcheck(lambda t, s, a: soft_quantize(t, s, a, lo, hi, window),
                                        (theta, step, sharp))
        assert torch.autograd.gradcheck(lambda t, s, a: entropy_bits(mpmf(t, s, a, lo, hi, window)),
                                        (theta, step, sharp))
        weights = torch.linspace(-1, 2, theta.numel(), dtype=torch.float64, device=device)
        fast = _grads(lambda t, s, a: soft_quantize(t, s, a, lo, hi, window), theta, step, sharp, weights)
    ref = _grads(lambda t, s, a: reference_soft_quantize(t, s, a, lo, hi, window), theta, step, sharp, weights)
    for a, b in zip(fast, ref):
        assert a.device.type == device
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)
    with kernel_path("torch"):
        pmf = mpmf(theta, step, sharp, lo, hi, window)
    torch.testing.assert_close(pmf, reference_mpmf(theta, step, sharp, lo, hi, window), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("alpha,bits,q,window,signed", CASES)
def test_numba_and_torch_paths_agree(dtype, alpha, bits, q, window, signed):
    """Same values and gradients (θ, step, sharpness) for Qd, Qp with the same uniforms, the MPMF
    and the fused quantize+MPMF, on both kernel paths."""
    lo, hi = alphabet_bounds(bits, signed)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-4, atol=1e-5)
    theta, step, sharp = _inputs(alpha, q, n=3000, seed=3, dtype=dtype)
    weights = torch.linspace(-1, 2, theta.numel(), dtype=dtype)
    level_weights = torch.linspace(0.5, -1.5, hi - lo + 1, dtype=dtype)

    def run(path):
        with kernel_path(path):
            qd = _grads(lambda t, s, a: soft_quantize(t, s, a, lo, hi, window), theta, step, sharp, weights)
            qp = _grads(lambda t, s, a: sample_quantize(t, s, a, lo, hi, window,
                                                        generator=torch.Generator().manual_seed(9)),
                        theta, step, sharp, weights)
            pm = _grads(lambda t, s, a: mpmf(t, s, a, lo, hi, window), theta, step, sharp, level_weights)

            def fused(t, s, a):
                y, p = quantize_with_mpmf(t, s, a, lo, hi, window)
                return torch.cat([y * weights, p * level_weights])
            both = _grads(fused, theta, step, sharp, torch.ones(theta.numel() + hi - lo + 1, dtype=dtype))
        return qd, qp, pm, both

    numba_results, torch_results = run("numba"), run("torch")
    for got, want in zip(torch_results, numba_results):
        for a, b in zip(got, want):
            assert a.dtype == b.dtype == dtype
            torch.testing.assert_close(a, b, **tol)
    # Qp: the same uniforms pick the same levels on both paths.
    assert torch.equal(torch_results[1][0], numba_results[1][0])


def test_weight_window_matches_full_alphabet():
    """window=None is computed over few levels, yet equals the full alphabet to float64 precision."""
    lo, hi = alphabet_bounds(8, True)
    theta, step, sharp = _inputs(3200.0, 0.05, n=500, seed=4)
    assert effective_window(step, sharp, lo, hi, None) == (5, True)       # αq² = 8: 2·3·8 ≥ 40
    assert effective_window(step, sharp / 1.6, lo, hi, None) == (7, True)  # αq² = 5: 2·3·5 < 40
    assert effective_window(step, torch.tensor(0.5, dtype=torch.float64), lo, hi, None)[0] > 17
    lo4, hi4 = alphabet_bounds(4, True)
    assert effective_window(step, torch.tensor(10.0, dtype=torch.float64), lo4, hi4, None) == (16, False)
    weights = torch.linspace(-1, 2, theta.numel(), dtype=torch.float64)
    for path in ("numba", "torch"):
        with kernel_path(path):
            fast = _grads(lambda t, s, a: soft_quantize(t, s, a, lo, hi), theta, step, sharp, weights)
        full = _grads(lambda t, s, a: reference_soft_quantize(t, s, a, lo, hi), theta, step, sharp, weights)
        for a, b in zip(fast, full):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


def test_float32_weight_window_matches_full_alphabet():
    """float32 values need less of the alphabet (levels under e^-24 of the nearest one are left out):
    5 levels down to αq² = 4 (float64 needs 7 below 6.67), and the windowed float32 results equal the
    full alphabet's computed in float64, to float32 precision, on both kernel paths."""
    lo, hi = alphabet_bounds(8, True)
    theta, step, sharp = _inputs(2000.0, 0.05, n=3000, seed=6, dtype=torch.float32)    # αq² = 5
    assert effective_window(step, sharp, lo, hi, None, torch.float32) == (5, True)    # 2·3·5 ≥ 24
    assert effective_window(step, sharp, lo, hi, None, torch.float64) == (7, True)    # 2·3·5 < 40
    assert effective_window(step, sharp * 0.7, lo, hi, None, torch.float32) == (7, True)   # αq² = 3.5
    weights = torch.linspace(-1, 2, theta.numel(), dtype=torch.float32)
    as64 = [x.detach().double().requires_grad_() for x in (theta, step, sharp)]
    full = _grads(lambda t, s, a: reference_soft_quantize(t, s, a, lo, hi), *as64, weights.double())
    for path in ("numba", "torch"):
        with kernel_path(path):
            fast = _grads(lambda t, s, a: soft_quantize(t, s, a, lo, hi), theta, step, sharp, weights)
        for a, b in zip(fast, full):
            torch.testing.assert_close(a.double(), b, rtol=2e-5, atol=1e-6 * float(b.abs().max()))


@pytest.mark.parametrize("device", DEVICES)
def test_results_on_input_device_and_dtype(device):
    lo, hi = alphabet_bounds(4, False)
    for dtype in (torch.float32, torch.float64):
        theta, step, sharp = _inputs(30.0, 0.2, device=device, dtype=dtype)
        with kernel_path("torch" if device != "cpu" else "auto"):
            y, pmf = quantize_with_mpmf(theta, step, sharp, lo, hi, 5)
            (y.sum() + entropy_bits(pmf)).backward()
        for t in (y, pmf, theta.grad, step.grad, sharp.grad):
            assert t.device.type == device and t.dtype == dtype


@pytest.mark.parametrize("device", DEVICES)
def test_sampling_reproducible_from_generator_on_device(device):
    lo, hi = alphabet_bounds(4, True)
    theta, step, sharp = _inputs(200.0, 0.05, n=5000, device=device)
    with kernel_path("torch"):
        draws = [sample_quantize(theta, step, sharp, lo, hi,
                                 generator=torch.Generator(device=device).manual_seed(s)) for s in (3, 3, 4)]
    assert torch.equal(draws[0], draws[1]) and not torch.equal(draws[0], draws[2])
    assert draws[0].device.type == device


@pytest.mark.parametrize("path", ["numba", "torch"])
def test_empty_tensor(path):
    lo, hi = alphabet_bounds(4, False)
    theta, step, sharp = _inputs(30.0, 0.2)
    empty = theta[:0]
    with kernel_path(path):
        y, pmf = quantize_with_mpmf(empty, step, sharp, lo, hi, 5)
        (y.sum() + entropy_bits(pmf)).backward()
    assert y.shape == (0,) and float(pmf.detach().sum()) == 0.0 and float(step.grad) == 0.0


def test_numba_path_refuses_what_it_cannot_run():
    lo, hi = alphabet_bounds(4, True)
    theta, step, sharp = _inputs(60.0, 0.2, dtype=torch.float64)
    with kernel_path("numba"):
        with pytest.raises(ValueError, match="numba"):
            soft_quantize(theta.detach().half(), step, sharp, lo, hi)
    with pytest.raises(ValueError, match="kernel path"):
        quantizer.set_kernel_path("cuda")
    with kernel_path("torch"):       # half precision runs on the torch path (computed in float32)
        y = soft_quantize(theta.detach().half(), step.half(), sharp.half(), lo, hi)
    assert y.dtype == torch.float16


def test_torch_path_chunks_large_tensors(monkeypatch):
    """Blocks of the [elements, K] formulation give the same result as one block."""
    from cdlcodec.cdl import _torch_kernels

    lo, hi = alphabet_bounds(4, False)
    theta, step, sharp = _inputs(30.0, 0.2, n=1000, seed=5)
    with kernel_path("torch"):
        whole = _grads(lambda t, s, a: torch.cat(quantize_with_mpmf(t, s, a, lo, hi, 5)), theta, step, sharp,
                       torch.linspace(-1, 1, 1016, dtype=torch.float64))
        monkeypatch.setattr(_torch_kernels, "BLOCK", 37)
        blocks = _grads(lambda t, s, a: torch.cat(quantize_with_mpmf(t, s, a, lo, hi, 5)), theta, step, sharp,
                        torch.linspace(-1, 1, 1016, dtype=torch.float64))
    for a, b in zip(whole, blocks):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("mode", ["rcdl", "cdl"])
def test_lenet5_cdl_step_on_torch_path(mode):
    """A full LeNet-5 (R-)CDL forward + backward with both entropy terms, torch kernels forced:
    nothing in the layers forces numpy, every quantizer parameter gets a finite gradient."""
    from cdlcodec.cdl.convert import (activation_quantizers, calibrate, convert, set_entropy_tracking,
                                      set_generator, weight_quantizers)
    from cdlcodec.cdl.loss import cdl_loss
    from cdlcodec.models import build

    torch.manual_seed(0)
    x = torch.rand(8, 1, 28, 28)
    y = torch.arange(8) % 10
    with kernel_path("torch"):
        model = convert(build("lenet5"), bits=4, mode=mode)
        calibrate(model, x, step_init="mse")
        set_generator(model, torch.Generator().manual_seed(1))
        set_entropy_tracking(model, True)
        model.train()
        parts = cdl_loss(model, model(x), y, lam=1e-4, gamma=1e-4)
        parts.total.backward()
    assert parts.weight_bits is not None and parts.activation_bits is not None
    for _, m in weight_quantizers(model):
        for p in (m.weight, m.q, m.alpha):
            assert p.grad is not None and torch.isfinite(p.grad).all()
    for _, a in activation_quantizers(model):
        for p in (a.s, a.beta):
            assert p.grad is not None and torch.isfinite(p.grad).all()


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("alpha,bits,q,window,signed", [
    (20.0, 4, 0.3, 5, False),          # activation window, A = 1.8
    (89.0, 4, 0.3, 5, False),          # activation window at the default sharpness, A = 8
    (800.0, 4, 0.1, None, True),       # weights, αq² = 8: the 5-level weight window
    (3200.0, 8, 0.05, None, True),     # 8-bit weights
    (1900.0, 4, 0.1, None, True),      # weights, αq² = 19: still 5 levels
    (14000.0, 4, 0.1, 5, False),       # activations at A = 140, just under the products' limit (A·4 ≤ 600)
    (8000.0, 4, 0.1, 5, False),        # A = 80: past where E^4·e^(-16A) overflowed float32 (A = 22)
    (50000.0, 4, 0.1, 5, False),       # A = 500: beyond the general kernels' products (no limit here)
])
def test_numba_five_level_kernels_match_general_ones(monkeypatch, dtype, alpha, bits, q, window, signed):
    """The branch-free kernels for 5-level windows (forward5 / backward5, own exp) give the values
    and gradients of the general numba kernels: Qd, Qp picks (identical levels), the MPMF and its
    gradient, with exact zeros, both alphabet edges, clipped values (near and far), a NaN and ±inf. The
    5-level backward recomputes each element's CPMF from θ (nothing kept from the forward), the general
    one reads the forward's stats and exps: the same gradients."""
    lo, hi = alphabet_bounds(bits, signed)
    assert effective_window(torch.tensor(q), torch.tensor(alpha), lo, hi, window) == (5, True)
    g = torch.Generator().manual_seed(11)
    theta = torch.randn(5000, generator=g, dtype=torch.float64) * q * (hi - lo) / 3
    theta[::7] = 0.0
    theta[1::11] = torch.linspace(lo - 3, hi + 3, theta[1::11].numel(), dtype=torch.float64) * q
    theta[5], theta[6], theta[8] = float("nan"), float("inf"), -float("inf")
    theta[2], theta[3], theta[4] = 1e4 * q, -1e4 * q, (hi + 0.7) * q   # far clipped: 2A·w beyond exp's range
    theta = theta.to(dtype).requires_grad_()
    step = torch.tensor(q, dtype=dtype, requires_grad=True)
    sharp = torch.tensor(alpha, dtype=dtype, requires_grad=True)
    weights = torch.linspace(-1, 2, theta.numel(), dtype=dtype)
    level_weights = torch.linspace(0.5, -1.5, hi - lo + 1, dtype=dtype)

    def run():
        out = []
        with kernel_path("numba"):
            for sample in (False, True):
                y, p = quantize_with_mpmf(theta, step, sharp, lo, hi, window, sample=sample,
                                          generator=torch.Generator().manual_seed(9))
                loss = (torch.nan_to_num(y) * weights).sum() + (p * level_weights).sum()
                grads = torch.autograd.grad(loss, (theta, step, sharp))
                y2 = soft_quantize(theta, step, sharp, lo, hi, window)
                grads2 = torch.autograd.grad((torch.nan_to_num(y2) * weights).sum(), (theta, step, sharp))
                out += [y.detach(), p.detach(), *grads, *grads2]
        return out

    fast = run()
    monkeypatch.setattr(quantizer, "_five", lambda *args: False)
    general = run()
    # The fast kernels compute in θ's precision, the general ones in float64: in float32 an element
    # near a midpoint carries A·2^-24 relative error (its exps' arguments are O(A)), 3e-5 at A = 500.
    A = alpha * q * q
    tol = dict(rtol=1e-11, atol=1e-13) if dtype == torch.float64 else dict(rtol=max(1e-5, A * 1e-7), atol=1e-6)
    for a, b in zip(fast, general):
        torch.testing.assert_close(a, b, equal_nan=True, **tol)
    assert torch.equal(torch.nan_to_num(fast[8]), torch.nan_to_num(general[8]))   # the Qp levels


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_numba_serial_twins_equal_parallel_kernels(relu, dtype):
    """The 5-level kernels' serial twins (taken when numba runs one thread, or for one chunk) give the
    parallel kernels' values, MPMF sums and gradients bit for bit: the same chunks in the same order.
    A tensor of several chunks, with the entropy term and Qp samples."""
    numba = pytest.importorskip("numba")
    from cdlcodec.cdl import _kernels
    from cdlcodec.cdl.entropy import quantize_with_entropy_bits
    g = torch.Generator().manual_seed(3)
    n = 9 * 4096 + 123
    assert _kernels.chunk_count(n) > 1
    base = torch.randn(n, generator=g, dtype=torch.float64).to(dtype) * (0.4 if relu else 0.05)
    step, sharp = torch.tensor(0.1, dtype=dtype), torch.tensor(900.0, dtype=dtype)
    lo, hi, window = (0, 15, 5) if relu else (-8, 7, None)
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("numba has one thread here: the parallel kernels never run")
    results = []
    saved = numba.get_num_threads()
    for threads in (1, numba.config.NUMBA_NUM_THREADS):
        numba.set_num_threads(threads)
        try:
            theta, s, a = (t.clone().requires_grad_() for t in (base, step, sharp))
            with kernel_path("numba"):
                y, h = quantize_with_entropy_bits(theta, s, a, lo, hi, window, 100.0, sample=True,
                                                  generator=torch.Generator().manual_seed(7), relu=relu)
            (y * torch.linspace(-1, 1, n, dtype=dtype) + h).sum().backward()
        finally:
            numba.set_num_threads(saved)
        results.append([y.detach(), h.detach(), theta.grad, s.grad, a.grad])
    for u, v in zip(*results):
        assert torch.equal(u, v)
