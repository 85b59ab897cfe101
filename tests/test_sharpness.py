import math

import numpy as np
import pytest
import torch
from torch import nn

from sharpscope.errors import SharpscopeError
from sharpscope.sharpness import apgd_checkpoints, average_sharpness, sharpness


class Identity(nn.Module):
    """f(x) = w for every example: the loss is then any function of w we choose."""

    def __init__(self, w0):
        super().__init__()
        self.w = nn.Parameter(torch.as_tensor(w0, dtype=torch.float64).clone())

    def forward(self, x):
        return self.w.expand(len(x), -1)


class Quadratic:
    """L(w) = g.w + 0.5 sum_i a_i w_i^2 (a_i >= 0), a closed-form test function."""

    def __init__(self, g, a):
        self.g = torch.as_tensor(g, dtype=torch.float64)
        self.a = torch.as_tensor(a, dtype=torch.float64)

    def __call__(self, outputs, targets):
        return (outputs @ self.g + 0.5 * (outputs**2) @ self.a).mean()


def data(n=4):
    return torch.zeros(n, 1, dtype=torch.float64), torch.zeros(n, dtype=torch.int64)


def l2_ball_max(grad, a, rho):
    """max_{||e|| <= rho} grad.e + 0.5 e^T diag(a) e: e = (lam - a)^-1 grad on the sphere,
    lam > max(a) solving the secular equation ||e(lam)|| = rho (More & Sorensen 1983)."""
    grad, a = np.asarray(grad, float), np.asarray(a, float)
    lo, hi = a.max() + 1e-15, a.max() + np.linalg.norm(grad) / rho + 1.0
    for _ in range(200):  # bisection: ||e(lam)|| decreases in lam
        mid = 0.5 * (lo + hi)
        if np.linalg.norm(grad / (mid - a)) > rho:
            lo = mid
        else:
            hi = mid
    e = grad / (hi - a)
    return grad @ e + 0.5 * (a * e**2).sum()


def test_linear_loss_l2_and_linf_maxima():
    g = torch.tensor([0.3, -1.2, 0.5, 2.0], dtype=torch.float64)
    model = Identity(torch.zeros(4, dtype=torch.float64))
    loss = Quadratic(g, torch.zeros(4, dtype=torch.float64))
    l2 = sharpness(model, data(), 0.1, loss_fn=loss, norm="l2")
    linf = sharpness(model, data(), 0.1, loss_fn=loss, norm="linf")
    assert l2.value == pytest.approx(0.1 * g.norm().item(), rel=1e-12)
    assert linf.value == pytest.approx(0.1 * g.abs().sum().item(), rel=1e-12)
    assert l2.eps_norm <= 0.1 + 1e-12 and linf.eps_norm <= 0.1 + 1e-12


def test_adaptive_sharpness_of_a_linear_loss_is_rho_times_norm_of_c_g():
    g = torch.tensor([0.3, -1.2, 0.5, 2.0], dtype=torch.float64)
    w0 = torch.tensor([1.0, -0.5, 2.0, 0.1], dtype=torch.float64)
    result = sharpness(
        Identity(w0),
        data(),
        0.05,
        loss_fn=Quadratic(g, torch.zeros(4, dtype=torch.float64)),
        adaptive=True,
        eta=0.01,
    )
    c = w0.abs() + 0.01
    assert result.value == pytest.approx(0.05 * (c * g).norm().item(), rel=1e-12)


def test_diagonal_quadratic_on_the_linf_box_is_exact():
    g, a = (
        torch.tensor([0.2, -0.1, 0.0, 0.4], dtype=torch.float64),
        torch.tensor([1.0, 3.0, 2.0, 0.5], dtype=torch.float64),
    )
    w0 = torch.tensor([0.1, 0.2, -0.3, 0.0], dtype=torch.float64)
    rho = 0.2
    result = sharpness(Identity(w0), data(), rho, loss_fn=Quadratic(g, a), norm="linf")
    grad = g + a * w0
    exact = (rho * grad.abs() + 0.5 * a * rho**2).sum().item()
    assert result.value == pytest.approx(exact, rel=1e-9)


@pytest.mark.parametrize("rho", [0.01, 0.3, 2.0])
def test_quadratic_on_the_l2_ball_reaches_the_trust_region_maximum(rho):
    g = torch.tensor([0.2, -0.1, 0.05, 0.4, 0.0], dtype=torch.float64)
    a = torch.tensor([1.0, 3.0, 2.0, 0.5, 0.1], dtype=torch.float64)
    w0 = torch.tensor([0.1, 0.2, -0.3, 0.0, 0.5], dtype=torch.float64)
    result = sharpness(Identity(w0), data(), rho, loss_fn=Quadratic(g, a), steps=100, restarts=3)
    exact = l2_ball_max((g + a * w0).numpy(), a.numpy(), rho)
    assert result.value <= exact + 1e-12  # a lower bound, never more
    assert result.value >= 0.999 * exact
    assert result.value == pytest.approx(result.perturbed_loss - result.loss, abs=1e-15)


