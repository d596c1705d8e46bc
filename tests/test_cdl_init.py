"""CDL initialisation options: least-squared-error steps, scale-aware sharpness, relative α/β rates,
and the full-precision warm start."""
import math

import numpy as np
import pytest
import torch

from cdlcodec.cdl.convert import activation_quantizers, calibrate, convert, rescale_sharpness, weight_quantizers
from cdlcodec.cdl.layers import initial_step, mse_step
from cdlcodec.cdl.optim import cdl_param_groups
from cdlcodec.cdl.train import TrainConfig, train_model
from cdlcodec.errors import CdlInputError
from cdlcodec.models import build


def _rounding_error(v, s, bits, signed):
    lo, hi = (-(1 << (bits - 1)), (1 << (bits - 1)) - 1) if signed else (0, (1 << bits) - 1)
    return float(((torch.round(v / s).clamp(lo, hi) * s - v) ** 2).mean())


@pytest.mark.parametrize("bits,signed", [(2, False), (4, False), (2, True), (4, True)])
def test_mse_step_is_a_local_minimum_no_worse_than_the_paper_step(bits, signed):
    g = torch.Generator().manual_seed(0)
    v = torch.randn(20000, generator=g)
    v = v.abs() if not signed else v
    start = initial_step(float(v.abs().mean()), bits)
    s = mse_step(v, bits, signed, start)
    err = _rounding_error(v, s, bits, signed)
    assert err <= _rounding_error(v, start, bits, signed)
    assert err <= _rounding_error(v, s * 1.1, bits, signed)
    assert err <= _rounding_error(v, s / 1.1, bits, signed)


def test_mse_step_of_uniform_values_on_the_alphabet_is_its_spacing():
    # values exactly on the levels 0, 0.5, 1.0, 1.5 of a 2-bit unsigned quantizer: zero error at s = 0.5
    v = torch.tensor([0.0, 0.5, 1.0, 1.5] * 50)
    assert mse_step(v, 2, False, 0.5 * 2 ** 0.25) == pytest.approx(0.5, rel=1e-6)


def _converted(step_init="paper"):
    torch.manual_seed(0)
    model = convert(build("lenet5"), bits=2, first_last_bits=8, mode="rcdl")
    x = torch.rand(16, 1, 28, 28, generator=torch.Generator().manual_seed(1))
    calibrate(model, x, step_init=step_init)
    return model


def test_calibrate_mse_changes_steps_and_paper_keeps_section_vi_b3():
    paper, mse = _converted("paper"), _converted("mse")
    for (_, p), (_, m) in zip(weight_quantizers(paper), weight_quantizers(mse)):
        assert p.q.item() == pytest.approx(initial_step(float(p.weight.detach().abs().mean()), int(p.bits)))
        err_p = _rounding_error(m.weight.detach(), p.q.item(), int(m.bits), True)
        err_m = _rounding_error(m.weight.detach(), m.q.item(), int(m.bits), True)
        assert err_m <= err_p
    assert any(p.s.item() != m.s.item() for (_, p), (_, m) in
               zip(activation_quantizers(paper), activation_quantizers(mse)))
    with pytest.raises(ValueError, match="step_init"):
        calibrate(paper, torch.zeros(2, 1, 28, 28), step_init="nope")


def test_rescale_sharpness_fixes_alpha_q_squared_and_relative_rates():
    model = _converted()
    rescale_sharpness(model, 8.0)
    for _, m in weight_quantizers(model):
        assert m.alpha.item() * m.q.item() ** 2 == pytest.approx(8.0, rel=1e-5)
    for _, a in activation_quantizers(model):
        assert a.beta.item() * a.s.item() ** 2 == pytest.approx(8.0, rel=1e-5)
    groups = cdl_param_groups(model, lr_w=1e-3, lr_q=1.0, lr_s=1.0, lr_alpha=3.0, lr_beta=4.0,
                              sharpness_reference=500.0)
    by_param = {id(p): g["lr"] for g in groups for p in g["params"]}
    fc1, relu1 = model.fc1, model.relu1
    assert by_param[id(fc1.alpha)] == pytest.approx(3.0 * fc1.alpha.item() / 500.0 / math.sqrt(48000))
    assert by_param[id(relu1.beta)] == pytest.approx(4.0 * relu1.beta.item() / 500.0 / math.sqrt(4704))
    # at α = β = 500 the relative rates are exactly eq. 39c/d
    plain = _converted()
    groups = cdl_param_groups(plain, lr_w=1e-3, lr_q=1.0, lr_s=1.0, lr_alpha=3.0, lr_beta=4.0,
                              sharpness_reference=500.0)
    by_param = {id(p): g["lr"] for g in groups for p in g["params"]}
    assert by_param[id(plain.fc1.alpha)] == pytest.approx(3.0 / math.sqrt(48000))


def test_fp_warm_start_then_rcdl():
    from cdlcodec.data.mnist import load_mnist_5k
    from cdlcodec.training import evaluate

    (x, y), (xt, yt) = load_mnist_5k()
    torch.manual_seed(0)
    cfg = TrainConfig(mode="rcdl", bits=4, epochs=1, fp_epochs=1, quiet=True, sharpness_init="scaled",
                      step_init="mse")
    res = train_model(build("lenet5"), x[:192], y[:192], xt[:200], yt[:200], cfg)
    assert res.warm_start is not None
    fp = build("lenet5")
    fp.load_state_dict(res.warm_start["state"])
    assert evaluate(fp.eval(), xt[:200], yt[:200]) == res.warm_start["accuracy"]
    assert res.steps == 3 and len(res.history) == 2
    assert [h["phase"] for h in res.history] == ["fp warm start", "rcdl"]
    assert set(res.warm_start["state"]) == set(build("lenet5").state_dict())
    assert len(weight_quantizers(res.model)) == 5 and not res.model.training
    assert res.test_accuracy == evaluate(res.model, xt[:200], yt[:200])


