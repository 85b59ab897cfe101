"""Compare two minima, numbers and pictures, in one folder; and the SGD-vs-SAM demo.

:func:`compare_checkpoints` writes, for checkpoints A and B of one architecture:

- the ``measure`` table of both (loss, accuracy, worst-case sharpness, top Hessian
  eigenvalue, Hessian trace), so the flatness seen in the figures comes with numbers;
- the interpolation L((1 - t) w_A + t w_B) (Goodfellow et al. 2015) and its barrier;
- 1-D curves along one random direction, overlaid, and 2-D surfaces side by side: the
  same raw Gaussian directions (same seed) for both models, each filter-normalized
  against its own model's filters (Li et al. 2018, Sec. 4), so the two pictures differ
  only by the minima;
- every surface as ``.npz``, every figure as PDF and PNG, ``results.json`` with every
  number and its settings, and ``report.md`` embedding the PNG figures and the table.

:func:`demo` trains SGD and SAM with the same seed and budget and compares them.
"""

from __future__ import annotations

import contextlib
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from typing import Any

import numpy as np
import torch

from .checkpoint import check_trusted_model, read_checkpoint
from .errors import SharpscopeError
from .files import (
    LOCK_NAME,
    exclusive_lock,
    json_safe,
    remove_stale_temporaries,
    write_json,
    write_text,
)
from .landscape import (
    DEFAULT_POINTS,
    DEFAULT_RANGE,
    INTERPOLATION_RANGE,
    interpolation_for_checkpoints,
    landscape_for_checkpoint,
)
from .measure import format_table, measure_checkpoint
from .plots import plot_1d, plot_2d, shared_color_scale
from .surface import Surface

# Defaults, each with its source.
DEFAULT_SAMPLES = 1024  # measure's evaluation set: 1024 fixed examples (or all if fewer)
DEFAULT_TRACE_SAMPLES = 100  # PyHessian's Hutchinson budget (maxIter=100)
FIGURE_FORMATS = ("pdf", "png")  # vector for the paper, PNG for report.md
FIGURES = ("interpolation", "1d", "2d_contour", "2d_surface3d")
# --quick: a smoke run (CI, a first look) in seconds: coarse grids, few examples.
QUICK = {"points": 21, "points_2d": 21, "samples": 256, "trace_samples": 20}


