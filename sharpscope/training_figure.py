"""The top Hessian eigenvalue (and sharpness) over training, with the learning rate's
stability threshold (Cohen et al. 2021, Fig. 1), from run folders trained with
``--track-every``: :func:`plot_training` and :func:`read_run`, exported by
:mod:`sharpscope.figures` with the other figures over seeds.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from matplotlib.figure import Figure

from .errors import SharpscopeError
from .figures import (
    BAND_ALPHA,
    _either,
    _examples,
    _figure,
    _finish,
    _groups,
    _number,
    _parse_json,
    _read_text,
    _style,
    legend_label,
)
from .plots import figure_format, paper_style
from .stats import summary
from .train_config import TrainConfig, config_from_dict, learning_rate, resolve_config

# Points at which a scheduled 2/η curve is drawn, at most: one per step up to this many.
THRESHOLD_POINTS = 20_000


@dataclass(frozen=True)
class TrainingRun:
    """What :func:`plot_training` reads of a run folder: its resolved configuration and
    the records of its metrics.jsonl (``{"kind": "epoch" | "track" | "final", ...}``)."""

    path: str
    config: TrainConfig
    records: tuple[dict[str, Any], ...]


def read_run(path: str | os.PathLike) -> TrainingRun:
    """A run folder's config.json and metrics.jsonl (``path`` is the folder or its
    metrics.jsonl)."""
    path = os.fspath(path)
    folder = os.path.dirname(path) if os.path.basename(path) == "metrics.jsonl" else path
    if not os.path.isdir(folder):
        if os.path.exists(folder):
            raise SharpscopeError(f"{path}: a file, not a run folder")
        raise SharpscopeError(f"{path}: no such run folder")
    metrics, config = (os.path.join(folder, n) for n in ("metrics.jsonl", "config.json"))
    for name in (metrics, config):
        if not os.path.isfile(name):
            raise SharpscopeError(
                f"{folder}: no {os.path.basename(name)}: not a sharpscope run folder"
            )
    what = "a run's metrics.jsonl"
    records = []
    for n, line in enumerate(_read_text(metrics, what).splitlines(), 1):
        if line.strip():
            record = _parse_json(line, f"{metrics} line {n}", "a JSON record")
            if not isinstance(record, dict):
                raise SharpscopeError(f"{metrics} line {n}: a record must be a JSON object")
            records.append(record)
    values = _parse_json(_read_text(config, "a run's config.json"), config, "a JSON file")
    c = resolve_config(config_from_dict(values, config))
    return TrainingRun(path=folder, config=c, records=tuple(records))


# -- 1. the top eigenvalue over training -----------------------------------------------
def stability_threshold(config: TrainConfig, lr: float | np.ndarray) -> tuple[Any, str]:
    """The largest Hessian eigenvalue at which ``config``'s optimizer is stable on a
    quadratic, at learning rate ``lr``, and its formula: 2/η for gradient descent,
    (2+2β)/η with heavy-ball momentum β (Cohen et al. 2021, who find full-batch training
    hovering there), (2+2β)/((1+2β)η) with Nesterov's. η = 0 gives infinity.

    Weight decay moves it down by the decay coefficient (negligible at the usual 5e-4)
    and is left out; SAM's own edge lies below gradient descent's (Long & Bartlett
    2023), and mini-batch SGD tends to stay below it (Cohen et al. 2021, Sec. 6)."""
    beta = float(config.momentum)
    lr = np.asarray(lr, dtype=float)
    with np.errstate(divide="ignore"):
        if beta == 0:
            value, formula = 2.0 / lr, "2/η"
        elif config.nesterov:
            value = (2 + 2 * beta) / ((1 + 2 * beta) * lr)
            formula = f"(2+2β)/((1+2β)η), β = {beta:g}"
        else:
            value, formula = (2 + 2 * beta) / lr, f"(2+2β)/η, β = {beta:g}"
    value = np.where(lr > 0, value, np.inf)
    return (float(value) if value.ndim == 0 else value), formula


def _steps_per_epoch(run: TrainingRun) -> int | None:
    """From the final record (its step and fractional epochs), else from the first
    epoch's record (epochs end at multiples of it; only the last can be partial, and a
    run with a final record is the one that could have ended in one)."""
    for record in run.records:
        if record.get("kind") == "final":
            step, epochs = record.get("step"), record.get("epochs")
            if isinstance(step, int) and isinstance(epochs, int | float) and epochs > 0:
                return max(round(step / epochs), 1)
    for record in run.records:
        if record.get("kind") == "epoch" and record.get("epoch") == 1:
            step = record.get("step")
            if isinstance(step, int) and not isinstance(step, bool) and step >= 1:
                return step
    return None


def _total_steps(run: TrainingRun) -> int | None:
    c = run.config
    if c.steps is not None:
        return c.steps
    per_epoch = _steps_per_epoch(run)
    if per_epoch is None or c.epochs is None:
        return None
    return c.epochs * per_epoch


@dataclass(frozen=True)
class _Tracked:
    """One run's tracking records, by step."""

    run: TrainingRun
    top: dict[int, float]
    sharpness: dict[int, float]
    rho: float | None
    samples: int | None


