"""The Hessian of L(w): extreme eigenvalues, trace and spectral density.

Every routine here needs only Hessian-vector products, from
:meth:`sharpscope.objective.Objective.hvp`.

- :func:`hessian_eigenvalues`: Lanczos with full reorthogonalization (default), power
  iteration with deflation, or the PyHessian package for a cross-check.
- :func:`hessian_trace`: Hutchinson's estimator with Rademacher probes.
- :func:`hessian_density`: stochastic Lanczos quadrature (Ghorbani et al. 2019).

The solvers themselves, on any matvec, are in :mod:`sharpscope.eigensolvers`.
"""

from __future__ import annotations

import importlib
import math
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from .checks import is_whole
from .eigensolvers import (
    WHICH,
    SolverResult,
    lanczos,
    power_iteration,
    stochastic_lanczos_quadrature,
)
from .errors import SharpscopeError
from .objective import Objective, make_objective

METHODS = ("lanczos", "power", "pyhessian")


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class EigenResult:
    """Extreme Hessian eigenvalues with their residuals and the settings that made them.

    ``eigenvalues`` are ordered largest first (which="largest") or smallest first
    (which="smallest"); ``eigenvectors`` (k, n) unit rows in the objective's flat layout,
    when asked for; ``residuals`` are ||H v - lambda v|| measured with a product of H
    (for Lanczos one more per pair: its own estimate ignores the products' rounding);
    ``converged`` says that every residual is within ``tol`` |lambda|; ``hvp_count`` the
    Hessian-vector products spent, those included (for "pyhessian": PyHessian's own,
    not the k we spend measuring its residuals).
    """

    eigenvalues: tuple[float, ...]
    residuals: tuple[float, ...]
    converged: bool
    hvp_count: int
    k: int
    which: str
    method: str
    tol: float
    seed: int
    n_params: int
    n_examples: int
    param_filter: str
    eigenvectors: torch.Tensor | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        """Every field but the eigenvectors, as JSON-ready Python values."""
        return {
            "eigenvalues": list(self.eigenvalues),
            "residuals": list(self.residuals),
            "converged": self.converged,
            "hvp_count": self.hvp_count,
            "k": self.k,
            "which": self.which,
            "method": self.method,
            "tol": self.tol,
            "seed": self.seed,
            "n_params": self.n_params,
            "n_examples": self.n_examples,
            "param_filter": self.param_filter,
        }


@dataclass(frozen=True)
class TraceResult:
    """Hutchinson estimate of tr(H) with the standard error of its mean."""

    value: float
    stderr: float
    samples: int
    hvp_count: int
    seed: int
    n_params: int
    n_examples: int
    param_filter: str

    def to_dict(self) -> dict[str, Any]:
        """All fields, as JSON-ready Python values."""
        return dict(self.__dict__)


@dataclass(frozen=True)
class DensityResult:
    """Eigenvalue density of H by stochastic Lanczos quadrature.

    ``grid`` and ``density`` are arrays of length ``grid_points`` (the density is in
    1 / eigenvalue units and integrates to about 1 over the grid); ``nodes`` and
    ``weights`` have shape (runs, steps): each run's quadrature (see
    :func:`stochastic_lanczos_quadrature`), its weights summing to 1.
    """

    grid: np.ndarray
    density: np.ndarray
    nodes: np.ndarray
    weights: np.ndarray
    runs: int
    steps: int
    sigma: float
    seed: int
    hvp_count: int
    n_params: int
    n_examples: int
    param_filter: str

    def to_dict(self) -> dict[str, Any]:
        """All fields, arrays as (nested) lists of floats."""
        out = dict(self.__dict__)
        for key in ("grid", "density", "nodes", "weights"):
            out[key] = np.asarray(out[key]).tolist()
        return out


# --------------------------------------------------------------------------- analyzers