def compare_checkpoints(
    path_a: str,
    path_b: str,
    out: str,
    *,
    labels: tuple[str, str] | None = None,
    points: int = DEFAULT_POINTS,
    points_2d: int = DEFAULT_POINTS,
    range: tuple[float, float] = DEFAULT_RANGE,  # noqa: A002 - the CLI's name
    interpolation_range: tuple[float, float] = INTERPOLATION_RANGE,
    directions: str = "filter",
    split: str = "train",
    samples: int | None = DEFAULT_SAMPLES,
    batch_size: int = 512,
    seed: int = 0,
    measure: bool = True,
    trace_samples: int = DEFAULT_TRACE_SAMPLES,
    device: torch.device | str = "cpu",
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    training: dict[str, Any] | None = None,
    overwrite: bool = False,
    model: str | None = None,
    model_options: dict[str, Any] | None = None,
    data: str | None = None,
    data_dir: str | None = None,
    download: bool = False,
    trust_code: bool = False,
) -> dict[str, Any]:
    """Measure and picture checkpoints ``path_a`` and ``path_b``; write it all to ``out``.

    ``points``: 1-D and interpolation points; ``points_2d``: points per axis of the 2-D
    grids (Li et al. 2018 use 51 x 51 on [-1, 1]^2). Every landscape and measurement
    uses the same ``samples`` examples of ``split`` (drawn from ``seed``), and the
    random directions are drawn from ``seed`` for both models. ``out`` is created (with
    its parents) if missing. ``training`` (how the two were trained, as :func:`demo`
    records it) is added to the report and the JSON. Returns the ``results.json``
    document.

    Everything is checked before any work (settings, both checkpoints, same
    architecture, ``out`` empty or ``overwrite``), and the files are written to a
    staging folder inside ``out`` and moved into place only when all are done: a
    failed or interrupted compare leaves ``out`` as it was; no file written can be one
    of the two checkpoints, and one process at a time writes ``out`` (a lock). ``model``,
    ``model_options``, ``data``, ``data_dir``, ``download`` and ``trust_code`` rebuild
    the checkpoints (:func:`~sharpscope.checkpoint.load_model_and_data`).
    """
    _check_settings(
        points=points,
        points_2d=points_2d,
        samples=samples,
        batch_size=batch_size,
        trace_samples=trace_samples,
        range=range,
        interpolation_range=interpolation_range,
    )
    loading = {
        "model": model,
        "model_options": model_options,
        "data": data,
        "data_dir": data_dir,
        "download": download,
        "trust_code": trust_code,
    }
    _check_inputs(path_a, path_b, out, model, trust_code)
    with _staging_folder(out, overwrite) as stage:
        say = log or (lambda message: None)
        evaluation = {
            "split": split,
            "samples": samples,
            "batch_size": batch_size,
            "seed": seed,
            "device": str(device),
        }
        seconds: dict[str, float] = {}
        document: dict[str, Any] = {
            "command": "compare",
            "checkpoints": [str(path_a), str(path_b)],
            "settings": {
                **evaluation,
                "points": points,
                "points_2d": points_2d,
                "range": list(range),
                "interpolation_range": list(interpolation_range),
                "directions": directions,
                "trace_samples": trace_samples,
            },
        }

        # The interpolation first: it checks the architectures match, and names the models.
        say("interpolation A -> B")
        start = time.perf_counter()
        interp = interpolation_for_checkpoints(
            path_a,
            path_b,
            points=points,
            range=interpolation_range,
            split=split,
            samples=samples,
            batch_size=batch_size,
            device=device,
            seed=seed,
            labels=labels,
            progress=progress,
            **loading,
        )
        seconds["interpolation"] = time.perf_counter() - start
        labels = tuple(interp.settings["labels"])  # type: ignore[assignment]
        if labels[0] == labels[1]:
            labels = (f"{labels[0]} (A)", f"{labels[1]} (B)")
            interp.settings["labels"] = list(labels)
        document["labels"] = list(labels)
        interp.save(os.path.join(stage, "interpolation.npz"))

        measured: list[dict[str, Any]] = []
        if measure:
            start = time.perf_counter()
            for path, label in zip((path_a, path_b), labels, strict=True):
                say(f"measure {label}")
                measured.append(
                    measure_checkpoint(
                        path,
                        device=device,
                        split=split,
                        samples=samples,
                        batch_size=batch_size,
                        trace_samples=trace_samples,
                        seed=seed,
                        progress=progress,
                        **loading,
                    )
                )
            seconds["measure"] = time.perf_counter() - start
        document["measure"] = measured

        curves: list[Surface] = []
        planes: list[Surface] = []
        for dim, store, n in ((1, curves, points), (2, planes, points_2d)):
            start = time.perf_counter()
            for path, label, key in zip((path_a, path_b), labels, "ab", strict=True):
                say(f"{dim}-D landscape of {label} ({n} points{' per axis' if dim == 2 else ''})")
                surface = landscape_for_checkpoint(
                    path,
                    dim=dim,
                    points=n,
                    range=range,
                    directions=directions,
                    seed=seed,  # the same raw directions (and examples) for both models
                    split=split,
                    samples=samples,
                    batch_size=batch_size,
                    device=device,
                    label=label,
                    progress=progress,
                    **loading,
                )
                surface.save(os.path.join(stage, f"{dim}d_{key}.npz"))
                store.append(surface)
            seconds[f"{dim}d"] = time.perf_counter() - start

        say("figures")
        start = time.perf_counter()
        figures, logs = _draw_figures(stage, interp, curves, planes, labels)
        seconds["figures"] = time.perf_counter() - start
        scale = shared_color_scale([s.loss for s in planes])
        document.update(
            {
                "interpolation": {
                    "file": "interpolation.npz",
                    **_curve_dict(interp),
                    "barrier": interpolation_barrier(interp),
                },
                "1d": [
                    {"label": s.settings["label"], "file": f"1d_{k}.npz", **_curve_dict(s)}
                    for s, k in zip(curves, "ab", strict=True)
                ],
                "2d": [
                    {"label": s.settings["label"], "file": f"2d_{k}.npz", **_plane_dict(s)}
                    for s, k in zip(planes, "ab", strict=True)
                ],
                "color_scale": scale.to_dict(),
                "1d_log": logs["1d"],
                "interpolation_log": logs["interpolation"],
                "figures": figures,
                "seconds": seconds,
            }
        )
        if training is not None:
            document["training"] = training
        _write_report(stage, document, measured, labels)
        write_json(os.path.join(stage, "results.json"), json_safe(document))
        _move_into_place(stage, out, (path_a, path_b))
    return document


