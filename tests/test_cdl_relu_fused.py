"""The activation quantizer's fused ReLU (QuantizeFunction's `relu`; numba: forward5_relu /
backward5_relu, which leave the ReLU's zeros out of their loops) against F.relu followed by the
quantizer: the same values (bit for bit) and the same gradients (float64 to 1e-9 relative; the θ-gradient
bit for bit without the entropy term), in R-CDL and CDL (samples), with and without the entropy term, numba and torch paths."""
import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("numba")
import torch.nn.functional as F  # noqa: E402

from cdlcodec.cdl import quantizer  # noqa: E402
from cdlcodec.cdl.entropy import quantize_with_entropy_bits  # noqa: E402
from cdlcodec.cdl.quantizer import sample_quantize, soft_quantize  # noqa: E402


def _activations(n, dtype, seed):
    """ReLU inputs with runs of non-positive values (whole blocks of them too), exact zeros, -0.0,
    values beyond the top level; more elements than one 512-block so blocks and chunks vary."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, generator=g, dtype=torch.float64) * 0.6 + 0.1
    x[1000:2200] = -torch.rand(1200, generator=g, dtype=torch.float64)     # a whole block of zeros
    x[::7] = 0.0
    x[3::11] = -0.0
    x[5::97] = 9.0                                                          # clipped at the top level
    return x.to(dtype)


def _run(x, step, sharp, relu_fused, mode, entropy, path, seed=5):
    xin = x.clone().requires_grad_()
    s = step.clone().requires_grad_()
    b = sharp.clone().requires_grad_()
    gen = torch.Generator().manual_seed(seed) if mode == "cdl" else None
    theta = xin if relu_fused else F.relu(xin)
    saved = quantizer.get_kernel_path()
    quantizer.set_kernel_path(path)
    try:
        if entropy:
            y, h = quantize_with_entropy_bits(theta, s, b, 0, 15, 5, 37, sample=mode == "cdl", generator=gen,
                                              relu=relu_fused)
        else:
            h = None
            if mode == "rcdl":
                y = soft_quantize(theta, s, b, 0, 15, 5, relu=relu_fused)
            else:
                y = sample_quantize(theta, s, b, 0, 15, 5, generator=gen, relu=relu_fused)
        w = torch.linspace(-1, 1, y.numel(), dtype=y.dtype).reshape(y.shape)
        loss = (y * w).sum() + (0.5 * h if h is not None else 0.0)
        loss.backward()
    finally:
        quantizer.set_kernel_path(saved)
    return y.detach(), (h.detach() if h is not None else None), xin.grad, s.grad, b.grad


@pytest.mark.parametrize("path", ["numba", "torch"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode", ["rcdl", "cdl"])
@pytest.mark.parametrize("entropy", [False, True])
def test_fused_relu_matches_relu_then_quantizer(path, dtype, mode, entropy):
    x = _activations(20000, dtype, 1)
    step = torch.tensor(0.3, dtype=dtype)
    sharp = torch.tensor(8.2 / 0.09, dtype=dtype)
    y0, h0, gx0, gs0, gb0 = _run(x, step, sharp, False, mode, entropy, path)
    y1, h1, gx1, gs1, gb1 = _run(x, step, sharp, True, mode, entropy, path)
    assert torch.equal(y0, y1)
    rtol = 1e-9 if dtype == torch.float64 else 2e-5
    if entropy:     # the MPMF sums (and so its gradient) equal to rounding: the zeros' share is added at once
        torch.testing.assert_close(gx1, gx0, rtol=rtol, atol=1e-12 if dtype == torch.float64 else 1e-6)
    else:
        assert torch.equal(gx0, gx1)
    assert (gx1[x <= 0] == 0).all()
    if entropy:
        torch.testing.assert_close(h1, h0, rtol=1e-12 if dtype == torch.float64 else 1e-6, atol=0)
    torch.testing.assert_close(gs1, gs0, rtol=rtol, atol=0)
    torch.testing.assert_close(gb1, gb0, rtol=rtol, atol=1e-12)


def test_fused_relu_kernels_on_blocks_without_zeros_and_all_zeros():
    """forward5_relu / backward5_relu when no element, every element, and NaN elements are zeros."""
    for x in (torch.rand(3000, dtype=torch.float64) + 0.01, -torch.rand(3000, dtype=torch.float64),
              torch.cat([torch.rand(700, dtype=torch.float64), torch.tensor([float("nan")]),
                         -torch.rand(600, dtype=torch.float64)])):
        step = torch.tensor(0.3, dtype=torch.float64)
        sharp = torch.tensor(90.0, dtype=torch.float64)
        r0 = _run(x, step, sharp, False, "rcdl", True, "numba")
        r1 = _run(x, step, sharp, True, "rcdl", True, "numba")
        torch.testing.assert_close(r1[0], r0[0], rtol=0, atol=0, equal_nan=True)
        if not torch.isnan(x).any():
            for a, b in zip(r0[1:], r1[1:]):
                torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12)


def test_fused_relu_gradcheck():
    """Away from the kink at 0, the fused quantizer's gradients are its derivatives (float64)."""
    g = torch.Generator().manual_seed(2)
    x = torch.randn(300, generator=g, dtype=torch.float64)
    x = torch.where(x.abs() < 0.05, x + 0.1, x).requires_grad_()
    s = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    b = torch.tensor(40.0, dtype=torch.float64, requires_grad=True)
    for path in ("numba", "torch"):
        saved = quantizer.get_kernel_path()
        quantizer.set_kernel_path(path)
        try:
            assert torch.autograd.gradcheck(
                lambda x_, s_, b_: quantize_with_entropy_bits(x_, s_, b_, 0, 15, 5, 10.0, relu=True), (x, s, b))
        finally:
            quantizer.set_kernel_path(saved)


def test_project_parameters_clamps_steps_and_sharpnesses():
    """project_parameters (one foreach clamp) gives what clamp_(min=MIN_POSITIVE) on each gives, NaN kept."""
    from cdlcodec.cdl.convert import activation_quantizers, convert, project_parameters, weight_quantizers
    from cdlcodec.cdl.layers import MIN_POSITIVE
    from cdlcodec.models import build

    model = convert(build("lenet5"))
    values = [-1.0, 0.0, 2.5, float("nan"), -0.0, 1e-9, 3.0, -7.0]
    params = [p for _, m in weight_quantizers(model) for p in (m.q, m.alpha)]
    params += [p for _, a in activation_quantizers(model) for p in (a.s, a.beta)]
    with torch.no_grad():
        for i, p in enumerate(params):
            p.fill_(values[i % len(values)])
    expected = [p.detach().clone().clamp_(min=MIN_POSITIVE) for p in params]
    project_parameters(model)
    for p, e in zip(params, expected):
        torch.testing.assert_close(p.detach(), e, rtol=0, atol=0, equal_nan=True)
