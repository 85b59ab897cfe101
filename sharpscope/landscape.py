"""Loss landscapes of checkpoints: the entry points that read a checkpoint, pick its
examples, build its directions and evaluate a surface or an interpolation.

The pieces: :mod:`sharpscope.directions` (filter-normalized, Hessian and PCA directions),
:mod:`sharpscope.grid` (evaluating a grid, resumably and over processes) and
:mod:`sharpscope.surface` (the result and its ``.npz`` file).
"""

from __future__ import annotations

import dataclasses
import math
import os
from typing import Any

import numpy as np
import torch

from .checkpoint import checkpoint_loss, load_model_and_data
from .data import without_location
from .directions import (
    _STEP,
    DIRECTIONS,
    NORMALIZATIONS,
    _check_same_architecture,
    cosine,
    hessian_directions,
    normalize_direction,
    parameter_layout,
    raw_direction,
    trajectory_checkpoints,
    trajectory_directions,
)
from .directions import orthogonalize as _orthogonalize  # a keyword is named orthogonalize
from .errors import SharpscopeError
from .grid import (
    AUTO_FACTOR,
    _check_distribute,
    _distribution,
    auto_range,
    check_grid_points,
    grid_coordinates,
    interpolation,
    surface_1d,
    surface_2d,
)
from .losses import get_loss
from .objective import Objective, ParamFilter
from .surface import Surface

# Li et al. (2018), Figs. 1-6 and their code's examples: [-1, 1] with 51 points per axis.
DEFAULT_RANGE = (-1.0, 1.0)


DEFAULT_POINTS = 51


# Goodfellow et al. (2015) and Li et al. (2018, Fig. 2) plot t in [-0.5, 1.5]; 401
# points as in the 1-D interpolation example of Li et al.'s code (tomgoldstein/
# loss-landscape, README: --x=-0.5:1.5:401). Its step 0.005 puts t = 0 and t = 1 on the
# grid exactly.
INTERPOLATION_RANGE = (-0.5, 1.5)


INTERPOLATION_POINTS = 401


# PCA directions with range="auto": the trajectory's extent plus 20% on every side.
TRAJECTORY_MARGIN = 1.2


_builtin_range = range  # ``range`` is a keyword argument of the two functions below


def _load(path, loading: dict[str, Any], split, samples, seed, device):
    """(model, metadata, data set, the fixed examples (x, y), loss function) of the
    checkpoint at ``path``, rebuilt with the caller's ``loading`` options
    (:func:`~sharpscope.checkpoint.load_model_and_data`)."""
    net, dataset, meta = load_model_and_data(path, device=device, **loading)
    dataset = dataset.to(device)
    loss_fn = get_loss(checkpoint_loss(meta, path))
    return net, meta, dataset, dataset.examples(split, samples, seed=seed), loss_fn


def _training_batches(dataset, samples, batch_size, seed) -> list:
    """The BatchNorm recalibration data: ``samples`` fixed training examples in batches."""
    x, y = dataset.examples("train", samples, seed=seed)
    return [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, len(y), batch_size)]


def _default_label(path: str, meta: dict[str, Any]) -> str:
    optimizer = (meta.get("config") or {}).get("optimizer")
    return str(optimizer).upper() if optimizer else os.path.basename(path)