def _check_settings(
    *,
    points: int = DEFAULT_POINTS,
    points_2d: int = DEFAULT_POINTS,
    samples: int | None = DEFAULT_SAMPLES,
    batch_size: int = 512,
    trace_samples: int = DEFAULT_TRACE_SAMPLES,
    range: tuple[float, float] = DEFAULT_RANGE,  # noqa: A002 - the CLI's name
    interpolation_range: tuple[float, float] = INTERPOLATION_RANGE,
    **others: Any,
) -> None:
    """The refusals of :func:`compare_checkpoints`'s settings (``others`` need none)."""
    for name, value in (("--range", range), ("--interpolation-range", interpolation_range)):
        low, high = (float(v) for v in value)
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise SharpscopeError(f"{name}: need finite LOW < HIGH, got {low:g} {high:g}")
    if points < 2 or points_2d < 2:
        raise SharpscopeError("--points and --points-2d must be at least 2")
    if samples is not None and samples <= 0:
        raise SharpscopeError(f"--samples must be positive, got {samples}")
    if batch_size < 1:
        raise SharpscopeError(f"--batch-size must be positive, got {batch_size}")
    if trace_samples < 2:
        raise SharpscopeError(f"--trace-samples must be at least 2, got {trace_samples}")


def _check_inputs(path_a: str, path_b: str, out: str, model: str | None, trust_code: bool):
    """The refusals of the two checkpoints and the output folder, before any work."""
    if not str(out).strip():
        raise SharpscopeError("the output folder is empty: give one")
    if os.path.exists(out) and not os.path.isdir(out):
        raise SharpscopeError(f"{out} exists and is not a folder")
    specs = []
    for path in (path_a, path_b):
        meta = read_checkpoint(path)  # missing, foreign or unsafe files: one clear line
        if "model" not in meta:
            raise SharpscopeError(
                f"{path}: a plain state_dict; compare needs sharpscope checkpoints"
            )
        check_trusted_model(meta["model"]["name"], path, named=model, trust_code=trust_code)
        specs.append(meta["model"])
        for name in OUTPUTS:
            if _same_file(path, os.path.join(out, name)):
                raise SharpscopeError(
                    f"{path} is where compare writes {name}: move it, or choose another --out"
                )
    if specs[0] != specs[1]:
        raise SharpscopeError(
            f"{path_a} and {path_b} have different architectures: nothing to compare"
        )


# Every file compare writes into its folder.
OUTPUTS = (
    "interpolation.npz",
    "1d_a.npz",
    "1d_b.npz",
    "2d_a.npz",
    "2d_b.npz",
    "results.json",
    "report.md",
    *(f"{name}.{fmt}" for name in FIGURES for fmt in FIGURE_FORMATS),
)


def _same_file(a: str, b: str) -> bool:
    """Whether paths ``a`` and ``b`` name one file (through links and ``..`` too)."""
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


@contextlib.contextmanager
def _staging_folder(out: str, overwrite: bool) -> Iterator[str]:
    """A staging folder inside ``out``, with ``out`` created and locked meanwhile.

    ``out`` must be empty unless ``overwrite`` (a staging folder or temporary file a
    killed compare left does not count, and is removed once that is checked). On the
    way out the staging folder goes, and ``out`` too if this call made it and nothing
    was moved in.
    """
    existed = os.path.isdir(out)
    _make_folder(out)
    try:
        with exclusive_lock(os.path.join(out, LOCK_NAME), out):
            stale = [n for n in os.listdir(out) if _STAGE.match(n) and _only_outputs(out, n)]
            if set(os.listdir(out)) - {LOCK_NAME, *stale} and not overwrite:
                raise SharpscopeError(
                    f"{out} exists and is not empty: pass --overwrite or a new --out"
                )
            for name in stale:
                shutil.rmtree(os.path.join(out, name))
            for name in OUTPUTS:
                remove_stale_temporaries(os.path.join(out, name))
            stage = tempfile.mkdtemp(prefix=".compare-", dir=out)
            try:
                yield stage
            finally:
                shutil.rmtree(stage, ignore_errors=True)
    finally:
        if not existed and os.path.isdir(out) and not os.listdir(out):
            os.rmdir(out)


_STAGE = re.compile(r"^\.compare-[a-z0-9_]{8}$")  # tempfile.mkdtemp's names


