"""Matrix-free symmetric eigensolvers: Lanczos, power iteration and stochastic Lanczos
quadrature on any ``matvec`` (v -> A v), so that they are tested on explicit matrices as
well as on Hessians (:mod:`sharpscope.hessian` hands them Hessian-vector products).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from .errors import SharpscopeError

MatVec = Callable[[torch.Tensor], torch.Tensor]
WHICH = ("largest", "smallest")


@dataclass(frozen=True)
class SolverResult:
    """Eigenpairs from a solver on a plain ``matvec``.

    ``eigenvalues`` (k,) float64, ordered largest first ("largest") or smallest first
    ("smallest"); ``eigenvectors`` (k, n), unit rows; ``residuals`` (k,) float64, the
    norms ||A v - lambda v||; ``matvecs`` the products spent.
    """

    eigenvalues: torch.Tensor
    eigenvectors: torch.Tensor
    residuals: torch.Tensor
    converged: bool
    matvecs: int


def _random_unit(
    n: int, generator: torch.Generator, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    # Drawn on the CPU from a local generator: the same seed gives the same vector on
    # every device and every rank.
    v = torch.randn(n, generator=generator, dtype=torch.float64).to(device=device, dtype=dtype)
    return v / torch.linalg.vector_norm(v)


def _check_request(n: int, k: int, which: str) -> None:
    if which not in WHICH:
        raise SharpscopeError(f"which must be 'largest' or 'smallest', got {which!r}")
    if not 1 <= k <= n:
        raise SharpscopeError(f"k = {k} eigenvalues asked for, but the operator has size {n}")


def _lanczos_process(
    matvec: MatVec,
    start: torch.Tensor,
    steps: int,
    *,
    restart: torch.Generator | None = None,
    should_stop: Callable[[list[float], list[float]], bool] | None = None,
    bar: Any = None,
) -> tuple[list[float], list[float], torch.Tensor]:
    """Up to ``steps`` Lanczos steps from the unit vector ``start``, fully reorthogonalized.

    Returns ``(alphas, betas, basis)``: T has diagonal ``alphas`` (m,) and off-diagonal
    ``betas[:-1]``; ``betas[-1]`` is the norm of the last residual vector, so a Ritz
    pair (theta_i, Q s_i) of T has residual ||A Q s_i - theta_i Q s_i|| = betas[-1] |s_i[-1]|
    (Parlett 1998, Sec. 13.1). ``basis`` is Q, shape (m, n).

    Each new vector is orthogonalized twice against the whole basis ("twice is enough",
    Parlett 1998, Sec. 6.9), which keeps the Ritz values free of spurious copies. When
    the Krylov space becomes invariant, the process stops, or with ``restart`` (a
    generator) continues from a fresh random vector orthogonal to the basis with a zero
    coupling, so eigenvalues the start vector missed (a second copy of a repeated one)
    are found too. ``should_stop(alphas, betas)`` is asked after every step.
    """
    n, dtype, device = start.numel(), start.dtype, start.device
    # Breakdown: a residual this small relative to ||T|| is rounding noise, not a
    # direction of the operator. Kept tight: missing a breakdown is harmless (the noise,
    # orthogonalized, is as good a next vector as any), a false one drops a coupling.
    breakdown = 10 * torch.finfo(dtype).eps
    basis = torch.empty(min(steps, 32), n, dtype=dtype, device=device)
    alphas: list[float] = []
    betas: list[float] = []
    q = start
    for j in range(steps):
        if j == basis.shape[0]:  # grow the basis geometrically instead of reserving n x steps
            grown = torch.empty(min(steps, 2 * j), n, dtype=dtype, device=device)
            grown[:j] = basis
            basis = grown
        basis[j] = q
        w = matvec(q).to(dtype)
        alpha = torch.dot(q, w)
        w = w - alpha * q
        if j > 0:
            w = w - betas[-1] * basis[j - 1]
        for _ in range(2):
            w = w - basis[: j + 1].T @ (basis[: j + 1] @ w)
        beta = torch.linalg.vector_norm(w).item()
        alphas.append(alpha.item())
        betas.append(beta)
        if bar is not None:
            bar.update()
        if j + 1 == steps or (should_stop is not None and should_stop(alphas, betas)):
            break
        scale = max(max(abs(a) for a in alphas), max(betas[:-1], default=0.0))
        if beta > breakdown * scale:
            q = w / beta
            continue
        if restart is None:
            break
        betas[-1] = 0.0
        q = _random_unit(n, restart, dtype, device)
        for _ in range(2):
            q = q - basis[: j + 1].T @ (basis[: j + 1] @ q)
        q = q / torch.linalg.vector_norm(q)
    return alphas, betas, basis[: len(alphas)]


def _tridiagonal_eigh(alphas: list[float], betas: list[float]) -> tuple[np.ndarray, np.ndarray]:
    """Eigenvalues (ascending) and eigenvectors of T with diagonal ``alphas`` and
    off-diagonal ``betas[: len(alphas) - 1]``."""
    m = len(alphas)
    T = np.diag(np.asarray(alphas, dtype=np.float64))
    off = np.asarray(betas[: m - 1], dtype=np.float64)
    T[np.arange(m - 1), np.arange(1, m)] = off
    T[np.arange(1, m), np.arange(m - 1)] = off
    return np.linalg.eigh(T)


def _wanted(theta: np.ndarray, k: int, which: str) -> np.ndarray:
    order = np.argsort(theta)  # ascending
    return order[::-1][:k] if which == "largest" else order[:k]


def _converged(residuals: np.ndarray, values: np.ndarray, tol: float) -> bool:
    return bool(np.all(residuals <= tol * np.maximum(np.abs(values), 1e-300)))


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
    """k extreme eigenpairs of a symmetric (n, n) operator: Lanczos, full reorthogonalization.

    The Krylov space grows by one vector per ``matvec`` until the k wanted Ritz pairs all
    have residual ||A y - theta y|| <= tol |theta| (read off T for free, see
    :func:`_lanczos_process`), and has at least max(2k + 1, 20) vectors before that
    counts (docs/algorithms.md; ARPACK's default ``ncv`` in scipy's ``eigsh``): a larger
    eigenvalue the start vector barely touches may not have appeared in a smaller one.
    The basis is kept, not restarted, so no product is thrown away; memory is
    n x (steps taken). ``max_iter`` caps the steps (default max(10k, 100), at most n);
    when the Krylov space turns out invariant the process continues from a fresh random
    vector, so repeated eigenvalues come out with their multiplicity.

    Why this rather than ``scipy.sparse.linalg.eigsh`` (ARPACK, implicitly restarted):
    both build the same Krylov space, but ARPACK checks convergence only after each
    restart cycle of ncv - k products and discards part of the space at every restart,
    while this checks after every product and keeps it all; it also stays in torch (GPU,
    float32 vectors, identical on every rank). benchmarks/bench_hessian.py compares the
    two in products at tol 1e-4.

    Returns eigenvalues largest first ("largest") or smallest (most negative) first
    ("smallest"), unit eigenvectors (k, n) in ``dtype``, residual estimates, and
    ``converged`` (False when ``max_iter`` ran out first).
    """
    _check_request(n, k, which)
    if tol <= 0:
        raise SharpscopeError(f"tol must be positive, got {tol}")
    max_iter = min(n, max_iter if max_iter is not None else max(10 * k, 100))
    if max_iter < k:
        raise SharpscopeError(f"max_iter = {max_iter} is smaller than k = {k}")
    min_iter = min(max_iter, max(2 * k + 1, 20))
    generator = torch.Generator().manual_seed(seed)
    start = _random_unit(n, generator, dtype, torch.device(device))

    def converged_now(alphas: list[float], betas: list[float]) -> bool:
        if len(alphas) < min_iter:
            return False
        theta, s = _tridiagonal_eigh(alphas, betas)
        pick = _wanted(theta, k, which)
        return _converged(np.abs(betas[-1] * s[-1, pick]), theta[pick], tol)

    with tqdm(total=max_iter, desc="Lanczos", disable=not progress, leave=False) as bar:
        alphas, betas, basis = _lanczos_process(
            matvec, start, max_iter, restart=generator, should_stop=converged_now, bar=bar
        )
    theta, s = _tridiagonal_eigh(alphas, betas)
    pick = _wanted(theta, k, which)
    residuals = np.abs(betas[-1] * s[-1, pick])
    ritz = torch.as_tensor(s[:, pick], dtype=basis.dtype, device=basis.device)
    vectors = (basis.T @ ritz).T
    vectors = vectors / torch.linalg.vector_norm(vectors, dim=1, keepdim=True)
    return SolverResult(
        torch.as_tensor(theta[pick], dtype=torch.float64),
        vectors,
        torch.as_tensor(residuals, dtype=torch.float64),
        _converged(residuals, theta[pick], tol),
        len(alphas),
    )


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

    Each eigenvector is iterated on the operator deflated against those found so far
    (v kept orthogonal to them) and stops on its residual ||A v - lambda v|| <= tol |lambda|,
    not on the relative change of lambda: that stalls early when the top two eigenvalues
    are close (PyHessian's rule). Power iteration finds the eigenvalue of largest
    magnitude, so "largest" runs on A + rho I when a negative eigenvalue dominates and
    "smallest" on rho I - A, rho the spectral radius from a first run. Eigenvectors
    before the last are converged to tol / 10, since the error of a vector deflated
    against also enters the later ones. ``max_iter`` caps the products per eigenvalue.
    """
    _check_request(n, k, which)
    if tol <= 0:
        raise SharpscopeError(f"tol must be positive, got {tol}")
    device = torch.device(device)
    generator = torch.Generator().manual_seed(seed)
    count = 0
    bar = tqdm(desc="power iteration", disable=not progress, leave=False)
    found: list[tuple[torch.Tensor, float]] = []

    def dominant(
        shift: float, sign: float, tol_i: float
    ) -> tuple[float, torch.Tensor, float, bool]:
        """Dominant eigenpair of sign * A + shift * I on the complement of ``found``;
        returns A's eigenvalue, the unit vector, its residual under A, convergence."""
        nonlocal count
        v = _random_unit(n, generator, dtype, device)
        lam, residual = 0.0, math.inf
        for _ in range(max_iter):
            for u, _ in found:
                v = v - torch.dot(u, v) * u
            v = v / torch.linalg.vector_norm(v)
            av = matvec(v).to(dtype)
            count += 1
            bar.update()
            for u, _ in found:  # the part of A v along found vectors is rounding noise
                av = av - torch.dot(u, av) * u
            lam = torch.dot(v, av).item()
            residual = torch.linalg.vector_norm(av - lam * v).item()
            if residual <= tol_i * max(abs(lam), 1e-300):
                return lam, v, residual, True
            v = sign * av + shift * v
        return lam, v, residual, False

    residuals, oks = [], []
    shift, sign = 0.0, 1.0
    if which == "smallest":
        lam, _, _, _ = dominant(0.0, 1.0, tol)
        # rho I - A with rho >= every eigenvalue (up to tol): the smallest becomes dominant.
        shift, sign = abs(lam) * (1 + tol), -1.0
    for i in range(k):
        tol_i = tol if i == k - 1 else tol / 10
        lam, v, res, ok = dominant(shift, sign, tol_i)
        if which == "largest" and lam < 0 and shift == 0.0:
            shift = abs(lam) * (1 + tol)  # a negative eigenvalue dominates: use A + rho I
            lam, v, res, ok = dominant(shift, sign, tol_i)
        found.append((v, lam))
        residuals.append(res)
        oks.append(ok)
    bar.close()
    values = torch.tensor([lam for _, lam in found], dtype=torch.float64)
    order = torch.argsort(values, descending=which == "largest")
    return SolverResult(
        values[order],
        torch.stack([v for v, _ in found])[order],
        torch.tensor(residuals, dtype=torch.float64)[order],
        all(oks),
        count,
    )


