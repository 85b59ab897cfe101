"""SAM / ASAM / GSAM against hand-computed float64 steps, and their interface."""

from __future__ import annotations

import copy
import math
import warnings

import pytest
import torch
from torch import nn

from sharpscope.sam import GSAM, SAM, bn_running_stats_frozen, dual_norm_step, rho_from_lr


def _loss(model: nn.Module, data) -> torch.Tensor:
    x, y = data
    return nn.functional.cross_entropy(model(x), y)


def _flat_grad(model: nn.Module, data, w: torch.Tensor) -> torch.Tensor:
    """grad L at the flat weights w (float64), without touching ``model``."""
    clone = copy.deepcopy(model)
    torch.nn.utils.vector_to_parameters(w, clone.parameters())
    loss = _loss(clone, data)
    return torch.cat([g.reshape(-1) for g in torch.autograd.grad(loss, list(clone.parameters()))])


def _reference_eps(g: torch.Tensor, w: torch.Tensor, rho: float, p: float, eta=None):
    """eps = T u, u = rho sign(Tg) |Tg|^(q-1) / (||Tg||_q^(q-1) + 1e-12), T = |w| + eta
    (T = 1 without ASAM); Foret et al. 2021 eq. 2, Kwon et al. 2021."""
    T = torch.ones_like(w) if eta is None else w.abs() + eta
    v = T * g
    if math.isinf(p):
        u = rho * torch.sign(v)
    else:
        q = p / (p - 1)
        norm_q = v.abs().pow(q).sum().pow(1 / q)
        u = rho * torch.sign(v) * v.abs().pow(q - 1) / (norm_q.pow(q - 1) + 1e-12)
    return T * u


def _sam_step(model, data, opt: SAM) -> None:
    opt.zero_grad()
    _loss(model, data).backward()
    opt.first_step(zero_grad=True)
    _loss(model, data).backward()
    opt.second_step(zero_grad=True)


@pytest.mark.parametrize(
    "p, eta",
    [(2, None), (math.inf, None), (3, None), (1.5, None), (2, 0.01), (3, 0.1)],
    ids=["p2", "pinf", "p3", "p1.5", "asam-p2-eta", "asam-p3-eta"],
)
def test_sam_step_matches_float64_reference(tiny_mlp, tiny_data, p, eta):
    rho, lr = 0.3, 0.1
    w = torch.nn.utils.parameters_to_vector(tiny_mlp.parameters()).detach().clone()
    g = _flat_grad(tiny_mlp, tiny_data, w)
    eps = _reference_eps(g, w, rho, p, eta)
    expected = w - lr * _flat_grad(tiny_mlp, tiny_data, w + eps)

    opt = SAM(
        tiny_mlp.parameters(),
        torch.optim.SGD,
        rho=rho,
        p=p,
        adaptive=eta is not None,
        eta=eta or 0.0,
        lr=lr,
    )
    _sam_step(tiny_mlp, tiny_data, opt)
    got = torch.nn.utils.parameters_to_vector(tiny_mlp.parameters()).detach()
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("p", [1.0, 1.5, 2.0, 3.0, 7.0, math.inf])
def test_dual_norm_step_is_on_the_sphere_and_attains_the_dual_norm(p):
    # max_{||u||_p <= rho} <v, u> = rho ||v||_q (Hoelder), attained by the dual-norm step.
    g = torch.Generator().manual_seed(0)
    vs = [
        torch.randn(3, 4, generator=g, dtype=torch.float64),
        torch.randn(5, generator=g, dtype=torch.float64),
    ]
    rho = 0.7
    us = dual_norm_step(vs, p, rho)
    u, v = torch.cat([t.reshape(-1) for t in us]), torch.cat([t.reshape(-1) for t in vs])
    q = math.inf if p == 1 else (1.0 if math.isinf(p) else p / (p - 1))
    assert torch.linalg.vector_norm(u, p).item() == pytest.approx(rho, rel=1e-10)
    assert (u @ v).item() == pytest.approx(rho * torch.linalg.vector_norm(v, q).item(), rel=1e-10)


