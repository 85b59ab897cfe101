"""Loss landscapes of checkpoints: the entry points that read a checkpoint, pick its
examples, build its directions and evaluate a surface or an interpolation.

The pieces: :mod:`sharpscope.directions` (filter-normalized, Hessian and PCA directions),
:mod:`sharpscope.grid` (evaluating a grid, resumably and over processes) and
:mod:`sharpscope.surface` (the result and its ``.npz`` file).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from .checkpoint import checkpoint_loss, load_model_and_data
from .data import without_location
from .directions import (
    _STEP,
    NORMALIZATIONS,
    _check_same_architecture,
    cosine,
    hessian_directions,
    normalize_direction,
    orthogonalize,
    parameter_layout,
    raw_direction,
    trajectory_checkpoints,
    trajectory_directions,
)
from .errors import SharpscopeError
from .grid import (
    AUTO_FACTOR,
    _distribution,
    auto_range,
    grid_coordinates,
    interpolation,
    surface_1d,
    surface_2d,
)
from .losses import get_loss
from .objective import Objective
from .settings import (
    EvaluationSettings,
    InterpolationSettings,
    LandscapeSettings,
    Loading,
    settings_from,
    split_keywords,
)
from .surface import Surface

# PCA directions with range="auto": the trajectory's extent plus 20% on every side.
TRAJECTORY_MARGIN = 1.2


def _load(path: str, loading: Loading, s: EvaluationSettings, device, datasets=None):
    """(model, metadata, data set, the fixed examples (x, y), loss function) of the
    checkpoint at ``path``, rebuilt as ``loading`` says
    (:func:`~sharpscope.checkpoint.load_model_and_data`)."""
    net, dataset, meta = load_model_and_data(
        path, device=device, datasets=datasets, **loading.keywords()
    )
    dataset = dataset.to(device)
    loss_fn = get_loss(checkpoint_loss(meta, path))
    return net, meta, dataset, dataset.examples(s.split, s.samples, seed=s.seed), loss_fn


def _training_batches(dataset, s: EvaluationSettings) -> list:
    """The BatchNorm recalibration data: ``s.samples`` fixed training examples in batches."""
    x, y = dataset.examples("train", s.samples, seed=s.seed)
    size = s.batch_size
    return [(x[i : i + size], y[i : i + size]) for i in range(0, len(y), size)]


def _default_label(path: str, meta: dict[str, Any]) -> str:
    optimizer = (meta.get("config") or {}).get("optimizer")
    return str(optimizer).upper() if optimizer else os.path.basename(path)


def _dtype_name(t: torch.Tensor) -> str:
    return str(t.dtype).replace("torch.", "")


def landscape_for_checkpoint(
    path: str,
    settings: LandscapeSettings | None = None,
    *,
    device: torch.device | str = "cpu",
    resume_path: str | None = None,
    progress: bool = False,
    **keywords: Any,
) -> Surface:
    """The 1-D or 2-D loss landscape of the model in checkpoint ``path``.

    ``settings`` (a :class:`~sharpscope.settings.LandscapeSettings`, or its fields as
    keywords) say which surface: ``dim`` 1 (L(w + a d1), arrays (nx,)) or 2
    (L(w + a d1 + b d2), arrays (ny, nx), rows = d2), its points, range and directions
    ("filter", "layer" or "none": normalizations of seeded Gaussian directions, d1 and
    d2 draws 0 and 1 of ``seed``; "hessian": the top Hessian eigenvectors; "pca": the
    top-2 principal components of the run's trajectory), and the examples (``split``,
    ``samples``, ``seed``). Keywords may also be fields of
    :class:`~sharpscope.settings.Loading` (how to rebuild the checkpoint: a model
    factory the file names runs only if ``model`` names it too or with ``trust_code``;
    CIFAR data is read from ``data_dir`` and fetched only with ``download``).
    ``resume_path``: a partial file for an interrupted run (see :func:`surface_2d`).

    The surface's settings record everything needed to remake it: checkpoint, label,
    split, n_examples, seed, directions, normalization, include_1d, orthogonalize,
    cos_d1_d2, bn, range, points, dtype, and a fingerprint of w and the directions.
    """
    keywords, loading = split_keywords(keywords)
    s = settings_from(LandscapeSettings, settings, keywords)
    net, meta, dataset, examples, loss_fn = _load(path, loading, s, device)
    record = {
        "checkpoint": str(path),
        "label": s.label or _default_label(path, meta),
        "split": s.split,
        "loss_function": checkpoint_loss(meta, path),
        "model": meta.get("model"),
        "data": without_location(meta.get("data")),
    }
    bn_batches = _training_batches(dataset, s) if s.bn_recalibrate else None
    run_dir = s.trajectory or os.path.dirname(os.path.abspath(path))
    forms = {"loss_fn": loss_fn}
    return _landscape(
        net, examples, forms, s, record, bn_batches, run_dir, device, resume_path, progress
    )


def landscape(
    model: torch.nn.Module,
    data: Any,
    settings: LandscapeSettings | None = None,
    *,
    loss_fn: Callable | None = None,
    batch_loss: Callable | None = None,
    examples_in: Callable | None = None,
    bn_data: Any = None,
    device: torch.device | str | None = None,
    resume_path: str | None = None,
    progress: bool = False,
    **keywords: Any,
) -> Surface:
    """The 1-D or 2-D loss landscape of ``model`` (in memory) on ``data``.

    The options of :func:`landscape_for_checkpoint` (a
    :class:`~sharpscope.settings.LandscapeSettings` or its fields as keywords: ``dim``,
    ``points``, ``range``, ``directions``, ``seed``...), for a model of your own: ``data``
    in any form an :class:`~sharpscope.objective.Objective` takes (``(inputs, targets)``,
    a list of batches, a ``DataLoader``), used as given (``split`` and ``samples`` choose
    a checkpoint's examples and do not apply), with ``loss_fn`` or ``batch_loss`` and
    ``examples_in`` as there. ``bn_data``: training batches for ``bn_recalibrate``.
    PCA directions need ``trajectory`` (a run folder with trajectory/ checkpoints).
    ``device``: default the model's. The model is never modified.
    """
    s = settings_from(LandscapeSettings, settings, keywords)
    if s.bn_recalibrate and bn_data is None:
        raise SharpscopeError("bn_recalibrate needs bn_data: the training batches to use")
    if s.directions == "pca" and s.trajectory is None:
        raise SharpscopeError("PCA directions need trajectory=<run folder>")
    if device is None:
        device = next(model.parameters()).device
    record = {
        "checkpoint": None,
        "label": s.label or type(model).__name__,
        "split": None,
        "loss_function": _loss_name(loss_fn, batch_loss),
        "model": {"class": f"{type(model).__module__}.{type(model).__qualname__}"},
        "data": None,
    }
    forms = {"loss_fn": loss_fn, "batch_loss": batch_loss, "examples_in": examples_in}
    return _landscape(
        model, data, forms, s, record, bn_data, s.trajectory, device, resume_path, progress
    )


def _loss_name(loss_fn: Callable | None, batch_loss: Callable | None) -> str:
    if batch_loss is not None:
        return "batch_loss " + getattr(batch_loss, "__qualname__", type(batch_loss).__name__)
    if loss_fn is None:
        return "ce"
    return getattr(loss_fn, "__qualname__", type(loss_fn).__name__)


def _landscape(net, data, forms, s, record, bn_batches, run_dir, device, resume_path, progress):
    """The surface of ``net`` on ``data`` (``forms``: the Objective's loss keywords) as
    ``s`` says, its settings ``record`` completed with what the computation found."""
    obj = Objective(
        net, data, batch_size=s.batch_size, device=device, param_filter=s.param_filter, **forms
    )
    obj.check_finite()  # the model takes the data, and its loss is a number
    ds, traj, extra = _directions(run_dir, s, obj)
    (low, high), extra_range = _range(s, obj, ds, traj, bn_batches)
    record = {
        "checkpoint": record.pop("checkpoint"),
        "label": record.pop("label"),
        "split": record.pop("split"),
        "n_examples": obj.n_examples,
        "seed": s.seed,
        "draw": s.draw,
        "directions": s.directions,
        "normalization": s.directions if s.directions in NORMALIZATIONS else "unit",
        "include_1d": s.include_1d if s.directions in NORMALIZATIONS else None,
        "orthogonalize": s.orthogonalize,
        "cos_d1_d2": cosine(ds[0], ds[1]) if s.dim == 2 else None,
        "bn": "recalibrate" if s.bn_recalibrate else "eval",
        "range": [low, high],
        "range_mode": "auto" if s.resolved_range == "auto" else "fixed",
        "points": list(s.grid) if s.dim == 2 else s.grid[0],
        "dtype": _dtype_name(obj.w0),
        "n_params": obj.numel,
        "param_filter": obj.param_filter,
        **record,
        **_distribution(s.distribute),
        **extra,
        **extra_range,
    }
    if s.distribute == "points" and obj.distributed:
        # The grid: each rank evaluates its share of the points on all the examples.
        obj = Objective(
            net,
            data,
            batch_size=s.batch_size,
            device=device,
            param_filter=s.param_filter,
            distributed=False,
            **forms,
        )
    common = {"settings": record, "resume_path": resume_path, "batched": s.batched}
    common.update(bn_batches=bn_batches, progress=progress)
    nx, ny = s.grid
    if s.dim == 1:
        surface = surface_1d(obj, ds[0], grid_coordinates(low, high, nx), **common)
    else:
        ca, cb = grid_coordinates(low, high, nx), grid_coordinates(low, high, ny)
        surface = surface_2d(obj, ds[0], ds[1], ca, cb, **common)
    vectors = {}
    if s.save_directions:
        vectors = {"d1": ds[0].cpu().numpy(), "d2": ds[1].cpu().numpy() if s.dim == 2 else None}
    return dataclasses.replace(surface, trajectory=traj, **vectors)


def _directions(
    run_dir: str | None, s: LandscapeSettings, obj: Objective
) -> tuple[list[torch.Tensor], np.ndarray | None, dict[str, Any]]:
    """(the ``s.dim`` directions, the trajectory's path on their plane or None, what the
    settings record about them)."""
    extra: dict[str, Any] = {}
    traj = None
    if s.directions in NORMALIZATIONS:
        raws = [
            raw_direction(obj.layout, s.seed, obj.w0.dtype, obj.device, index=2 * s.draw + i)
            for i in range(s.dim)
        ]
        ds = [normalize_direction(r, obj.w0, obj.layout, s.directions, s.include_1d) for r in raws]
    elif s.directions == "hessian":
        ds, eigenvalues = hessian_directions(obj, k=s.dim, seed=s.seed)
        extra["hessian_eigenvalues"] = eigenvalues
    else:
        d1, d2, traj, explained = trajectory_directions(run_dir, obj)
        ds = [d1, d2][: s.dim]
        extra["trajectory_dir"] = str(run_dir)
        extra["trajectory_steps"] = [
            int(_STEP.search(p)[1]) for p in trajectory_checkpoints(run_dir)
        ]
        extra["explained_variance"] = explained
        if s.dim == 1:
            traj = None  # a path on a plane; a 1-D curve has no room for it
    if s.dim == 2 and s.orthogonalize:
        ds[1] = orthogonalize(ds[0], ds[1])
    return ds, traj, extra


def _range(
    s: LandscapeSettings, obj: Objective, ds: list[torch.Tensor], traj, bn_batches
) -> tuple[tuple[float, float], dict[str, Any]]:
    """The (low, high) of every axis, and what the settings record about it: a fixed
    range, the trajectory's extent plus TRAJECTORY_MARGIN (PCA planes), or
    :func:`~sharpscope.grid.auto_range`."""
    if s.resolved_range != "auto":
        return s.resolved_range, {}
    if s.directions == "pca" and s.dim == 2:
        half = TRAJECTORY_MARGIN * float(np.abs(traj).max())
        return (-half, half), {}
    half = auto_range(obj, ds, batched=s.batched, bn_batches=bn_batches)
    return (-half, half), {"auto_factor": AUTO_FACTOR}


def interpolation_for_checkpoints(
    path_a: str,
    path_b: str,
    settings: InterpolationSettings | None = None,
    *,
    device: torch.device | str = "cpu",
    resume_path: str | None = None,
    progress: bool = False,
    **keywords: Any,
) -> Surface:
    """The interpolation curve L((1 - t) w_A + t w_B) between two checkpoints.

    ``settings``: a :class:`~sharpscope.settings.InterpolationSettings`, or its fields
    as keywords; keywords may also be fields of :class:`~sharpscope.settings.Loading`
    (both checkpoints are rebuilt as in :func:`landscape_for_checkpoint`). Evaluated on
    A's data set (``split``, ``samples`` examples drawn with ``seed``). The grid holds
    t = 0 and t = 1 exactly when the range contains them, so the curve's ends are
    L(w_A) and L(w_B) (for BatchNorm networks: with ``include_buffers`` or
    ``bn_recalibrate``; see :func:`~sharpscope.grid.interpolation`). ``labels``: the
    models' names (default: their optimizers); ``label``: the curve's ("A → B").
    """
    keywords, loading = split_keywords(keywords)
    s = settings_from(InterpolationSettings, settings, keywords)
    datasets: dict[str, Any] = {}  # B is evaluated on A's data: loaded once
    model_a, meta_a, dataset, examples, loss_fn = _load(path_a, loading, s, device, datasets)
    model_b, meta_b = _load(path_b, loading, s, device, datasets)[:2]
    if meta_a.get("model") != meta_b.get("model"):
        raise SharpscopeError(
            f"{path_a} and {path_b} have different architectures: nothing to interpolate"
        )
    _check_same_architecture(
        parameter_layout(model_a, s.param_filter), dict(model_b.named_parameters())
    )
    low, high = s.range
    ts = grid_coordinates(low, high, s.points)
    if low <= 1 <= high:
        i = int(np.argmin(np.abs(ts - 1)))
        if ts[i] != 0.0:  # never move the t = 0 point (a grid of one or two points)
            ts[i] = 1.0  # t = 1 exactly: the curve ends at w_B
    labels = s.labels or (_default_label(path_a, meta_a), _default_label(path_b, meta_b))
    record = {
        "checkpoints": [str(path_a), str(path_b)],
        "label": s.label or f"{labels[0]} → {labels[1]}",
        "labels": list(labels),
        "split": s.split,
        "n_examples": len(examples[1]),
        "seed": s.seed,
        "directions": "interpolation",
        "normalization": "none",
        "range": [low, high],
        "points": s.points,
        "param_filter": s.param_filter if isinstance(s.param_filter, str) else "custom",
        "loss_function": checkpoint_loss(meta_a, path_a),
        "model": meta_a.get("model"),
        "data": without_location(meta_a.get("data")),
    }
    return interpolation(
        model_a,
        model_b,
        examples,
        ts,
        include_buffers=s.include_buffers,
        bn_batches=_training_batches(dataset, s) if s.bn_recalibrate else None,
        loss_fn=loss_fn,
        batch_size=s.batch_size,
        device=device,
        param_filter=s.param_filter,
        settings=record,
        resume_path=resume_path,
        batched=s.batched,
        distribute=s.distribute,
        progress=progress,
    )