def stochastic_lanczos_quadrature(
    matvec: MatVec,
    n: int,
    *,
    runs: int,
    steps: int,
    seed: int = 0,
    dtype: torch.dtype = torch.float64,
    device: torch.device | str = "cpu",
    progress: bool = False,
) -> tuple[np.ndarray, np.ndarray]:
    """Gauss quadrature nodes and weights of the spectral measure seen from random vectors.

    Each run takes ``steps`` Lanczos steps from a random unit vector q; the eigenvalues
    theta_i of its tridiagonal T and the squared first components tau_i of T's
    eigenvectors give sum_i tau_i f(theta_i) = q^T f(A) q exactly for polynomials f of
    degree < 2 * steps (Golub & Meurant 2010, Ch. 6), and E[q^T f(A) q] = tr f(A) / n
    (Ubaru, Chen & Saad 2017, Sec. 3). A run whose Krylov space becomes invariant stops
    early: its quadrature is then exact for every f.

    Returns ``(nodes, weights)``, each (runs, steps) float64; a run that stopped early is
    padded with copies of its last node at weight 0. Each row of weights sums to 1.
    """
    if runs < 1 or steps < 1:
        raise SharpscopeError(f"quadrature needs runs >= 1 and steps >= 1, got {runs}, {steps}")
    steps = min(steps, n)
    generator = torch.Generator().manual_seed(seed)
    nodes = np.zeros((runs, steps))
    weights = np.zeros((runs, steps))
    for r in tqdm(range(runs), desc="SLQ runs", disable=not progress, leave=False):
        start = _random_unit(n, generator, dtype, torch.device(device))
        alphas, betas, _ = _lanczos_process(matvec, start, steps)
        theta, s = _tridiagonal_eigh(alphas, betas)
        m = len(theta)
        nodes[r, :m], nodes[r, m:] = theta, theta[-1]
        weights[r, :m] = s[0] ** 2
    return nodes, weights
