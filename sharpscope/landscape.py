"""Loss landscapes: directions in weight space and the surfaces L(w + a d1 + b d2).

Directions (Li et al. 2018, "Visualizing the Loss Landscape of Neural Nets", Sec. 4):
a Gaussian direction rescaled filter by filter to the norms of w's filters, so that
landscapes of networks with different weight scales are comparable. Also layer-wise
and unnormalized directions, the interpolation between two minima (Goodfellow et al.
2015), top Hessian eigenvectors, and the top-2 principal components of a training
trajectory (Li et al. 2018, Sec. 7).

Every point is evaluated at w + a d1 + b d2 computed afresh from the stored w, through
:class:`~sharpscope.objective.Objective`, so the user's model is never written to.
Surfaces are saved as ``.npz``: coordinates, loss, accuracy and the settings as JSON.
"""

from __future__ import annotations

import copy
import glob
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from .checkpoint import atomic_write, load_checkpoint, read_checkpoint
from .data import load_dataset
from .errors import SharpscopeError
from .losses import get_loss
from .objective import Layout, Objective, eval_mode, exact_float32, make_objective

NORMALIZATIONS = ("filter", "layer", "none")
DIRECTIONS = NORMALIZATIONS + ("hessian", "pca")
LAYOUT_2D = "rows = d2 (coords_b), columns = d1 (coords_a)"
# Li et al. (2018): 2-D plots on [-1, 1]^2 with 51 x 51 points; interpolation on
# [-0.5, 1.5] (Goodfellow et al. 2015 plot [-0.5, 1.5] too).
DEFAULT_RANGE = (-1.0, 1.0)
DEFAULT_POINTS = 51
INTERPOLATION_RANGE = (-0.5, 1.5)


# --------------------------------------------------------------------------- directions


def raw_direction(
    layout: Layout, seed: int, dtype: torch.dtype = torch.float32, device: Any = "cpu"
) -> torch.Tensor:
    """A standard Gaussian vector in ``layout``, drawn tensor by tensor from ``seed``.

    The draw depends only on the layout and the seed, so two models of the same
    architecture get the same raw direction: what comparing two minima fairly needs.
    """
    g = torch.Generator().manual_seed(seed)
    parts = [torch.randn(s.numel(), generator=g, dtype=torch.float64) for s in layout.shapes]
    return torch.cat(parts).to(device=device, dtype=dtype)


def normalize_direction(
    raw: torch.Tensor,
    w: torch.Tensor,
    layout: Layout,
    normalization: str = "filter",
    include_1d: bool = False,
) -> torch.Tensor:
    """Rescale ``raw`` against the weights ``w`` (both flat in ``layout``).

    "filter": for every tensor with dim > 1, each slice along dim 0 (a conv output
    filter, a linear output row) gets the norm of the matching slice of w (Li et al.
    2018, eq. 1; +1e-10 against zero slices). "layer": each tensor gets the norm of
    w's tensor. "none": unchanged. Tensors with dim <= 1 (biases, normalization
    affine parameters) are zero unless ``include_1d``, then scaled as a whole to w's
    tensor norm (for a 1-D tensor, its only "filter" is the whole tensor).
    """
    if normalization not in NORMALIZATIONS:
        raise SharpscopeError(
            f"unknown normalization {normalization!r}: choose {', '.join(NORMALIZATIONS)}"
        )
    d_parts = layout.unflatten(raw)
    w_parts = layout.unflatten(w)
    out = {}
    for name, shape in zip(layout.names, layout.shapes, strict=True):
        d, p = d_parts[name], w_parts[name].to(raw.dtype)
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
    model: nn.Module | Objective,
    *,
    seed: int = 0,
    normalization: str = "filter",
    include_1d: bool = False,
    param_filter: str = "all",
) -> torch.Tensor:
    """A seeded Gaussian direction normalized against the model's weights (flat)."""
    if isinstance(model, Objective):
        layout, w = model.layout, model.w0
    else:
        obj = Objective(model, (torch.zeros(1), torch.zeros(1)), param_filter=param_filter)
        layout, w = obj.layout, obj.w0
    raw = raw_direction(layout, seed, w.dtype, w.device)
    return normalize_direction(raw, w, layout, normalization, include_1d)


