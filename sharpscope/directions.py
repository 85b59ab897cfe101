"""Directions in weight space for loss landscapes.

Random Gaussian directions normalized filter by filter (Li et al. 2018, "Visualizing the
Loss Landscape of Neural Nets", Sec. 4), layer by layer or not at all; the straight line
between two minima (Goodfellow et al. 2015); the top Hessian eigenvectors; and the top-2
principal components of a training trajectory (Li et al. 2018, Sec. 7). Every direction
is a flat vector in the layout of an :class:`~sharpscope.objective.Objective`.
"""

from __future__ import annotations

import glob
import os
import re

import numpy as np
import torch
from torch import nn

from .checkpoint import read_checkpoint
from .errors import SharpscopeError
from .objective import Layout, Objective, ParamFilter, select_parameters

NORMALIZATIONS = ("filter", "layer", "none")


DIRECTIONS = NORMALIZATIONS + ("hessian", "pca")


def parameter_layout(model: nn.Module, param_filter: ParamFilter = "all") -> Layout:
    """The flat layout of ``model``'s selected parameters (as :attr:`Objective.layout`)."""
    return Layout.of(model, select_parameters(model, param_filter))


def raw_direction(
    layout: Layout,
    seed: int,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    *,
    index: int = 0,
) -> torch.Tensor:
    """A standard Gaussian vector (numel,) in ``layout``, drawn tensor by tensor.

    ``index`` picks the draw: d1 is index 0, d2 index 1, both from one generator seeded
    with ``seed``, so a 1-D surface's direction is the 2-D surface's d1. The draw
    depends only on the layout's shapes and the seed (it is made in float64 on the CPU,
    then cast), so two models of one architecture get the same raw direction: the
    fair way to compare two minima is this raw draw normalized against each model's
    own weights (:func:`normalize_direction`).
    """
    g = torch.Generator().manual_seed(seed)
    for _ in range(index + 1):
        parts = [torch.randn(s.numel(), generator=g, dtype=torch.float64) for s in layout.shapes]
    return torch.cat(parts).to(device=device, dtype=dtype)


def normalize_direction(
    raw: torch.Tensor,
    w: torch.Tensor,
    layout: Layout,
    normalization: str = "filter",
    include_1d: bool = False,
) -> torch.Tensor:
    """Rescale ``raw`` against the weights ``w`` (both flat (numel,) in ``layout``).

    "filter" (Li et al. 2018, Sec. 4): for every tensor with dim > 1, each slice along
    dim 0 (a conv output filter, a linear output row) is rescaled to the norm of the
    matching slice of w: d_j <- d_j ||w_j|| / (||d_j|| + 1e-10). "layer": each tensor
    rescaled to the norm of w's tensor. "none": unchanged. Tensors with dim <= 1
    (biases, normalization-layer affine parameters) are zero by default, as in Li et
    al.'s code (ignore="biasbn"); with ``include_1d`` they keep their Gaussian draw,
    rescaled as a whole to the norm of w's tensor (a 1-D tensor taken as one filter;
    their code copies w itself into d there instead, a direction that is not random).
    A zero tensor (a fresh BatchNorm bias) gets a zero direction either way. Buffers
    such as BatchNorm running statistics are not parameters, so never in a direction.
    """
    if normalization not in NORMALIZATIONS:
        raise SharpscopeError(
            f"unknown normalization {normalization!r}: choose {', '.join(NORMALIZATIONS)}"
        )
    d_parts = layout.unflatten(raw)
    w_parts = layout.unflatten(w.to(raw))
    out = {}
    for name, shape in zip(layout.names, layout.shapes, strict=True):
        d, p = d_parts[name], w_parts[name]
        if len(shape) <= 1 and not include_1d:
            out[name] = torch.zeros_like(d)
        elif normalization == "none":
            out[name] = d.clone()
        elif normalization == "layer" or len(shape) <= 1:
            out[name] = d * (p.norm() / (d.norm() + 1e-10))
        else:
            d2, p2 = d.reshape(shape[0], -1), p.reshape(shape[0], -1)
            scale = p2.norm(dim=1, keepdim=True) / (d2.norm(dim=1, keepdim=True) + 1e-10)
            out[name] = (d2 * scale).reshape(shape)
    return layout.flatten(out)


def random_direction(
    model_or_objective: nn.Module | Objective,
    *,
    seed: int = 0,
    normalization: str = "filter",
    include_1d: bool = False,
    param_filter: ParamFilter = "all",
    index: int = 0,
) -> torch.Tensor:
    """A seeded Gaussian direction normalized against the model's weights.

    Flat (numel,), in the layout, dtype and device of ``Objective.w0`` (for a module:
    of its parameters selected by ``param_filter``). ``index`` 0 is d1, 1 is d2 (see
    :func:`raw_direction`); normalization as :func:`normalize_direction`.
    """
    if isinstance(model_or_objective, Objective):
        layout, w = model_or_objective.layout, model_or_objective.w0
    else:
        layout = parameter_layout(model_or_objective, param_filter)
        params = dict(model_or_objective.named_parameters())
        w = layout.flatten({n: params[n].detach() for n in layout.names})
    raw = raw_direction(layout, seed, w.dtype, w.device, index=index)
    return normalize_direction(raw, w, layout, normalization, include_1d)


