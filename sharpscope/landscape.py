"""Loss landscapes: directions in weight space and the surfaces L(w + a d1 + b d2).

Directions (Li et al. 2018, "Visualizing the Loss Landscape of Neural Nets", Sec. 4):
a Gaussian direction rescaled filter by filter to the norms of w's filters, so that
landscapes of networks with different weight scales are comparable. Also layer-wise
and unnormalized directions, the straight line between two minima (Goodfellow et al.
2015, "Qualitatively Characterizing Neural Network Optimization Problems"), top
Hessian eigenvectors, and the top-2 principal components of a training trajectory
(Li et al. 2018, Sec. 7).

Every point is evaluated at w + a d1 + b d2 computed afresh from the stored w (never
by accumulating steps, which drifts), through :class:`~sharpscope.objective.Objective`,
so the user's model is never written to. Surfaces are saved as ``.npz``: coordinates,
loss, accuracy, the settings as JSON and the directions' seed; unfinished points are
NaN, and an interrupted grid continues from its partial file.
"""

from __future__ import annotations

import copy
import dataclasses
import glob
import hashlib
import json
import math
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.func import functional_call
from tqdm.auto import tqdm

from . import distributed
from .checkpoint import checkpoint_loss, load_model_and_data, read_checkpoint
from .data import without_location
from .errors import SharpscopeError, first_line
from .files import atomic_write
from .losses import correct_count, get_loss
from .objective import (
    Layout,
    Objective,
    ParamFilter,
    eval_mode,
    exact_float32,
    make_objective,
    model_fits_data,
    select_parameters,
)

NORMALIZATIONS = ("filter", "layer", "none")
DIRECTIONS = NORMALIZATIONS + ("hessian", "pca")
KINDS = ("1d", "2d", "interpolation")
LAYOUT_2D = "rows = d2 (coords_b), columns = d1 (coords_a)"
# Li et al. (2018), Figs. 1-6 and their code's examples: [-1, 1] with 51 points per axis.
DEFAULT_RANGE = (-1.0, 1.0)
DEFAULT_POINTS = 51
# Goodfellow et al. (2015) and Li et al. (2018, Fig. 2) plot t in [-0.5, 1.5]; 401
# points as in the 1-D interpolation example of Li et al.'s code (tomgoldstein/
# loss-landscape, README: --x=-0.5:1.5:401). Its step 0.005 puts t = 0 and t = 1 on the
# grid exactly.
INTERPOLATION_RANGE = (-0.5, 1.5)
INTERPOLATION_POINTS = 401
# The most grid points one surface may have (a 51 x 51 figure has 2,601): every point
# is at least one pass over the examples, and the grid's arrays are allocated up front.
MAX_GRID_POINTS = 10**6
# range="auto": double the half-width from AUTO_START until the loss at every edge is
# AUTO_FACTOR x the centre loss (our choice: one decade of loss, enough to show the
# basin's walls on a log color scale), at most AUTO_MAX_DOUBLINGS times (up to 256).
AUTO_FACTOR = 10.0
AUTO_START = 0.25
AUTO_MAX_DOUBLINGS = 10
# PCA directions with range="auto": the trajectory's extent plus 20% on every side.
TRAJECTORY_MARGIN = 1.2
# Points per vmap call: 16 copies of the activations of one batch; measured by
# benchmarks/bench_landscape.py, a larger chunk gains little once the device is busy.
VMAP_CHUNK = 16
# vmap only for models up to 1M parameters (16 stacked copies of w stay small).
VMAP_MAX_PARAMS = 1_000_000
# A 2-D grid's partial file is rewritten at most this often (seconds): a kill loses at
# most this much work, and writing a few-kB .npz costs nothing at that rate.
PARTIAL_SAVE_SECONDS = 10.0
# Grid points split over torchrun ranks: chunks each rank evaluates between two
# all-reduces of the results (a few kB for a 51 x 51 grid; rank 0 can save only what
# has been summed).
SPLIT_ROUND_CHUNKS = 8
# Settings that may differ between an interrupted run and the one that resumes it.
_RESUME_IGNORED = ("label", "labels", "evaluation", "processes", "distribute")
# Under torchrun: "points" deals the grid points out to the ranks, each evaluating its
# points on all the examples (no communication per point; the default); "examples"
# evaluates every point on all ranks, each on its shard of the examples, sums
# all-reduced (for evaluation sets too large for one device).
DISTRIBUTE = ("points", "examples")


# --------------------------------------------------------------------------- directions


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


_orthogonalize = orthogonalize  # landscape_for_checkpoint has a keyword of that name


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


# --------------------------------------------------------------------------- surfaces


