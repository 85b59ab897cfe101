"""Hessian eigenvalues, trace and density against dense float64 Hessians of tiny models."""

import json
import math

import numpy as np
import pytest
import torch
from torch.func import functional_call

from sharpscope.eigensolvers import lanczos, power_iteration, stochastic_lanczos_quadrature
from sharpscope.errors import SharpscopeError
from sharpscope.hessian import hessian_density, hessian_eigenvalues, hessian_trace
from sharpscope.losses import mse
from sharpscope.objective import Objective


def dense(obj: Objective) -> torch.Tensor:
    """The exact Hessian of the objective's L at w0, (n, n), by autograd."""
    x = torch.cat([b[0] for b in obj.batches()])
    y = torch.cat([b[1] for b in obj.batches()])
    modes = [(m, m.training) for m in obj.model.modules()]
    obj.model.eval()

    def loss(w):
        return obj.loss_fn(functional_call(obj.model, obj.state(w), (x,)), y)

    H = torch.autograd.functional.hessian(loss, obj.w0)
    for m, flag in modes:
        m.training = flag
    return H


def symmetric_matrix(eigenvalues, seed=0):
    g = torch.Generator().manual_seed(seed)
    n = len(eigenvalues)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return Q @ torch.diag(torch.tensor(eigenvalues, dtype=torch.float64)) @ Q.T


def snapshot(model):
    return (
        [(m, m.training) for m in model.modules()],
        {k: v.clone() for k, v in model.state_dict().items()},
    )


def assert_untouched(model, before):
    modes, state = before
    assert all(m.training == flag for m, flag in modes)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    assert all(p.grad is None for p in model.parameters())


# ------------------------------------------------------------------ eigenvalues on models


@pytest.mark.parametrize("loss_fn", [torch.nn.functional.cross_entropy, mse])
@pytest.mark.parametrize("batch_size", [None, 10])  # one batch (cached graph) and three
def test_lanczos_matches_dense_hessian_top3(tiny_mlp, tiny_data, loss_fn, batch_size):
    obj = Objective(tiny_mlp, tiny_data, loss_fn, batch_size=batch_size)
    exact = torch.linalg.eigvalsh(dense(obj)).flip(0)
    result = hessian_eigenvalues(obj, k=3)  # the default tol 1e-4
    assert result.converged
    np.testing.assert_allclose(result.eigenvalues, exact[:3].numpy(), rtol=1e-4)
    assert result.hvp_count == obj.hvp_count
    assert result.hvp_count >= 20  # Krylov size at least max(2k + 1, 20)


def test_lanczos_bottom_eigenvalue_and_eigenvectors_of_bn_cnn(tiny_bn_cnn, tiny_image_data):
    obj = Objective(tiny_bn_cnn, tiny_image_data)
    H = dense(obj)
    exact = torch.linalg.eigvalsh(H)
    assert exact[0] < 0  # a random point is a saddle: the bottom is negative
    result = hessian_eigenvalues(obj, k=1, which="smallest", return_eigenvectors=True)
    assert result.eigenvalues[0] == pytest.approx(exact[0].item(), rel=1e-4)
    v = result.eigenvectors[0]
    assert v.shape == (obj.numel,) and torch.linalg.vector_norm(v).item() == pytest.approx(1.0)
    true_residual = torch.linalg.vector_norm(H @ v - result.eigenvalues[0] * v).item()
    assert true_residual <= 1e-4 * abs(result.eigenvalues[0])
    assert result.residuals[0] == pytest.approx(true_residual, rel=1e-3, abs=1e-10)


def test_lanczos_on_a_float32_model(tiny_mlp, tiny_data):
    exact = torch.linalg.eigvalsh(dense(Objective(tiny_mlp, tiny_data))).flip(0)
    x, y = tiny_data
    result = hessian_eigenvalues(tiny_mlp.float(), (x.float(), y), k=2)
    np.testing.assert_allclose(result.eigenvalues, exact[:2].numpy(), rtol=1e-4)


def test_lanczos_residuals_are_measured_and_converged_means_what_it_says(tiny_mlp, tiny_data):
    """On a float32 model Lanczos's own residual estimate falls far below what the
    products' rounding allows; the reported residual is the one a further product
    measures, and a tol below that floor is reported as not converged."""
    x, y = tiny_data
    obj = Objective(tiny_mlp.float(), (x.float(), y), accumulate_dtype=torch.float64)
    result = hessian_eigenvalues(obj, k=2, return_eigenvectors=True)
    assert result.converged
    for lam, v, reported in zip(
        result.eigenvalues, result.eigenvectors, result.residuals, strict=True
    ):
        measured = torch.linalg.vector_norm(obj.hvp(v) - lam * v).item()
        assert reported >= 0.5 * measured  # the same product up to float32 rounding
        assert measured > 1e-9 * abs(lam)  # the floor: far above a Ritz estimate's 1e-19
    with pytest.warns(RuntimeWarning, match="converged=False"):
        strict = hessian_eigenvalues(obj, k=1, tol=1e-12, max_iter=60)
    assert not strict.converged
    assert strict.residuals[0] > 1e-12 * abs(strict.eigenvalues[0])