def _check_range(value: Any, name: str = "range") -> tuple[float, float] | str:
    if value == "auto":
        return "auto"
    try:
        low, high = (float(v) for v in value)
    except (TypeError, ValueError):
        raise SharpscopeError(f"{name} must be (LOW, HIGH) or 'auto', got {value!r}") from None
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise SharpscopeError(f"{name}: need finite LOW < HIGH, got {low} {high}")
    return low, high


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def landscape_for_checkpoint(
    path: str,
    *,
    dim: int = 1,
    points: int | tuple[int, int] = DEFAULT_POINTS,
    range: tuple[float, float] | str | None = None,  # noqa: A002 - the CLI's name
    directions: str = "filter",
    seed: int = 0,
    orthogonalize: bool = False,
    include_1d: bool = False,
    split: str = "train",
    samples: int | None = 1024,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    bn_recalibrate: bool = False,
    trajectory: str | None = None,
    resume_path: str | None = None,
    save_directions: bool = False,
    label: str | None = None,
    param_filter: ParamFilter = "all",
    batched: bool | None = None,
    distribute: str = "points",
    progress: bool = False,
    model: str | None = None,
    model_options: dict[str, Any] | None = None,
    data: str | None = None,
    data_dir: str | None = None,
    download: bool = False,
    trust_code: bool = False,
) -> Surface:
    """The 1-D or 2-D loss landscape of the model in checkpoint ``path``.

    Args:
        dim: 1 (L(w + a d1), arrays (nx,)) or 2 (L(w + a d1 + b d2), arrays (ny, nx),
            rows = d2).
        points: n per axis, or (nx, ny) for a non-square 2-D grid.
        range: (low, high) for every axis; "auto" (:func:`auto_range`; for "pca" the
            trajectory's extent plus 20%); None: (-1, 1) for random directions (Li et
            al. 2018), "auto" for "hessian" and "pca", whose unit-norm directions have
            no natural scale.
        directions: "filter" (default, Li et al. 2018), "layer" or "none": normalizations
            of seeded Gaussian directions (:func:`random_direction`; d1 and d2 are draws
            0 and 1 of ``seed``); "hessian": the top-``dim`` Hessian eigenvectors (unit
            norm); "pca": the top-2 principal components of the run's trajectory
            (``trajectory`` = the run folder; default: the checkpoint's folder).
        seed: the directions' seed, also the seed of the fixed example subset.
        orthogonalize: 2-D only: make d2 orthogonal to d1, after normalization; the
            settings record cos(d1, d2) as used.
        include_1d: perturb 1-D parameters (biases, normalization affine) too.
        split, samples, batch_size: which examples L is evaluated on.
        bn_recalibrate: recompute BatchNorm statistics at every point on ``samples``
            training examples (``torch.optim.swa_utils.update_bn``); default eval mode
            with the checkpoint's running statistics.
        resume_path: partial file for an interrupted run (see :func:`surface_2d`).
        save_directions: keep d1 (and d2) in the surface (saved in the .npz).
        batched: vmap over stacked weights (True), one point at a time (False), or
            automatic (None; see :func:`evaluate_points`).
        distribute: under torchrun, split the grid points ("points", default) or the
            examples ("examples") over the ranks (see DISTRIBUTE). Directions and the
            automatic range are computed on example shards either way.
        model, model_options, data, data_dir, download, trust_code: how to rebuild
            the checkpoint (:func:`~sharpscope.checkpoint.load_model_and_data`): a
            model factory the file names runs only if ``model`` names it too or with
            ``trust_code``; CIFAR data is read from ``data_dir`` (never from a folder
            the file names) and fetched only with ``download``.

    The settings record everything needed to remake the surface: checkpoint, label,
    split, n_examples, seed, directions, normalization, include_1d, orthogonalize,
    cos_d1_d2, bn, range, points, dtype, and a fingerprint of w and the directions.
    """
    if dim not in (1, 2):
        raise SharpscopeError(f"dim must be 1 or 2, got {dim}")
    if directions not in DIRECTIONS:
        raise SharpscopeError(f"unknown directions {directions!r}: choose {', '.join(DIRECTIONS)}")
    nx, ny = check_grid_points(*([points] * dim if isinstance(points, int) else points))
    if range is None:
        range = "auto" if directions in ("hessian", "pca") else DEFAULT_RANGE
    range = _check_range(range)
    if trajectory is not None and directions != "pca":
        raise SharpscopeError("a trajectory applies to directions='pca' only")
    if orthogonalize and dim != 2:
        raise SharpscopeError("orthogonalize applies to 2-D landscapes (two directions)")
    _check_distribute(distribute)
    loading = {
        "model": model,
        "model_options": model_options,
        "data": data,
        "data_dir": data_dir,
        "download": download,
        "trust_code": trust_code,
    }
    net, meta, dataset, examples, loss_fn = _load(path, loading, split, samples, seed, device)
    obj = Objective(
        net, examples, loss_fn, batch_size=batch_size, device=device, param_filter=param_filter
    )
    obj.check_finite()  # the model takes the data, and its loss is a number
    bn_batches = _training_batches(dataset, samples, batch_size, seed) if bn_recalibrate else None
    extra: dict[str, Any] = {}
    traj = None
    if directions in NORMALIZATIONS:
        raws = [
            raw_direction(obj.layout, seed, obj.w0.dtype, obj.device, index=i)
            for i in _builtin_range(dim)
        ]
        ds = [normalize_direction(r, obj.w0, obj.layout, directions, include_1d) for r in raws]
    elif directions == "hessian":
        ds, eigenvalues = hessian_directions(obj, k=dim, seed=seed)
        extra["hessian_eigenvalues"] = eigenvalues
    else:
        run_dir = trajectory or os.path.dirname(os.path.abspath(path))
        d1, d2, traj, explained = trajectory_directions(run_dir, obj)
        ds = [d1, d2][:dim]
        extra["trajectory_dir"] = str(run_dir)
        extra["trajectory_steps"] = [
            int(_STEP.search(p)[1]) for p in trajectory_checkpoints(run_dir)
        ]
        extra["explained_variance"] = explained
        if dim == 1:
            traj = None  # a path on a plane; a 1-D curve has no room for it
    if dim == 2 and orthogonalize:
        ds[1] = _orthogonalize(ds[0], ds[1])
    if range == "auto" and directions == "pca" and dim == 2:
        half = TRAJECTORY_MARGIN * float(np.abs(traj).max())
        low, high = -half, half
    elif range == "auto":
        half = auto_range(obj, ds, batched=batched, bn_batches=bn_batches)
        low, high = -half, half
        extra["auto_factor"] = AUTO_FACTOR
    else:
        low, high = range
    settings = {
        "checkpoint": str(path),
        "label": label or _default_label(path, meta),
        "split": split,
        "n_examples": obj.n_examples,
        "seed": seed,
        "directions": directions,
        "normalization": directions if directions in NORMALIZATIONS else "unit",
        "include_1d": include_1d if directions in NORMALIZATIONS else None,
        "orthogonalize": orthogonalize,
        "cos_d1_d2": cosine(ds[0], ds[1]) if dim == 2 else None,
        "bn": "recalibrate" if bn_recalibrate else "eval",
        "range": [low, high],
        "range_mode": "auto" if range == "auto" else "fixed",
        "points": [nx, ny] if dim == 2 else nx,
        "dtype": _dtype_name(obj.w0),
        "n_params": obj.numel,
        "param_filter": obj.param_filter,
        "loss_function": (meta.get("config") or {}).get("loss", "ce"),
        "model": meta.get("model"),
        "data": without_location(meta.get("data")),
        **_distribution(distribute),
        **extra,
    }
    if distribute == "points" and obj.distributed:
        # The grid: each rank evaluates its share of the points on all the examples.
        obj = Objective(
            net,
            examples,
            loss_fn,
            batch_size=batch_size,
            device=device,
            param_filter=param_filter,
            distributed=False,
        )
    common = {
        "settings": settings,
        "resume_path": resume_path,
        "batched": batched,
        "bn_batches": bn_batches,
        "progress": progress,
    }
    if dim == 1:
        surface = surface_1d(obj, ds[0], grid_coordinates(low, high, nx), **common)
    else:
        ca, cb = grid_coordinates(low, high, nx), grid_coordinates(low, high, ny)
        surface = surface_2d(obj, ds[0], ds[1], ca, cb, **common)
    vectors = {}
    if save_directions:
        vectors = {"d1": ds[0].cpu().numpy(), "d2": ds[1].cpu().numpy() if dim == 2 else None}
    return dataclasses.replace(surface, trajectory=traj, **vectors)