def _tracked(run: TrainingRun) -> _Tracked:
    top, sharp, rhos, samples = {}, {}, set(), set()
    for record in run.records:
        if record.get("kind") != "track":
            continue
        step = record.get("step")
        if isinstance(step, bool) or not isinstance(step, int) or step < 0:
            raise SharpscopeError(f"run {run.path}: a tracking record's step is {step!r}")
        top[step] = _number(record.get("hessian_top"), f"run {run.path}: hessian_top at {step}")
        if "sharpness" in record:
            sharp[step] = _number(record["sharpness"], f"run {run.path}: sharpness at {step}")
            rhos.add(_number(record.get("sharpness_rho"), f"run {run.path}: sharpness_rho"))
        if isinstance(record.get("track_samples"), int):
            samples.add(record["track_samples"])
    if not top:
        raise SharpscopeError(
            f"run {run.path} has no --track-every records (train it with --track-every N)"
        )
    if len(rhos) > 1:
        raise SharpscopeError(f"run {run.path}: sharpness tracked at several ρ ({_either(rhos)})")
    return _Tracked(
        run, top, sharp, next(iter(rhos), None), samples.pop() if len(samples) == 1 else None
    )


def _lr_key(run: TrainingRun, x: str) -> tuple:
    """What a run's threshold line depends on: runs with equal keys share one line."""
    c = run.config
    total = None if c.schedule == "constant" else _total_steps(run)
    per_epoch = _steps_per_epoch(run) if x == "epoch" else None
    return (c.lr, c.schedule, c.warmup, total, c.momentum, c.nesterov, per_epoch)


def _threshold_curve(run: TrainingRun, first: int, last: int) -> tuple[np.ndarray, np.ndarray]:
    """(steps, threshold) from step ``first`` to ``last``: the lr of step s is the one
    the step from the weights tracked at s takes (train.py tracks after s steps)."""
    c = run.config
    total = _total_steps(run)
    if total is None:
        if c.schedule != "constant":
            raise SharpscopeError(
                f"run {run.path}: the length of its {c.schedule} schedule is unknown (no "
                "epoch finished yet): its learning rate, and 2/η, cannot be computed"
            )
        total = last + 1
    if last - first + 1 <= THRESHOLD_POINTS:
        steps = np.arange(first, last + 1)
    else:
        steps = np.unique(np.linspace(first, last, THRESHOLD_POINTS).round().astype(int))
    lrs = np.array([learning_rate(c, int(s), total) for s in steps])
    return steps, stability_threshold(c, lrs)[0]


def plot_training(
    groups: Mapping[str, Sequence[str | os.PathLike | TrainingRun]],
    out: str | os.PathLike,
    *,
    x: str = "step",
    sharpness: bool | None = None,
    log: bool = False,
    columns: int = 1,
    title: str | None = None,
) -> Figure:
    """The top Hessian eigenvalue over training with the stability threshold 2/η
    (Cohen et al. 2021, Fig. 1), from run folders trained with ``--track-every``.

    ``groups``: label -> run folders (or :class:`TrainingRun`). Per group, the mean
    over its runs at the steps all of them tracked, with a band of ± one standard error
    (no band for one run). ``x``: "step" or "epoch". The threshold
    (:func:`stability_threshold`) is a dashed line at the lr of each step: straight for
    a constant lr, a curve under a schedule (it leaves the axes as a cosine lr falls to
    0); one black line when every group's runs share the schedule, else one per group in
    its color. ``sharpness``: a second panel with the tracked worst-case sharpness
    (``--track-sharpness``); None draws it when every run has it. ``log``: log y axes.
    """
    figure_format(out)
    if x not in ("step", "epoch"):
        raise SharpscopeError(f"x must be 'step' or 'epoch', got {x!r}")
    series = _series(_groups(groups, "a training figure"), x)
    every = [r for _, runs, _ in series for r in runs]
    if sharpness is None:
        sharpness = all(r.sharpness for r in every)
    if sharpness:
        _check_sharpness(every)
    per_epoch = _epoch_lengths(every) if x == "epoch" else {}
    with paper_style():
        fig, axes = _figure(columns, 2 if sharpness else 1)
        tops, lows = _draw_curves(axes, series, per_epoch, sharpness)
        tops += _draw_thresholds(axes[0], series, per_epoch, x)
        # Room for the data and the threshold at its lowest; a threshold rising with a
        # falling lr leaves the axes at the top.
        if log:
            axes[0].set_ylim(top=2.0 * max(tops))
        else:
            axes[0].set_ylim(min(0.0, min(lows)), 1.1 * max(tops))
        samples = {r.samples for r in every}
        where = _examples(["train"], [samples.pop()] if len(samples) == 1 else [])
        axes[0].set_ylabel(f"top Hessian eigenvalue\n({where})")
        if sharpness:
            axes[1].set_ylabel(f"worst-case sharpness\n(ρ = {every[0].rho:g}, l2, {where})")
        fig.align_ylabels(axes)
        axes[-1].set_xlabel(x)
        if columns == 2:
            for ax in axes:
                ax.set_xlabel(x)
        for ax in axes:
            if log:
                ax.set_yscale("log")
            ax.margins(x=0)
        axes[0].legend(frameon=False)
        _finish(fig, axes, out, title)
    return fig