def test_asam_p2_is_rho_t_squared_g_over_norm_tg(tiny_mlp, tiny_data):
    """The closed form (Kwon et al. 2021): eps = rho T^2 g / (||T g|| + 1e-12), T = |w| + eta."""
    rho, eta = 0.5, 0.01
    opt = SAM(tiny_mlp.parameters(), torch.optim.SGD, rho=rho, adaptive=True, eta=eta, lr=0.1)
    _loss(tiny_mlp, tiny_data).backward()
    eps = opt.perturbation()
    for p in tiny_mlp.parameters():
        T = p.detach().abs() + eta
        norm = torch.sqrt(
            sum(((q.detach().abs() + eta) * q.grad).pow(2).sum() for q in tiny_mlp.parameters())
        )
        torch.testing.assert_close(
            eps[p], rho * T**2 * p.grad / (norm + 1e-12), rtol=1e-12, atol=1e-15
        )


def test_p1_puts_the_whole_budget_on_the_largest_gradient_entry(tiny_mlp, tiny_data):
    opt = SAM(tiny_mlp.parameters(), torch.optim.SGD, rho=0.2, p=1, lr=0.1)
    _loss(tiny_mlp, tiny_data).backward()
    eps = torch.cat([e.reshape(-1) for e in opt.perturbation().values()])
    g = torch.cat([p.grad.reshape(-1) for p in tiny_mlp.parameters()])
    i = g.abs().argmax()
    expected = torch.zeros_like(g)
    expected[i] = 0.2 * torch.sign(g[i])
    assert torch.equal(eps, expected)


@pytest.mark.parametrize(
    "base, kwargs",
    [
        (torch.optim.SGD, {"lr": 0.1, "momentum": 0.9, "weight_decay": 5e-4, "nesterov": True}),
        (torch.optim.Adam, {"lr": 1e-2, "weight_decay": 1e-3}),
    ],
    ids=["sgd-nesterov-wd", "adam"],
)
def test_rho_zero_reproduces_the_base_optimizer_exactly(tiny_bn_cnn, tiny_image_data, base, kwargs):
    a, b = tiny_bn_cnn, copy.deepcopy(tiny_bn_cnn)
    sam = SAM(a.parameters(), base, rho=0.0, **kwargs)
    plain = base(b.parameters(), **kwargs)
    for _ in range(4):
        _loss(a, tiny_image_data).backward()
        sam.first_step(zero_grad=True)
        with bn_running_stats_frozen(a):
            _loss(a, tiny_image_data).backward()
        sam.second_step(zero_grad=True)
        _loss(b, tiny_image_data).backward()
        plain.step()
        plain.zero_grad()
    for (name, ta), tb in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
        assert torch.equal(ta, tb), name


def test_gsam_alpha_zero_equals_sam_and_alpha_matches_reference(tiny_mlp, tiny_data):
    a, b, c = tiny_mlp, copy.deepcopy(tiny_mlp), copy.deepcopy(tiny_mlp)
    sam = SAM(a.parameters(), torch.optim.SGD, rho=0.2, lr=0.1, momentum=0.9)
    gsam0 = GSAM(b.parameters(), torch.optim.SGD, rho=0.2, alpha=0.0, lr=0.1, momentum=0.9)
    for _ in range(3):
        _sam_step(a, tiny_data, sam)
        _sam_step(b, tiny_data, gsam0)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)

    # alpha > 0: update direction g_p - alpha (g - (g . g_p / ||g_p||^2) g_p)
    # (Zhuang et al. 2022, Algorithm 1), one plain SGD step.
    alpha, rho, lr = 0.3, 0.2, 0.1
    w = torch.nn.utils.parameters_to_vector(c.parameters()).detach().clone()
    g = _flat_grad(c, tiny_data, w)
    gp = _flat_grad(c, tiny_data, w + rho * g / (g.norm() + 1e-12))
    perp = g - (g @ gp) / (gp @ gp + 1e-12) * gp  # +1e-12: the guard of eps
    expected = w - lr * (gp - alpha * perp)
    gsam = GSAM(c.parameters(), torch.optim.SGD, rho=rho, alpha=alpha, lr=lr)
    _sam_step(c, tiny_data, gsam)
    got = torch.nn.utils.parameters_to_vector(c.parameters()).detach()
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-14)