def test_power_iteration_matches_dense_top2_and_bottom(tiny_mlp, tiny_data):
    obj = Objective(tiny_mlp, tiny_data)
    exact = torch.linalg.eigvalsh(dense(obj))
    top = hessian_eigenvalues(obj, k=2, method="power", max_iter=20_000)
    assert top.converged
    np.testing.assert_allclose(top.eigenvalues, exact.flip(0)[:2].numpy(), rtol=1e-4)
    assert all(r <= 1e-4 * abs(v) for r, v in zip(top.residuals, top.eigenvalues, strict=True))
    bottom = hessian_eigenvalues(obj, k=1, which="smallest", method="power", max_iter=20_000)
    assert bottom.converged
    assert bottom.eigenvalues[0] == pytest.approx(exact[0].item(), rel=1e-4)


def test_eigenvalues_are_seeded(tiny_mlp, tiny_data):
    obj = Objective(tiny_mlp, tiny_data)
    for method in ("lanczos", "power"):
        a = hessian_eigenvalues(obj, k=2, method=method, seed=5, max_iter=5000)
        b = hessian_eigenvalues(obj, k=2, method=method, seed=5, max_iter=5000)
        assert a == b  # same numbers, same product counts


def test_running_out_of_iterations_is_reported(tiny_mlp, tiny_data):
    obj = Objective(tiny_mlp, tiny_data)
    with pytest.warns(RuntimeWarning, match="converged=False"):
        result = hessian_eigenvalues(obj, k=1, method="power", max_iter=3)
    assert not result.converged and result.hvp_count == 3


