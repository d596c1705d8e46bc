"""MPMF and entropy terms (eq. 25-29)."""
import math

import numpy as np
import pytest
import torch

from cdlcodec.cdl.entropy import entropy_bits, mpmf, reference_mpmf
from cdlcodec.cdl.metrics import empirical_entropy_bits, huffman_code_bits
from cdlcodec.cdl.quantizer import alphabet_bounds, hard_levels


@pytest.mark.parametrize("bits,signed,window", [(4, True, None), (2, True, None), (3, False, 5)])
def test_mpmf_matches_reference_and_gradcheck(bits, signed, window):
    lo, hi = alphabet_bounds(bits, signed)
    g = torch.Generator().manual_seed(0)
    theta = (torch.randn(16, generator=g, dtype=torch.float64) * 0.4).requires_grad_()
    step = torch.tensor(0.15, dtype=torch.float64, requires_grad=True)
    sharp = torch.tensor(40.0, dtype=torch.float64, requires_grad=True)
    fast = mpmf(theta, step, sharp, lo, hi, window)
    ref = reference_mpmf(theta, step, sharp, lo, hi, window)
    torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-13)
    assert abs(float(fast.detach().sum()) - 1) < 1e-12
    assert torch.autograd.gradcheck(lambda t, s, a: entropy_bits(mpmf(t, s, a, lo, hi, window)),
                                    (theta, step, sharp))
    g_fast = torch.autograd.grad(entropy_bits(fast), (theta, step, sharp))
    g_ref = torch.autograd.grad(entropy_bits(ref), (theta, step, sharp))
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("bits,signed,window", [(4, True, None), (6, True, None), (4, False, 5)])
def test_mpmf_entropy_equals_histogram_entropy_for_large_alpha(bits, signed, window):
    lo, hi = alphabet_bounds(bits, signed)
    q = 0.05
    rng = np.random.default_rng(0)
    theta = rng.laplace(0.0, 0.08, 20000) + (0.15 if not signed else 0.0)
    # Move values that sit near a midpoint (ties of the argmax) a little inward.
    frac = theta / q - np.round(theta / q)
    theta = np.where(np.abs(frac) > 0.45, np.round(theta / q) * q, theta)
    t = torch.tensor(theta)
    alpha = torch.tensor(1e6, dtype=torch.float64)
    h_mpmf = float(entropy_bits(mpmf(t, torch.tensor(q, dtype=torch.float64), alpha, lo, hi, window)))
    levels = hard_levels(t.float(), torch.tensor(q), lo, hi).numpy()
    assert abs(h_mpmf - empirical_entropy_bits(levels)) < 1e-6


def test_mpmf_entropy_is_larger_for_smaller_alpha():
    lo, hi = alphabet_bounds(4, True)
    t = torch.randn(5000, generator=torch.Generator().manual_seed(2), dtype=torch.float64) * 0.1
    q = torch.tensor(0.05, dtype=torch.float64)
    hs = [float(entropy_bits(mpmf(t, q, torch.tensor(a, dtype=torch.float64), lo, hi)))
          for a in (10.0, 100.0, 1e3, 1e5)]
    assert hs == sorted(hs, reverse=True)


def test_entropy_bits_of_known_pmfs():
    assert float(entropy_bits(torch.tensor([0.5, 0.5]))) == pytest.approx(1.0)
    assert float(entropy_bits(torch.tensor([1.0, 0.0, 0.0]))) == pytest.approx(0.0)
    assert float(entropy_bits(torch.full((8,), 1 / 8))) == pytest.approx(3.0)


def test_local_huffman_code_length():
    # counts 5,2,1,1 -> code lengths 1,2,3,3 -> 5+4+3+3 = 15 bits
    levels = np.array([0] * 5 + [1] * 2 + [2] + [3])
    assert huffman_code_bits(levels) == 15
    assert huffman_code_bits(np.zeros(7, dtype=np.int64)) == 7
    levels = np.random.default_rng(0).integers(-8, 8, 4096)
    h = empirical_entropy_bits(levels) * levels.size
    assert h <= huffman_code_bits(levels) < h + levels.size
    assert math.isclose(empirical_entropy_bits(np.arange(16)), 4.0)