def orthogonalize(d1: torch.Tensor, d2: torch.Tensor) -> torch.Tensor:
    """d2 with its component along d1 removed, rescaled to d2's norm (Gram-Schmidt).

    Call after normalization: orthogonalizing first is undone by it (ALGORITHMS.md).
    """
    d2_perp = d2 - torch.dot(d2, d1) / torch.dot(d1, d1) * d1
    return d2_perp * (d2.norm() / (d2_perp.norm() + 1e-30))


def cosine(d1: torch.Tensor, d2: torch.Tensor) -> float:
    return (torch.dot(d1, d2) / (d1.norm() * d2.norm() + 1e-30)).item()


def trajectory_directions(
    run_dir: str, objective: Objective
) -> tuple[torch.Tensor, torch.Tensor, np.ndarray, list[float]]:
    """Top-2 principal components of (w_i - w) over a run's saved trajectory.

    Reads ``RUN/trajectory/step_*.pt`` (``sharpscope train --save-every N``); w is the
    objective's weights (normally the run's final checkpoint). Returns unit directions
    d1, d2, the trajectory's coordinates (k, 2) on that plane, and the fraction of the
    variance each component explains (Li et al. 2018, Sec. 7).
    """
    paths = sorted(glob.glob(os.path.join(run_dir, "trajectory", "step_*.pt")))
    if len(paths) < 3:
        raise SharpscopeError(
            f"{run_dir}/trajectory holds {len(paths)} checkpoints: PCA needs at least 3 "
            "(train with --save-every N)"
        )
    rows = []
    for path in paths:
        state = read_checkpoint(path)["state_dict"]
        missing = [n for n in objective.layout.names if n not in state]
        if missing:
            raise SharpscopeError(f"{path}: not the same architecture (no {missing[0]})")
        w_i = objective.layout.flatten({n: state[n] for n in objective.layout.names})
        rows.append(w_i.to(objective.w0) - objective.w0)
    M = torch.stack(rows).double()
    _, S, Vh = torch.linalg.svd(M, full_matrices=False)
    d1, d2 = Vh[0], Vh[1]
    coords = (M @ torch.stack([d1, d2]).T).cpu().numpy()
    explained = (S[:2] ** 2 / (S**2).sum()).tolist()
    dtype = objective.w0.dtype
    return d1.to(dtype), d2.to(dtype), coords, explained


# --------------------------------------------------------------------------- surfaces


@dataclass
class Surface:
    """A computed landscape.

    ``coords_a`` (nx,) runs along d1 (or t for interpolation); ``coords_b`` (ny,) along
    d2, for 2-D only. ``loss`` and ``accuracy`` are (nx,) for 1-D and interpolation,
    (ny, nx) for 2-D: rows = d2 / coords_b, columns = d1 / coords_a. NaN marks a
    point not computed yet.
    """

    kind: str
    coords_a: np.ndarray
    coords_b: np.ndarray | None
    loss: np.ndarray
    accuracy: np.ndarray
    settings: dict[str, Any]
    trajectory: np.ndarray | None = None
    d1: np.ndarray | None = field(default=None, repr=False)
    d2: np.ndarray | None = field(default=None, repr=False)

    def save(self, path: str) -> None:
        """Write an ``.npz`` atomically (readable with ``allow_pickle=False``)."""
        arrays: dict[str, np.ndarray] = {
            "coords_a": np.asarray(self.coords_a, dtype=np.float64),
            "loss": np.asarray(self.loss, dtype=np.float64),
            "accuracy": np.asarray(self.accuracy, dtype=np.float64),
            "settings": np.asarray(json.dumps(self.settings)),
            "seed": np.asarray(self.settings.get("seed", -1)),
        }
        for key in ("coords_b", "trajectory", "d1", "d2"):
            value = getattr(self, key)
            if value is not None:
                arrays[key] = np.asarray(value)

        def write(tmp: str) -> None:
            with open(tmp, "wb") as f:
                np.savez(f, **arrays)

        atomic_write(path, write)