def test_cached_graph_products_equal_the_objectives(tiny_bn_cnn, tiny_image_data):
    obj = Objective(tiny_bn_cnn, tiny_image_data, batch_size=6)
    v = torch.randn(obj.numel, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    with torch.no_grad():  # a caller's no_grad does not stop the products
        cached = obj.hvp_operator(cache_graph=True)(v)
        fresh = obj.hvp_operator(cache_graph=False)(v)
    torch.testing.assert_close(cached, fresh, rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(fresh, dense(obj) @ v, rtol=1e-10, atol=1e-12)
    assert obj.hvp_count == 2


# ------------------------------------------------------------------ solvers on matrices


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
    smallest = power_iteration(lambda v: A @ v, 4, 2, which="smallest", tol=1e-9, max_iter=10_000)
    assert largest.eigenvalues[0].item() == pytest.approx(2.0, rel=1e-7)
    np.testing.assert_allclose(smallest.eigenvalues.numpy(), [-5.0, 0.5], rtol=1e-7)


def test_lanczos_finds_repeated_eigenvalues_with_their_multiplicity():
    # From one start vector the Krylov space holds one copy of each distinct eigenvalue
    # (7 here); it becomes invariant and Lanczos goes on from a fresh vector.
    A = symmetric_matrix([3.0, 3.0, 2.0, 1.0, 0.0, -1.0, -4.0] + [0.5] * 30)
    result = lanczos(lambda v: A @ v, A.shape[0], 3, tol=1e-10)
    assert result.converged
    np.testing.assert_allclose(result.eigenvalues.numpy(), [3.0, 3.0, 2.0], rtol=1e-9)
    smallest = lanczos(lambda v: A @ v, A.shape[0], 2, which="smallest", tol=1e-10)
    np.testing.assert_allclose(smallest.eigenvalues.numpy(), [-4.0, -1.0], rtol=1e-9)


def test_lanczos_eigenvectors_of_a_large_sparse_spectrum():
    eigenvalues = np.linspace(-1, 1, 400)
    eigenvalues[-3:] = [5.0, 4.0, 3.5]  # outliers above a bulk, as in trained networks
    A = symmetric_matrix(eigenvalues.tolist(), seed=1)
    result = lanczos(lambda v: A @ v, 400, 3, tol=1e-6)
    assert result.converged and result.matvecs < 100
    np.testing.assert_allclose(result.eigenvalues.numpy(), [5.0, 4.0, 3.5], rtol=1e-6)
    for lam, v, r in zip(result.eigenvalues, result.eigenvectors, result.residuals, strict=True):
        true = torch.linalg.vector_norm(A @ v - lam * v).item()
        assert true <= 1e-6 * abs(lam) and r == pytest.approx(true, rel=1e-3, abs=1e-12)


def test_slq_nodes_and_weights_on_a_matrix_with_three_eigenvalues():
    multiplicity = {-1.0: 5, 2.0: 10, 7.0: 25}
    A = symmetric_matrix([lam for lam, m in multiplicity.items() for _ in range(m)], seed=2)
    runs = 200
    nodes, weights = stochastic_lanczos_quadrature(lambda v: A @ v, 40, runs=runs, steps=10)
    assert nodes.shape == weights.shape == (runs, 10)
    # The Krylov space is invariant after 3 steps: every node of non-negligible weight is
    # one of the three eigenvalues, whatever rounding adds after that.
    eig = np.array(list(multiplicity))
    near = np.abs(nodes[..., None] - eig) <= 1e-8  # (runs, steps, 3)
    assert np.all(near.any(axis=-1) | (weights <= 1e-20))
    per_eigenvalue = (weights[..., None] * near).sum(axis=1)  # (runs, 3)
    np.testing.assert_allclose(per_eigenvalue.sum(axis=1), 1.0, rtol=1e-12)
    # tau_i = squared norm of a random unit vector's part in eigenspace i: its mean is
    # m_i / n and its variance 2 p (1 - p) / (n + 2) with p = m_i / n (a Beta law).
    n = 40
    for i, m in enumerate(multiplicity.values()):
        p = m / n
        se = math.sqrt(2 * p * (1 - p) / (n + 2) / runs)
        assert abs(per_eigenvalue[:, i].mean() - p) <= 4 * se


def test_solvers_refuse_bad_requests():
    A = torch.eye(3, dtype=torch.float64)
    for solver in (lanczos, power_iteration):
        with pytest.raises(SharpscopeError, match="operator has size 3"):
            solver(lambda v: A @ v, 3, 4)
        with pytest.raises(SharpscopeError, match="which"):
            solver(lambda v: A @ v, 3, 1, which="middle")
        with pytest.raises(SharpscopeError, match="tol"):
            solver(lambda v: A @ v, 3, 1, tol=0.0)


# ------------------------------------------------------------------ trace and density


def test_hutchinson_trace_is_unbiased_with_the_right_standard_error(tiny_mlp, tiny_data):
    obj = Objective(tiny_mlp, tiny_data)
    H = dense(obj)
    samples = 400
    result = hessian_trace(obj, samples=samples, seed=0)
    exact = torch.trace(H).item()
    per_probe_var = 2 * ((H**2).sum() - (torch.diag(H) ** 2).sum()).item()
    expected_se = (per_probe_var / samples) ** 0.5
    assert abs(result.value - exact) <= 4 * expected_se
    # The sample standard error of 400 probes is within 20% of the true one.
    assert result.stderr == pytest.approx(expected_se, rel=0.2)
    assert result.hvp_count == samples
    assert hessian_trace(obj, samples=samples, seed=0) == result  # seeded


def test_density_integrates_to_one_and_its_mean_is_trace_over_n(tiny_mlp, tiny_data):
    obj = Objective(tiny_mlp, tiny_data)
    eig = torch.linalg.eigvalsh(dense(obj)).numpy()
    n, runs = obj.numel, 50
    result = hessian_density(obj, runs=runs, steps=8, seed=1)
    assert np.trapezoid(result.density, result.grid) == pytest.approx(1.0, abs=1e-3)
    np.testing.assert_allclose(result.weights.sum(axis=1), 1.0, rtol=1e-10)
    # Each run's mean is q^T H q for its unit start vector q (exact for degree 1), whose
    # mean is tr(H) / n and variance 2 / (n + 2) * (mean of lambda^2 - (tr H / n)^2).
    mean = (result.nodes * result.weights).sum() / runs
    se = math.sqrt(2 / (n + 2) * ((eig**2).mean() - eig.mean() ** 2) / runs)
    assert abs(mean - eig.mean()) <= 4 * se
    # The grid's density has the same mean (Gaussian smoothing keeps it).
    grid_mean = np.trapezoid(result.grid * result.density, result.grid)
    assert grid_mean == pytest.approx(mean, abs=1e-3 * np.abs(eig).max())
    assert result.hvp_count == runs * 8
    assert hessian_density(obj, runs=runs, steps=8, seed=1).to_dict() == result.to_dict()


def test_density_with_full_steps_finds_the_exact_spectrum_edges(tiny_mlp, tiny_data):
    obj = Objective(tiny_mlp, tiny_data)
    eig = torch.linalg.eigvalsh(dense(obj)).numpy()
    result = hessian_density(obj, runs=2, steps=obj.numel)
    for theta in result.nodes:  # a full Lanczos run's nodes are H's eigenvalues
        assert theta.min() == pytest.approx(eig[0], rel=1e-8)
        assert theta.max() == pytest.approx(eig[-1], rel=1e-8)


# ------------------------------------------------------------------ the model, results, input


def test_model_is_untouched_and_results_are_json(tiny_bn_cnn, tiny_image_data):
    tiny_bn_cnn.train()
    before = snapshot(tiny_bn_cnn)
    results = [
        hessian_eigenvalues(tiny_bn_cnn, tiny_image_data, k=2),
        hessian_eigenvalues(tiny_bn_cnn, tiny_image_data, method="power", batch_size=5),
        hessian_trace(tiny_bn_cnn, tiny_image_data, samples=3),
        hessian_density(tiny_bn_cnn, tiny_image_data, runs=2, steps=5, grid_points=20),
    ]
    assert_untouched(tiny_bn_cnn, before)
    for result in results:
        doc = json.loads(json.dumps(result.to_dict(), allow_nan=False))
        assert doc["n_examples"] == 17 and doc["param_filter"] == "all"
    assert results[0].to_dict()["eigenvalues"] == list(results[0].eigenvalues)


def test_bad_input_is_refused(tiny_bn_cnn, tiny_image_data):
    n = sum(p.numel() for p in tiny_bn_cnn.parameters())
    with pytest.raises(SharpscopeError, match="parameters"):
        hessian_eigenvalues(tiny_bn_cnn, tiny_image_data, k=n + 1)
    with pytest.raises(SharpscopeError, match="unknown eigenvalue method"):
        hessian_eigenvalues(tiny_bn_cnn, tiny_image_data, method="magic")
    with pytest.raises(SharpscopeError, match="which"):
        hessian_eigenvalues(tiny_bn_cnn, tiny_image_data, which="top")
    with pytest.raises(SharpscopeError, match="no data"):
        hessian_trace(tiny_bn_cnn)
    with pytest.raises(SharpscopeError, match="probes"):
        hessian_trace(tiny_bn_cnn, tiny_image_data, samples=1)
    with pytest.raises(SharpscopeError, match="when building it"):
        hessian_density(Objective(tiny_bn_cnn, tiny_image_data), tiny_image_data)


def test_nan_loss_is_refused(tiny_mlp, tiny_data):
    with torch.no_grad():
        tiny_mlp[0].weight[0, 0] = float("nan")
    for analyzer in (hessian_eigenvalues, hessian_trace, hessian_density):
        with pytest.raises(SharpscopeError, match="nan"):
            analyzer(tiny_mlp, tiny_data)


# ------------------------------------------------------------------ PyHessian


@pytest.mark.parametrize("batch_size", [None, 10])  # its single-batch and data-loader modes
def test_pyhessian_cross_check_agrees_and_leaves_the_model_alone(tiny_mlp, tiny_data, batch_size):
    pytest.importorskip("pyhessian")
    exact = torch.linalg.eigvalsh(dense(Objective(tiny_mlp, tiny_data))).flip(0)
    tiny_mlp.train()
    before = snapshot(tiny_mlp)
    state = torch.random.get_rng_state()
    result = hessian_eigenvalues(
        tiny_mlp,
        tiny_data,
        k=2,
        method="pyhessian",
        tol=1e-9,  # its relative-change rule needs far tighter than 1e-4 for 1e-4 accuracy
        max_iter=3000,
        batch_size=batch_size,
        return_eigenvectors=True,
    )
    assert_untouched(tiny_mlp, before)
    assert torch.equal(torch.random.get_rng_state(), state)
    assert result.converged
    np.testing.assert_allclose(result.eigenvalues, exact[:2].numpy(), rtol=1e-4)
    assert result.eigenvectors.shape == (2, result.n_params)


def test_pyhessian_product_count_is_its_own(tiny_mlp, tiny_data):
    pytest.importorskip("pyhessian")
    # A tolerance it cannot meet: each eigenvalue takes exactly max_iter products.
    with pytest.warns(RuntimeWarning, match="converged=False"):
        result = hessian_eigenvalues(
            tiny_mlp, tiny_data, k=2, method="pyhessian", tol=1e-30, max_iter=7
        )
    assert result.hvp_count == 14 and not result.converged
    with pytest.raises(SharpscopeError, match="largest"):
        hessian_eigenvalues(tiny_mlp, tiny_data, method="pyhessian", which="smallest")
    with pytest.raises(SharpscopeError, match="every parameter"):
        hessian_eigenvalues(tiny_mlp, tiny_data, method="pyhessian", param_filter="weights")