def test_rho_from_lr_is_linear_between_the_endpoints():
    assert rho_from_lr(0.1, 0.1, 0.0, 0.05, 0.01) == pytest.approx(0.05)
    assert rho_from_lr(0.0, 0.1, 0.0, 0.05, 0.01) == pytest.approx(0.01)
    assert rho_from_lr(0.025, 0.1, 0.0, 0.05, 0.01) == pytest.approx(0.02)
    assert rho_from_lr(0.1, 0.1, 0.1, 0.05, 0.01) == 0.05  # constant lr: rho_max


def test_bn_running_stats_unchanged_by_the_perturbed_pass(tiny_bn_cnn, tiny_image_data):
    model = tiny_bn_cnn
    opt = SAM(model.parameters(), torch.optim.SGD, rho=0.5, lr=0.1)
    _loss(model, tiny_image_data).backward()
    after_clean = {k: v.clone() for k, v in model.named_buffers()}
    bn = model[1]
    assert int(bn.num_batches_tracked) == 4  # the fixture's 3 passes + the clean pass
    opt.first_step(zero_grad=True)
    with bn_running_stats_frozen(model):
        # still normalizes with batch statistics: output equals F.batch_norm in training form
        x = model[0](tiny_image_data[0])
        expected = nn.functional.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
        torch.testing.assert_close(bn(x), expected)
        _loss(model, tiny_image_data).backward()
    opt.second_step(zero_grad=True)
    for name, value in model.named_buffers():
        assert torch.equal(value, after_clean[name]), name
    assert bn.track_running_stats and bn.training  # flags restored


def test_bn_freeze_leaves_eval_mode_layers_alone(tiny_bn_cnn, tiny_image_data):
    model = tiny_bn_cnn.eval()
    with torch.no_grad():
        before = model(tiny_image_data[0])
        with bn_running_stats_frozen(model):
            inside = model(tiny_image_data[0])
    assert torch.equal(before, inside)  # running statistics still used in eval mode


def test_state_dict_round_trip_resumes_exactly(tiny_mlp, tiny_data, tmp_path):
    kwargs = {"rho": 0.1, "lr": 0.05, "momentum": 0.9, "weight_decay": 1e-3}
    a = tiny_mlp
    opt_a = SAM(a.parameters(), torch.optim.SGD, **kwargs)
    for _ in range(3):
        _sam_step(a, tiny_data, opt_a)
    path = tmp_path / "opt.pt"
    torch.save({"model": a.state_dict(), "opt": opt_a.state_dict()}, path)
    saved = torch.load(path, weights_only=True)
    assert any("momentum_buffer" in s for s in saved["opt"]["state"].values())
    b = copy.deepcopy(a)
    with torch.no_grad():
        for p in b.parameters():
            p.zero_()
    b.load_state_dict(saved["model"])
    opt_b = SAM(b.parameters(), torch.optim.SGD, rho=0.7, lr=1.0)  # replaced by the load
    opt_b.load_state_dict(saved["opt"])
    assert (
        opt_b.param_groups[0]["rho"] == 0.1
        and opt_b.base_optimizer.param_groups is opt_b.param_groups
    )
    for _ in range(2):
        _sam_step(a, tiny_data, opt_a)
        _sam_step(b, tiny_data, opt_b)
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_scheduler_attaches_without_warning_and_drives_the_base_lr(tiny_mlp, tiny_data):
    opt = SAM(tiny_mlp.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=1, gamma=0.5)
        for _ in range(3):
            _sam_step(tiny_mlp, tiny_data, opt)
            sched.step()
    assert opt.base_optimizer.param_groups[0]["lr"] == pytest.approx(0.1 * 0.5**3)


def test_step_with_closure_equals_first_and_second_step(tiny_mlp, tiny_data):
    a, b = tiny_mlp, copy.deepcopy(tiny_mlp)
    opt_a = SAM(a.parameters(), torch.optim.SGD, rho=0.1, p="inf", lr=0.1)
    opt_b = SAM(b.parameters(), torch.optim.SGD, rho=0.1, p="inf", lr=0.1)
    _sam_step(a, tiny_data, opt_a)
    _loss(b, tiny_data).backward()
    loss = opt_b.step(lambda: _loss(b, tiny_data).backward() or 1.0)
    assert loss == 1.0
    for pa, pb in zip(a.parameters(), b.parameters(), strict=True):
        assert torch.equal(pa, pb)


