"""Evaluating a landscape: grid coordinates, points evaluated (batched with vmap, one at a
time, or with BatchNorm recalibrated), and the resumable, distributable grid runner.

Every point is evaluated at w + a d1 + b d2 computed afresh from the stored w (never by
accumulating steps, which drifts), through :class:`~sharpscope.objective.Objective`, so
the user's model is never written to.
"""

from __future__ import annotations

import copy
import math
import os
import time
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .batches import make_source, to_device
from .directions import _check_same_architecture
from .errors import SharpscopeError
from .objective import Objective, ParamFilter, make_objective, model_fits_data
from .surface import Surface, _fingerprint, _load_partial, _new_surface, save_partial

# The most grid points one surface may have (a 51 x 51 figure has 2,601): every point
# is at least one pass over the examples, and the grid's arrays are allocated up front.
MAX_GRID_POINTS = 10**6


# range="auto": double the half-width from AUTO_START until the loss at every edge is
# AUTO_FACTOR x the centre loss (our choice: one decade of loss, enough to show the
# basin's walls on a log color scale), at most AUTO_MAX_DOUBLINGS times (up to 256).
AUTO_FACTOR = 10.0


AUTO_START = 0.25


AUTO_MAX_DOUBLINGS = 10


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


# Under torchrun: "points" deals the grid points out to the ranks, each evaluating its
# points on all the examples (no communication per point; the default); "examples"
# evaluates every point on all ranks, each on its shard of the examples, sums
# all-reduced (for evaluation sets too large for one device).
DISTRIBUTE = ("points", "examples")


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


class BatchNormRecalibrator:
    """BatchNorm running statistics recomputed at given weights, on training batches.

    As ``torch.optim.swa_utils.update_bn`` (and the mode-connectivity papers that use
    it, e.g. Garipov et al. 2018): reset every BatchNorm's statistics, momentum None (a
    cumulative average of the batch statistics), one pass over ``batches`` in train
    mode. Done on one private copy of the model, never on the user's.
    """

    def __init__(self, objective: Objective, batches: Any):
        self.objective = objective
        self.model = copy.deepcopy(objective.model).to(objective.device)
        self.norms = [
            m for m in self.model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)
        ]
        # The training batches: data in any form an Objective takes, passed over with
        # the objective's own loss form (the loss itself is not used).
        self.source = make_source(batches, objective.source_batch_size, objective.examples_in)
        if self.source.examples == 0 or self.source.n_batches == 0:
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
            for batch in self.source:
                self.objective.batch_terms(self.model, to_device(batch, self.objective.device))
        return {n: b.detach().clone() for n, b in self.model.named_buffers()}