def test_an_exact_minimum_needs_restarts():
    a = torch.tensor([1.0, 4.0, 2.0], dtype=torch.float64)
    model, loss = (
        Identity(torch.zeros(3, dtype=torch.float64)),
        Quadratic(torch.zeros(3, dtype=torch.float64), a),
    )
    stuck = sharpness(model, data(), 0.1, loss_fn=loss)
    assert stuck.value == 0.0  # zero gradient: zero-init ascent cannot move
    freed = sharpness(model, data(), 0.1, loss_fn=loss, restarts=3, steps=50)
    assert freed.value == pytest.approx(0.5 * 4.0 * 0.1**2, rel=1e-3)
    assert freed.value <= 0.5 * 4.0 * 0.1**2 + 1e-15


def test_m_sharpness_is_the_mean_of_per_batch_maxima(tiny_mlp, tiny_data):
    x, y = tiny_data
    whole = sharpness(tiny_mlp, (x, y), 0.1, m=8, steps=5)
    manual = [
        sharpness(tiny_mlp, (x[i : i + 8], y[i : i + 8]), 0.1, steps=5, seed=k).value
        for k, i in enumerate(range(0, len(y), 8))
    ]
    assert len(whole.per_batch) == 3
    np.testing.assert_allclose(whole.per_batch, manual, rtol=1e-12)
    assert whole.value == pytest.approx(np.mean(manual), rel=1e-12)


def test_real_model_value_is_reproducible_and_model_untouched(tiny_bn_cnn, tiny_image_data):
    before = {k: v.clone() for k, v in tiny_bn_cnn.state_dict().items()}
    tiny_bn_cnn.train()
    a = sharpness(tiny_bn_cnn, tiny_image_data, 0.05, restarts=2, return_perturbation=True)
    b = sharpness(tiny_bn_cnn, tiny_image_data, 0.05, restarts=2)
    assert a.value == b.value and a.value > 0
    assert a.perturbation.norm().item() <= 0.05 + 1e-12
    assert a.grad_count == 2 * (1 + 20)
    assert tiny_bn_cnn.training
    for k, v in tiny_bn_cnn.state_dict().items():
        assert torch.equal(v, before[k])


def test_sharpness_grows_with_rho(tiny_mlp, tiny_data):
    values = [sharpness(tiny_mlp, tiny_data, rho).value for rho in (0.01, 0.05, 0.2)]
    assert values[0] < values[1] < values[2]


def test_average_sharpness_of_a_quadratic_is_half_rho_squared_trace():
    a = torch.tensor([1.0, 4.0, 2.0, 0.5], dtype=torch.float64)
    g = torch.tensor([0.3, 0.0, -0.2, 0.1], dtype=torch.float64)
    res = average_sharpness(
        Identity(torch.zeros(4, dtype=torch.float64)),
        data(),
        0.1,
        loss_fn=Quadratic(g, a),
        samples=2000,
    )
    exact = 0.5 * 0.1**2 * a.sum().item()  # E[g.e] = 0, E[e_i^2] = rho^2
    assert abs(res.value - exact) <= 4 * res.stderr
    box = average_sharpness(
        Identity(torch.zeros(4, dtype=torch.float64)),
        data(),
        0.1,
        loss_fn=Quadratic(g, a),
        norm="linf",
        samples=2000,
    )
    assert abs(box.value - exact / 3) <= 4 * box.stderr  # E[U(-r, r)^2] = r^2 / 3


def test_checkpoint_schedule_matches_croce_and_hein():
    # p = 0.22, 0.41, 0.57, 0.7, 0.8, 0.87 ... -> for N = 100: 22, 41, 57, 70, 80, 87, ...
    assert apgd_checkpoints(100)[:6] == [22, 41, 57, 70, 80, 87]
    assert all(c <= 20 for c in apgd_checkpoints(20))


def test_bad_input(tiny_mlp, tiny_data):
    with pytest.raises(SharpscopeError, match="rho must be positive"):
        sharpness(tiny_mlp, tiny_data, 0.0)
    with pytest.raises(SharpscopeError, match="unknown norm"):
        sharpness(tiny_mlp, tiny_data, 0.1, norm="l1")
    with torch.no_grad():
        tiny_mlp[0].bias.fill_(math.nan)
    with pytest.raises(SharpscopeError, match="nan"):
        sharpness(tiny_mlp, tiny_data, 0.1)