def _only_outputs(out: str, name: str) -> bool:
    """Whether folder ``name`` of ``out`` holds nothing but compare's outputs (and their
    temporary files): a staging folder of a killed compare, not someone's own."""
    folder = os.path.join(out, name)
    return os.path.isdir(folder) and all(
        entry in OUTPUTS or any(entry.startswith(f".tmp-{o}-") for o in OUTPUTS)
        for entry in os.listdir(folder)
    )


def _move_into_place(stage: str, out: str, inputs: Sequence[str]) -> None:
    """Move every staged file into ``out``, after checking that none replaces an input."""
    names = sorted(os.listdir(stage))
    for name in names:
        for path in inputs:
            if _same_file(path, os.path.join(out, name)):
                raise SharpscopeError(f"{path} is where compare writes {name}: nothing written")
    for name in names:
        os.replace(os.path.join(stage, name), os.path.join(out, name))


def interpolation_barrier(surface: Surface) -> dict[str, float]:
    """The loss barrier on t in [0, 1]: max_t L(t) - ((1 - t) L(0) + t L(1)).

    The definition of Frankle et al. (2020, "Linear Mode Connectivity and the Lottery
    Ticket Hypothesis", Sec. 2) with loss for error; 0 when the straight path never
    rises above the chord between the two minima. Also the t where it is reached.
    """
    t = np.asarray(surface.coords_a, dtype=float)
    loss = np.asarray(surface.loss, dtype=float)
    inside = (t >= 0) & (t <= 1) & np.isfinite(loss)
    at0, at1 = np.flatnonzero(t == 0.0), np.flatnonzero(t == 1.0)
    if not inside.any() or not len(at0) or not len(at1):
        return {"value": math.nan, "t": math.nan}
    l0, l1 = loss[at0[0]], loss[at1[0]]
    excess = loss[inside] - ((1 - t[inside]) * l0 + t[inside] * l1)
    i = int(np.argmax(excess))
    return {"value": float(max(excess[i], 0.0)), "t": float(t[inside][i])}


def landscape_summary(surface: Surface) -> dict[str, float]:
    """Plain numbers from a 1-D or 2-D surface: L at the centre (a = b = 0), the mean
    and the maximum of L over the plotted range, and the mean rise above the centre
    (a Monte Carlo-free average-case sharpness over the drawn directions' box)."""
    loss = np.asarray(surface.loss, dtype=float)
    centre_index = (
        (int(np.argmin(np.abs(surface.coords_b))), int(np.argmin(np.abs(surface.coords_a))))
        if surface.kind == "2d"
        else (int(np.argmin(np.abs(surface.coords_a))),)
    )
    centre = float(loss[centre_index])
    finite = loss[np.isfinite(loss)]
    return {
        "centre_loss": centre,
        "mean_loss": float(finite.mean()),
        "max_loss": float(finite.max()),
        "mean_rise": float(finite.mean() - centre),
    }


# -- figures and report --------------------------------------------------------------
def _draw_figures(
    out: str,
    interp: Surface,
    curves: Sequence[Surface],
    planes: Sequence[Surface],
    labels: tuple[str, str],
) -> tuple[dict[str, list[str]], dict[str, bool]]:
    """Every figure as PDF and PNG; returns {name: [file, ...]} and which curves were
    drawn on a log axis."""
    # Curves on a log axis when the loss spans two decades, the rule of the 2-D levels.
    log_1d = shared_color_scale([c.loss for c in curves]).log
    log_interp = shared_color_scale([interp.loss]).log
    figures: dict[str, list[str]] = {}
    draws = (
        lambda f: plot_1d([interp], f, log=log_interp, endpoints=labels),
        lambda f: plot_1d(curves, f, labels=list(labels), log=log_1d),
        lambda f: plot_2d(planes, f, style="contour", labels=list(labels)),
        lambda f: plot_2d(planes, f, style="surface3d", labels=list(labels)),
    )
    for name, draw in zip(FIGURES, draws, strict=True):
        figures[name] = []
        for fmt in FIGURE_FORMATS:
            draw(os.path.join(out, f"{name}.{fmt}"))
            figures[name].append(f"{name}.{fmt}")
    return figures, {"1d": log_1d, "interpolation": log_interp}


