"""The Hessian of L(w): extreme eigenvalues, trace and spectral density.

Every routine here needs only Hessian-vector products, from
:meth:`sharpscope.objective.Objective.hvp`; the low-level solvers take any symmetric
``matvec`` so they are tested on explicit matrices as well as on models.

- :func:`hessian_eigenvalues`: Lanczos with full reorthogonalization (default), power
  iteration with deflation, or the PyHessian package for a cross-check.
- :func:`hessian_trace`: Hutchinson's estimator with Rademacher probes.
- :func:`hessian_density`: stochastic Lanczos quadrature (Ghorbani et al. 2019).
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

from .errors import SharpscopeError
from .objective import Objective, make_objective

MatVec = Callable[[torch.Tensor], torch.Tensor]
METHODS = ("lanczos", "power", "pyhessian")


# --------------------------------------------------------------------------- solvers


@dataclass(frozen=True)
class SolverResult:
    """Eigenpairs from a solver on a plain ``matvec``: values (k,), vectors (k, n)."""

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    residuals: torch.Tensor
    converged: bool
    matvecs: int


def _unit_start(n: int, seed: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(n, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)
    return v / torch.linalg.vector_norm(v)


def lanczos(
    matvec: MatVec,
    n: int,
    k: int = 1,
    *,
    which: str = "largest",
    tol: float = 1e-4,
    max_iter: int | None = None,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> SolverResult:
    """k extreme eigenpairs of a symmetric operator by Lanczos with full reorthogonalization.

    The Krylov basis Q_j grows one vector per matvec; each new vector is orthogonalized
    twice against the whole basis ("twice is enough", Parlett 1998, Sec. 6.9), which keeps
    the Ritz values free of spurious copies. After each step the Ritz pairs (theta_i,
    Q s_i) of the tridiagonal T_j have residual ||A y_i - theta_i y_i|| = beta_j |e_j^T s_i|
    (Parlett 1998, Sec. 13.1), so convergence is read off T_j for free: the iteration stops
    when the k wanted pairs all have residual <= tol * |theta_i|. No restarts: the basis
    is kept (memory n x iterations); ``max_iter`` caps it (default max(10k, 100), below n),
    and at least max(2k + 1, 20) steps are taken (ALGORITHMS.md).

    Returns eigenvalues ordered largest first ("largest") or smallest first ("smallest").
    """
    if which not in ("largest", "smallest"):
        raise SharpscopeError(f"which must be 'largest' or 'smallest', got {which!r}")
    if not 1 <= k <= n:
        raise SharpscopeError(f"k = {k} eigenvalues asked for, but the operator has size {n}")
    max_iter = min(n, max_iter or max(10 * k, 100))
    # A Krylov space of at least max(2k + 1, 20) before trusting convergence: a larger
    # eigenvalue the start vector barely touches may not have appeared in a smaller one.
    min_iter = min(max_iter, max(2 * k + 1, 20))
    device = torch.device(device)
    q = _unit_start(n, seed, dtype, device)
    basis = torch.empty(max_iter, n, dtype=dtype, device=device)
    alphas: list[float] = []
    betas: list[float] = []
    theta = s = None
    converged = False
    bar = tqdm(total=max_iter, desc="Lanczos", disable=not progress, leave=False)
    for j in range(max_iter):
        basis[j] = q
        w = matvec(q).to(dtype)
        alpha = torch.dot(q, w)
        w = w - alpha * q - (betas[-1] * basis[j - 1] if j > 0 else 0.0)
        for _ in range(2):  # full reorthogonalization, twice
            w = w - basis[: j + 1].T @ (basis[: j + 1] @ w)
        beta = torch.linalg.vector_norm(w).item()
        alphas.append(alpha.item())
        bar.update()
        theta, s = _tridiagonal_eigh(alphas, betas)
        pick = _wanted(theta, k, which)
        residual = np.abs(beta * s[-1, pick])
        if len(alphas) >= min_iter and np.all(
            residual <= tol * np.maximum(np.abs(theta[pick]), 1e-30)
        ):
            converged = True
            break
        # An invariant subspace: T_j's eigenvalues are exact eigenvalues of the operator.
        if beta <= 1e-12 * max(abs(theta).max(), 1e-30) or j + 1 == max_iter:
            converged = bool(beta <= 1e-12 * max(abs(theta).max(), 1e-30))
            break
        betas.append(beta)
        q = w / beta
    bar.close()
    steps = len(alphas)
    pick = _wanted(theta, min(k, steps), which)
    ritz = torch.as_tensor(s[:, pick], dtype=dtype, device=device)
    vectors = (basis[:steps].T @ ritz).T
    last_beta = beta if steps == len(betas) + 1 else 0.0
    residuals = torch.as_tensor(np.abs(last_beta * s[-1, pick]), dtype=torch.float64)
    return SolverResult(
        torch.as_tensor(theta[pick], dtype=torch.float64), vectors, residuals, converged, steps
    )


def _tridiagonal_eigh(alphas: list[float], betas: list[float]) -> tuple[np.ndarray, np.ndarray]:
    m = len(alphas)
    T = np.diag(alphas)
    off = np.asarray(betas[: m - 1])
    T[np.arange(m - 1), np.arange(1, m)] = off
    T[np.arange(1, m), np.arange(m - 1)] = off
    return np.linalg.eigh(T)


def _wanted(theta: np.ndarray, k: int, which: str) -> np.ndarray:
    order = np.argsort(theta)  # ascending
    return order[::-1][:k] if which == "largest" else order[:k]


def power_iteration(
    matvec: MatVec,
    n: int,
    k: int = 1,
    *,
    which: str = "largest",
    tol: float = 1e-4,
    max_iter: int = 1000,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> SolverResult:
    """k extreme eigenpairs by power iteration with deflation.

    Each eigenvector is iterated on the operator deflated against those found so far,
    A - sum_j lambda_j v_j v_j^T, and stops on its residual ||H v - lambda v|| <= tol |lambda|
    (not on the relative change of lambda, which stalls early when the top two
    eigenvalues are close: PyHessian's rule). Power iteration finds the eigenvalue of
    largest magnitude, so "largest" is computed on H + rho I and "smallest" on rho I - H,
    with rho the spectral radius, whenever negative eigenvalues could dominate.
    """
    if which not in ("largest", "smallest"):
        raise SharpscopeError(f"which must be 'largest' or 'smallest', got {which!r}")
    if not 1 <= k <= n:
        raise SharpscopeError(f"k = {k} eigenvalues asked for, but the operator has size {n}")
    device = torch.device(device)
    counter = [0]

    def counted(v: torch.Tensor) -> torch.Tensor:
        counter[0] += 1
        return matvec(v).to(dtype)

    bar = tqdm(desc="power iteration", disable=not progress, leave=False)

    def dominant(shift: float, sign: float, found: list, seed_: int, tol: float = tol):
        """Dominant eigenpair of sign * H + shift * I, deflated against ``found``."""
        v = _unit_start(n, seed_, dtype, device)
        lam_h, hv, ok = 0.0, None, False
        for _ in range(max_iter):
            for u, _lam in found:  # keep v orthogonal to found vectors
                v = v - torch.dot(u, v) * u
            v = v / torch.linalg.vector_norm(v)
            hv = counted(v)
            bar.update()
            for u, lam in found:
                hv = hv - lam * torch.dot(u, v) * u
            lam_h = torch.dot(v, hv).item()
            residual = torch.linalg.vector_norm(hv - lam_h * v).item()
            if residual <= tol * max(abs(lam_h), 1e-30):
                ok = True
                break
            v = sign * hv + shift * v
        return lam_h, v, residual, ok

    found: list[tuple[torch.Tensor, float]] = []
    residuals, oks = [], []
    shift = 0.0
    if which == "smallest":
        lam, _, _, _ = dominant(0.0, 1.0, [], seed)
        shift = abs(lam)
    for i in range(k):
        sign = -1.0 if which == "smallest" else 1.0
        # The error of a vector deflated against bounds the residual of every later one,
        # so those are converged ten times tighter.
        tol_i = tol if i == k - 1 else tol / 10
        lam, v, res, ok = dominant(shift, sign, found, seed + 1 + i, tol_i)
        if which == "largest" and lam < 0 and shift == 0.0:
            shift = abs(lam)  # a negative eigenvalue dominates: shift to H + rho I
            lam, v, res, ok = dominant(shift, sign, found, seed + 1 + i, tol_i)
        found.append((v, lam))
        residuals.append(res)
        oks.append(ok)
    bar.close()
    values = torch.tensor([lam for _, lam in found], dtype=torch.float64)
    order = torch.argsort(values, descending=which == "largest")
    vectors = torch.stack([v for v, _ in found])[order]
    return SolverResult(
        values[order],
        vectors,
        torch.tensor(residuals, dtype=torch.float64)[order],
        all(oks),
        counter[0],
    )


# --------------------------------------------------------------------------- results


@dataclass(frozen=True)
class EigenResult:
    """Extreme Hessian eigenvalues with their residuals and the settings that made them.

    ``eigenvalues`` are ordered largest first (which="largest") or smallest first
    (which="smallest"); ``eigenvectors`` has shape (k, n) in the objective's flat layout
    when asked for; ``residuals`` are ||H v - lambda v|| for unit v.
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
        return dict(self.__dict__)


@dataclass(frozen=True)
class DensityResult:
    """Eigenvalue density of H by stochastic Lanczos quadrature.

    ``grid`` and ``density`` are arrays of length ``grid_points`` (the density integrates
    to about 1 over the grid); ``nodes`` and ``weights`` have shape (runs, steps): the
    quadrature each run produced, its weights summing to 1.
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
        out = {k: v for k, v in self.__dict__.items()}
        for key in ("grid", "density", "nodes", "weights"):
            out[key] = np.asarray(out[key]).tolist()
        return out


# --------------------------------------------------------------------------- analyzers


def _objective(model, data, loss_fn, param_filter, batch_size, device) -> Objective:
    options = {"param_filter": param_filter, "batch_size": batch_size, "device": device}
    if isinstance(model, Objective):
        return make_objective(model)
    return make_objective(model, data, loss_fn, **options)


def hessian_eigenvalues(
    model: nn.Module | Objective,
    data: Any = None,
    k: int = 1,
    *,
    loss_fn: Callable | None = None,
    which: str = "largest",
    method: str = "lanczos",
    tol: float = 1e-4,
    max_iter: int | None = None,
    seed: int = 0,
    return_eigenvectors: bool = False,
    param_filter: str = "all",
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> EigenResult:
    """The k largest (or smallest, most negative) eigenvalues of the Hessian of L at w.

    Args:
        model: a module (with ``data``: an (inputs, targets) pair or batches) or an
            :class:`~sharpscope.objective.Objective`.
        k: number of eigenvalues.
        which: "largest" (largest algebraic, largest first) or "smallest".
        method: "lanczos" (default; full reorthogonalization, stops on Ritz residuals),
            "power" (deflated power iteration stopping on the residual) or "pyhessian"
            (the PyHessian package's power iteration, for a cross-check; largest only).
        tol: relative residual ||Hv - lambda v|| / |lambda| at which a pair counts as
            converged (for "pyhessian": PyHessian's own relative-change tolerance).
        seed: seeds the start vectors (a local generator).

    The tolerance default 1e-4 is the accuracy issue 3's benchmark asks for; PyHessian's
    default is 1e-3 on a relative change, which is looser (see benchmarks/bench_hessian.py).
    """
    if method not in METHODS:
        raise SharpscopeError(f"unknown eigenvalue method {method!r}: choose {', '.join(METHODS)}")
    if tol <= 0:
        raise SharpscopeError(f"tol must be positive, got {tol}")
    obj = _objective(model, data, loss_fn, param_filter, batch_size, device)
    obj.check_finite()
    if not 1 <= k <= obj.numel:
        raise SharpscopeError(
            f"k = {k} eigenvalues asked for, but the model has {obj.numel} parameters"
        )
    start = obj.hvp_count
    if method == "pyhessian":
        if which != "largest":
            raise SharpscopeError("PyHessian computes the largest eigenvalues only")
        values, vectors, hvps = _pyhessian_eigenvalues(obj, k, tol, max_iter or 100, seed)
        residuals = _residuals(obj, values, vectors)
        result = SolverResult(values, vectors, residuals, True, hvps)
    else:
        solver = lanczos if method == "lanczos" else power_iteration
        kwargs = {"max_iter": max_iter} if max_iter else {}
        result = solver(
            lambda v: obj.hvp(v),
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
    hvps = obj.hvp_count - start if method != "pyhessian" else result.matvecs
    return EigenResult(
        eigenvalues=tuple(float(x) for x in result.eigenvalues),
        residuals=tuple(float(x) for x in result.residuals),
        converged=bool(result.converged),
        hvp_count=int(hvps),
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


def _residuals(obj: Objective, values: torch.Tensor, vectors: torch.Tensor) -> torch.Tensor:
    res = []
    for lam, v in zip(values.tolist(), vectors, strict=True):
        v = v.to(obj.accumulate_dtype)
        res.append(torch.linalg.vector_norm(obj.hvp(v / v.norm()) - lam * v / v.norm()).item())
    return torch.tensor(res, dtype=torch.float64)


def _pyhessian_eigenvalues(obj: Objective, k: int, tol: float, max_iter: int, seed: int):
    """Run PyHessian's ``hessian.eigenvalues`` on the objective's model and data.

    Its known problems are handled here: ``cuda=True`` by default (we pass the
    objective's device), it leaves the model in eval mode and gradients in ``.grad``
    (both restored), it draws start vectors from the global RNG (forked and seeded), and
    it covers every parameter (so only param_filter "all" is comparable).
    """
    try:
        # The module, not the class the package re-exports under the same name.
        module = importlib.import_module("pyhessian.hessian")
    except ImportError:
        raise SharpscopeError(
            "method 'pyhessian' needs the PyHessian package: pip install 'sharpscope[pyhessian]'"
        ) from None
    if obj.param_filter != "all":
        raise SharpscopeError("PyHessian covers every parameter: use param_filter 'all'")
    model = obj.model
    modes = [(m, m.training) for m in model.modules()]
    grads = {p: p.grad for p in model.parameters()}
    counter = [0]
    single = len(obj.batches) == 1
    original_hvp = module.hessian_vector_product

    def counted_hvp(*args, **kwargs):
        counter[0] += 1
        return original_hvp(*args, **kwargs)

    try:
        with (
            torch.random.fork_rng(devices=[obj.device] if obj.device.type == "cuda" else []),
            warnings.catch_warnings(),
        ):
            # Its backward(create_graph=True) makes a parameter/grad reference cycle; we
            # break it by restoring .grad below, so its warning is noise here.
            warnings.filterwarnings("ignore", message=".*reference cycle")
            torch.manual_seed(seed)
            kwargs = {"data": obj.batches[0]} if single else {"dataloader": obj.batches}
            h = module.hessian(model, obj.loss_fn, cuda=obj.device.type == "cuda", **kwargs)
            if single:
                module.hessian_vector_product = counted_hvp
            else:
                original_dl = h.dataloader_hv_product

                def counted_dl(v):
                    counter[0] += 1
                    return original_dl(v)

                h.dataloader_hv_product = counted_dl
            values, vectors = h.eigenvalues(maxIter=max_iter, tol=tol, top_n=k)
    finally:
        module.hessian_vector_product = original_hvp
        for m, flag in modes:
            m.training = flag
        for p, g in grads.items():
            p.grad = g
    names = dict(model.named_parameters())
    param_order = [n for n, p in names.items() if p.requires_grad]
    flat = []
    for vec in vectors:
        by_name = dict(zip(param_order, vec, strict=True))
        flat.append(obj.layout.flatten(by_name).to(obj.accumulate_dtype))
    values_t = torch.tensor(values, dtype=torch.float64)
    order = torch.argsort(values_t, descending=True)
    return values_t[order], torch.stack(flat)[order], counter[0]


def hessian_trace(
    model: nn.Module | Objective,
    data: Any = None,
    *,
    samples: int = 100,
    seed: int = 0,
    loss_fn: Callable | None = None,
    param_filter: str = "all",
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> TraceResult:
    """tr(H) by Hutchinson's estimator: the mean of z^T H z over Rademacher probes z.

    The per-probe variance is 2 (||H||_F^2 - sum_i H_ii^2) (Avron & Toledo 2011, Sec. 3);
    the standard error reported is the sample standard deviation over sqrt(samples).
    100 probes by default: PyHessian's ``trace`` cap (``maxIter=100``), here a fixed budget.
    """
    if samples < 2:
        raise SharpscopeError(f"the trace needs at least 2 probes, got {samples}")
    obj = _objective(model, data, loss_fn, param_filter, batch_size, device)
    obj.check_finite()
    g = torch.Generator().manual_seed(seed)
    values = []
    for _ in tqdm(range(samples), desc="Hutchinson trace", disable=not progress, leave=False):
        z = torch.randint(0, 2, (obj.numel,), generator=g).to(obj.device, obj.accumulate_dtype)
        z = 2 * z - 1
        values.append(torch.dot(z, obj.hvp(z)).item())
    arr = np.asarray(values)
    return TraceResult(
        value=float(arr.mean()),
        stderr=float(arr.std(ddof=1) / math.sqrt(samples)),
        samples=samples,
        hvp_count=samples,
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
    param_filter: str = "all",
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> DensityResult:
    """The Hessian's eigenvalue density by stochastic Lanczos quadrature.

    Each run performs ``steps`` Lanczos steps from a random unit vector; the eigenvalues
    of its tridiagonal T are the quadrature nodes and the squared first components of
    T's eigenvectors their weights (Golub & Meurant 2010; Ghorbani et al. 2019, Sec. 2).
    Nodes are smoothed by Gaussians of width ``sigma`` onto a grid and runs averaged.
    Defaults follow Ghorbani et al. (2019): 80 Lanczos steps; PyHessian's density uses
    sigma = 1e-5 on a normalized spectrum. Here sigma defaults to 1% of the spectral
    range so the curve is readable on a linear axis.
    """
    if runs < 1 or steps < 1 or grid_points < 2:
        raise SharpscopeError("density needs runs >= 1, steps >= 1 and grid_points >= 2")
    obj = _objective(model, data, loss_fn, param_filter, batch_size, device)
    obj.check_finite()
    steps = min(steps, obj.numel)
    nodes, weights = [], []
    start = obj.hvp_count
    for r in tqdm(range(runs), desc="SLQ runs", disable=not progress, leave=False):
        theta, first = _lanczos_quadrature(obj, steps, seed + r)
        nodes.append(theta)
        weights.append(first)
    width = max(max(n.max() for n in nodes) - min(n.min() for n in nodes), 1e-12)
    sigma = sigma if sigma is not None else 0.01 * width
    lo = min(n.min() for n in nodes) - 5 * sigma
    hi = max(n.max() for n in nodes) + 5 * sigma
    grid = np.linspace(lo, hi, grid_points)
    density = np.zeros(grid_points)
    for theta, w in zip(nodes, weights, strict=True):
        gauss = np.exp(-((grid[:, None] - theta[None, :]) ** 2) / (2 * sigma**2))
        density += (gauss / (sigma * math.sqrt(2 * math.pi))) @ w
    density /= runs
    pad = max(len(n) for n in nodes)
    node_arr = np.full((runs, pad), np.nan)
    weight_arr = np.zeros((runs, pad))
    for i, (theta, w) in enumerate(zip(nodes, weights, strict=True)):
        node_arr[i, : len(theta)] = theta
        weight_arr[i, : len(w)] = w
    return DensityResult(
        grid=grid,
        density=density,
        nodes=node_arr,
        weights=weight_arr,
        runs=runs,
        steps=steps,
        sigma=float(sigma),
        seed=seed,
        hvp_count=obj.hvp_count - start,
        n_params=obj.numel,
        n_examples=obj.n_examples,
        param_filter=obj.param_filter,
    )


def _lanczos_quadrature(obj: Objective, steps: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Nodes and weights of one SLQ run: eigh of T_m from a random unit start."""
    q = _unit_start(obj.numel, seed, obj.accumulate_dtype, obj.device)
    basis = [q]
    alphas, betas = [], []
    for j in range(steps):
        w = obj.hvp(q).to(obj.accumulate_dtype)
        alpha = torch.dot(q, w)
        w = w - alpha * q - (betas[-1] * basis[j - 1] if j > 0 else 0.0)
        Q = torch.stack(basis)
        w = w - Q.T @ (Q @ w)  # full reorthogonalization (Ghorbani et al. 2019, App. B)
        alphas.append(alpha.item())
        beta = torch.linalg.vector_norm(w).item()
        if j + 1 == steps or beta < 1e-10:
            break
        betas.append(beta)
        q = w / beta
        basis.append(q)
    theta, s = _tridiagonal_eigh(alphas, betas)
    return theta, s[0] ** 2