def load_surface(path: str) -> Surface:
    """Read a surface saved by :meth:`Surface.save`; a clear error for anything else."""
    if not os.path.isfile(path):
        raise SharpscopeError(f"{path}: no such file")
    try:
        with np.load(path, allow_pickle=False) as f:
            data = {k: f[k] for k in f.files}
        settings = json.loads(str(data["settings"]))
        kind = settings["kind"]
        surface = Surface(
            kind=kind,
            coords_a=data["coords_a"],
            coords_b=data.get("coords_b"),
            loss=data["loss"],
            accuracy=data["accuracy"],
            settings=settings,
            trajectory=data.get("trajectory"),
            d1=data.get("d1"),
            d2=data.get("d2"),
        )
    except Exception as exc:  # a zip error, a missing key, bad JSON: one message
        raise SharpscopeError(f"{path}: not a sharpscope landscape file ({exc})") from None
    expected = (
        (len(surface.coords_b), len(surface.coords_a)) if kind == "2d" else (len(surface.coords_a),)
    )
    if surface.loss.shape != expected or surface.accuracy.shape != expected:
        raise SharpscopeError(f"{path}: arrays do not match the coordinates")
    return surface


def grid_coordinates(low: float, high: float, points: int) -> np.ndarray:
    """``points`` evenly spaced values on [low, high] that contain 0 exactly when the
    range does (the nearest grid value is snapped to 0, so the centre is L(w) itself)."""
    if points < 1:
        raise SharpscopeError(f"a grid needs at least 1 point, got {points}")
    if not (math.isfinite(low) and math.isfinite(high)) or high < low:
        raise SharpscopeError(f"bad range [{low}, {high}]")
    coords = np.linspace(low, high, points)
    if low <= 0 <= high:
        coords[np.argmin(np.abs(coords))] = 0.0
    return coords


def _use_vmap(objective: Objective, batched: bool | None) -> bool:
    # vmap over stacked weights only pays off where one forward leaves the device idle:
    # on a CPU it was 0.5-0.6x as fast as one point at a time for digits models
    # (benchmarks/bench_landscape.py), so the default is batched on CUDA only, for models
    # small enough that a chunk of 16 copies of the activations fits.
    if batched is not None:
        return batched
    return objective.device.type == "cuda" and objective.numel <= 1_000_000