@dataclass
class Surface:
    """A computed landscape (mutable: the grid fills ``loss`` and ``accuracy`` in place).

    ``kind``: "1d", "2d" or "interpolation". ``coords_a`` (nx,) runs along d1 (or t for
    interpolation); ``coords_b`` (ny,) along d2, for 2-D only. ``loss`` and
    ``accuracy`` (fraction in [0, 1]) are (nx,) for 1-D and interpolation, (ny, nx) for
    2-D: rows = d2 / coords_b, columns = d1 / coords_a. NaN marks a point not computed
    yet. ``settings`` says what produced it (see :func:`landscape_for_checkpoint`);
    ``trajectory`` (k, 2) is a PCA plane's path in (a, b) coordinates; ``d1``/``d2``
    the direction vectors when kept.
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

    @property
    def seed(self) -> int | None:
        """The directions' (and examples') seed."""
        return self.settings.get("seed")

    def to_dict(self) -> dict[str, Any]:
        """Everything but the direction vectors, as JSON-ready values (NaN -> None)."""

        def plain(a: np.ndarray | None) -> Any:
            if a is None:
                return None
            return np.vectorize(_none_for_nan, otypes=[object])(np.asarray(a, float)).tolist()

        return {
            "kind": self.kind,
            "coords_a": plain(self.coords_a),
            "coords_b": plain(self.coords_b),
            "loss": plain(self.loss),
            "accuracy": plain(self.accuracy),
            "trajectory": plain(self.trajectory),
            "settings": self.settings,
        }

    def _arrays(self) -> dict[str, np.ndarray]:
        arrays: dict[str, np.ndarray] = {
            "coords_a": np.asarray(self.coords_a, dtype=np.float64),
            "loss": np.asarray(self.loss, dtype=np.float64),
            "accuracy": np.asarray(self.accuracy, dtype=np.float64),
            "settings": np.asarray(json.dumps(self.settings)),
            "seed": np.asarray(-1 if self.seed is None else int(self.seed)),
        }
        for key in ("coords_b", "trajectory", "d1", "d2"):
            value = getattr(self, key)
            if value is not None:
                arrays[key] = np.asarray(value)
        return arrays

    def save(self, path: str | os.PathLike) -> None:
        """Write an ``.npz`` atomically (readable with ``allow_pickle=False``): arrays
        ``coords_a``, ``coords_b`` (2-D), ``loss``, ``accuracy``, ``settings`` (JSON, a
        0-d string array), ``seed``, and ``trajectory``, ``d1``, ``d2`` when present."""
        _write_npz(path, self._arrays())


def _none_for_nan(v: float) -> float | None:
    return float(v) if math.isfinite(v) else None


def _write_npz(path: str | os.PathLike, arrays: dict[str, np.ndarray]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:  # a file object: np.savez would append ".npz" to a name
            np.savez(f, **arrays)

    atomic_write(path, write)


def load_surface(path: str | os.PathLike) -> Surface:
    """Read a surface saved by :meth:`Surface.save`; :class:`SharpscopeError` with one
    clear line for a missing, unreadable or foreign file."""
    path = os.fspath(path)
    if os.path.isdir(path):
        raise SharpscopeError(f"{path}: a folder, not a landscape file")
    if not os.path.isfile(path):
        raise SharpscopeError(f"{path}: no such file")
    try:
        loaded = np.load(path, allow_pickle=False)
    except Exception:
        raise SharpscopeError(f"{path}: not a sharpscope landscape file (not an .npz)") from None
    if not isinstance(loaded, np.lib.npyio.NpzFile):
        raise SharpscopeError(f"{path}: not a sharpscope landscape file (a .npy array)")
    try:
        with loaded as f:
            size = _npz_bytes(f)
            if size > MAX_SURFACE_BYTES:  # checked from the headers, before reading
                raise SharpscopeError(
                    f"{path}: its arrays would take {size / 2**30:.3g} GiB, more than a "
                    f"landscape file holds ({MAX_SURFACE_BYTES / 2**30:g} GiB at most)"
                )
            data = {k: f[k] for k in f.files}
        missing = [k for k in ("settings", "coords_a", "loss", "accuracy") if k not in data]
        if missing:
            raise SharpscopeError(
                f"{path}: not a sharpscope landscape file (no {', '.join(missing)} in it)"
            )
        settings = json.loads(str(data["settings"][()]))
        if not isinstance(settings, dict):
            raise SharpscopeError(f"{path}: not a sharpscope landscape file (bad settings)")
        surface = Surface(
            kind=settings["kind"],
            coords_a=data["coords_a"],
            coords_b=data.get("coords_b"),
            loss=data["loss"],
            accuracy=data["accuracy"],
            settings=settings,
            trajectory=data.get("trajectory"),
            d1=data.get("d1"),
            d2=data.get("d2"),
        )
    except SharpscopeError:
        raise
    except Exception as exc:  # a zip error, a missing key, bad JSON: one message
        raise SharpscopeError(
            f"{path}: not a sharpscope landscape file ({first_line(exc)})"
        ) from None
    _check_surface(path, surface)
    return surface


# The largest finite loss a surface file may hold: beyond it a plot's range overflows.
MAX_FINITE_VALUE = 1e300


def _check_surface(path: str, surface: Surface) -> None:
    """Refuse, in one line, a surface whose arrays or settings a plot cannot take."""
    s = surface.settings

    def bad(what: str) -> SharpscopeError:
        return SharpscopeError(f"{path}: not a valid landscape file ({what})")

    if surface.kind not in KINDS:
        raise bad(f"unknown kind {surface.kind!r}")
    for key in ("label", "split"):
        if s.get(key) is not None and not isinstance(s[key], str):
            raise bad(f"its {key} is not text")
    labels = s.get("labels")
    if labels is not None and not (
        isinstance(labels, list) and len(labels) == 2 and all(isinstance(v, str) for v in labels)
    ):
        raise bad("its labels are not two texts")
    axes = [("coords_a", surface.coords_a)]
    if surface.kind == "2d":
        if surface.coords_b is None:
            raise bad("a 2-D landscape without coords_b")
        axes.append(("coords_b", surface.coords_b))
    for name, coords in axes:
        if not _is_real(coords) or coords.ndim != 1 or len(coords) < 1:
            raise bad(f"{name} must be a list of real numbers")
        if not np.isfinite(coords).all() or (np.diff(coords) <= 0).any():
            raise bad(f"{name} must be finite and increasing")
    expected = tuple(len(c) for _, c in axes[::-1])
    for name in ("loss", "accuracy"):
        values = getattr(surface, name)
        if not _is_real(values):
            raise bad(f"{name} must be real numbers")
        if values.shape != expected:
            raise bad(f"{name} {values.shape} does not match the coordinates {expected}")
        finite = values[np.isfinite(values)]
        if finite.size and np.abs(finite).max() > MAX_FINITE_VALUE:
            raise bad(f"{name} values beyond {MAX_FINITE_VALUE:g}")
    accuracy = surface.accuracy[np.isfinite(surface.accuracy)]
    if accuracy.size and (accuracy.min() < 0 or accuracy.max() > 1):
        raise bad("accuracy outside [0, 1]")
    trajectory = surface.trajectory
    if trajectory is not None and (
        not _is_real(trajectory)
        or trajectory.ndim != 2
        or trajectory.shape[1] != 2
        or not np.isfinite(trajectory).all()
    ):
        raise bad("trajectory must be (k, 2) finite numbers")
    for name in ("d1", "d2"):
        vector = getattr(surface, name)
        if vector is not None and (not _is_real(vector) or vector.ndim != 1):
            raise bad(f"{name} must be a vector of real numbers")
    for name in ("coords_a", "coords_b", "loss", "accuracy", "trajectory"):
        value = getattr(surface, name)
        if value is not None:
            setattr(surface, name, value.astype(np.float64))


# The most a landscape file's arrays may take: a 1000 x 1000 grid and the two direction
# vectors of a 400M-parameter model in float32 fit.
MAX_SURFACE_BYTES = 4 * 2**30


def _npz_bytes(f: np.lib.npyio.NpzFile) -> int:
    """The bytes the arrays of ``f`` would take, read from the .npy headers of all its
    members (numpy may read a member named ``NAME`` for the key ``NAME`` rather than
    ``NAME.npy``: every member counts)."""
    total = 0
    for name in f.zip.namelist():
        with f.zip.open(name) as member:
            version = np.lib.format.read_magic(member)
            read_header = (
                np.lib.format.read_array_header_1_0
                if version == (1, 0)
                else np.lib.format.read_array_header_2_0
            )
            shape, _, dtype = read_header(member)
        total += math.prod(shape) * dtype.itemsize
    return total


def _is_real(a: Any) -> bool:
    """A numpy array of real numbers (floats or integers; not bool, complex or text)."""
    return isinstance(a, np.ndarray) and a.dtype.kind in "fiu"


def check_grid_points(nx: Any, ny: Any = 1) -> tuple[int, int]:
    """``(nx, ny)`` if a grid of nx x ny points (ny = 1: a curve) can be computed: whole
    numbers of at least 1, and at most MAX_GRID_POINTS in all."""
    for n in (nx, ny):
        if not isinstance(n, int | np.integer) or isinstance(n, bool) or n < 1:
            raise SharpscopeError(f"a landscape needs a positive whole number of points, got {n!r}")
    if nx * ny > MAX_GRID_POINTS:
        raise SharpscopeError(
            f"a grid of {nx} x {ny} = {nx * ny:.3g} points is too large "
            f"(at most {MAX_GRID_POINTS:,}; Li et al.'s figures use 51 x 51)"
        )
    return int(nx), int(ny)


def grid_coordinates(low: float, high: float, points: int) -> np.ndarray:
    """``points`` evenly spaced values on [low, high], containing 0 exactly when the
    range does: the value nearest 0 is set to 0, so the centre is L(w) itself. A
    symmetric range with an odd count is uniform with 0 at its middle; otherwise the
    snapped value makes one step slightly uneven."""
    if points < 1:
        raise SharpscopeError(f"a grid needs at least 1 point, got {points}")
    if not (math.isfinite(low) and math.isfinite(high)) or high < low:
        raise SharpscopeError(f"bad range [{low}, {high}]: need finite LOW <= HIGH")
    if points == 1:
        return np.array([0.0 if low <= 0 <= high else (low + high) / 2])
    coords = np.linspace(low, high, points)
    if points % 2 == 1 and low == -high:  # exact symmetry: c[i] = -c[n-1-i]
        coords = np.concatenate([coords[: points // 2], [0.0], -coords[: points // 2][::-1]])
    if low <= 0 <= high:
        coords[np.argmin(np.abs(coords))] = 0.0
    return coords


def _use_vmap(objective: Objective, batched: bool | None) -> bool:
    # vmap over stacked weights pays off where one forward leaves the device idle (small
    # models on a GPU, launch-bound). On a CPU (benchmarks/bench_landscape.py) it ran at
    # 0.3-0.5x the speed of one point at a time for the digits models on 1024 examples,
    # 1.0x on 128; only a 3k-parameter MLP (0.03 ms forward) gained (2x, of 0.2 ms per
    # point). So by default it is used on CUDA only, up to VMAP_MAX_PARAMS parameters.
    if batched is not None:
        return batched
    # Not automatic on example shards: a fallback on one rank alone (below) would leave
    # the ranks making different all-reduces.
    if objective.distributed:
        return False
    return objective.device.type == "cuda" and objective.numel <= VMAP_MAX_PARAMS


def evaluate_points(
    objective: Objective,
    weights: torch.Tensor,
    *,
    batched: bool | None = None,
    chunk: int = VMAP_CHUNK,
    buffers: dict[str, torch.Tensor] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Loss and accuracy at each row of ``weights`` (P, numel): two float64 arrays (P,).

    ``batched``: True runs ``chunk`` points per forward with ``torch.func.vmap`` over
    stacked weights; False one point at a time (:meth:`Objective.evaluate`); None picks
    (vmap on CUDA for models up to VMAP_MAX_PARAMS, falling back to one at a time if
    the model cannot be vmapped). ``buffers`` override the model's buffers at every
    point. Both paths evaluate in eval mode and never write to the model.
    """
    if not _use_vmap(objective, batched):
        results = [objective.evaluate(w, buffers) for w in weights]
        return np.array([r["loss"] for r in results]), np.array([r["accuracy"] for r in results])
    try:
        return _evaluate_vmap(objective, weights, chunk, buffers)
    except (torch.OutOfMemoryError, torch.distributed.DistBackendError):
        raise
    except (RuntimeError, NotImplementedError):
        if batched:  # asked for explicitly: say why it fails
            raise
        return evaluate_points(objective, weights, batched=False, buffers=buffers)


