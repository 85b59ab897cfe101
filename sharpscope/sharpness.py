"""Worst-case and average-case sharpness of L at w.

Worst case (the SAM sharpness term, Foret et al. 2021, eq. 1)::

    S_max(w) = max_{||eps / c||_p <= rho} L(w + eps) - L(w)

found by projected gradient ascent in the style of APGD (Croce & Hein 2020, Alg. 1),
as Andriushchenko et al. (2023, Sec. 3) use it for weights. The ascent runs in the
normalized coordinates u = eps / c, where c = |w| + eta elementwise for adaptive
(reparametrization-aware) sharpness and c = 1 otherwise, so the feasible set is a plain
l2 ball or linf box and the projection is a rescale or a clamp.

An ascent finds a point inside the ball, so the value returned is a real
L(w + eps) - L(w) of the eps it reports: a lower bound of the maximum, never more.

Average case: E_eps[L(w + eps)] - L(w) with eps ~ N(0, rho^2 diag(c^2)) (l2) or
eps ~ U[-rho c, rho c] (linf), by Monte Carlo with a standard error.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .batches import count_examples, join_batches, slice_batch, to_device
from .checks import is_real, is_whole
from .errors import SharpscopeError
from .objective import Objective, make_objective

NORMS = ("l2", "linf")
# APGD constants (Croce & Hein 2020, Sec. 3.2): momentum 0.75, the success fraction 0.75
# below which the step halves, and the checkpoint schedule p_0 = 0, p_1 = 0.22,
# p_{j+1} = p_j + max(p_j - p_{j-1} - 0.03, 0.06).
MOMENTUM = 0.75
SUCCESS_FRACTION = 0.75


def apgd_checkpoints(steps: int) -> list[int]:
    """The iterations ceil(p_j N) at which APGD may halve its step (Croce & Hein 2020)."""
    p = [0.0, 0.22]
    while p[-1] < 1:
        p.append(p[-1] + max(p[-1] - p[-2] - 0.03, 0.06))
    return sorted({math.ceil(round(pj * steps, 9)) for pj in p if 0 < pj <= 1})


@dataclass(frozen=True)
class SharpnessResult:
    """max_{||eps/c||_p <= rho} L(w + eps) - L(w), found by APGD, with its settings.

    ``value = perturbed_loss - loss`` where ``perturbed_loss`` is L at the returned
    perturbation (re-evaluated); ``per_batch`` holds each batch's value for m-sharpness.
    ``perturbation`` (eps in the objective's flat layout) only when asked for, and only
    without m.
    """

    value: float
    loss: float
    perturbed_loss: float
    rho: float
    norm: str
    adaptive: bool
    eta: float
    steps: int
    restarts: int
    m: int | None
    seed: int
    n_examples: int
    n_params: int
    param_filter: str
    grad_count: int
    eps_norm: float
    per_batch: tuple[float, ...] | None = None
    perturbation: torch.Tensor | None = field(default=None, repr=False)

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k != "perturbation"}
        out["per_batch"] = list(self.per_batch) if self.per_batch is not None else None
        return out


@dataclass(frozen=True)
class AverageSharpnessResult:
    """E[L(w + eps)] - L(w) by Monte Carlo, with the standard error of the mean."""

    value: float
    stderr: float
    loss: float
    rho: float
    norm: str
    adaptive: bool
    eta: float
    samples: int
    seed: int
    n_examples: int
    n_params: int
    param_filter: str

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def check_sharpness_options(
    rho: float,
    norm: str = "l2",
    steps: int = 1,
    restarts: int = 1,
    eta: float = 0.0,
    m: int | None = None,
) -> None:
    """The refusals of :func:`sharpness`'s options (no model needed)."""
    if not is_real(rho, finite=True) or not rho > 0:
        raise SharpscopeError(f"rho must be positive, got {rho}")
    if not is_real(eta, finite=True) or not eta >= 0:
        raise SharpscopeError(f"eta must be >= 0 (c = |w| + eta scales eps), got {eta}")
    if norm not in NORMS:
        raise SharpscopeError(f"unknown norm {norm!r}: choose l2 or linf")
    if not is_whole(steps, 1) or not is_whole(restarts, 1):
        raise SharpscopeError("APGD needs steps >= 1 and restarts >= 1")
    if m is not None and not is_whole(m, 1):
        raise SharpscopeError(f"m must be a positive number of examples, got {m}")


def check_average_samples(samples: int) -> None:
    """A Monte Carlo mean and its standard error need two draws at least."""
    if not is_whole(samples, 2):
        raise SharpscopeError(f"average sharpness needs at least 2 samples, got {samples}")


def _scale(obj: Objective, adaptive: bool, eta: float) -> torch.Tensor:
    """c: |w| + eta (adaptive, Kwon et al. 2021) or ones."""
    if adaptive:
        return obj.w0.abs() + eta
    return torch.ones_like(obj.w0)


def _project(u: torch.Tensor, rho: float, norm: str) -> torch.Tensor:
    if norm == "linf":
        return u.clamp(-rho, rho)
    n = torch.linalg.vector_norm(u)
    return u * (rho / n) if n > rho else u


def _ascent_direction(g: torch.Tensor, norm: str) -> torch.Tensor:
    if norm == "linf":
        return torch.sign(g)
    return g / (torch.linalg.vector_norm(g) + 1e-30)


def _random_in_ball(n: int, rho: float, norm: str, g: torch.Generator) -> torch.Tensor:
    """A point drawn uniformly from the l2 ball or linf box of radius rho."""
    if norm == "linf":
        return (2 * torch.rand(n, generator=g, dtype=torch.float64) - 1) * rho
    d = torch.randn(n, generator=g, dtype=torch.float64)
    radius = rho * torch.rand((), generator=g, dtype=torch.float64) ** (1.0 / n)
    return d / torch.linalg.vector_norm(d) * radius


def _apgd(
    obj: Objective,
    c: torch.Tensor,
    rho: float,
    norm: str,
    steps: int,
    restarts: int,
    seed: int,
    bar: tqdm,
) -> tuple[float, torch.Tensor]:
    """Best (L(w + c u), u) over ``restarts`` APGD runs of ``steps`` steps (docs/algorithms.md)."""
    checkpoints = set(apgd_checkpoints(steps))
    gen = torch.Generator().manual_seed(seed)
    w0, dtype = obj.w0, obj.w0.dtype
    best_value, best_u = -math.inf, torch.zeros_like(w0)

    def at(u: torch.Tensor) -> tuple[float, torch.Tensor]:
        value, grad_w = obj.value_and_grad(w0 + c * u)
        return value, (c * grad_w.to(dtype))

    for r in range(restarts):
        if r == 0:
            u = torch.zeros_like(w0)
        else:
            u = _random_in_ball(obj.numel, rho, norm, gen).to(w0.device, dtype)
        current, g = at(u)
        run_best, run_u, run_g = current, u, g
        step = 2 * rho  # initial step size 2 * rho (Croce & Hein 2020, Alg. 1)
        u_prev = u
        successes, last_checkpoint = 0, 0
        best_at_checkpoint, step_at_checkpoint = run_best, step
        for k in range(steps):
            z = _project(u + step * _ascent_direction(g, norm), rho, norm)
            if k > 0:
                z = _project(u + MOMENTUM * (z - u) + (1 - MOMENTUM) * (u - u_prev), rho, norm)
            u_prev, u = u, z
            value, g = at(u)
            successes += value > current
            current = value
            if value > run_best:
                run_best, run_u, run_g = value, u, g
            bar.update()
            if k + 1 in checkpoints:
                h = k + 1 - last_checkpoint
                stalled = step == step_at_checkpoint and run_best == best_at_checkpoint
                if successes < SUCCESS_FRACTION * h or stalled:
                    step /= 2
                    u, g, u_prev, current = run_u, run_g, run_u, run_best
                successes, last_checkpoint = 0, k + 1
                best_at_checkpoint, step_at_checkpoint = run_best, step
        if run_best > best_value:
            best_value, best_u = run_best, run_u
    return best_value, best_u


def _objective(model, data, loss_fn, accumulate_dtype, **options) -> Objective:
    """:func:`make_objective` with ``options`` (its keywords), summing in float64 unless
    told otherwise when it builds."""
    if not isinstance(model, Objective):
        accumulate_dtype = accumulate_dtype or torch.float64
    return make_objective(model, data, loss_fn, accumulate_dtype=accumulate_dtype, **options)


def sharpness(
    model: nn.Module | Objective,
    data: Any = None,
    rho: float = 0.05,
    *,
    loss_fn: Callable | None = None,
    batch_loss: Callable | None = None,
    examples_in: Callable | None = None,
    norm: str = "l2",
    adaptive: bool = False,
    eta: float = 0.0,
    steps: int = 20,
    restarts: int = 1,
    m: int | None = None,
    seed: int = 0,
    param_filter: str = "all",
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    accumulate_dtype: torch.dtype | None = None,
    return_perturbation: bool = False,
    progress: bool = False,
) -> SharpnessResult:
    """Worst-case sharpness max_{||eps/c||_p <= rho} L(w + eps) - L(w) by APGD.

    Args:
        model: a module with ``data`` (any form an
            :class:`~sharpscope.objective.Objective` takes: an (inputs, targets) pair, a
            list of batches, a DataLoader) and ``loss_fn`` or ``batch_loss`` (and
            ``examples_in``) as there; or an Objective (then ``data``, the loss,
            ``param_filter``, ``batch_size``, ``device`` and ``accumulate_dtype`` are
            the objective's own, and giving them here too is refused).
        rho: radius (0.05: SAM's default, Foret et al. 2021).
        norm: "l2" or "linf".
        adaptive, eta: measure eps relative to c = |w| + eta (Kwon et al. 2021;
            Andriushchenko et al. 2023 use eta = 0 for adaptive sharpness).
        steps: APGD iterations per restart (20: Andriushchenko et al. 2023, Sec. 3).
        restarts: the first starts at eps = 0, the others uniformly inside the ball
            (at an exact minimum the gradient is zero and only these can move).
        m: None measures the whole set as one batch (the definition in SAM's bound);
            m = k splits the examples, in order, into batches of k (the last one may be
            shorter) and returns the unweighted mean of each batch's own maximum
            (m-sharpness, Foret et al. 2021, Sec. 4.1). Batch i seeds its restarts with
            ``seed + i``. Under a process group the batches are shared out over the ranks.
        seed: seeds the random restarts (a local generator).
        accumulate_dtype: dtype for summing L over batches; default float64, which
            keeps small-rho differences exact (docs/algorithms.md, pitfalls).
        return_perturbation: keep the best eps (shape (n_params,), the objective's flat
            layout) in the result; only without m.

    Returns:
        :class:`SharpnessResult`; ``value`` is L(w + eps) - L(w) re-evaluated at the eps
        found, a lower bound of the maximum. ``eps_norm`` is ||eps||_p (for adaptive
        sharpness ||eps / c||_p <= rho bounds it instead); ``grad_count`` counts gradients
        of the whole set (with m: of single batches).
    """
    check_sharpness_options(rho, norm, steps, restarts, eta, m)
    obj = _objective(
        model,
        data,
        loss_fn,
        accumulate_dtype,
        batch_loss=batch_loss,
        examples_in=examples_in,
        param_filter=param_filter,
        batch_size=batch_size,
        device=device,
    )
    base_loss = obj.check_finite()  # every batch's loss is finite when the mean is
    groups = [obj] if m is None else _micro_batches(obj, m)
    mine = [i for i in range(len(groups)) if m is None or i % _world(obj) == _rank(obj)]
    bar = tqdm(
        total=len(mine) * restarts * steps,
        desc=f"APGD sharpness rho={rho}",
        disable=not progress,
        leave=False,
    )
    # One row per group: value, L(w), L(w + eps), ||eps||_p, gradients spent.
    rows = torch.zeros(len(groups), 5, dtype=torch.float64, device=obj.device)
    best_eps = None
    for i in mine:
        group = groups[i]
        start = group.grad_count
        loss = base_loss if group is obj else group.value()
        c = _scale(group, adaptive, eta)
        _, u = _apgd(group, c, rho, norm, steps, restarts, seed + i, bar)
        eps = c * u
        perturbed = group.value(group.w0 + eps)  # the real L(w + eps) of what we report
        eps_norm = torch.linalg.vector_norm(eps, 2 if norm == "l2" else math.inf).item()
        rows[i] = torch.tensor(
            [perturbed - loss, loss, perturbed, eps_norm, group.grad_count - start],
            dtype=torch.float64,
        )
        best_eps = eps
    bar.close()
    if m is not None and obj.distributed:
        distributed.all_reduce_sum_([rows])  # each group was measured on one rank only
    rows = rows.cpu().numpy()
    return SharpnessResult(
        value=float(rows[:, 0].mean()),
        loss=float(rows[:, 1].mean()),
        perturbed_loss=float(rows[:, 2].mean()),
        rho=rho,
        norm=norm,
        adaptive=adaptive,
        eta=eta,
        steps=steps,
        restarts=restarts,
        m=m,
        seed=seed,
        n_examples=obj.n_examples,
        n_params=obj.numel,
        param_filter=obj.param_filter,
        grad_count=int(rows[:, 4].sum()),
        eps_norm=float(rows[:, 3].max()),
        per_batch=tuple(float(v) for v in rows[:, 0]) if m is not None else None,
        perturbation=best_eps if return_perturbation and m is None else None,
    )


def _world(obj: Objective) -> int:
    return distributed.world_size() if obj.distributed else 1


def _rank(obj: Objective) -> int:
    return distributed.rank() if obj.distributed else 0


def _micro_batches(obj: Objective, m: int) -> list[Objective]:
    """One single-process objective per batch of m consecutive examples of ``obj``.

    Under a process group each rank holds a contiguous shard of data held in memory, or
    every world-th batch of streamed data (:func:`~sharpscope.batches.make_source`);
    gathering the shards back in that order gives every example in its original order,
    so the batches are the ones a single process would form. Streamed data is joined in
    memory: m-sharpness regroups the examples, so they must fit.
    """
    batches = list(obj.batches())
    if obj.distributed:
        cpu = torch.device("cpu")
        shards = distributed.all_gather_objects([to_device(b, cpu) for b in batches])
        if obj.source.in_memory:  # contiguous ranges of examples, in rank order
            batches = [b for shard in shards for b in shard]
        else:  # streamed batches dealt out in turn: batch j of rank r is j * world + r
            rounds = itertools.zip_longest(*shards)
            batches = [b for batch_round in rounds for b in batch_round if b is not None]
        batches = [to_device(b, obj.device) for b in batches]
    # Groups of m rows (the first dimension, what slicing cuts; examples_in only weighs).
    forward_batch = max(count_examples(b) for b in batches)  # the objective's pass size
    every = join_batches(batches)
    n = count_examples(every)
    names = set(obj.layout.names)
    return [
        Objective(
            obj.model,
            [slice_batch(every, a, b, n) for a, b in _cuts(i, min(i + m, n), forward_batch)],
            None if obj.batch_loss else obj.loss_fn,
            batch_loss=obj.batch_loss,
            examples_in=obj.examples_in,
            param_filter=lambda name, _p: name in names,
            device=obj.device,
            accumulate_dtype=obj.accumulate_dtype,
            distributed=False,
        )
        for i in range(0, n, m)
    ]


def _cuts(start: int, stop: int, size: int) -> list[tuple[int, int]]:
    """(start, stop) of the forward passes of size at most ``size`` over start:stop."""
    return [(a, min(a + size, stop)) for a in range(start, stop, size)]


def average_sharpness(
    model: nn.Module | Objective,
    data: Any = None,
    rho: float = 0.05,
    *,
    loss_fn: Callable | None = None,
    batch_loss: Callable | None = None,
    examples_in: Callable | None = None,
    norm: str = "l2",
    adaptive: bool = False,
    eta: float = 0.0,
    samples: int = 100,
    seed: int = 0,
    param_filter: str = "all",
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    accumulate_dtype: torch.dtype | None = None,
    progress: bool = False,
) -> AverageSharpnessResult:
    """Average-case sharpness E[L(w + eps)] - L(w) by Monte Carlo.

    The scaling convention, decided here (docs/algorithms.md, "Average-case sharpness"): rho is a
    per-coordinate scale, not a radius.

    - "l2": eps_i ~ N(0, (rho c_i)^2) independently, i.e. eps ~ N(0, rho^2 diag(c^2)),
      as in Andriushchenko et al. (2023, Sec. 3) and their code. ||eps / c||_2 is then
      about rho sqrt(n), far outside the worst-case ball of the same rho, so the two
      numbers are not comparable at equal rho.
    - "linf": eps_i ~ U[-rho c_i, rho c_i] independently: eps fills the worst-case box.

    c = |w| + eta when ``adaptive``, else 1. For a quadratic L with Hessian H the value is
    rho^2 / 2 tr(diag(c) H diag(c)) ("l2") and rho^2 / 6 of that trace ("linf").
    Returns the sample mean over ``samples`` draws (100 by default, the default of
    Andriushchenko et al. 2023's code; a local generator seeded with ``seed``) and its
    standard error std / sqrt(samples). Other arguments as
    :func:`sharpness`.
    """
    check_sharpness_options(rho, norm, eta=eta)
    check_average_samples(samples)
    obj = _objective(
        model,
        data,
        loss_fn,
        accumulate_dtype,
        batch_loss=batch_loss,
        examples_in=examples_in,
        param_filter=param_filter,
        batch_size=batch_size,
        device=device,
    )
    loss = obj.check_finite()
    c = _scale(obj, adaptive, eta)
    gen = torch.Generator().manual_seed(seed)
    diffs = []
    for _ in tqdm(range(samples), desc="average sharpness", disable=not progress, leave=False):
        if norm == "l2":
            z = torch.randn(obj.numel, generator=gen, dtype=torch.float64)
        else:
            z = 2 * torch.rand(obj.numel, generator=gen, dtype=torch.float64) - 1
        eps = rho * c * z.to(obj.device, obj.dtype)
        diffs.append(obj.value(obj.w0 + eps) - loss)
    arr = np.asarray(diffs)
    return AverageSharpnessResult(
        value=float(arr.mean()),
        stderr=float(arr.std(ddof=1) / math.sqrt(samples)),
        loss=loss,
        rho=rho,
        norm=norm,
        adaptive=adaptive,
        eta=eta,
        samples=samples,
        seed=seed,
        n_examples=obj.n_examples,
        n_params=obj.numel,
        param_filter=obj.param_filter,
    )