def _series(pairs, x: str) -> list:
    """(label, tracked runs, the steps all of them tracked) per group."""
    series = []
    for label, items in pairs:
        runs = [
            _tracked(item if isinstance(item, TrainingRun) else read_run(item)) for item in items
        ]
        common = sorted(set.intersection(*(set(r.top) for r in runs)))
        if not common:
            raise SharpscopeError(
                f"group {label}: its runs share no tracked step (track them with the same "
                "--track-every)"
            )
        keys = {_lr_key(r.run, x) for r in runs}
        if len(keys) > 1:
            raise SharpscopeError(
                f"group {label}: its runs differ in learning rate, schedule, momentum or "
                "epoch length: their thresholds differ (put them in separate groups)"
            )
        series.append((label, runs, common))
    return series


def _check_sharpness(every: list) -> None:
    for r in every:
        if not r.sharpness:
            raise SharpscopeError(
                f"run {r.run.path} has no tracked sharpness (train it with --track-sharpness)"
            )
    rhos = {r.rho for r in every}
    if len(rhos) > 1:
        raise SharpscopeError(
            f"the runs tracked sharpness at different ρ ({_either(sorted(rhos))}): "
            "plot them separately"
        )


def _epoch_lengths(every: list) -> dict[str, int]:
    per_epoch = {}
    for r in every:
        per_epoch[r.run.path] = _steps_per_epoch(r.run)
        if per_epoch[r.run.path] is None:
            raise SharpscopeError(
                f"run {r.run.path} has no finished epoch, so its steps per epoch are "
                "unknown: plot it against steps"
            )
    return per_epoch


def _draw_curves(axes, series, per_epoch, sharpness: bool) -> tuple[list[float], list[float]]:
    """Each group's mean curve with its band; the highest and lowest values drawn on the
    eigenvalue panel."""
    tops, lows = [], []
    for i, (label, runs, common) in enumerate(series):
        scale = per_epoch.get(runs[0].run.path) or 1
        xs = np.asarray(common, dtype=float) / scale
        style = _style(i)
        panels = [(axes[0], "top")] + ([(axes[1], "sharpness")] if sharpness else [])
        for ax, what in panels:
            stats = [summary([getattr(r, what)[s] for r in runs]) for s in common]
            mean = np.array([s.mean for s in stats])
            ax.plot(xs, mean, label=legend_label(label, len(runs)), **style)
            if len(runs) > 1:
                se = np.array([s.stderr for s in stats])
                ax.fill_between(
                    xs, mean - se, mean + se, color=style["color"], alpha=BAND_ALPHA, lw=0
                )
                if what == "top":
                    tops.append(float((mean + se).max()))
                    lows.append(float((mean - se).min()))
            elif what == "top":
                tops.append(float(mean.max()))
                lows.append(float(mean.min()))
    return tops, lows


def _draw_thresholds(ax, series, per_epoch, x: str) -> list[float]:
    """The stability thresholds: one black line when every group shares the schedule,
    else one per group in its color; returns their lowest values."""
    shared = len({_lr_key(runs[0].run, x) for _, runs, _ in series}) == 1
    tops = []
    for i, (label, runs, common) in enumerate(series):
        if shared and i > 0:
            break
        run = runs[0].run
        scale = per_epoch.get(run.path) or 1
        first, last = (
            (min(c[0] for _, _, c in series), max(c[-1] for _, _, c in series))
            if shared
            else (common[0], common[-1])
        )
        steps, threshold = _threshold_curve(run, first, last)
        lowest = threshold[np.isfinite(threshold)]
        if lowest.size:
            tops.append(float(lowest.min()))
        _, formula = stability_threshold(run.config, 1.0)
        line = {
            "color": "k" if shared else _style(i)["color"],
            "linestyle": "--",
            "linewidth": 0.9,
            "label": formula + ("" if shared else f", {label}"),
        }
        c = run.config
        if c.schedule == "constant" and (c.warmup == 0 or first >= c.warmup):
            line["label"] += f" (η = {c.lr:g})"
            ax.axhline(stability_threshold(c, c.lr)[0], **line)
        else:
            line["label"] += f" (η: {c.lr:g}, {c.schedule}" + (
                f", {c.warmup} warmup steps)" if c.warmup else ")"
            )
            shown = np.where(np.isfinite(threshold), threshold, np.nan)
            ax.plot(steps / scale, shown, **line)
    return tops