def check_eigenvalue_options(method: str, which: str = "largest", tol: float = 1e-4) -> None:
    """The refusals of :func:`hessian_eigenvalues`'s options (no model needed)."""
    if method not in METHODS:
        raise SharpscopeError(f"unknown eigenvalue method {method!r}: choose {', '.join(METHODS)}")
    if which not in WHICH:
        raise SharpscopeError(f"which must be 'largest' or 'smallest', got {which!r}")
    if not tol > 0:
        raise SharpscopeError(f"tol must be positive, got {tol}")
    if method == "pyhessian" and which != "largest":
        raise SharpscopeError("PyHessian computes the largest eigenvalues only: use lanczos")


def check_trace_samples(samples: int) -> None:
    """Hutchinson's estimate and its standard error need two probes at least."""
    if not is_whole(samples, 2):
        raise SharpscopeError(f"the trace needs at least 2 probes, got {samples}")


def hessian_eigenvalues(
    model: nn.Module | Objective,
    data: Any = None,
    k: int = 1,
    *,
    loss_fn: Callable | None = None,
    batch_loss: Callable | None = None,
    examples_in: Callable | None = None,
    which: str = "largest",
    method: str = "lanczos",
    tol: float = 1e-4,
    max_iter: int | None = None,
    seed: int = 0,
    return_eigenvectors: bool = False,
    param_filter: Any = "all",
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    cache_graph: bool | None = None,
) -> EigenResult:
    """The k largest (or smallest, most negative) eigenvalues of the Hessian of L at w.

    Args:
        model: a module (with ``data`` in any form an
            :class:`~sharpscope.objective.Objective` takes, and ``loss_fn`` or
            ``batch_loss`` and ``examples_in`` as there) or an Objective (then leave
            data, the loss, param_filter, batch_size and device unset).
        k: number of eigenvalues, 1 <= k <= number of parameters.
        which: "largest" (largest algebraic, largest first) or "smallest" (most
            negative first).
        method: "lanczos" (default: :func:`lanczos`), "power" (:func:`power_iteration`)
            or "pyhessian" (the PyHessian package's power iteration on the same model and
            data, for a cross-check; "largest" only; ``pip install pyhessian``).
        tol: a pair counts as converged when ||Hv - lambda v|| <= tol |lambda|. For
            "pyhessian": its own rule, the relative change of the eigenvalue between
            iterations, which needs a tighter value for the same accuracy (at 1e-4 it
            gives about 1e-3 relative error; see benchmarks/bench_hessian.py).
        max_iter: Lanczos steps in all (default max(10k, 100)), or products per
            eigenvalue for "power" (default 1000) and "pyhessian" (default 100, its own).
        seed: seeds the start vectors (a local generator; global RNG untouched).
        return_eigenvectors: keep the eigenvectors, (k, n), in the result.
        cache_graph: build the gradient graph once and reuse it for every product
            (see :meth:`Objective.hvp_operator`); default: when the data is one batch.

    The default tol 1e-4 is the accuracy the measurements aim at. ``converged`` is False (and a
    warning raised) when ``max_iter`` ran out before every pair met tol.
    """
    check_eigenvalue_options(method, which, tol)
    obj = make_objective(
        model,
        data,
        loss_fn,
        batch_loss=batch_loss,
        examples_in=examples_in,
        param_filter=param_filter,
        batch_size=batch_size,
        device=device,
    )
    if not 1 <= k <= obj.numel:
        raise SharpscopeError(
            f"k = {k} eigenvalues asked for, but the model has {obj.numel} parameters"
        )
    obj.check_finite()
    start = obj.hvp_count
    if method == "pyhessian":
        result = _pyhessian_result(obj, k, tol, max_iter or 100, seed, cache_graph)
    else:
        solver = lanczos if method == "lanczos" else power_iteration
        kwargs = {"max_iter": max_iter} if max_iter is not None else {}
        matvec = obj.hvp_operator(cache_graph)
        result = solver(
            matvec,
            obj.numel,
            k,
            which=which,
            tol=tol,
            seed=seed,
            dtype=obj.accumulate_dtype,
            device=obj.device,
            progress=progress,
            **kwargs,
        )
        residuals, converged = result.residuals, result.converged
        if method == "lanczos":
            residuals, converged = _measured_residuals(matvec, result, tol)
        result = SolverResult(
            result.eigenvalues, result.eigenvectors, residuals, converged, obj.hvp_count - start
        )
    if not result.converged:
        warnings.warn(
            f"{method}: not every eigenpair reached tol {tol} within max_iter; "
            "the result says converged=False (raise max_iter)",
            RuntimeWarning,
            stacklevel=2,
        )
    return EigenResult(
        eigenvalues=tuple(float(x) for x in result.eigenvalues),
        residuals=tuple(float(x) for x in result.residuals),
        converged=bool(result.converged),
        hvp_count=int(result.matvecs),
        k=k,
        which=which,
        method=method,
        tol=tol,
        seed=seed,
        n_params=obj.numel,
        n_examples=obj.n_examples,
        param_filter=obj.param_filter,
        eigenvectors=result.eigenvectors if return_eigenvectors else None,
    )


