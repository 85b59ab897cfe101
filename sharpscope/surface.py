"""Surfaces: the result of a landscape, its ``.npz`` file and its partial file.

A :class:`Surface` holds coordinates, loss and accuracy on a grid (NaN = not computed
yet) and the settings that produced it. It is saved as an ``.npz`` readable with
``allow_pickle=False``; :func:`load_surface` checks every array and setting of a file
before use (files may come from anyone). An unfinished grid is saved as a partial file
(the surface plus a ``done`` mask) that a later run with the same settings, weights and
directions continues.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from .errors import SharpscopeError, first_line
from .files import atomic_write, npz_headers, open_npz
from .stats import summary

KINDS = ("1d", "2d", "interpolation")


LAYOUT_2D = "rows = d2 (coords_b), columns = d1 (coords_a)"


# Settings that may differ between an interrupted run and the one that resumes it.
_RESUME_IGNORED = ("label", "labels", "evaluation", "processes", "distribute")


class PartialMismatch(SharpscopeError):
    """A partial file to resume from was computed with other settings, weights or
    directions than the run that would continue it."""


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


def landscape_summary(surface: Surface) -> dict[str, float]:
    """Plain numbers from a 1-D or 2-D surface: L at the centre (a = b = 0), the mean
    and the maximum of L over the plotted range, the mean rise above the centre (an
    average-case sharpness over the drawn directions' box, without Monte Carlo) and the
    maximum rise (the worst point of the box).

    The mean is the average over the range by the trapezoidal rule (end points weighted
    by half, on each axis), so a coarse grid and a fine one estimate the same average: a
    plain mean of the points overweights the edges, where the loss is highest, the more
    the coarser the grid. Points not computed (NaN) are left out."""
    loss = np.asarray(surface.loss, dtype=float)
    weights = _trapezoid_weights(surface.coords_a)
    if surface.kind == "2d":
        centre_index = (
            int(np.argmin(np.abs(surface.coords_b))),
            int(np.argmin(np.abs(surface.coords_a))),
        )
        weights = np.outer(_trapezoid_weights(surface.coords_b), weights)
    else:
        centre_index = (int(np.argmin(np.abs(surface.coords_a))),)
    centre = float(loss[centre_index])
    finite = np.isfinite(loss)
    mean = float((weights[finite] * loss[finite]).sum() / weights[finite].sum())
    top = float(loss[finite].max())
    return {
        "centre_loss": centre,
        "mean_loss": mean,
        "max_loss": top,
        "mean_rise": mean - centre,
        "max_rise": top - centre,
    }


def _trapezoid_weights(coords: Any) -> np.ndarray:
    """The trapezoidal rule's weight of each point of a sorted 1-D grid (half the
    distance between its neighbours; one point alone weighs 1)."""
    x = np.asarray(coords, dtype=float)
    if x.size < 2:
        return np.ones(x.size)
    gaps = np.diff(x)
    return np.concatenate([[gaps[0]], gaps[:-1] + gaps[1:], [gaps[-1]]]) / 2


# The numbers of a landscape that vary with its directions, summarized over draws, and
# their names in tables.
DRAW_SUMMARIES = {"mean_rise": "mean rise", "max_rise": "max rise"}


def summarize_draws(surfaces: Sequence[Surface]) -> dict[str, Any]:
    """The mean rise and the maximum rise of surfaces that differ only in their direction
    draw (``draw`` 0, 1, ... of one seed, same grid and examples): for each, every draw's
    value and their mean ± standard error over the draws (:func:`~sharpscope.stats.summary`;
    no standard error from one draw). The spread says how much one picture's flatness
    owes to its directions."""
    if not surfaces:
        raise SharpscopeError("no surfaces to summarize")
    kinds = {s.kind for s in surfaces}
    if len(kinds) != 1 or kinds & {"interpolation"}:
        raise SharpscopeError("summarize_draws takes 1-D or 2-D surfaces of one kind")
    shapes = {np.shape(s.loss) for s in surfaces}
    if len(shapes) != 1:
        raise SharpscopeError("the surfaces of the draws must share one grid")
    rows = [landscape_summary(s) for s in surfaces]
    result: dict[str, Any] = {"kind": surfaces[0].kind, "draws": len(surfaces)}
    for name in DRAW_SUMMARIES:
        values = [r[name] for r in rows]
        result[name] = {"values": values, **summary(values).to_dict()}
    return result


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
    loaded = open_npz(path, "a sharpscope landscape file")
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
    """The bytes the arrays of ``f`` would take, from the .npy headers of all its members."""
    return sum(math.prod(shape) * dtype.itemsize for _, shape, dtype in npz_headers(f))


def _is_real(a: Any) -> bool:
    """A numpy array of real numbers (floats or integers; not bool, complex or text)."""
    return isinstance(a, np.ndarray) and a.dtype.kind in "fiu"


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
        raise PartialMismatch(
            f"{path}: a partial landscape computed with other settings ({what}); "
            "delete it to start over"
        )
    return saved.loss, saved.accuracy, done


def save_partial(surface: Surface, done: np.ndarray, path: str) -> None:
    _write_npz(path, {**surface._arrays(), "done": done})
