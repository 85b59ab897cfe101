import itertools
import json
import math
import os

import numpy as np
import pytest
import torch
from torch import nn

from sharpscope.errors import SharpscopeError
from sharpscope.losses import mse
from sharpscope.sharpness import apgd_checkpoints, average_sharpness, sharpness
from tests.distributed_utils import run_distributed


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


# --------------------------------------------------------------------------- a real model
# A linear model under the MSE loss: L(w + e) = L(w) + g.e + 0.5 e^T A e exactly, with
# A = dense Hessian (PSD), so its maxima over the l2 ball and the linf box are known.


def linear_mse_problem(n=12, d=2, classes=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    model = nn.Linear(d, classes).double()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64))
    x = torch.randn(n, d, generator=g, dtype=torch.float64)
    y = torch.randint(classes, (n,), generator=g)
    return model, (x, y)


def gradient_and_hessian(model, data):
    """Flat gradient and dense Hessian of the MSE loss in the Objective's layout
    (parameters in named_parameters order, each flattened)."""
    names = [n for n, _ in model.named_parameters()]
    shapes = [p.shape for _, p in model.named_parameters()]
    w0 = torch.cat([p.detach().reshape(-1) for p in model.parameters()])

    def loss_at(w):
        params, offset = {}, 0
        for name, shape in zip(names, shapes, strict=True):
            params[name] = w[offset : offset + shape.numel()].view(shape)
            offset += shape.numel()
        return mse(torch.func.functional_call(model, params, (data[0],)), data[1])

    w = w0.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(loss_at(w), w)
    return grad, torch.autograd.functional.hessian(loss_at, w0)


def l2_max_dense(grad, hessian, rho):
    """The trust-region maximum for a dense PSD Hessian, in its eigenbasis."""
    a, q = torch.linalg.eigh(hessian)
    return l2_ball_max((q.T @ grad).numpy(), a.clamp(min=0).numpy(), rho)


def linf_max_by_vertices(grad, hessian, rho):
    """max over the box of a convex quadratic: the best of its 2^n vertices."""
    n = len(grad)
    signs = torch.tensor(list(itertools.product((-1.0, 1.0), repeat=n)), dtype=torch.float64)
    e = rho * signs
    return (e @ grad + 0.5 * ((e @ hessian) * e).sum(1)).max().item()


@pytest.mark.parametrize("rho", [0.05, 0.5])
def test_linear_mse_model_l2_sharpness_reaches_the_trust_region_maximum(rho):
    model, data = linear_mse_problem()
    grad, hessian = gradient_and_hessian(model, data)
    exact = l2_max_dense(grad, hessian, rho)
    result = sharpness(model, data, rho, loss_fn=mse, steps=100, restarts=3)
    assert result.value <= exact + 1e-12
    assert result.value >= (1 - 1e-4) * exact
    assert result.eps_norm <= rho * (1 + 1e-12)


@pytest.mark.parametrize("rho", [0.05, 0.5])
def test_linear_mse_model_linf_sharpness_reaches_the_best_vertex(rho):
    model, data = linear_mse_problem()  # 9 parameters: 512 vertices
    grad, hessian = gradient_and_hessian(model, data)
    exact = linf_max_by_vertices(grad, hessian, rho)
    result = sharpness(
        model, data, rho, loss_fn=mse, norm="linf", steps=100, restarts=5, return_perturbation=True
    )
    assert result.value <= exact + 1e-12
    assert result.value >= (1 - 1e-9) * exact
    assert result.perturbation.abs().max().item() <= rho * (1 + 1e-12)


def test_adaptive_l2_sharpness_is_the_trust_region_maximum_in_scaled_coordinates():
    # With eps = c u: L(w + c u) - L(w) = (c g).u + 0.5 u^T diag(c) A diag(c) u, ||u|| <= rho.
    model, data = linear_mse_problem(seed=1)
    grad, hessian = gradient_and_hessian(model, data)
    c = torch.cat([p.detach().abs().reshape(-1) for p in model.parameters()]) + 0.01
    rho = 0.3
    exact = l2_max_dense(c * grad, c[:, None] * hessian * c[None, :], rho)
    result = sharpness(
        model,
        data,
        rho,
        loss_fn=mse,
        adaptive=True,
        eta=0.01,
        steps=100,
        restarts=3,
        return_perturbation=True,
    )
    assert result.value <= exact + 1e-12 and result.value >= (1 - 1e-4) * exact
    assert torch.linalg.vector_norm(result.perturbation / c).item() <= rho * (1 + 1e-12)
    assert result.adaptive and result.eta == 0.01


def test_adaptive_linf_box_on_a_diagonal_quadratic_is_exact():
    # u in the box [-rho, rho]^n, eps = c u: the maximum is at u = rho sign(c grad), giving
    # sum_i rho c_i |grad_i| + 0.5 a_i c_i^2 rho^2.
    g = torch.tensor([0.2, -0.1, 0.0, 0.4], dtype=torch.float64)
    a = torch.tensor([1.0, 3.0, 2.0, 0.5], dtype=torch.float64)
    w0 = torch.tensor([0.1, 0.2, -0.3, 1.5], dtype=torch.float64)
    rho, c = 0.2, w0.abs()
    result = sharpness(
        Identity(w0), data(), rho, loss_fn=Quadratic(g, a), norm="linf", adaptive=True
    )
    grad = g + a * w0
    exact = (rho * c * grad.abs() + 0.5 * a * c**2 * rho**2).sum().item()
    assert result.value == pytest.approx(exact, rel=1e-9)