def _measured_residuals(matvec, result, tol: float) -> tuple[torch.Tensor, bool]:
    """||H v - lambda v|| of each Ritz pair measured with one more product, and whether
    every one is within ``tol`` |lambda|.

    Lanczos's own residual estimate (the last entry of the Ritz vector times the last
    off-diagonal) assumes exact products; it falls to 1e-19 while the products of a
    float32 model carry rounding errors of about 1e-6 relative, so only a measured
    residual says whether a pair is an eigenpair of the H actually computed.
    """
    measured = torch.tensor(
        [
            torch.linalg.vector_norm(matvec(v) - lam * v.to(result.eigenvectors.dtype)).item()
            for lam, v in zip(result.eigenvalues.tolist(), result.eigenvectors, strict=True)
        ],
        dtype=torch.float64,
    )
    bound = tol * result.eigenvalues.abs().to(torch.float64).cpu()
    return measured, bool((measured <= bound).all())


def _pyhessian_result(
    obj: Objective, k: int, tol: float, max_iter: int, seed: int, cache_graph: bool | None
) -> SolverResult:
    """PyHessian's top-k eigenpairs as a :class:`SolverResult`, with the residuals
    ||Hv - lambda v|| measured by our own products (PyHessian reports none)."""
    values, vectors, hvps, ok = _pyhessian_eigenvalues(obj, k, tol, max_iter, seed)
    matvec = obj.hvp_operator(cache_graph)
    residuals = torch.tensor(
        [
            torch.linalg.vector_norm(matvec(v) - lam * v).item()
            for lam, v in zip(values.tolist(), vectors, strict=True)
        ],
        dtype=torch.float64,
    )
    return SolverResult(values, vectors, residuals, ok, hvps)