def test_weights_restored_from_a_copy_not_by_subtraction(tiny_mlp, tiny_data):
    w = [p.detach().clone() for p in tiny_mlp.parameters()]
    opt = SAM(tiny_mlp.parameters(), torch.optim.SGD, rho=1e3, lr=0.0)
    _loss(tiny_mlp, tiny_data).backward()
    opt.first_step(zero_grad=True)
    _loss(tiny_mlp, tiny_data).backward()
    opt.second_step()
    for p, p0 in zip(tiny_mlp.parameters(), w, strict=True):
        assert torch.equal(p, p0)  # bit-exact even after a huge excursion


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"rho": -0.1}, "rho"),
        ({"p": 0.5}, "p must"),
        ({"p": "two"}, "p must"),
        ({"eta": -1}, "eta"),
    ],
)
def test_bad_arguments_are_refused(tiny_mlp, kwargs, match):
    with pytest.raises(ValueError, match=match):
        SAM(tiny_mlp.parameters(), torch.optim.SGD, lr=0.1, **kwargs)


def test_step_without_closure_is_refused(tiny_mlp):
    opt = SAM(tiny_mlp.parameters(), torch.optim.SGD, lr=0.1)
    with pytest.raises(ValueError, match="closure"):
        opt.step()


# -- SAM with a torch.amp.GradScaler (a CPU scaler works on float32/float64 gradients) --------
PATTERN = r"sam\.first_step\(zero_grad=True, scaler=scaler\)"


def _flat(model: nn.Module) -> torch.Tensor:
    return torch.nn.utils.parameters_to_vector(model.parameters()).detach().clone()


def _scaled_sam_step(
    model, data, opt: SAM, scaler, finish: str = "scaler.step", poison=None, seen=None
):
    """The documented pattern; ``poison`` ("first"/"second") puts an inf in one gradient;
    ``seen`` collects the weights each pass ran at."""

    def backward(which: str) -> None:
        if seen is not None:
            seen.append(_flat(model))
        scaler.scale(_loss(model, data)).backward()
        if poison == which:
            next(model.parameters()).grad.view(-1)[0] = math.inf

    opt.zero_grad()
    backward("first")
    if finish == "step(closure)":
        opt.step(lambda: backward("second"), scaler=scaler)
    else:
        opt.first_step(zero_grad=True, scaler=scaler)
        backward("second")
        if finish == "scaler.step":
            scaler.step(opt)
        elif finish == "unperturb+scaler.step":
            opt.unperturb()
            scaler.step(opt)
        else:
            opt.second_step()
    scaler.update()
    opt.zero_grad()


FINISHES = ["scaler.step", "second_step", "unperturb+scaler.step", "step(closure)"]


@pytest.mark.parametrize("finish", FINISHES)
@pytest.mark.parametrize("cls", [SAM, GSAM])
def test_scaled_step_equals_the_unscaled_step(tiny_mlp, tiny_data, cls, finish):
    a, b = tiny_mlp, copy.deepcopy(tiny_mlp)
    kwargs = {"rho": 0.2, "lr": 0.1, "momentum": 0.9}
    plain, scaled = (
        cls(a.parameters(), torch.optim.SGD, **kwargs),
        cls(b.parameters(), torch.optim.SGD, **kwargs),
    )
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    for _ in range(3):
        _sam_step(a, tiny_data, plain)
        _scaled_sam_step(b, tiny_data, scaled, scaler, finish)
    # The scale is a power of two: scaling and unscaling are exact.
    torch.testing.assert_close(_flat(b), _flat(a), rtol=1e-12, atol=0)
    assert scaler.get_scale() == 2.0**16  # no pass was non-finite