def _write_report(
    out: str, doc: dict[str, Any], measured: list[dict[str, Any]], labels: tuple[str, str]
) -> None:
    s = doc["settings"]
    a, b = labels
    n_examples = doc["1d"][0]["settings"]["n_examples"]
    grid = doc["2d"][0]["settings"]["points"]
    lines = [
        f"# {a} vs {b}: sharpness and loss landscapes",
        "",
        f"- A = {a}: `{doc['checkpoints'][0]}`",
        f"- B = {b}: `{doc['checkpoints'][1]}`",
        f"- every number and surface on the same {n_examples} {s['split']} examples "
        f"(seed {s['seed']}); random directions drawn from seed {s['seed']} for both models, "
        f"each {s['directions']}-normalized against its own model (Li et al. 2018)",
        "",
    ]
    if "training" in doc:
        lines += ["## Training", ""]
        for label, run in zip(labels, doc["training"].values(), strict=True):
            m = run["metrics"]
            lines.append(
                f"- {label}: `{run['command']}` ({run['seconds']:.0f} s): train loss "
                f"{m['train_eval_loss']:.4g}, test accuracy {m['test_accuracy']:.2%}"
            )
        lines.append("")
    if measured:
        lines += ["## Measurements", "", "```", format_table(measured, list(labels)), "```", ""]
    rows = [
        ("loss at the minimum", "centre_loss", "1d"),
        ("1-D: mean loss rise over the range", "mean_rise", "1d"),
        ("1-D: max loss over the range", "max_loss", "1d"),
        ("2-D: mean loss rise over the plane", "mean_rise", "2d"),
        ("2-D: max loss over the plane", "max_loss", "2d"),
    ]
    lines += ["## Landscape numbers", "", f"| | {a} | {b} |", "| --- | ---: | ---: |"]
    for name, key, dim in rows:
        values = [f"{entry['summary'][key]:.4g}" for entry in doc[dim]]
        lines.append(f"| {name} | {values[0]} | {values[1]} |")
    barrier = doc["interpolation"]["barrier"]
    lines += [
        "",
        f"Interpolation barrier A → B (max over t in [0, 1] of L(t) minus the chord; "
        f"Frankle et al. 2020): {barrier['value']:.4g} at t = {barrier['t']:.3g}.",
        "",
        "## Interpolation",
        "",
        "![interpolation](interpolation.png)",
        "",
        f"L((1 - t) w_A + t w_B) for t in [{s['interpolation_range'][0]:g}, "
        f"{s['interpolation_range'][1]:g}], {s['points']} points (Goodfellow et al. 2015).",
        "",
        "## One random direction",
        "",
        "![1-D](1d.png)",
        "",
        f"L(w + α d) for α in [{s['range'][0]:g}, {s['range'][1]:g}], {s['points']} points; "
        "d a Gaussian direction drawn from the same seed for both models and normalized "
        "against each model's own filters.",
        "",
        "## Two random directions",
        "",
        "![2-D contours](2d_contour.png)",
        "",
        "![2-D surfaces](2d_surface3d.png)",
        "",
        f"L(w + α d1 + β d2) on a {grid[0]} x {grid[1]} grid over "
        f"[{s['range'][0]:g}, {s['range'][1]:g}]^2; both panels share one color scale and "
        "one set of contour levels"
        + (" (log-spaced)" if doc["color_scale"]["log"] else "")
        + ". The white + marks the minimum.",
    ]
    if min(grid) < 51:
        lines += [
            "",
            f"The grid is {grid[0]} x {grid[1]}, coarser than Li et al.'s 51 x 51, to keep "
            "the run short; `--points-2d 51` gives the paper's resolution.",
        ]
    times = ", ".join(f"{name} {value:.1f} s" for name, value in doc["seconds"].items())
    lines += [
        "",
        "## Files",
        "",
        "Surfaces: `interpolation.npz`, `1d_a.npz`, `1d_b.npz`, `2d_a.npz`, `2d_b.npz`; "
        "every number with its settings: `results.json`; each figure as PDF and PNG. "
        "Each figure is remade from the saved surfaces, without recomputing, by "
        "(in this folder; `.png` for `.pdf` gives the PNG):",
        "",
        "```",
        *_plot_commands(doc),
        "```",
        "",
        f"Time: {times}.",
        "",
    ]
    write_text(os.path.join(out, "report.md"), "\n".join(lines))