def _pyhessian_eigenvalues(
    obj: Objective, k: int, tol: float, max_iter: int, seed: int
) -> tuple[torch.Tensor, torch.Tensor, int, bool]:
    """Run PyHessian's ``hessian.eigenvalues`` on the objective's model and data.

    Returns eigenvalues (k,) largest first, unit eigenvectors (k, n) in the objective's
    layout, PyHessian's Hessian-vector products, and whether each eigenvalue stopped on
    its tolerance before ``max_iter``. Its known problems are handled here: ``cuda=True``
    by default (we pass the objective's device); ``model.eval()`` left behind, and
    ``.grad`` filled by its ``backward(create_graph=True)`` (modes and grads restored,
    grads cleared first so stale ones do not enter its gradient); start vectors from the
    global RNG (forked and seeded); every parameter covered (only param_filter "all"
    is comparable).
    """
    try:
        # The module, not the class the package re-exports under the same name.
        module = importlib.import_module("pyhessian.hessian")
    except ImportError:
        raise SharpscopeError(
            "method 'pyhessian' needs the PyHessian package: pip install pyhessian "
            "(or pip install 'sharpscope[pyhessian]')"
        ) from None
    if obj.param_filter != "all":
        raise SharpscopeError("PyHessian covers every parameter: use param_filter 'all'")
    if obj.distributed:
        raise SharpscopeError("PyHessian does not run under torch.distributed")
    if obj.batch_loss is not None:
        raise SharpscopeError(
            "PyHessian takes (inputs, targets) batches and a loss_fn, not a batch_loss"
        )
    model = obj.model
    params = [p for p in model.parameters() if p.requires_grad]
    if any(p.device != obj.device for p in params):
        raise SharpscopeError("PyHessian needs the model on the objective's device: move it there")
    modes = [(m, m.training) for m in model.modules()]
    grads = {p: p.grad for p in model.parameters()}
    batches = list(obj.batches())  # PyHessian holds its data set itself
    single = len(batches) == 1
    count = 0
    # PyHessian calls orthnormal(v, found) once per iteration: len(found) tells which
    # eigenvalue the iteration belongs to, so we learn which ones hit maxIter.
    iterations = [0] * k
    original_hvp, original_orth = module.hessian_vector_product, module.orthnormal

    def counted_hvp(*args: Any, **kwargs: Any) -> Any:
        nonlocal count
        count += 1
        return original_hvp(*args, **kwargs)

    def counted_orth(w: Any, found: list) -> Any:
        iterations[len(found)] += 1
        return original_orth(w, found)

    try:
        for p in model.parameters():
            p.grad = None
        with (
            torch.random.fork_rng(devices=[obj.device] if obj.device.type == "cuda" else []),
            warnings.catch_warnings(),
            torch.enable_grad(),
        ):
            # Its backward(create_graph=True) makes a parameter/grad reference cycle; we
            # break it by restoring .grad below, so its warning is noise here.
            warnings.filterwarnings("ignore", message=".*reference cycle")
            torch.manual_seed(seed)
            data = {"data": batches[0]} if single else {"dataloader": batches}
            h = module.hessian(model, obj.loss_fn, cuda=obj.device.type == "cuda", **data)
            module.orthnormal = counted_orth
            if single:
                module.hessian_vector_product = counted_hvp
            else:
                original_dl = h.dataloader_hv_product

                def counted_dl(v: Any) -> Any:
                    nonlocal count
                    count += 1
                    return original_dl(v)

                h.dataloader_hv_product = counted_dl
            values, vectors = h.eigenvalues(maxIter=max_iter, tol=tol, top_n=k)
    finally:
        module.hessian_vector_product, module.orthnormal = original_hvp, original_orth
        for m, flag in modes:
            m.training = flag
        for p, g in grads.items():
            p.grad = g
    ok = all(i < max_iter for i in iterations)
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    flat = []
    for vec in vectors:
        by_name = dict(zip(names, vec, strict=True))
        u = obj.layout.flatten(by_name).to(obj.device, obj.accumulate_dtype)
        flat.append(u / torch.linalg.vector_norm(u))
    values_t = torch.tensor(values, dtype=torch.float64)
    order = torch.argsort(values_t, descending=True)
    return values_t[order], torch.stack(flat)[order], count, ok


def hessian_trace(
    model: nn.Module | Objective,
    data: Any = None,
    *,
    samples: int = 100,
    seed: int = 0,
    loss_fn: Callable | None = None,
    batch_loss: Callable | None = None,
    examples_in: Callable | None = None,
    param_filter: Any = "all",
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    cache_graph: bool | None = None,
) -> TraceResult:
    """tr(H) by Hutchinson's estimator: the mean of z^T H z over Rademacher probes z.

    Hutchinson (1990); for Rademacher z the per-probe variance is
    2 (||H||_F^2 - sum_i H_ii^2) (Avron & Toledo 2011, Sec. 3), the smallest of any
    probe distribution. ``stderr`` is the sample standard deviation of the probes over
    sqrt(samples). A fixed budget of ``samples`` products; 100 by default, PyHessian's
    cap for its ``trace`` (``maxIter=100``), without its early stop on a relative change.
    """
    check_trace_samples(samples)
    obj = make_objective(
        model,
        data,
        loss_fn,
        batch_loss=batch_loss,
        examples_in=examples_in,
        param_filter=param_filter,
        batch_size=batch_size,
        device=device,
    )
    obj.check_finite()
    matvec = obj.hvp_operator(cache_graph)
    start = obj.hvp_count
    g = torch.Generator().manual_seed(seed)
    values = np.empty(samples)
    for i in tqdm(range(samples), desc="Hutchinson trace", disable=not progress, leave=False):
        z = torch.randint(0, 2, (obj.numel,), generator=g, dtype=torch.int8)
        z = (2 * z - 1).to(obj.device, obj.accumulate_dtype)
        values[i] = torch.dot(z, matvec(z)).item()
    return TraceResult(
        value=float(values.mean()),
        stderr=float(values.std(ddof=1) / math.sqrt(samples)),
        samples=samples,
        hvp_count=obj.hvp_count - start,
        seed=seed,
        n_params=obj.numel,
        n_examples=obj.n_examples,
        param_filter=obj.param_filter,
    )