def _evaluate_vmap(objective, weights, chunk, buffers) -> tuple[np.ndarray, np.ndarray]:
    model, loss_fn, layout = objective.model, objective.loss_fn, objective.layout
    fixed = objective.state(objective.w0, buffers)
    for name in layout.names:
        del fixed[name]

    def one(w: torch.Tensor, x: torch.Tensor, y: torch.Tensor):
        out = functional_call(model, {**fixed, **layout.unflatten(w)}, (x,))
        return loss_fn(out, y), correct_count(out, y)

    run = torch.func.vmap(one, in_dims=(0, None, None))
    losses, accs = [], []
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
            losses.append(total.double().cpu().numpy())
            accs.append(correct.cpu().numpy() / objective.n_examples)
    return np.concatenate(losses), np.concatenate(accs)


class BatchNormRecalibrator:
    """BatchNorm running statistics recomputed at given weights, on training batches.

    As ``torch.optim.swa_utils.update_bn`` (and the mode-connectivity papers that use
    it, e.g. Garipov et al. 2018): reset every BatchNorm's statistics, momentum None (a
    cumulative average of the batch statistics), one pass over ``batches`` in train
    mode. Done on one private copy of the model, never on the user's.
    """

    def __init__(self, objective: Objective, batches: Sequence[tuple[torch.Tensor, torch.Tensor]]):
        self.objective = objective
        self.model = copy.deepcopy(objective.model).to(objective.device)
        self.norms = [
            m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
        ]
        self.batches = [(x.to(objective.device), y) for x, y in batches]
        if not self.batches:
            raise SharpscopeError("BatchNorm recalibration needs at least one training batch")

    def __call__(self, w: torch.Tensor) -> dict[str, torch.Tensor]:
        """The model's buffers (name -> tensor) after recalibration at weights ``w``."""
        state = self.objective.state(w)
        with torch.no_grad():
            for name, p in self.model.named_parameters():
                p.copy_(state[name])
            for bn in self.norms:
                bn.reset_running_stats()
                bn.momentum = None
            self.model.train()
            for x, _ in self.batches:
                self.model(x)
        return {n: b.detach().clone() for n, b in self.model.named_buffers()}


