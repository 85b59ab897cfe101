import numpy as np
import pytest
import torch
from torch.func import functional_call

from sharpscope.errors import SharpscopeError
from sharpscope.hessian import (
    hessian_density,
    hessian_eigenvalues,
    hessian_trace,
    lanczos,
    power_iteration,
)
from sharpscope.losses import mse
from sharpscope.objective import Objective


def dense(obj: Objective, loss_fn=torch.nn.functional.cross_entropy) -> torch.Tensor:
    x = torch.cat([b[0] for b in obj.batches])
    y = torch.cat([b[1] for b in obj.batches])
    modes = [(m, m.training) for m in obj.model.modules()]
    obj.model.eval()

    def loss(w):
        return loss_fn(functional_call(obj.model, obj.state(w), (x,)), y)

    H = torch.autograd.functional.hessian(loss, obj.w0)
    for m, flag in modes:
        m.training = flag
    return H


def symmetric_matrix(eigenvalues, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = len(eigenvalues)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return Q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ Q.T


@pytest.mark.parametrize("loss_fn", [torch.nn.functional.cross_entropy, mse])
def test_lanczos_matches_dense_hessian_top3(tiny_mlp, tiny_data, loss_fn):
    obj = Objective(tiny_mlp, tiny_data, loss_fn, batch_size=10)
    exact = torch.linalg.eigvalsh(dense(obj, loss_fn)).flip(0)
    result = hessian_eigenvalues(obj, k=3, tol=1e-6)
    assert result.converged
    np.testing.assert_allclose(result.eigenvalues, exact[:3].numpy(), rtol=1e-4)
    assert result.hvp_count == obj.hvp_count


def test_lanczos_bottom_eigenvalue_and_eigenvectors_of_bn_cnn(tiny_bn_cnn, tiny_image_data):
    obj = Objective(tiny_bn_cnn, tiny_image_data)
    H = dense(obj)
    exact = torch.linalg.eigvalsh(H)
    assert exact[0] < 0  # a saddle-ish random point: the bottom is negative
    result = hessian_eigenvalues(obj, k=1, which="smallest", tol=1e-6, return_eigenvectors=True)
    assert result.eigenvalues[0] == pytest.approx(exact[0].item(), rel=1e-4)
    v = result.eigenvectors[0]
    true_residual = torch.linalg.vector_norm(H @ v - result.eigenvalues[0] * v).item()
    assert true_residual <= 1e-5 * abs(result.eigenvalues[0])
    assert result.residuals[0] == pytest.approx(true_residual, abs=1e-8)


def test_power_iteration_matches_dense_top2(tiny_mlp, tiny_data):
    obj = Objective(tiny_mlp, tiny_data)
    exact = torch.linalg.eigvalsh(dense(obj)).flip(0)
    result = hessian_eigenvalues(obj, k=2, method="power", tol=1e-5, max_iter=20000)
    np.testing.assert_allclose(result.eigenvalues, exact[:2].numpy(), rtol=1e-4)
    assert result.converged
    assert all(
        r <= 1e-5 * abs(v) for r, v in zip(result.residuals, result.eigenvalues, strict=True)
    )


def test_power_iteration_with_close_top_two_stops_on_the_residual():
    # lambda1 = 1.0, lambda2 = 0.999: the relative change of the Rayleigh quotient is tiny
    # long before v has converged; a residual rule keeps going until it really has.
    A = symmetric_matrix([1.0, 0.999, 0.5, 0.1, -0.2])
    result = power_iteration(lambda v: A @ v, 5, 2, tol=1e-8, max_iter=200_000)
    assert result.converged
    np.testing.assert_allclose(result.eigenvalues.numpy(), [1.0, 0.999], rtol=1e-7)
    for lam, v in zip(result.eigenvalues, result.eigenvectors, strict=True):
        assert torch.linalg.vector_norm(A @ v - lam * v) <= 1e-7


def test_power_iteration_largest_when_a_negative_eigenvalue_dominates():
    A = symmetric_matrix([-5.0, 2.0, 1.0, 0.5])
    largest = power_iteration(lambda v: A @ v, 4, 1, tol=1e-9, max_iter=10_000)
    smallest = power_iteration(lambda v: A @ v, 4, 1, which="smallest", tol=1e-9, max_iter=10_000)
    assert largest.eigenvalues[0].item() == pytest.approx(2.0, rel=1e-7)
    assert smallest.eigenvalues[0].item() == pytest.approx(-5.0, rel=1e-7)


def test_lanczos_on_explicit_matrix_with_degenerate_top():
    A = symmetric_matrix([3.0, 3.0, 2.0, 1.0, 0.0, -1.0, -4.0] + [0.5] * 30)
    result = lanczos(lambda v: A @ v, A.shape[0], 3, tol=1e-10)
    # Lanczos from one start vector sees one copy of a repeated eigenvalue: 3, then 2, then 1.
    np.testing.assert_allclose(result.eigenvalues.numpy(), [3.0, 2.0, 1.0], rtol=1e-9)
    smallest = lanczos(lambda v: A @ v, A.shape[0], 2, which="smallest", tol=1e-10)
    np.testing.assert_allclose(smallest.eigenvalues.numpy(), [-4.0, -1.0], rtol=1e-9)


def test_hutchinson_trace_is_unbiased_with_the_right_standard_error(tiny_mlp, tiny_data):
    obj = Objective(tiny_mlp, tiny_data)
    H = dense(obj)
    samples = 400
    result = hessian_trace(obj, samples=samples, seed=0)
    exact = torch.trace(H).item()
    per_probe_var = 2 * ((H**2).sum() - (torch.diag(H) ** 2).sum()).item()
    expected_se = (per_probe_var / samples) ** 0.5
    assert abs(result.value - exact) <= 4 * expected_se
    assert result.stderr == pytest.approx(expected_se, rel=0.2)
    assert result.hvp_count == samples
    assert hessian_trace(obj, samples=samples, seed=0).value == result.value  # seeded


def test_density_integrates_to_one_and_its_mean_is_trace_over_n(tiny_mlp, tiny_data):
    obj = Objective(tiny_mlp, tiny_data)
    H = dense(obj)
    result = hessian_density(obj, runs=20, steps=obj.numel, seed=1)
    mass = np.trapezoid(result.density, result.grid)
    assert mass == pytest.approx(1.0, abs=1e-3)
    # Each run's quadrature is exact for polynomials of low degree: its mean is v^T H v.
    mean = np.nansum(result.nodes * result.weights) / result.runs
    assert mean == pytest.approx(torch.trace(H).item() / obj.numel, rel=0.3)
    np.testing.assert_allclose(result.weights.sum(axis=1), 1.0, rtol=1e-10)


def test_model_is_untouched_and_bad_input_refused(tiny_bn_cnn, tiny_image_data):
    before = {k: v.clone() for k, v in tiny_bn_cnn.state_dict().items()}
    tiny_bn_cnn.train()
    hessian_eigenvalues(tiny_bn_cnn, tiny_image_data, k=2)
    hessian_trace(tiny_bn_cnn, tiny_image_data, samples=3)
    assert tiny_bn_cnn.training
    for k, v in tiny_bn_cnn.state_dict().items():
        assert torch.equal(v, before[k])
    n = sum(p.numel() for p in tiny_bn_cnn.parameters())
    with pytest.raises(SharpscopeError, match="parameters"):
        hessian_eigenvalues(tiny_bn_cnn, tiny_image_data, k=n + 1)
    with pytest.raises(SharpscopeError, match="unknown eigenvalue method"):
        hessian_eigenvalues(tiny_bn_cnn, tiny_image_data, method="magic")


def test_nan_loss_is_refused(tiny_mlp, tiny_data):
    with torch.no_grad():
        tiny_mlp[0].weight[0, 0] = float("nan")
    with pytest.raises(SharpscopeError, match="nan"):
        hessian_eigenvalues(tiny_mlp, tiny_data)


def test_pyhessian_cross_check_agrees_and_leaves_the_model_alone(tiny_mlp, tiny_data):
    pytest.importorskip("pyhessian")
    obj = Objective(tiny_mlp, tiny_data)
    exact = torch.linalg.eigvalsh(dense(obj)).flip(0)
    tiny_mlp.train()
    result = hessian_eigenvalues(
        tiny_mlp, tiny_data, k=2, method="pyhessian", tol=1e-8, max_iter=3000
    )
    assert tiny_mlp.training and all(p.grad is None for p in tiny_mlp.parameters())
    np.testing.assert_allclose(result.eigenvalues, exact[:2].numpy(), rtol=1e-3)
    assert result.hvp_count >= 2
