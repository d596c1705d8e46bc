"""Qp / Qd of the CDL paper: analytic gradients (Lemma 1 + the α derivative), limits, Proposition 1."""
import pytest
import torch

from cdlcodec.cdl.quantizer import (alphabet_bounds, cpmf, hard_levels, hard_quantize,
                                    reference_soft_quantize, sample_quantize, soft_quantize)

CASES = [  # (alpha, bits, q, window, signed)
    (5.0, 3, 0.5, None, True),
    (60.0, 4, 0.2, None, True),
    (2.0, 2, 1.0, None, True),
    (500.0, 6, 0.05, None, True),
    (20.0, 4, 0.3, 5, False),    # activation: 5-level window, unsigned alphabet
    (20.0, 2, 0.3, 5, False),    # window wider than the 4-level alphabet
]


def _inputs(alpha, q, n=12, seed=0):
    g = torch.Generator().manual_seed(seed)
    theta = (torch.randn(n, generator=g, dtype=torch.float64) * q * 3).requires_grad_()
    step = torch.tensor(q, dtype=torch.float64, requires_grad=True)
    sharp = torch.tensor(alpha, dtype=torch.float64, requires_grad=True)
    return theta, step, sharp


@pytest.mark.parametrize("alpha,bits,q,window,signed", CASES)
def test_qd_gradcheck(alpha, bits, q, window, signed):
    lo, hi = alphabet_bounds(bits, signed)
    theta, step, sharp = _inputs(alpha, q)
    assert torch.autograd.gradcheck(lambda t, s, a: soft_quantize(t, s, a, lo, hi, window),
                                    (theta, step, sharp))


@pytest.mark.parametrize("alpha,bits,q,window,signed", CASES)
def test_qd_matches_closed_form_and_its_autograd(alpha, bits, q, window, signed):
    """Forward = eq. 8; backward (eq. 9a, 9b, -Cov(X,(θ-X)²)) = autograd of the closed form."""
    lo, hi = alphabet_bounds(bits, signed)
    theta, step, sharp = _inputs(alpha, q, seed=1)
    fast = soft_quantize(theta, step, sharp, lo, hi, window)
    ref = reference_soft_quantize(theta, step, sharp, lo, hi, window)
    torch.testing.assert_close(fast, ref, rtol=1e-12, atol=1e-12)
    weights = torch.linspace(-1, 2, theta.numel(), dtype=torch.float64)
    g_fast = torch.autograd.grad((fast * weights).sum(), (theta, step, sharp))
    g_ref = torch.autograd.grad((ref * weights).sum(), (theta, step, sharp))
    for a, b in zip(g_fast, g_ref):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-11)


def test_lemma1_closed_forms_explicitly():
    lo, hi = alphabet_bounds(3, True)
    theta, step, sharp = _inputs(8.0, 0.4, n=5, seed=2)
    prob, idx = cpmf(theta, step, sharp, lo, hi)
    x = idx * step
    mean = (prob * x).sum(-1)
    var = (prob * x * x).sum(-1) - mean ** 2
    skew_u = (prob * x ** 3).sum(-1) - mean * (prob * x * x).sum(-1)
    d2 = (theta.unsqueeze(-1) - x) ** 2
    cov = (prob * x * d2).sum(-1) - mean * (prob * d2).sum(-1)
    for i in range(5):
        g = torch.autograd.grad(soft_quantize(theta, step, sharp, lo, hi)[i], (theta, step, sharp))
        a = sharp.detach()
        torch.testing.assert_close(g[0][i], (2 * a * var[i]).detach())                       # eq. 9a
        torch.testing.assert_close(g[1], ((mean[i] + 2 * a * theta[i] * var[i] - 2 * a * skew_u[i])
                                          / step).detach())                                  # eq. 9b
        torch.testing.assert_close(g[2], (-cov[i]).detach())                                 # ∂/∂α