@pytest.mark.parametrize("kwargs,needle", [
    ({"mode": "fp", "fp_epochs": 1}, "fp_epochs"),  # the library names parameters; the CLI maps them to flags
    ({"fp_epochs": -1}, "fp_epochs"),
    ({"sharpness_init": "x"}, "sharpness init"),
    ({"sharpness_constant": 0.0}, "sharpness constant"),
    ({"step_init": "x"}, "step init"),
    ({"sharpness_schedule": "x"}, "sharpness schedule"),
    ({"sharpness_start": 0.0}, "sharpness start"),
    ({"sharpness_start": 9.0, "sharpness_constant": 8.0}, "sharpness start"),
    ({"anneal_fraction": 0.0}, "anneal fraction"),
])
def test_bad_init_options(kwargs, needle):
    with pytest.raises(CdlInputError, match=needle):
        TrainConfig(**kwargs).check()


def test_sharpness_anneal_floors_alpha_and_beta_on_a_geometric_ramp():
    from cdlcodec.cdl.train import SharpnessAnneal

    anneal = SharpnessAnneal(0.5, 8.0, total_steps=100, fraction=0.5)
    assert anneal.constant_at(0) == pytest.approx(0.5)
    assert anneal.constant_at(25) == pytest.approx(2.0)          # half-way up the ramp: sqrt(0.5·8)
    assert anneal.constant_at(50) == anneal.constant_at(100) == pytest.approx(8.0)
    torch.manual_seed(0)
    model = convert(build("lenet5"), bits=4, mode="rcdl")
    calibrate(model, torch.rand(8, 1, 28, 28))
    rescale_sharpness(model, 0.5)
    (_, fc2), (_, relu4) = weight_quantizers(model)[3], activation_quantizers(model)[3]
    with torch.no_grad():
        fc2.alpha.mul_(100.0)                                    # already sharper than the floor: kept
    kept = float(fc2.alpha)
    anneal.apply(model, 25)
    for _, m in weight_quantizers(model):
        assert float(m.alpha * m.q ** 2) >= 2.0 * (1 - 1e-5)
    for _, a in activation_quantizers(model):
        assert float(a.beta * a.s ** 2) == pytest.approx(2.0, rel=1e-5)
    assert float(fc2.alpha) == kept and float(relu4.beta * relu4.s ** 2) == pytest.approx(2.0, rel=1e-5)


@pytest.mark.parametrize("skip_some", [False, True])
def test_cdl_adam_equals_torch_adam(skip_some):
    """CDLAdam (the one-value groups of eq. 39 updated as one vector) moves every parameter and its
    state exactly as torch.optim.Adam does (bit for bit, 25 steps of a converted LeNet-5's groups,
    with some gradients missing on some steps), and their state_dicts load into each other."""
    import copy
    from cdlcodec.cdl.convert import calibrate, convert
    from cdlcodec.cdl.optim import CDLAdam, cdl_param_groups
    from cdlcodec.models import build

    torch.manual_seed(0)
    model = convert(build("lenet5"), bits=4, mode="rcdl")
    calibrate(model, torch.rand(8, 1, 28, 28))
    twin = copy.deepcopy(model)

    def groups(m):
        return cdl_param_groups(m, lr_w=2e-3, lr_q=3e-3, lr_s=3e-3, lr_alpha=0.05, lr_beta=0.05,
                                sharpness_reference=500.0)

    opts = (torch.optim.Adam(groups(model)), CDLAdam(groups(twin)))
    assert sum(len(g["params"]) == 1 for g in opts[1].param_groups) >= 18
    fused_sizes = []
    fused_step = opts[1]._fused_step
    opts[1]._fused_step = lambda gs: (fused_sizes.append(len(gs)), fused_step(gs))
    g = torch.Generator().manual_seed(1)
    for step in range(25):
        grads = [torch.randn(p.shape, generator=g) * 10.0 ** float(torch.randint(-4, 2, (), generator=g))
                 for p in model.parameters()]
        for m in (model, twin):
            for i, (p, gr) in enumerate(zip(m.parameters(), grads)):
                p.grad = None if skip_some and (i + step) % 5 == 0 else gr.clone()
        for opt in opts:
            opt.step()
        for a, b in zip(model.parameters(), twin.parameters()):
            assert torch.equal(a, b)
    assert len(fused_sizes) == 25 and min(fused_sizes) >= 10      # the vector path ran every step
    sa, sb = opts[0].state_dict(), opts[1].state_dict()
    assert sa["state"].keys() == sb["state"].keys()
    for k in sa["state"]:
        for name in ("step", "exp_avg", "exp_avg_sq"):
            assert torch.equal(sa["state"][k][name], sb["state"][k][name]), (k, name)
    CDLAdam(groups(copy.deepcopy(model))).load_state_dict(sa)
    torch.optim.Adam(groups(copy.deepcopy(twin))).load_state_dict(sb)
    # A state loaded into an optimizer that has stepped replaces the vectors CDLAdam updated in place
    # (`_flat_state`): both go on from the loaded values (moments zeroed here, so stale ones would show).
    for k in sa["state"]:
        sa["state"][k]["exp_avg"] = torch.zeros_like(sa["state"][k]["exp_avg"])
    for opt in opts:
        opt.load_state_dict(copy.deepcopy(sa))
    for step in range(3):
        for m in (model, twin):
            for p in m.parameters():
                p.grad = torch.full_like(p, 0.01 * (step + 1))
        for opt in opts:
            opt.step()
        for a, b in zip(model.parameters(), twin.parameters()):
            assert torch.equal(a, b)