def _plot_commands(doc: dict[str, Any]) -> list[str]:
    """The ``sharpscope plot`` commands that redraw the figures from the .npz files
    (in place: --overwrite)."""
    log_1d = " --log" if doc["1d_log"] else ""
    log_interp = " --log" if doc["interpolation_log"] else ""
    return [
        f"sharpscope plot interpolation.npz{log_interp} --out interpolation.pdf --overwrite",
        f"sharpscope plot 1d_a.npz 1d_b.npz{log_1d} --out 1d.pdf --overwrite",
        "sharpscope plot 2d_a.npz 2d_b.npz --out 2d_contour.pdf --overwrite",
        "sharpscope plot 2d_a.npz 2d_b.npz --style surface3d --out 2d_surface3d.pdf --overwrite",
    ]


def _curve_dict(surface: Surface) -> dict[str, Any]:
    return {
        "settings": surface.settings,
        "coords": np.asarray(surface.coords_a).tolist(),
        "loss": np.asarray(surface.loss).tolist(),
        "accuracy": np.asarray(surface.accuracy).tolist(),
        "summary": landscape_summary(surface) if surface.kind != "interpolation" else {},
    }


def _plane_dict(surface: Surface) -> dict[str, Any]:
    return {
        "settings": surface.settings,
        "layout": "loss[i][j] at (alpha = coords_a[j], beta = coords_b[i])",
        "coords_a": np.asarray(surface.coords_a).tolist(),
        "coords_b": np.asarray(surface.coords_b).tolist(),
        "loss": np.asarray(surface.loss).tolist(),
        "accuracy": np.asarray(surface.accuracy).tolist(),
        "summary": landscape_summary(surface),
    }


def _make_folder(out: str) -> None:
    """Create the output folder, parents included (``--out runs/demo`` on a fresh clone)."""
    try:
        os.makedirs(out, exist_ok=True)
    except (FileExistsError, NotADirectoryError):
        raise SharpscopeError(f"cannot make folder {out}: a file is in the way") from None
    except OSError as exc:
        raise SharpscopeError(f"cannot make folder {out}: {exc.strerror}") from None


def demo(
    out: str,
    *,
    seed: int = 0,
    epochs: int | None = None,
    rho: float | None = None,
    overwrite: bool = False,
    device: torch.device | str = "cpu",
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    **compare_options: Any,
) -> dict[str, Any]:
    """Train SGD and SAM on the default data (digits) with the same seed and budget
    (``out``/sgd, ``out``/sam), then :func:`compare_checkpoints` them into
    ``out``/compare. ``epochs`` and ``rho`` None keep :class:`TrainConfig`'s defaults;
    ``compare_options`` go to :func:`compare_checkpoints`. Returns its document, with
    each run's command, configuration, final metrics and time under "training"."""
    from .train import TrainConfig, resolve_config, train

    say = log or (lambda message: None)
    # Before any training: fail fast, not after SGD; the configuration's checks too.
    config = TrainConfig(optimizer="sam", seed=seed, epochs=epochs, device=str(device))
    if rho is not None:
        config.rho = rho
    resolve_config(config)
    _check_settings(**compare_options)
    for optimizer in ("sgd", "sam"):
        folder = os.path.join(out, optimizer)
        if not overwrite and os.path.isdir(folder) and os.listdir(folder):
            raise SharpscopeError(
                f"{folder} is not empty (an earlier demo?): pass --overwrite to replace the "
                "runs, or a new --out"
            )
    _make_folder(out)
    training: dict[str, Any] = {}
    for optimizer in ("sgd", "sam"):
        config = TrainConfig(optimizer=optimizer, seed=seed, epochs=epochs, device=str(device))
        if rho is not None:
            config.rho = rho
        folder = os.path.join(out, optimizer)
        command = f"sharpscope train --optimizer {optimizer} --seed {seed} --out {folder}"
        command += f" --epochs {epochs}" if epochs is not None else ""
        command += f" --rho {rho:g}" if rho is not None and optimizer == "sam" else ""
        say(command)
        start = time.perf_counter()
        metrics = train(config, folder, overwrite=overwrite, progress=progress, quiet=True)
        training[optimizer] = {
            "command": command,
            "config": asdict(config),
            "metrics": metrics,
            "seconds": time.perf_counter() - start,
        }
    return compare_checkpoints(
        os.path.join(out, "sgd", "checkpoint.pt"),
        os.path.join(out, "sam", "checkpoint.pt"),
        os.path.join(out, "compare"),
        labels=("SGD", "SAM"),
        seed=seed,
        device=device,
        progress=progress,
        log=log,
        training=training,
        overwrite=overwrite,
        **compare_options,
    )