def _recalibrated_buffers(
    objective: Objective,
    w: torch.Tensor,
    train_batches: Sequence[tuple[torch.Tensor, torch.Tensor]],
) -> dict[str, torch.Tensor]:
    """The buffers after BatchNorm recalibration at ``w`` (one-off
    :class:`BatchNormRecalibrator`)."""
    return BatchNormRecalibrator(objective, train_batches)(w)


class _PointEvaluator:
    """Evaluates stacked weight vectors the way one surface asked for: vmap-batched,
    one point at a time, or with BatchNorm recalibrated at every point."""

    def __init__(self, objective: Objective, batched: bool | None, bn_batches: Any):
        self.objective = objective
        self.recalibrate = (
            BatchNormRecalibrator(objective, bn_batches) if bn_batches is not None else None
        )
        self.batched = batched
        self.vmap = self.recalibrate is None and _use_vmap(objective, batched)

    @property
    def chunk(self) -> int:
        return VMAP_CHUNK if self.vmap else 1

    @property
    def description(self) -> str:
        if self.recalibrate is not None:
            return "one point at a time, BatchNorm recalibrated"
        return f"vmap, {VMAP_CHUNK} points per pass" if self.vmap else "one point at a time"

    def __call__(
        self, W: torch.Tensor, buffers: dict[str, torch.Tensor] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Loss and accuracy (P,) at the rows of W (P, numel)."""
        if self.recalibrate is not None:
            out = [
                evaluate_points(self.objective, w[None], batched=False, buffers=self.recalibrate(w))
                for w in W
            ]
            return np.concatenate([o[0] for o in out]), np.concatenate([o[1] for o in out])
        if self.vmap and buffers is None:
            try:
                return evaluate_points(self.objective, W, batched=True)
            except (torch.OutOfMemoryError, torch.distributed.DistBackendError):
                raise
            except (RuntimeError, NotImplementedError):
                if self.batched:  # asked for explicitly: let the reason show
                    raise
                self.vmap = False  # a model vmap cannot take: one at a time from now on
        return evaluate_points(self.objective, W, batched=False, buffers=buffers)


def _fingerprint(*values: torch.Tensor | np.ndarray) -> str:
    """A short SHA-256 of the exact bytes of ``values``: tells a partial file computed
    from other weights or directions apart from this one's."""
    h = hashlib.sha256()
    for v in values:
        if isinstance(v, torch.Tensor):
            v = v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()
        h.update(np.ascontiguousarray(v).tobytes())
    return h.hexdigest()[:16]


def _comparable(settings: dict[str, Any]) -> dict[str, Any]:
    plain = json.loads(json.dumps(settings))  # tuples -> lists, as they come back from a file
    return {k: v for k, v in plain.items() if k not in _RESUME_IGNORED}


def _load_partial(path: str, surface: Surface) -> tuple[np.ndarray, np.ndarray, np.ndarray] | None:
    """(loss, accuracy, done) from a partial file whose settings match ``surface``'s."""
    if not os.path.isfile(path):
        return None
    saved = load_surface(path)
    with np.load(path, allow_pickle=False) as f:
        done = f["done"].astype(bool) if "done" in f.files else np.isfinite(saved.loss)
    mine, theirs = _comparable(surface.settings), _comparable(saved.settings)
    differ = sorted(k for k in set(mine) | set(theirs) if mine.get(k) != theirs.get(k))
    if (
        differ
        or saved.kind != surface.kind
        or not np.array_equal(saved.coords_a, surface.coords_a)
        or (surface.coords_b is not None and not np.array_equal(saved.coords_b, surface.coords_b))
        or done.shape != surface.loss.shape
    ):
        what = ", ".join(differ) or "coordinates"
        raise SharpscopeError(
            f"{path}: a partial landscape computed with other settings ({what}); "
            "delete it to start over"
        )
    return saved.loss, saved.accuracy, done


def save_partial(surface: Surface, done: np.ndarray, path: str) -> None:
    _write_npz(path, {**surface._arrays(), "done": done})


def _run_grid(
    surface: Surface,
    points: list[tuple[tuple[int, ...], tuple[float, ...]]],
    weight_at: Callable[..., torch.Tensor],
    evaluator: _PointEvaluator,
    *,
    buffers_at: Callable[..., dict[str, torch.Tensor]] | None = None,
    resume_path: str | None = None,
    progress: bool = False,
) -> None:
    """Fill ``surface.loss`` / ``.accuracy`` at ``points`` = [(array index, coordinates)].

    The weights of each point come from ``weight_at(*coordinates)`` when its chunk is
    evaluated (never all at once: 2601 copies of w would not fit for a large model).
    With ``resume_path``: finished points are read from it first, and it is rewritten
    every PARTIAL_SAVE_SECONDS and on any interruption (by rank 0 only); it is removed
    once the grid is complete. Under a process group with an evaluator whose objective
    is not distributed, the points are split over the ranks and the results summed
    (every rank ends with the whole surface); with a distributed (example-sharded)
    objective every rank evaluates every point.
    """
    done = np.zeros(surface.loss.shape, dtype=bool)
    if resume_path:
        state = distributed.on_main(lambda: _load_partial(resume_path, surface))
        if state is not None:
            surface.loss[...], surface.accuracy[...], done[...] = state
    todo = [p for p in points if not done[p[0]]]
    writer = bool(resume_path) and distributed.is_main_process()
    step = 1 if buffers_at is not None else evaluator.chunk
    split = distributed.is_distributed() and not evaluator.objective.distributed
    bar = tqdm(
        total=len(points),
        initial=len(points) - len(todo),
        desc=f"{surface.kind} landscape",
        disable=not progress,
        leave=False,
    )
    last_save = time.monotonic()

    def evaluate(chunk: list) -> tuple[np.ndarray, np.ndarray]:
        W = torch.stack([weight_at(*coords) for _, coords in chunk])
        buffers = buffers_at(*chunk[0][1]) if buffers_at is not None else None
        return evaluator(W, buffers)

    def rounds():
        """Lists of (index, loss, accuracy) finished together, the same on every rank."""
        if not split:  # one process, or every rank evaluating every point on its shard
            for start in range(0, len(todo), step):
                chunk = todo[start : start + step]
                loss, acc = evaluate(chunk)
                yield [(p[0], lv, av) for p, lv, av in zip(chunk, loss, acc, strict=True)]
            return
        # The points dealt out round-robin, each rank evaluating its own on all the
        # examples; after every round of SPLIT_ROUND_CHUNKS chunks per rank the results
        # are summed over the ranks (each point has one owner, the others add exact
        # zeros), so rank 0 saves and shows what all have done.
        mine = todo[distributed.rank() :: distributed.world_size()]
        per_round = step * SPLIT_ROUND_CHUNKS
        longest = -(-len(todo) // distributed.world_size())
        for start in range(0, longest, per_round):
            part = mine[start : start + per_round]
            table = torch.zeros(3, done.size, dtype=torch.float64)
            for c in range(0, len(part), step):
                chunk = part[c : c + step]
                flat = [np.ravel_multi_index(idx, done.shape) for idx, _ in chunk]
                loss, acc = evaluate(chunk)
                table[0, flat] = torch.from_numpy(np.asarray(loss, dtype=np.float64))
                table[1, flat] = torch.from_numpy(np.asarray(acc, dtype=np.float64))
                table[2, flat] = 1.0
            table = table.to(evaluator.objective.device)  # NCCL sums CUDA tensors only
            distributed.all_reduce_sum_([table])
            table = table.cpu().numpy()
            yield [
                (np.unravel_index(f, done.shape), table[0, f], table[1, f])
                for f in np.flatnonzero(table[2])
            ]

    try:
        for finished in rounds():
            for idx, lv, av in finished:
                surface.loss[idx], surface.accuracy[idx] = lv, av
                done[idx] = True  # last: an interruption never marks a point half-written
            bar.update(len(finished))
            if writer and time.monotonic() - last_save >= PARTIAL_SAVE_SECONDS:
                save_partial(surface, done, resume_path)
                last_save = time.monotonic()
    except BaseException:
        if writer and done.any():  # keep what is done: the same resume_path continues
            save_partial(surface, done, resume_path)
        raise
    finally:
        bar.close()
    surface.settings["evaluation"] = evaluator.description
    if writer and os.path.exists(resume_path):
        os.remove(resume_path)


def _new_surface(kind, coords_a, coords_b, settings, fingerprint) -> Surface:
    shape = (len(coords_a),) if coords_b is None else (len(coords_b), len(coords_a))
    head: dict[str, Any] = {"kind": kind}
    if kind == "2d":
        head["layout"] = LAYOUT_2D
    return Surface(
        kind,
        coords_a,
        coords_b,
        np.full(shape, np.nan),
        np.full(shape, np.nan),
        {**(settings or {}), **head, "fingerprint": fingerprint},
    )


def _coords(values: Sequence[float], name: str) -> np.ndarray:
    out = np.asarray(values, dtype=np.float64).reshape(-1)
    if len(out) == 0:
        raise SharpscopeError(f"{name}: a landscape needs at least 1 point")
    if not np.isfinite(out).all():
        raise SharpscopeError(f"{name}: coordinates must be finite")
    return out


def surface_1d(
    objective: Objective,
    direction: torch.Tensor,
    coords: Sequence[float],
    *,
    settings: dict[str, Any] | None = None,
    resume_path: str | None = None,
    batched: bool | None = None,
    bn_batches: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
    progress: bool = False,
) -> Surface:
    """L(w + a d) and accuracy for a in ``coords`` (nx,), w = ``objective.w0``.

    ``direction`` is flat (numel,). ``batched``: see :func:`evaluate_points`.
    ``bn_batches``: training batches (x, y) on which BatchNorm statistics are
    recomputed at every point (:class:`BatchNormRecalibrator`); None keeps the model's
    running statistics (eval mode). ``resume_path``: see :func:`surface_2d`.
    """
    ca = _coords(coords, "coords")
    d = direction.to(objective.w0)
    surface = _new_surface("1d", ca, None, settings, _fingerprint(objective.w0, d, ca))
    points = [((i,), (float(a),)) for i, a in enumerate(ca)]
    evaluator = _PointEvaluator(objective, batched, bn_batches)
    _run_grid(
        surface,
        points,
        lambda a: objective.w0 + a * d,
        evaluator,
        resume_path=resume_path,
        progress=progress,
    )
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
    bn_batches: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
    progress: bool = False,
) -> Surface:
    """L(w + a d1 + b d2) and accuracy on the grid ``coords_b`` x ``coords_a``.

    Arrays (ny, nx): rows = d2 / coords_b, columns = d1 / coords_a; each point's
    weights are computed afresh from w. With ``resume_path`` the finished points are
    saved there every PARTIAL_SAVE_SECONDS and on interruption (KeyboardInterrupt, or
    SIGTERM once turned into one, as the CLI does); a later call with the same
    settings, weights and directions continues from it without recomputing finished
    points, giving the same numbers; the file is removed once the grid is complete.
    ``batched`` and ``bn_batches``: see :func:`surface_1d`.
    """
    ca, cb = _coords(coords_a, "coords_a"), _coords(coords_b, "coords_b")
    e1, e2 = d1.to(objective.w0), d2.to(objective.w0)
    fingerprint = _fingerprint(objective.w0, e1, e2, ca, cb)
    surface = _new_surface("2d", ca, cb, settings, fingerprint)
    points = [((i, j), (float(a), float(b))) for i, b in enumerate(cb) for j, a in enumerate(ca)]
    evaluator = _PointEvaluator(objective, batched, bn_batches)
    _run_grid(
        surface,
        points,
        lambda a, b: objective.w0 + a * e1 + b * e2,
        evaluator,
        resume_path=resume_path,
        progress=progress,
    )
    return surface


def interpolation(
    model_a: nn.Module,
    model_b: nn.Module,
    data: Any,
    ts: Sequence[float],
    *,
    include_buffers: bool = False,
    bn_batches: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
    loss_fn: Callable | None = None,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
    param_filter: ParamFilter = "all",
    settings: dict[str, Any] | None = None,
    resume_path: str | None = None,
    batched: bool | None = None,
    distribute: str = "points",
    progress: bool = False,
) -> Surface:
    """L((1 - t) w_A + t w_B) and accuracy for t in ``ts`` (Goodfellow et al. 2015).

    ``data``: (inputs, targets) or batches, as for :class:`Objective`. Computed as
    (1 - t) w_A + t w_B, so t = 0 and t = 1 give w_A and w_B bit for bit. BatchNorm
    running statistics: model A's at every t by default (only the weights move, as the
    "weights" directions of Li et al.'s code; then the point t = 1 is w_B with A's
    statistics, not model B, for a network with BatchNorm); ``include_buffers``
    interpolates floating-point buffers with the same t (their "states"), so t = 1 is
    model B exactly; ``bn_batches`` recomputes them on training batches at every t
    (:class:`BatchNormRecalibrator`, as mode-connectivity papers do). Neither model is
    modified. ``distribute``: under torchrun, split the points ("points") or the
    examples ("examples") over the ranks (see DISTRIBUTE).
    """
    if include_buffers and bn_batches is not None:
        raise SharpscopeError("interpolate BatchNorm statistics or recalibrate them, not both")
    _check_distribute(distribute)
    obj = make_objective(
        model_a,
        data,
        loss_fn,
        batch_size=batch_size,
        device=device,
        param_filter=param_filter,
        distributed=False if distribute == "points" else None,
    )
    layout = obj.layout
    params_b = dict(model_b.named_parameters())
    _check_same_architecture(layout, params_b)
    wa = obj.w0
    wb = layout.flatten({n: params_b[n].detach() for n in layout.names}).to(wa)
    with model_fits_data():
        obj.value()  # the model takes the data (NaN far out along the line is a finding)
    ts = _coords(ts, "ts")
    buffers_at = None
    if include_buffers:
        bufs_a = {n: b.to(obj.device) for n, b in model_a.named_buffers()}
        bufs_b = dict(model_b.named_buffers())
        for n, b in bufs_a.items():
            if n not in bufs_b or bufs_b[n].shape != b.shape:
                raise SharpscopeError(f"the two models have different buffers ({n})")
        bufs_b = {n: bufs_b[n].to(bufs_a[n]) for n in bufs_a}

        def buffers_at(t: float) -> dict[str, torch.Tensor]:
            return {
                n: (1 - t) * b + t * bufs_b[n] if b.is_floating_point() else b
                for n, b in bufs_a.items()
            }

    bn = "interpolate" if include_buffers else ("recalibrate" if bn_batches else "A")
    surface = _new_surface(
        "interpolation",
        ts,
        None,
        {
            **(settings or {}),
            "include_buffers": include_buffers,
            "bn": bn,
            **_distribution(distribute),
        },
        _fingerprint(wa, wb, ts),
    )
    points = [((i,), (float(t),)) for i, t in enumerate(ts)]
    _run_grid(
        surface,
        points,
        lambda t: (1 - t) * wa + t * wb,
        _PointEvaluator(obj, batched, bn_batches),
        buffers_at=buffers_at,
        resume_path=resume_path,
        progress=progress,
    )
    return surface


def auto_range(
    objective: Objective,
    directions: Sequence[torch.Tensor],
    *,
    factor: float = AUTO_FACTOR,
    start: float = AUTO_START,
    max_doublings: int = AUTO_MAX_DOUBLINGS,
    batched: bool | None = None,
    bn_batches: Sequence[tuple[torch.Tensor, torch.Tensor]] | None = None,
) -> float:
    """The half-width r of a symmetric range whose edges reach ``factor`` x L(w).

    Doubles r from ``start`` until L(w +- r d) >= factor L(w) for every direction d and
    both signs (a NaN or infinite loss counts as reached), at most ``max_doublings``
    times, so the plot shows the basin and its walls whatever the scale of the
    directions. Evaluated as the surface will be (``batched``, ``bn_batches``).
    """
    evaluator = _PointEvaluator(objective, batched, bn_batches)
    centre = float(evaluator(objective.w0[None])[0][0])
    r = start
    for _ in range(max_doublings):
        edges = torch.stack(
            [objective.w0 + s * r * d.to(objective.w0) for d in directions for s in (-1.0, 1.0)]
        )
        losses = evaluator(edges)[0]
        losses = np.where(np.isnan(losses), np.inf, losses)
        if losses.min() >= factor * centre:
            break
        r *= 2
    return r


# --------------------------------------------------------------------------- from files

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


def _check_distribute(distribute: str) -> None:
    if distribute not in DISTRIBUTE:
        choices = ", ".join(DISTRIBUTE)
        raise SharpscopeError(f"distribute must be one of {choices}, got {distribute!r}")


def _distribution(distribute: str) -> dict[str, Any]:
    """How a surface was computed over processes (not part of what it is: a resumed run
    may use other ones)."""
    world = distributed.world_size()
    return {"processes": world, "distribute": distribute if world > 1 else None}


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