@pytest.mark.parametrize("mode", ["rcdl", "cdl"])
def test_tracked_weight_entropy_equals_a_separate_pass(mode):
    """With weight entropy tracking (one quantizer pass gives the quantized weights and the MPMF), the
    eq. 30 loss, its gradients and the CDL samples are those of a separate MPMF pass; the tracked
    value is taken once, so a second loss without a new forward computes it afresh."""
    from cdlcodec.cdl.convert import calibrate, convert, set_entropy_tracking, set_generator, weight_quantizers
    from cdlcodec.cdl.loss import cdl_loss
    from cdlcodec.models import build

    torch.manual_seed(0)
    x, y = torch.rand(8, 1, 28, 28), torch.arange(8) % 10
    results = []
    for tracked in (False, True):
        torch.manual_seed(1)
        model = convert(build("lenet5"), bits=4, mode=mode)
        calibrate(model, x, step_init="mse")
        set_generator(model, torch.Generator().manual_seed(2))
        set_entropy_tracking(model, True, weights=tracked)
        model.train()
        logits = model(x)
        layers = weight_quantizers(model)
        assert all((m.last_entropy_bits is not None) == tracked for _, m in layers)
        parts = cdl_loss(model, logits, y, lam=1e-4, gamma=1e-4)
        parts.total.backward()
        assert all(m.last_entropy_bits is None for _, m in layers)         # taken by the loss
        results.append((parts.total.detach(), [p.grad.clone() for p in model.parameters()]))
        if tracked:
            again = cdl_loss(model, model.fc3.weight.new_zeros(8, 10), y, lam=1e-4)
            separate = sum(m.weight_entropy_bits() for _, m in layers)
            torch.testing.assert_close(again.weight_bits, float(separate.detach()))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b, rtol=1e-6, atol=0)
    for a, b in zip(grads_a, grads_b):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("window,signed,bits,alpha", [(5, False, 4, 89.0), (None, True, 4, 800.0),
                                                      (None, True, 8, 3200.0)])
def test_quantize_with_entropy_bits_matches_the_autograd_chain(dtype, window, signed, bits, alpha):
    """quantize_with_entropy_bits (one autograd node for scale·H) gives the value of
    scale * entropy_bits(quantize_with_mpmf(...)[1]) (float64 to 1e-12, float32 to 1e-6) and its gradients in θ, step and
    sharpness (float64 to 1e-12 relative), with empty bins (p < 1e-30) in the alphabet; gradcheck."""
    from cdlcodec.cdl.entropy import _SumsEntropyBits, quantize_with_entropy_bits
    from cdlcodec.cdl.quantizer import quantize_with_mpmf

    lo, hi = alphabet_bounds(bits, signed)
    q = 0.1 if window is None else 0.3
    g = torch.Generator().manual_seed(3)
    theta = (torch.randn(3000, generator=g, dtype=torch.float64) * q * 2).to(dtype)
    if not signed:
        theta = theta.abs()
        theta[::3] = 0.0
    theta.requires_grad_()
    step = torch.tensor(q, dtype=dtype, requires_grad=True)
    sharp = torch.tensor(alpha, dtype=dtype, requires_grad=True)
    scale = 784
    out = []
    for fused in (False, True):
        if fused:
            y, bits_ = quantize_with_entropy_bits(theta, step, sharp, lo, hi, window, scale)
        else:
            y, pmf = quantize_with_mpmf(theta, step, sharp, lo, hi, window)
            if bits == 8 or not signed:      # empty bins: the clamp's zero-gradient side is exercised
                assert (pmf == 0).any()
            bits_ = scale * entropy_bits(pmf)
        grads = torch.autograd.grad(bits_ * 3.0 + (y * y).sum(), (theta, step, sharp))
        out.append((bits_.detach(), y.detach(), grads))
    (b0, y0, g0), (b1, y1, g1) = out
    assert torch.equal(y0, y1)
    # The numba path takes H in float64 from the kernel's float64 sums (the chain: in θ's dtype).
    torch.testing.assert_close(b1, b0, rtol=1e-12 if dtype == torch.float64 else 1e-6, atol=0)
    tol = dict(rtol=1e-12, atol=1e-15) if dtype == torch.float64 else dict(rtol=1e-5, atol=1e-6)
    for a, b in zip(g1, g0):
        torch.testing.assert_close(a, b, **tol)
    if dtype == torch.float64:
        sums = torch.rand(12, dtype=torch.float64, generator=g) * 50 + 0.1   # (at p = 0, H is not differentiable)
        assert torch.autograd.gradcheck(lambda s: _SumsEntropyBits.apply(s, 60, 7.0), (sums.requires_grad_(),))