def interpolation_for_checkpoints(
    path_a: str,
    path_b: str,
    *,
    points: int = INTERPOLATION_POINTS,
    range: tuple[float, float] = INTERPOLATION_RANGE,  # noqa: A002 - the CLI's name
    include_buffers: bool = False,
    bn_recalibrate: bool = False,
    split: str = "train",
    samples: int | None = 1024,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    seed: int = 0,
    labels: tuple[str, str] | None = None,
    label: str | None = None,
    param_filter: ParamFilter = "all",
    resume_path: str | None = None,
    batched: bool | None = None,
    distribute: str = "points",
    progress: bool = False,
    model: str | None = None,
    model_options: dict[str, Any] | None = None,
    data: str | None = None,
    data_dir: str | None = None,
    download: bool = False,
    trust_code: bool = False,
) -> Surface:
    """The interpolation curve L((1 - t) w_A + t w_B) between two checkpoints.

    Evaluated on A's data set (``split``, ``samples`` examples drawn with ``seed``).
    The grid holds t = 0 and t = 1 exactly when the range contains them, so the curve's
    ends are L(w_A) and L(w_B) (for BatchNorm networks: with ``include_buffers`` or
    ``bn_recalibrate``; see :func:`interpolation`). ``labels``: the models' names
    (default: their optimizers); ``label``: the curve's (default "A → B"). ``model``,
    ``model_options``, ``data``, ``data_dir``, ``download`` and ``trust_code`` rebuild
    both checkpoints as in :func:`landscape_for_checkpoint`.
    """
    low, high = _check_range(range)
    check_grid_points(points)
    if include_buffers and bn_recalibrate:
        raise SharpscopeError("interpolate BatchNorm statistics or recalibrate them, not both")
    loading = {
        "model": model,
        "model_options": model_options,
        "data": data,
        "data_dir": data_dir,
        "download": download,
        "trust_code": trust_code,
        "datasets": {},  # B is evaluated on A's data: loaded once
    }
    model_a, meta_a, dataset, examples, loss_fn = _load(
        path_a, loading, split, samples, seed, device
    )
    model_b, meta_b = load_model_and_data(path_b, device=device, **loading)[::2]
    if meta_a.get("model") != meta_b.get("model"):
        raise SharpscopeError(
            f"{path_a} and {path_b} have different architectures: nothing to interpolate"
        )
    _check_same_architecture(
        parameter_layout(model_a, param_filter), dict(model_b.named_parameters())
    )
    ts = grid_coordinates(low, high, points)
    if low <= 1 <= high:
        i = int(np.argmin(np.abs(ts - 1)))
        if ts[i] != 0.0:  # never move the t = 0 point (a grid of one or two points)
            ts[i] = 1.0  # t = 1 exactly: the curve ends at w_B
    labels = tuple(labels or (_default_label(path_a, meta_a), _default_label(path_b, meta_b)))
    settings = {
        "checkpoints": [str(path_a), str(path_b)],
        "label": label or f"{labels[0]} → {labels[1]}",
        "labels": list(labels),
        "split": split,
        "n_examples": len(examples[1]),
        "seed": seed,
        "directions": "interpolation",
        "normalization": "none",
        "range": [low, high],
        "points": points,
        "param_filter": param_filter if isinstance(param_filter, str) else "custom",
        "loss_function": (meta_a.get("config") or {}).get("loss", "ce"),
        "model": meta_a.get("model"),
        "data": without_location(meta_a.get("data")),
    }
    bn_batches = _training_batches(dataset, samples, batch_size, seed) if bn_recalibrate else None
    return interpolation(
        model_a,
        model_b,
        examples,
        ts,
        include_buffers=include_buffers,
        bn_batches=bn_batches,
        loss_fn=loss_fn,
        batch_size=batch_size,
        device=device,
        param_filter=param_filter,
        settings=settings,
        resume_path=resume_path,
        batched=batched,
        distribute=distribute,
        progress=progress,
    )