def orthogonalize(d1: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
    """d2 with its component along d1 removed, rescaled to d2's norm (Gram-Schmidt).

    Call it after normalization: normalizing after orthogonalizing rescales each filter
    and undoes the orthogonality (docs/algorithms.md). The result keeps d2's overall norm
    but no longer its filter norms exactly.
    """
    d2_perp = d2 - torch.dot(d2, d1) / torch.dot(d1, d1) * d1
    return d2_perp * (d2.norm() / (d2_perp.norm() + 1e-30))


def cosine(d1: torch.Tensor, d2: torch.Tensor) -> float:
    """cos(d1, d2) = <d1, d2> / (||d1|| ||d2||), as a Python float."""
    return (torch.dot(d1, d2) / (d1.norm() * d2.norm() + 1e-30)).item()


def interpolation_direction(
    model_a: nn.Module, model_b: nn.Module, *, param_filter: ParamFilter = "all"
) -> torch.Tensor:
    """w_B - w_A (flat, in A's layout): the direction of the straight line from A to B
    (Goodfellow et al. 2015). Raises :class:`SharpscopeError` for different architectures."""
    layout = parameter_layout(model_a, param_filter)
    params_a, params_b = dict(model_a.named_parameters()), dict(model_b.named_parameters())
    _check_same_architecture(layout, params_b)
    wa = layout.flatten({n: params_a[n].detach() for n in layout.names})
    wb = layout.flatten({n: params_b[n].detach() for n in layout.names})
    return wb.to(wa) - wa


def _check_same_architecture(layout: Layout, params_b: dict[str, torch.Tensor]) -> None:
    for name, shape in zip(layout.names, layout.shapes, strict=True):
        if name not in params_b or params_b[name].shape != shape:
            raise SharpscopeError(
                f"the two models have different architectures (parameter {name}): "
                "nothing to interpolate"
            )


def hessian_directions(
    objective: Objective, k: int = 2, *, seed: int = 0, tol: float = 1e-4
) -> tuple[list[torch.Tensor], list[float]]:
    """The top-k Hessian eigenvectors (unit norm, flat) and their eigenvalues, by
    Lanczos (:func:`sharpscope.hessian.hessian_eigenvalues`), largest first."""
    from .hessian import hessian_eigenvalues  # lazily: hessian imports much

    eig = hessian_eigenvalues(
        objective, k=k, which="largest", tol=tol, seed=seed, return_eigenvectors=True
    )
    vectors = [eig.eigenvectors[i].to(objective.w0) for i in range(k)]
    return vectors, [float(v) for v in eig.eigenvalues]


_STEP = re.compile(r"step_(\d+)\.pt$")


def trajectory_checkpoints(run_dir: str) -> list[str]:
    """The checkpoints ``RUN/trajectory/step_NNNNNNN.pt`` written by ``sharpscope train
    --save-every N``, in step order."""
    paths = glob.glob(os.path.join(run_dir, "trajectory", "step_*.pt"))
    return sorted((p for p in paths if _STEP.search(p)), key=lambda p: int(_STEP.search(p)[1]))


def trajectory_directions(
    run_dir: str, objective: Objective
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, list[float]]:
    """Top-2 principal components of (w_i - w) over a run's saved trajectory.

    Li et al. (2018), Sec. 7: with w the final weights (the objective's, normally the
    run's final checkpoint) and w_i the saved ones, the rows of M = [w_i - w] (k, n)
    are decomposed by SVD (not centred: the plane passes through w); d1, d2 are the
    top two right singular vectors (unit norm) and the trajectory's coordinates are the
    projections M [d1 d2] (k, 2), signed so that the first point's are >= 0. Also
    returns the fraction of the variance of M that each component explains.
    """
    paths = trajectory_checkpoints(run_dir)
    if len(paths) < 2:
        raise SharpscopeError(
            f"{os.path.join(run_dir, 'trajectory')} holds {len(paths)} checkpoints: PCA needs "
            "at least 2 (train with --save-every N)"
        )
    rows = []
    for path in paths:
        state = read_checkpoint(path)["state_dict"]
        for name, shape in zip(objective.layout.names, objective.layout.shapes, strict=True):
            if name not in state or state[name].shape != shape:
                raise SharpscopeError(f"{path}: not the model's architecture (parameter {name})")
        w_i = objective.layout.flatten({n: state[n] for n in objective.layout.names})
        rows.append(w_i.to(device=objective.device, dtype=torch.float64))
    M = torch.stack(rows) - objective.w0.double()
    _, S, Vh = torch.linalg.svd(M, full_matrices=False)
    if len(S) < 2 or S[1] <= 1e-12 * S[0]:
        raise SharpscopeError(f"{run_dir}: the trajectory spans fewer than 2 dimensions")
    # An SVD's signs are arbitrary: fix them so the run's first point has coordinates
    # >= 0, the same picture on every machine.
    signs = torch.where(M[0] @ Vh[:2].T < 0, -1.0, 1.0).to(Vh)
    d1, d2 = signs[0] * Vh[0], signs[1] * Vh[1]
    coords = (M @ torch.stack([d1, d2]).T).cpu().numpy()
    explained = (S[:2] ** 2 / (S**2).sum()).tolist()
    return d1.to(objective.w0), d2.to(objective.w0), coords, explained