def hessian_density(
    model: nn.Module | Objective,
    data: Any = None,
    *,
    runs: int = 5,
    steps: int = 80,
    grid_points: int = 1000,
    sigma: float | None = None,
    seed: int = 0,
    loss_fn: Callable | None = None,
    batch_loss: Callable | None = None,
    examples_in: Callable | None = None,
    param_filter: Any = "all",
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
    cache_graph: bool | None = None,
) -> DensityResult:
    """The Hessian's eigenvalue density by stochastic Lanczos quadrature.

    ``runs`` Lanczos runs of ``steps`` steps from random unit vectors; each gives nodes
    (eigenvalues of its T) and weights (squared first components of T's eigenvectors),
    Ghorbani, Krishnan & Xiao 2019, Sec. 2.2 (:func:`stochastic_lanczos_quadrature`).
    The nodes are smoothed by Gaussians of standard deviation ``sigma`` (eigenvalue
    units) onto ``grid_points`` points spanning the nodes +- 5 sigma, runs averaged.

    Defaults: 80 steps, from Ghorbani et al.'s code (google/spectral-density README:
    "around 80-90 Lanczos steps are certainly enough for most models"; PyHessian's
    ``density`` uses 100); 5 runs, where PyHessian uses 1 and hessian-eigenthings 10:
    the start-vector noise falls as 1/sqrt(runs) (Ubaru, Chen & Saad 2017, Thm. 4.1),
    and 400 products stay affordable. sigma defaults to 1% of the node range on a
    1000-point grid, for a linear axis; both reference codes use a Gaussian of variance
    1e-5 * max(1, range) on 10,000 points, meant for a log axis: pass that sigma to match.
    """
    if runs < 1 or steps < 1 or grid_points < 2:
        raise SharpscopeError("density needs runs >= 1, steps >= 1 and grid_points >= 2")
    if sigma is not None and sigma <= 0:
        raise SharpscopeError(f"sigma must be positive, got {sigma}")
    obj = make_objective(
        model,
        data,
        loss_fn,
        batch_loss=batch_loss,
        examples_in=examples_in,
        param_filter=param_filter,
        batch_size=batch_size,
        device=device,
    )
    obj.check_finite()
    start = obj.hvp_count
    nodes, weights = stochastic_lanczos_quadrature(
        obj.hvp_operator(cache_graph),
        obj.numel,
        runs=runs,
        steps=steps,
        seed=seed,
        dtype=obj.accumulate_dtype,
        device=obj.device,
        progress=progress,
    )
    lo, hi = float(nodes.min()), float(nodes.max())
    sigma = sigma if sigma is not None else 0.01 * max(hi - lo, 1e-12 * max(abs(lo), abs(hi), 1))
    grid = np.linspace(lo - 5 * sigma, hi + 5 * sigma, grid_points)
    density = np.zeros(grid_points)
    for theta, tau in zip(nodes, weights, strict=True):
        gauss = np.exp(-((grid[:, None] - theta[None, :]) ** 2) / (2 * sigma**2))
        density += (gauss / (sigma * math.sqrt(2 * math.pi))) @ tau
    density /= runs
    return DensityResult(
        grid=grid,
        density=density,
        nodes=nodes,
        weights=weights,
        runs=runs,
        steps=nodes.shape[1],
        sigma=float(sigma),
        seed=seed,
        hvp_count=obj.hvp_count - start,
        n_params=obj.numel,
        n_examples=obj.n_examples,
        param_filter=obj.param_filter,
    )