def evaluate_points(
    objective: Objective,
    weights: torch.Tensor,
    *,
    batched: bool | None = None,
    chunk: int = 16,
    buffers: dict[str, torch.Tensor] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Loss and accuracy at each row of ``weights`` (P, n): arrays of shape (P,).

    With ``batched`` the points go through the model ``chunk`` at a time with
    ``torch.func.vmap`` over stacked weights; otherwise one at a time.
    """
    if not _use_vmap(objective, batched):
        results = [objective.evaluate(w, buffers) for w in weights]
        return (np.array([r["loss"] for r in results]), np.array([r["accuracy"] for r in results]))
    losses, accs = [], []
    fixed = {**objective._fixed, **(buffers or {})}
    model, loss_fn = objective.model, objective.loss_fn

    def one(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor):
        out = functional_call(model, {**fixed, **objective.layout.unflatten(w)}, (x,))
        return loss_fn(out, y), (out.argmax(dim=-1) == y).sum()

    run = torch.func.vmap(one, in_dims=(0, None, None))
    with torch.no_grad(), exact_float32(), eval_mode(model):
        for start in range(0, len(weights), chunk):
            W = weights[start : start + chunk]
            total = torch.zeros(len(W), dtype=objective.accumulate_dtype, device=objective.device)
            correct = torch.zeros(len(W), dtype=torch.int64, device=objective.device)
            for x, y in objective.batches:
                loss, hits = run(W, x, y)
                total += loss.to(total.dtype) * (len(y) / objective.n_examples)
                correct += hits
            total, correct = objective._sum(total), objective._sum(correct)
            losses.append(total.cpu().numpy())
            accs.append(correct.cpu().numpy() / objective.n_examples)
    return np.concatenate(losses), np.concatenate(accs)


def _recalibrated_buffers(
    objective: Objective, w: torch.Tensor, train_batches: list
) -> dict[str, torch.Tensor]:
    """BatchNorm running statistics recomputed at weights ``w`` on training batches.

    As ``torch.optim.swa_utils.update_bn``: reset the statistics, momentum None (a
    cumulative average), one pass in train mode; done on a copy, never the user's model.
    """
    model = copy.deepcopy(objective.model)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    with torch.no_grad():
        params = dict(model.named_parameters())
        for name, value in objective.layout.unflatten(w).items():
            params[name].copy_(value)
        for bn in bns:
            bn.reset_running_stats()
            bn.momentum = None
        model.train()
        for x, _ in train_batches:
            model(x)
    return {n: b.detach() for n, b in model.named_buffers()}


class _Grid:
    """Evaluates a list of points with progress, periodic partial saves and resume."""

    def __init__(self, objective, batched, bn_batches, progress, partial, save_every_s=10.0):
        self.objective, self.batched, self.bn_batches = objective, batched, bn_batches
        self.progress, self.partial, self.save_every_s = progress, partial, save_every_s

    def run(self, surface: Surface, points: list[tuple[tuple[int, ...], torch.Tensor]]) -> None:
        todo = [(idx, w) for idx, w in points if np.isnan(surface.loss[idx])]
        bar = tqdm(
            total=len(points),
            initial=len(points) - len(todo),
            desc="landscape",
            disable=not self.progress,
            leave=False,
        )
        last_save = time.monotonic()
        step = 1 if self.bn_batches is not None else 64
        try:
            for start in range(0, len(todo), step):
                chunk = todo[start : start + step]
                if self.bn_batches is not None:
                    idx, w = chunk[0]
                    buffers = _recalibrated_buffers(self.objective, w, self.bn_batches)
                    loss, acc = evaluate_points(
                        self.objective, w[None], batched=False, buffers=buffers
                    )
                else:
                    loss, acc = evaluate_points(
                        self.objective, torch.stack([w for _, w in chunk]), batched=self.batched
                    )
                for (idx, _), lv, av in zip(chunk, loss, acc, strict=True):
                    surface.loss[idx], surface.accuracy[idx] = lv, av
                bar.update(len(chunk))
                if self.partial and time.monotonic() - last_save > self.save_every_s:
                    surface.save(self.partial)
                    last_save = time.monotonic()
        except BaseException:
            if self.partial:  # keep what is done: --resume continues from here
                surface.save(self.partial)
            raise
        finally:
            bar.close()


def _resume_into(surface: Surface, partial: str | None) -> None:
    """Copy finished points from a partial file whose settings match ``surface``'s."""
    if not partial or not os.path.isfile(partial):
        return
    saved = load_surface(partial)
    same = (
        saved.kind == surface.kind
        and {k: v for k, v in saved.settings.items() if k != "label"}
        == {k: v for k, v in surface.settings.items() if k != "label"}
        and np.array_equal(saved.coords_a, surface.coords_a)
        and (surface.coords_b is None or np.array_equal(saved.coords_b, surface.coords_b))
    )
    if not same:
        raise SharpscopeError(
            f"{partial}: a partial landscape with other settings; delete it or drop --resume"
        )
    surface.loss[...] = saved.loss
    surface.accuracy[...] = saved.accuracy


def surface_1d(
    objective: Objective,
    direction: torch.Tensor,
    coords: Sequence[float],
    *,
    settings: dict[str, Any] | None = None,
    batched: bool | None = None,
    bn_batches: list | None = None,
    progress: bool = False,
) -> Surface:
    """L(w + a d) and accuracy for a in ``coords``."""
    coords = np.asarray(coords, dtype=np.float64)
    surface = Surface(
        "1d",
        coords,
        None,
        np.full(len(coords), np.nan),
        np.full(len(coords), np.nan),
        {"kind": "1d", **(settings or {})},
    )
    points = [((i,), objective.w0 + float(a) * direction) for i, a in enumerate(coords)]
    _Grid(objective, batched, bn_batches, progress, None).run(surface, points)
    return surface


def surface_2d(
    objective: Objective,
    d1: torch.Tensor,
    d2: torch.Tensor,
    coords_a: Sequence[float],
    coords_b: Sequence[float],
    *,
    settings: dict[str, Any] | None = None,
    resume_path: str | None = None,
    batched: bool | None = None,
    bn_batches: list | None = None,
    progress: bool = False,
) -> Surface:
    """L(w + a d1 + b d2) on the grid coords_b x coords_a (rows = d2, columns = d1).

    With ``resume_path`` the finished points are saved there every few seconds and on
    interruption; a later call with the same settings continues from it, recomputing
    nothing, and the file is removed once the grid is complete.
    """
    ca, cb = np.asarray(coords_a, dtype=np.float64), np.asarray(coords_b, dtype=np.float64)
    shape = (len(cb), len(ca))
    surface = Surface(
        "2d",
        ca,
        cb,
        np.full(shape, np.nan),
        np.full(shape, np.nan),
        {"kind": "2d", "layout": LAYOUT_2D, **(settings or {})},
    )
    _resume_into(surface, resume_path)
    points = [
        ((i, j), objective.w0 + float(a) * d1 + float(b) * d2)
        for i, b in enumerate(cb)
        for j, a in enumerate(ca)
    ]
    _Grid(objective, batched, bn_batches, progress, resume_path).run(surface, points)
    if resume_path and os.path.exists(resume_path):
        os.remove(resume_path)
    return surface


def auto_range(
    objective: Objective,
    directions: Sequence[torch.Tensor],
    *,
    factor: float = 10.0,
    start: float = 0.5,
    max_doublings: int = 8,
) -> float:
    """The half-width r at which the loss at every ±r·d reaches ``factor`` x L(w).

    Doubles r from ``start`` (at most ``max_doublings`` times) so the plot shows the
    basin and its walls whatever the scale of the directions.
    """
    centre = objective.value()
    target = factor * centre if centre > 0 else 1.0
    r = start
    for _ in range(max_doublings):
        edges = torch.stack([objective.w0 + s * r * d for d in directions for s in (-1, 1)])
        losses, _ = evaluate_points(objective, edges)
        if np.nanmin(losses) >= target:
            break
        r *= 2
    return r


# --------------------------------------------------------------------------- from files


def _objective_for(path: str, split, samples, batch_size, device, seed, model=None, data=None):
    net, meta = load_checkpoint(path, model=model, data=data, device=device)
    if meta.get("data") is None:
        raise SharpscopeError(f"{path}: no data set recorded; name one with --data")
    dataset = load_dataset(meta["data"]).to(device)
    loss_fn = get_loss((meta.get("config") or {}).get("loss", "ce"))
    x, y = dataset.examples(split, samples, seed=seed)
    obj = Objective(net, (x, y), loss_fn, batch_size=batch_size, device=device)
    return obj, dataset, meta


def landscape_for_checkpoint(
    path: str,
    *,
    dim: int = 1,
    points: int | tuple[int, int] = DEFAULT_POINTS,
    range: tuple[float, float] | str = DEFAULT_RANGE,  # noqa: A002 - the CLI's name
    directions: str = "filter",
    seed: int = 0,
    orthogonalize_d2: bool = False,
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
    batched: bool | None = None,
    progress: bool = False,
) -> Surface:
    """The 1-D or 2-D landscape of the model in checkpoint ``path``.

    ``directions``: "filter" | "layer" | "none" (seeded Gaussian directions with that
    normalization), "hessian" (top eigenvectors, unit norm) or "pca" (top principal
    components of the run's trajectory, ``trajectory`` = run folder; default the
    checkpoint's folder). ``points`` is n, or (nx, ny) for a non-square 2-D grid;
    ``range`` is (low, high) or "auto".
    """
    if dim not in (1, 2):
        raise SharpscopeError(f"--dim must be 1 or 2, got {dim}")
    if directions not in DIRECTIONS:
        raise SharpscopeError(f"unknown directions {directions!r}: choose {', '.join(DIRECTIONS)}")
    nx, ny = (points, points) if isinstance(points, int) else points
    if min(nx, ny) < 1:
        raise SharpscopeError("a landscape needs at least 1 point along each axis")
    obj, dataset, meta = _objective_for(path, split, samples, batch_size, device, seed)
    extra: dict[str, Any] = {}
    traj = None
    if directions in NORMALIZATIONS:
        raw1 = raw_direction(obj.layout, seed, obj.w0.dtype, obj.device)
        raw2 = raw_direction(obj.layout, seed + 1, obj.w0.dtype, obj.device)
        d1 = normalize_direction(raw1, obj.w0, obj.layout, directions, include_1d)
        d2 = normalize_direction(raw2, obj.w0, obj.layout, directions, include_1d)
    elif directions == "hessian":
        from .hessian import hessian_eigenvalues

        eig = hessian_eigenvalues(obj, k=dim, return_eigenvectors=True, seed=seed)
        d1 = eig.eigenvectors[0].to(obj.w0.dtype)
        d2 = eig.eigenvectors[-1].to(obj.w0.dtype)
        extra["hessian_eigenvalues"] = list(eig.eigenvalues)
    else:
        run_dir = trajectory or os.path.dirname(os.path.abspath(path))
        d1, d2, traj, explained = trajectory_directions(run_dir, obj)
        extra["explained_variance"] = explained
        extra["trajectory_dir"] = run_dir
    if dim == 2 and orthogonalize_d2:
        d2 = orthogonalize(d1, d2)
    if range == "auto" and traj is not None:  # PCA: the plane around the trajectory
        half = 1.2 * float(np.abs(traj).max())
        low, high = -half, half
    elif range == "auto":
        half = auto_range(obj, [d1] if dim == 1 else [d1, d2])
        low, high = -half, half
    else:
        low, high = range
    bn_batches = None
    if bn_recalibrate:
        xt, yt = dataset.examples("train", samples, seed=seed)
        bn_batches = [
            (xt[i : i + batch_size], yt[i : i + batch_size])
            for i in builtins_range(0, len(yt), batch_size)
        ]
    settings = {
        "checkpoint": str(path),
        "label": label or _default_label(path, meta),
        "split": split,
        "n_examples": obj.n_examples,
        "seed": seed,
        "directions": directions,
        "normalization": directions if directions in NORMALIZATIONS else "unit",
        "include_1d": include_1d,
        "orthogonalize": orthogonalize_d2,
        "cos_d1_d2": cosine(d1, d2) if dim == 2 else None,
        "bn": "recalibrate" if bn_recalibrate else "eval",
        "range": [low, high],
        "points": [nx, ny] if dim == 2 else nx,
        "dtype": str(obj.w0.dtype).replace("torch.", ""),
        "param_filter": obj.param_filter,
        "loss_function": (meta.get("config") or {}).get("loss", "ce"),
        "model": meta.get("model"),
        "data": meta.get("data"),
        **extra,
    }
    common = {
        "settings": settings,
        "batched": batched,
        "bn_batches": bn_batches,
        "progress": progress,
    }
    if dim == 1:
        surface = surface_1d(obj, d1, grid_coordinates(low, high, nx), **common)
    else:
        surface = surface_2d(
            obj,
            d1,
            d2,
            grid_coordinates(low, high, nx),
            grid_coordinates(low, high, ny),
            resume_path=resume_path,
            **common,
        )
    surface.trajectory = traj
    if save_directions:
        surface.d1 = d1.cpu().numpy()
        surface.d2 = d2.cpu().numpy() if dim == 2 else None
    return surface


builtins_range = range  # ``range`` is a keyword argument name above


def _default_label(path: str, meta: dict[str, Any]) -> str:
    optimizer = (meta.get("config") or {}).get("optimizer")
    return str(optimizer).upper() if optimizer else os.path.basename(path)


def interpolation(
    model_a: nn.Module,
    model_b: nn.Module,
    data: Any,
    ts: Sequence[float],
    *,
    include_buffers: bool = False,
    loss_fn: Callable | None = None,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    settings: dict[str, Any] | None = None,
    progress: bool = False,
) -> Surface:
    """L((1 - t) w_A + t w_B) for t in ``ts`` (Goodfellow et al. 2015).

    BatchNorm statistics are model A's unless ``include_buffers`` ("states"), when
    floating-point buffers are interpolated with the same t.
    """
    obj_a = make_objective(model_a, data, loss_fn, batch_size=batch_size, device=device)
    obj_b = Objective(model_b, (torch.zeros(1), torch.zeros(1)), device=obj_a.device)
    if obj_a.layout.names != obj_b.layout.names or obj_a.layout.shapes != obj_b.layout.shapes:
        raise SharpscopeError("the two checkpoints have different architectures")
    wa, wb = obj_a.w0, obj_b.w0.to(obj_a.w0)
    ts = np.asarray(ts, dtype=np.float64)
    surface = Surface(
        "interpolation",
        ts,
        None,
        np.full(len(ts), np.nan),
        np.full(len(ts), np.nan),
        {"kind": "interpolation", "include_buffers": include_buffers, **(settings or {})},
    )
    bufs_a = dict(model_a.named_buffers())
    bufs_b = dict(model_b.named_buffers())
    for i, t in enumerate(tqdm(ts, desc="interpolation", disable=not progress, leave=False)):
        w = (1 - t) * wa + t * wb
        buffers = None
        if include_buffers:
            buffers = {
                n: ((1 - t) * b + t * bufs_b[n].to(b)) if b.is_floating_point() else b
                for n, b in bufs_a.items()
            }
        r = obj_a.evaluate(w, buffers)
        surface.loss[i], surface.accuracy[i] = r["loss"], r["accuracy"]
    return surface


def interpolation_for_checkpoints(
    path_a: str,
    path_b: str,
    *,
    points: int = DEFAULT_POINTS,
    range: tuple[float, float] = INTERPOLATION_RANGE,  # noqa: A002 - the CLI's name
    include_buffers: bool = False,
    split: str = "train",
    samples: int | None = 1024,
    batch_size: int = 512,
    device: torch.device | str = "cpu",
    seed: int = 0,
    labels: tuple[str, str] | None = None,
    progress: bool = False,
) -> Surface:
    """The interpolation curve between the models in two checkpoints, on A's data."""
    obj, _, meta_a = _objective_for(path_a, split, samples, batch_size, device, seed)
    model_b, meta_b = load_checkpoint(path_b, device=device)
    if meta_a.get("model") != meta_b.get("model"):
        raise SharpscopeError(
            f"{path_a} and {path_b} have different architectures: nothing to interpolate"
        )
    ts = grid_coordinates(range[0], range[1], points)
    if range[0] <= 1 <= range[1]:
        ts[np.argmin(np.abs(ts - 1))] = 1.0  # t = 1 exactly: the curve ends at L(w_B)
    labels = labels or (_default_label(path_a, meta_a), _default_label(path_b, meta_b))
    settings = {
        "checkpoints": [str(path_a), str(path_b)],
        "label": f"{labels[0]} → {labels[1]}",
        "labels": list(labels),
        "split": split,
        "n_examples": obj.n_examples,
        "seed": seed,
        "directions": "interpolation",
        "normalization": "none",
        "range": list(range),
        "points": points,
        "dtype": str(obj.w0.dtype).replace("torch.", ""),
    }
    data = [(x, y) for x, y in obj.batches]
    return interpolation(
        obj.model,
        model_b,
        data,
        ts,
        include_buffers=include_buffers,
        loss_fn=obj.loss_fn,
        device=device,
        settings=settings,
        progress=progress,
    )