def test_m_sharpness_of_the_linear_mse_model_is_the_mean_of_exact_batch_maxima():
    model, (x, y) = linear_mse_problem(n=12)
    rho, m = 0.3, 4
    exact = []
    for i in range(0, 12, m):
        grad, hessian = gradient_and_hessian(model, (x[i : i + m], y[i : i + m]))
        exact.append(l2_max_dense(grad, hessian, rho))
    result = sharpness(model, (x, y), rho, loss_fn=mse, m=m, steps=100, restarts=3)
    np.testing.assert_allclose(result.per_batch, exact, rtol=1e-4)
    assert all(v <= e + 1e-12 for v, e in zip(result.per_batch, exact, strict=True))
    assert result.value == pytest.approx(np.mean(result.per_batch), rel=1e-12)
    whole = sharpness(model, (x, y), rho, loss_fn=mse, steps=100, restarts=3)
    assert whole.value < result.value  # each batch climbs its own way (Foret et al. Sec 4.1)


def test_seeds_reproduce_and_select_the_restarts():
    # At an exact minimum only the random restarts move, so the seed picks the answer.
    a = torch.tensor([1.0, 4.0, 2.0], dtype=torch.float64)
    model, loss = (
        Identity(torch.zeros(3, dtype=torch.float64)),
        Quadratic(torch.zeros(3, dtype=torch.float64), a),
    )
    kwargs = {"loss_fn": loss, "restarts": 3, "steps": 3, "return_perturbation": True}
    first = sharpness(model, data(), 0.5, seed=1, **kwargs)
    again = sharpness(model, data(), 0.5, seed=1, **kwargs)
    other = sharpness(model, data(), 0.5, seed=2, **kwargs)
    assert first.value == again.value and torch.equal(first.perturbation, again.perturbation)
    assert not torch.equal(first.perturbation, other.perturbation)
    assert first.seed == 1 and other.seed == 2


def test_result_to_dict_is_plain_json():
    model, data = linear_mse_problem()
    result = sharpness(model, data, 0.1, loss_fn=mse, m=6, steps=2, return_perturbation=True)
    doc = json.loads(json.dumps(result.to_dict()))
    assert "perturbation" not in doc and len(doc["per_batch"]) == 2
    for key in ("rho", "norm", "adaptive", "eta", "steps", "restarts", "m", "seed"):
        assert doc[key] == getattr(result, key)
    assert doc["n_examples"] == 12 and doc["n_params"] == 9 and doc["param_filter"] == "all"


def test_weights_filter_leaves_the_bias_out():
    model, data = linear_mse_problem()
    result = sharpness(
        model, data, 0.1, loss_fn=mse, param_filter="weights", return_perturbation=True
    )
    assert result.n_params == 6 and result.param_filter == "weights"
    assert result.perturbation.shape == (6,)


def m_sharpness_on_ranks(rank, world, out_dir):
    model, data = linear_mse_problem(n=13)  # 13 examples: uneven shards and batches
    result = sharpness(model, data, 0.3, loss_fn=mse, m=4, steps=5, restarts=2)
    torch.save(result.to_dict(), os.path.join(out_dir, f"rank{rank}.pt"))


def test_m_sharpness_under_a_process_group_equals_one_process(tmp_path):
    run_distributed(m_sharpness_on_ranks, 2, str(tmp_path))
    model, data = linear_mse_problem(n=13)
    single = sharpness(model, data, 0.3, loss_fn=mse, m=4, steps=5, restarts=2)
    for r in range(2):
        got = torch.load(tmp_path / f"rank{r}.pt")
        np.testing.assert_allclose(got["per_batch"], single.per_batch, rtol=1e-12)
        assert got["value"] == pytest.approx(single.value, rel=1e-12)
        assert got["grad_count"] == single.grad_count


def test_adaptive_average_sharpness_of_a_quadratic():
    a = torch.tensor([1.0, 4.0, 2.0, 0.5], dtype=torch.float64)
    w0 = torch.tensor([0.5, -1.0, 2.0, 0.1], dtype=torch.float64)
    rho, c = 0.1, w0.abs() + 0.1
    res = average_sharpness(
        Identity(w0),
        data(),
        rho,
        loss_fn=Quadratic(torch.zeros(4, dtype=torch.float64), a),
        adaptive=True,
        eta=0.1,
        samples=2000,
        seed=4,
    )
    # L(w + eps) - L(w) = (a w).eps + 0.5 sum a_i eps_i^2 with E[eps_i^2] = rho^2 c_i^2
    exact = 0.5 * rho**2 * (a * c**2).sum().item()
    assert abs(res.value - exact) <= 4 * res.stderr
    assert res.adaptive and res.samples == 2000 and res.seed == 4


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"eta": -0.1, "adaptive": True}, "eta must be >= 0"),
        ({"m": 0}, "m must be a positive"),
        ({"steps": 0}, "steps >= 1"),
        ({"restarts": 0}, "restarts >= 1"),
        ({"rho": float("nan")}, "rho must be positive"),
    ],
)
def test_bad_settings_are_refused(tiny_mlp, tiny_data, kwargs, message):
    with pytest.raises(SharpscopeError, match=message):
        sharpness(tiny_mlp, tiny_data, **{"rho": 0.1, **kwargs})


def test_empty_data_is_refused(tiny_mlp):
    empty = (torch.zeros(0, 4, dtype=torch.float64), torch.zeros(0, dtype=torch.int64))
    with pytest.raises(SharpscopeError, match="empty"):
        sharpness(tiny_mlp, empty, 0.1)
    with pytest.raises(SharpscopeError, match="at least 2 samples"):
        average_sharpness(
            tiny_mlp,
            (torch.zeros(3, 4, dtype=torch.float64), torch.zeros(3, dtype=torch.int64)),
            0.1,
            samples=1,
        )