class PointEvaluator:
    """Evaluates stacked weight vectors the way one surface asked: ``chunk`` points per
    forward pass with vmap (:meth:`Objective.evaluate_many`), one at a time
    (:meth:`Objective.evaluate`), or with BatchNorm recalibrated at every point.

    ``batched``: True asks for vmap (and lets its failure show), False for one point at
    a time; None picks (see :func:`_use_vmap`) and falls back to one point at a time,
    for good, the first time a model cannot be vmapped.
    """

    def __init__(
        self,
        objective: Objective,
        batched: bool | None = None,
        bn_batches: Any = None,
        chunk: int = VMAP_CHUNK,
    ):
        self.objective = objective
        self.recalibrate = (
            BatchNormRecalibrator(objective, bn_batches) if bn_batches is not None else None
        )
        self.batched = batched
        self.vmap = self.recalibrate is None and _use_vmap(objective, batched)
        self.vmap_chunk = chunk

    @property
    def chunk(self) -> int:
        """Points evaluated together."""
        return self.vmap_chunk if self.vmap else 1

    @property
    def description(self) -> str:
        if self.recalibrate is not None:
            return "one point at a time, BatchNorm recalibrated"
        return f"vmap, {self.vmap_chunk} points per pass" if self.vmap else "one point at a time"

    def __call__(
        self, W: torch.Tensor, buffers: dict[str, torch.Tensor] | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Loss and accuracy (float64 arrays (P,)) at the rows of W (P, numel); ``buffers``
        override the model's buffers at every point."""
        if self.vmap:
            try:
                loss, accuracy = self.objective.evaluate_many(W, buffers, self.vmap_chunk)
                return loss.numpy(), accuracy.numpy()
            except (torch.OutOfMemoryError, torch.distributed.DistBackendError):
                raise
            except (RuntimeError, NotImplementedError):
                if self.batched:  # asked for explicitly: let the reason show
                    raise
                self.vmap = False  # a model vmap cannot take: one at a time from now on
        results = [
            self.objective.evaluate(w, self.recalibrate(w) if self.recalibrate else buffers)
            for w in W
        ]
        accuracy = [math.nan if r["accuracy"] is None else r["accuracy"] for r in results]
        return np.array([r["loss"] for r in results]), np.array(accuracy, dtype=np.float64)


def evaluate_points(
    objective: Objective,
    weights: torch.Tensor,
    *,
    batched: bool | None = None,
    chunk: int = VMAP_CHUNK,
    buffers: dict[str, torch.Tensor] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Loss and accuracy at each row of ``weights`` (P, numel): two float64 arrays (P,),
    evaluated as :class:`PointEvaluator` does (``batched``, ``chunk``); ``buffers``
    override the model's buffers at every point. Both paths evaluate in eval mode and
    never write to the model."""
    return PointEvaluator(objective, batched, chunk=chunk)(weights, buffers)


def _check_distribute(distribute: str) -> None:
    if distribute not in DISTRIBUTE:
        choices = ", ".join(DISTRIBUTE)
        raise SharpscopeError(f"distribute must be one of {choices}, got {distribute!r}")


def _distribution(distribute: str) -> dict[str, Any]:
    """How a surface was computed over processes (not part of what it is: a resumed run
    may use other ones)."""
    world = distributed.world_size()
    return {"processes": world, "distribute": distribute if world > 1 else None}


def _run_grid(
    surface: Surface,
    points: list[tuple[tuple[int, ...], tuple[float, ...]]],
    weight_at: Callable[..., torch.Tensor],
    evaluator: PointEvaluator,
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

    rounds = _rounds(todo, step, evaluate, done.shape, evaluator.objective.device, split)
    try:
        for finished in rounds:
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


def _rounds(todo: list, step: int, evaluate: Callable, shape, device, split: bool):
    """Lists of (index, loss, accuracy) finished together, the same on every rank.

    Without ``split`` (one process, or every rank evaluating every point on its shard of
    the examples) each chunk of ``step`` points is a round. With it, the points are dealt
    out round-robin, each rank evaluating its own on all the examples; after every round
    of SPLIT_ROUND_CHUNKS chunks per rank the results are summed over the ranks (each
    point has one owner, the others add exact zeros), so rank 0 saves and shows what all
    have done.
    """
    if not split:
        for start in range(0, len(todo), step):
            chunk = todo[start : start + step]
            loss, acc = evaluate(chunk)
            yield [(p[0], lv, av) for p, lv, av in zip(chunk, loss, acc, strict=True)]
        return
    size = math.prod(shape)
    mine = todo[distributed.rank() :: distributed.world_size()]
    per_round = step * SPLIT_ROUND_CHUNKS
    longest = -(-len(todo) // distributed.world_size())
    for start in range(0, longest, per_round):
        part = mine[start : start + per_round]
        table = torch.zeros(3, size, dtype=torch.float64)
        for c in range(0, len(part), step):
            chunk = part[c : c + step]
            flat = [np.ravel_multi_index(idx, shape) for idx, _ in chunk]
            loss, acc = evaluate(chunk)
            table[0, flat] = torch.from_numpy(np.asarray(loss, dtype=np.float64))
            table[1, flat] = torch.from_numpy(np.asarray(acc, dtype=np.float64))
            table[2, flat] = 1.0
        table = table.to(device)  # NCCL sums CUDA tensors only
        distributed.all_reduce_sum_([table])
        table = table.cpu().numpy()
        yield [
            (np.unravel_index(f, shape), table[0, f], table[1, f]) for f in np.flatnonzero(table[2])
        ]


def _coords(values: Sequence[float], name: str) -> np.ndarray:
    out = np.asarray(values, dtype=np.float64).reshape(-1)
    if len(out) == 0:
        raise SharpscopeError(f"{name}: a landscape needs at least 1 point")
    if not np.isfinite(out).all():
        raise SharpscopeError(f"{name}: coordinates must be finite")
    return out


def _require_objective(objective: Any, name: str) -> None:
    if not isinstance(objective, Objective):
        raise SharpscopeError(
            f"{name} takes an Objective (with its directions); for a model and its data "
            "call sharpscope.landscape(model, data, dim=...)"
        )


def surface_1d(
    objective: Objective,
    direction: torch.Tensor,
    coords: Sequence[float],
    *,
    settings: dict[str, Any] | None = None,
    resume_path: str | None = None,
    batched: bool | None = None,
    bn_batches: Any = None,
    progress: bool = False,
) -> Surface:
    """L(w + a d) and accuracy for a in ``coords`` (nx,), w = ``objective.w0``.

    ``direction`` is flat (numel,). ``batched``: see :func:`evaluate_points`.
    ``bn_batches``: training batches (x, y) on which BatchNorm statistics are
    recomputed at every point (:class:`BatchNormRecalibrator`); None keeps the model's
    running statistics (eval mode). ``resume_path``: see :func:`surface_2d`.
    """
    _require_objective(objective, "surface_1d")
    ca = _coords(coords, "coords")
    d = direction.to(objective.w0)
    surface = _new_surface("1d", ca, None, settings, _fingerprint(objective.w0, d, ca))
    points = [((i,), (float(a),)) for i, a in enumerate(ca)]
    evaluator = PointEvaluator(objective, batched, bn_batches)
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
    bn_batches: Any = None,
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
    _require_objective(objective, "surface_2d")
    ca, cb = _coords(coords_a, "coords_a"), _coords(coords_b, "coords_b")
    e1, e2 = d1.to(objective.w0), d2.to(objective.w0)
    fingerprint = _fingerprint(objective.w0, e1, e2, ca, cb)
    surface = _new_surface("2d", ca, cb, settings, fingerprint)
    points = [((i, j), (float(a), float(b))) for i, b in enumerate(cb) for j, a in enumerate(ca)]
    evaluator = PointEvaluator(objective, batched, bn_batches)
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
    bn_batches: Any = None,
    loss_fn: Callable | None = None,
    batch_loss: Callable | None = None,
    examples_in: Callable | None = None,
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

    ``data``, ``loss_fn`` / ``batch_loss``, ``examples_in``: as for :class:`Objective`
    (any batches, a DataLoader). Computed as
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
        batch_loss=batch_loss,
        examples_in=examples_in,
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
        PointEvaluator(obj, batched, bn_batches),
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
    bn_batches: Any = None,
) -> float:
    """The half-width r of a symmetric range whose edges reach ``factor`` x L(w).

    Doubles r from ``start`` until L(w +- r d) >= factor L(w) for every direction d and
    both signs (a NaN or infinite loss counts as reached), at most ``max_doublings``
    times, so the plot shows the basin and its walls whatever the scale of the
    directions. Evaluated as the surface will be (``batched``, ``bn_batches``).
    """
    evaluator = PointEvaluator(objective, batched, bn_batches)
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