def test_scaled_step_of_a_float32_model_matches_the_float32_step(tiny_mlp, tiny_data):
    a = tiny_mlp.float()
    b = copy.deepcopy(a)
    data = (tiny_data[0].float(), tiny_data[1])
    w = _flat(a)
    plain = SAM(a.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    scaled = SAM(b.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    _sam_step(a, data, plain)
    _scaled_sam_step(b, data, scaled, torch.amp.GradScaler("cpu", init_scale=2.0**24))
    torch.testing.assert_close(_flat(b) - w, _flat(a) - w, rtol=1e-6, atol=1e-9)


@pytest.mark.parametrize("finish", FINISHES)
@pytest.mark.parametrize("poison", ["first", "second"])
def test_a_non_finite_gradient_skips_the_whole_step_and_backs_off(
    tiny_mlp, tiny_data, poison, finish
):
    model = tiny_mlp
    w = _flat(model)
    opt = GSAM(model.parameters(), torch.optim.SGD, rho=0.2, lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    seen = []
    _scaled_sam_step(model, tiny_data, opt, scaler, finish, poison=poison, seen=seen)
    assert torch.equal(_flat(model), w)  # back at w, no base step
    assert not opt.state  # no momentum buffer: the base optimizer never stepped
    assert scaler.get_scale() == 2.0**15
    if poison == "first":  # eps = 0: the second pass ran at w, not at a NaN point
        assert torch.equal(seen[1], w)

    # The next step runs normally, at the reduced scale.
    ref = copy.deepcopy(model)
    _sam_step(ref, tiny_data, GSAM(ref.parameters(), torch.optim.SGD, rho=0.2, lr=0.1))
    opt2 = GSAM(model.parameters(), torch.optim.SGD, rho=0.2, lr=0.1)
    _scaled_sam_step(model, tiny_data, opt2, scaler, finish)
    torch.testing.assert_close(_flat(model), _flat(ref), rtol=1e-12, atol=0)


def test_scaler_step_with_a_closure_is_refused_at_w(tiny_mlp, tiny_data):
    # Was silently wrong: the gradient at w + eps stayed scaled (an update ~1e5 too large).
    opt = SAM(tiny_mlp.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    w = _flat(tiny_mlp)
    calls = []
    scaler.scale(_loss(tiny_mlp, tiny_data)).backward()
    with pytest.raises(RuntimeError, match=r"scaler\.step\(opt, closure\).*" + PATTERN):
        scaler.step(opt, lambda: calls.append(1))
    assert not calls and torch.equal(_flat(tiny_mlp), w)
    assert not hasattr(opt, "found_inf") and not hasattr(opt, "grad_scale")


def _misuse_no_first_step(model, data, opt, scaler):
    scaler.scale(_loss(model, data)).backward()
    scaler.step(opt)


def _misuse_first_step_without_scaler(model, data, opt, scaler):
    scaler.scale(_loss(model, data)).backward()
    scaler.unscale_(opt)
    opt.first_step(zero_grad=True)
    scaler.scale(_loss(model, data)).backward()
    scaler.step(opt)  # the gradient at w + eps is scaled, and SAM was never told by what


def _misuse_unscale_before_first_step(model, data, opt, scaler):
    scaler.scale(_loss(model, data)).backward()
    scaler.unscale_(opt)
    opt.first_step(zero_grad=True, scaler=scaler)


def _misuse_no_update(model, data, opt, scaler):
    scaler.scale(_loss(model, data)).backward()
    opt.first_step(zero_grad=True, scaler=scaler)
    scaler.scale(_loss(model, data)).backward()
    scaler.step(opt)
    opt.zero_grad()
    scaler.scale(_loss(model, data)).backward()
    opt.first_step(zero_grad=True, scaler=scaler)


def _misuse_unfinished(model, data, opt, scaler):
    scaler.scale(_loss(model, data)).backward()
    opt.first_step(zero_grad=True, scaler=scaler)
    scaler.scale(_loss(model, data)).backward()
    opt.unperturb()
    opt.base_optimizer.step()  # bypasses the inf check
    scaler.update()
    opt.zero_grad()
    scaler.scale(_loss(model, data)).backward()
    opt.first_step(zero_grad=True, scaler=scaler)


@pytest.mark.parametrize(
    "misuse, match",
    [
        (_misuse_no_first_step, "only finishes"),
        (_misuse_first_step_without_scaler, "without an enabled scaler"),
        (_misuse_unscale_before_first_step, "already ran"),
        (_misuse_no_update, r"scaler\.update\(\) after every step"),
        (_misuse_unfinished, "before the last scaled step was finished"),
    ],
    ids=["no-first-step", "first-step-without-scaler", "unscale-first", "no-update", "unfinished"],
)
def test_misuse_with_a_scaler_raises_naming_the_pattern(tiny_mlp, tiny_data, misuse, match):
    opt = SAM(tiny_mlp.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    with pytest.raises(RuntimeError, match=match + ".*" + PATTERN):
        misuse(tiny_mlp, tiny_data, opt, scaler)
    if misuse is _misuse_first_step_without_scaler:
        assert not opt._saved  # abandoned, back at w


def test_documented_pattern_with_accumulation_and_clipping_matches_a_reference(tiny_mlp, tiny_data):
    model, (x, y) = tiny_mlp, tiny_data
    rho, lr, max_norm = 0.1, 0.5, 0.05
    w = _flat(model)
    g = _flat_grad(model, tiny_data, w)
    g2 = _flat_grad(model, tiny_data, w + rho * g / (g.norm() + 1e-12))
    assert g2.norm() > 2 * max_norm  # the clip is active
    expected = w - lr * g2 * (max_norm / (g2.norm() + 1e-6))  # clip_grad_norm_'s formula

    optimizer = SAM(model.parameters(), torch.optim.SGD, rho=rho, lr=lr)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    micro_batches = [(x[i : i + 8], y[i : i + 8]) for i in range(0, len(y), 8)]  # 8, 8, 7

    def accumulate(micro_batches):
        for xb, yb in micro_batches:
            loss = nn.functional.cross_entropy(model(xb), yb) * len(yb) / len(y)
            scaler.scale(loss).backward()

    optimizer.zero_grad()
    accumulate(micro_batches)
    optimizer.first_step(zero_grad=True, scaler=scaler)
    with bn_running_stats_frozen(model):
        accumulate(micro_batches)
    scaler.unscale_(optimizer)
    torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=max_norm)
    scaler.step(optimizer)
    scaler.update()
    torch.testing.assert_close(_flat(model), expected, rtol=1e-12, atol=1e-14)


def test_a_disabled_scaler_gives_the_plain_step(tiny_mlp, tiny_data):
    a, b = tiny_mlp, copy.deepcopy(tiny_mlp)
    plain = SAM(a.parameters(), torch.optim.SGD, rho=0.2, lr=0.1, momentum=0.9)
    off = SAM(b.parameters(), torch.optim.SGD, rho=0.2, lr=0.1, momentum=0.9)
    scaler = torch.amp.GradScaler("cpu", enabled=False)
    for finish in FINISHES:
        _sam_step(a, tiny_data, plain)
        _scaled_sam_step(b, tiny_data, off, scaler, finish)
    assert torch.equal(_flat(a), _flat(b))


def test_fp16_autocast_step_matches_the_float32_step_at_fp16_tolerance():
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(8, 16), nn.Tanh(), nn.Linear(16, 4))
    x, y = torch.randn(64, 8), torch.randint(4, (64,))
    try:
        with torch.autocast("cpu", dtype=torch.float16):
            assert model(x).dtype == torch.float16
    except (RuntimeError, AssertionError) as e:
        pytest.skip(f"no float16 autocast on this CPU build: {e}")
    a, b = model, copy.deepcopy(model)
    w = _flat(a)
    plain = SAM(a.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    _sam_step(a, (x, y), plain)

    def loss16():
        with torch.autocast("cpu", dtype=torch.float16):
            return nn.functional.cross_entropy(b(x), y)

    scaled = SAM(b.parameters(), torch.optim.SGD, rho=0.05, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
    scaler.scale(loss16()).backward()
    scaled.first_step(zero_grad=True, scaler=scaler)
    scaler.scale(loss16()).backward()
    scaler.step(scaled)
    scaler.update()
    d32, d16 = _flat(a) - w, _flat(b) - w
    assert d16.norm() == pytest.approx(d32.norm().item(), rel=1e-2)
    torch.testing.assert_close(d16, d32, rtol=2e-2, atol=2e-3 * d32.abs().max().item())