@pytest.mark.parametrize("bits,signed", [(4, True), (2, True), (4, False)])
def test_qd_tends_to_hard_quantizer(bits, signed):
    lo, hi = alphabet_bounds(bits, signed)
    q = 0.1
    theta = torch.linspace(-1.2, 1.2, 241, dtype=torch.float64)
    frac = (theta / q) - torch.round(theta / q)
    theta = theta[frac.abs() < 0.4]          # away from the midpoints, where the argmax is a tie
    hard = hard_quantize(theta, torch.tensor(q), lo, hi).double()
    errors = []
    for alpha in (1e2, 1e3, 1e4, 1e5):
        soft = soft_quantize(theta, torch.tensor(q, dtype=torch.float64),
                             torch.tensor(alpha, dtype=torch.float64), lo, hi, 5 if not signed else None)
        errors.append(float((soft - hard).abs().max()))
    assert errors[-1] < 1e-6
    assert all(b <= a + 1e-12 for a, b in zip(errors, errors[1:]))


@pytest.mark.parametrize("alpha,q", [(30.0, 0.3), (300.0, 0.1), (5.0, 0.5)])
def test_proposition1_monte_carlo(alpha, q):
    """E[(θ-Qp)²] = (θ-Qd)² + Var{Qp}, and E[Qp] = Qd, estimated from 200k samples per θ."""
    lo, hi = alphabet_bounds(3, True)
    n = 100_000
    for theta_value in (-0.37, 0.05, 0.61, 2.0):
        theta = torch.full((n,), theta_value, dtype=torch.float64)
        step = torch.tensor(q, dtype=torch.float64)
        sharp = torch.tensor(alpha, dtype=torch.float64)
        gen = torch.Generator().manual_seed(7)
        samples = sample_quantize(theta, step, sharp, lo, hi, generator=gen)
        levels = samples / q
        assert torch.allclose(levels, levels.round(), atol=1e-9)
        assert levels.round().min() >= lo and levels.round().max() <= hi
        prob, idx = cpmf(theta[:1], step, sharp, lo, hi)
        x = idx[0] * q
        qd = float((prob[0] * x).sum())
        var = float((prob[0] * x * x).sum()) - qd ** 2
        lhs = float(((theta_value - samples) ** 2).mean())
        rhs = (theta_value - qd) ** 2 + var
        # Monte Carlo error: std of (θ-Qp)² / sqrt(n), with a generous factor.
        tol = 6 * float(((theta_value - samples) ** 2).std()) / n ** 0.5 + 1e-8
        assert abs(lhs - rhs) < tol
        assert abs(float(samples.mean()) - qd) < 6 * var ** 0.5 / n ** 0.5 + 1e-8
        assert abs(float(samples.var()) - var) < 0.03 * var + 1e-8


def test_sampling_is_reproducible_and_backward_is_qd():
    lo, hi = alphabet_bounds(4, True)
    theta = torch.randn(1000, dtype=torch.float64, generator=torch.Generator().manual_seed(0)) * 0.2
    step = torch.tensor(0.05, dtype=torch.float64, requires_grad=True)
    sharp = torch.tensor(200.0, dtype=torch.float64, requires_grad=True)
    a = sample_quantize(theta, step, sharp, lo, hi, generator=torch.Generator().manual_seed(3))
    b = sample_quantize(theta, step, sharp, lo, hi, generator=torch.Generator().manual_seed(3))
    c = sample_quantize(theta, step, sharp, lo, hi, generator=torch.Generator().manual_seed(4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    th = theta.clone().requires_grad_()
    g_sample = torch.autograd.grad(sample_quantize(th, step, sharp, lo, hi).sum(), (th, step, sharp))
    g_soft = torch.autograd.grad(soft_quantize(th, step, sharp, lo, hi).sum(), (th, step, sharp))
    for x, y in zip(g_sample, g_soft):
        torch.testing.assert_close(x, y)


def test_hard_quantizer_is_argmax_of_cpmf():
    lo, hi = alphabet_bounds(4, True)
    theta = torch.randn(5000, generator=torch.Generator().manual_seed(1)) * 0.5
    step = torch.tensor(0.07)
    prob, idx = cpmf(theta.double(), step.double(), torch.tensor(50.0, dtype=torch.float64), lo, hi)
    argmax = idx.gather(-1, prob.argmax(-1, keepdim=True)).squeeze(-1).long()
    assert torch.equal(hard_levels(theta, step, lo, hi), argmax)
    assert hard_levels(theta, step, lo, hi).min() == lo and hard_levels(theta, step, lo, hi).max() == hi
