"""Compare two minima, numbers and pictures, in one folder.

:func:`compare_checkpoints` writes, for checkpoints A and B of one architecture:

- the ``measure`` table of both (loss, accuracy, worst-case sharpness, top Hessian
  eigenvalue, Hessian trace), so the flatness seen in the figures comes with numbers;
- the interpolation L((1 - t) w_A + t w_B) (Goodfellow et al. 2015) and its barrier;
- 1-D curves along one random direction, overlaid, and 2-D surfaces side by side: the
  same raw Gaussian directions (same seed) for both models, each filter-normalized
  against its own model's filters (Li et al. 2018, Sec. 4), so the two pictures differ
  only by the minima;
- every surface as ``.npz``, every figure as PDF and PNG, ``results.json`` with every
  number and its settings, and ``report.md`` (:mod:`sharpscope.report`).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch

from .checkpoint import check_trusted_model, read_checkpoint
from .data import data_spec_from_file
from .errors import SharpscopeError
from .files import LOCK_NAME, exclusive_lock, json_safe, remove_stale_temporaries, write_json
from .groups import document_numbers, group_statistics
from .landscape import interpolation_for_checkpoints, landscape_for_checkpoint
from .measure import measure_checkpoint
from .plots import shared_color_scale
from .report import (
    BAND_FIGURE,
    FIGURE_FORMATS,
    FIGURES,
    MEASURE_FILES,
    SEED_FIGURES,
    draw_band_figure,
    draw_figures,
    draw_seed_figures,
    write_report,
)
from .settings import CompareSettings, Loading, settings_from, split_keywords
from .surface import DRAW_SUMMARIES, Surface, landscape_summary, summarize_draws

# Every file compare writes into its folder.
OUTPUTS = (
    "interpolation.npz",
    "1d_a.npz",
    "1d_b.npz",
    "2d_a.npz",
    "2d_b.npz",
    "results.json",
    "report.md",
    *(f"{name}.{fmt}" for name in (*FIGURES, BAND_FIGURE, *SEED_FIGURES) for fmt in FIGURE_FORMATS),
    *MEASURE_FILES,
)


def compare_checkpoints(
    path_a: str | Sequence[str],
    path_b: str | Sequence[str],
    out: str,
    settings: CompareSettings | None = None,
    *,
    labels: tuple[str, str] | None = None,
    overwrite: bool = False,
    training: dict[str, Any] | None = None,
    device: torch.device | str = "cpu",
    progress: bool = False,
    log: Callable[[str], None] | None = None,
    **keywords: Any,
) -> dict[str, Any]:
    """Measure and picture checkpoints ``path_a`` and ``path_b``; write it all to ``out``.

    ``settings``: a :class:`~sharpscope.settings.CompareSettings` (or its fields as
    keywords): every landscape and measurement uses the same ``samples`` examples of
    ``split`` drawn from ``seed``, and the random directions are drawn from ``seed`` for
    both models. Keywords may also be fields of :class:`~sharpscope.settings.Loading`
    (how to rebuild the checkpoints). ``out`` is created (with its parents) if missing.
    ``training`` (how the two were trained, as :func:`~sharpscope.demo.demo` records it)
    is added to the report and the JSON. Returns the ``results.json`` document.

    Groups: ``path_a`` and ``path_b`` may each be several checkpoints (e.g. one per
    seed). The pictures are of the first of each; every checkpoint is measured, and with
    ``draws`` > 1 its 1-D curve is drawn along that many direction draws; the document
    then gains "statistics": every number as each group's mean ± standard error, and the
    difference with Welch's test and its 95% interval (:mod:`sharpscope.groups`), and
    report.md a table of them with a figure of the mean 1-D curves and their bands.

    Everything is checked before any work (settings, both checkpoints, same
    architecture, ``out`` empty or ``overwrite``), and the files are written to a
    staging folder inside ``out`` and moved into place only when all are done: a
    failed or interrupted compare leaves ``out`` as it was; no file written can be one
    of the two checkpoints, and one process at a time writes ``out`` (a lock).
    """
    keywords, loading = split_keywords(keywords)
    s = settings_from(CompareSettings, settings, keywords)
    group_a, group_b = _group(path_a, "A"), _group(path_b, "B")
    path_a, path_b = group_a[0], group_b[0]
    _check_inputs([*group_a, *group_b], out, loading)
    say = log or (lambda message: None)
    run = {"settings": s, "loading": loading, "device": device, "progress": progress}
    run["grouped"] = len(group_a) > 1 or len(group_b) > 1
    with _staging_folder(out, overwrite) as stage:
        seconds: dict[str, float] = {}
        start = time.perf_counter()
        say("interpolation A -> B")
        interp = _interpolation(path_a, path_b, labels, run)
        labels = tuple(interp.settings["labels"])  # type: ignore[assignment]
        interp.save(os.path.join(stage, "interpolation.npz"))
        seconds["interpolation"] = time.perf_counter() - start
        measured = _measure_both((path_a, path_b), labels, run, say, seconds)
        curves, planes = _surfaces((path_a, path_b), labels, run, say, seconds, stage)
        say("figures")
        start = time.perf_counter()
        figures, logs = draw_figures(stage, interp, curves, planes, labels)
        seconds["figures"] = time.perf_counter() - start
        document = _document(s, device, path_a, path_b, labels, interp, curves, planes)
        document.update(measure=measured, figures=figures, seconds=seconds)
        if run["grouped"] or s.draws > 1:
            run["training"] = training
            stats = _statistics((group_a, group_b), measured, curves, run, say, seconds)
            documents = stats.pop("documents")
            document.update(groups={"a": group_a, "b": group_b}, **stats)
            document["figures"][BAND_FIGURE] = draw_band_figure(stage, stats["bands"], labels)
            if documents[0] and documents[1]:
                runs = (group_a, group_b)
                document["figures"].update(draw_seed_figures(stage, documents, runs, labels))
        document.update({"1d_log": logs["1d"], "interpolation_log": logs["interpolation"]})
        if training is not None:
            document["training"] = training
        write_report(stage, document, measured, labels)
        write_json(os.path.join(stage, "results.json"), json_safe(document))
        _move_into_place(stage, out, (*group_a, *group_b))
    return document


def _group(paths: str | os.PathLike | Sequence[str], side: str) -> list[str]:
    """The checkpoints of one side: one path, or a non-empty sequence of them."""
    if isinstance(paths, str | os.PathLike):
        return [os.fspath(paths)]
    group = [os.fspath(p) for p in paths]
    if not group:
        raise SharpscopeError(f"group {side} has no checkpoints")
    if len(set(map(os.path.realpath, group))) != len(group):
        raise SharpscopeError(f"group {side} names one checkpoint twice")
    return group


def _statistics(groups, measured, curves, run: dict[str, Any], say, seconds) -> dict[str, Any]:
    """Every checkpoint's numbers (its measure document; the mean and maximum rise of its
    1-D curves and coarse 2-D surfaces over ``draws`` direction draws, averaged over the
    draws), their statistics by group, each checkpoint's landscape numbers with their
    standard error over the draws, and each group's mean 1-D curve with its standard
    error over checkpoints and draws."""
    s: CompareSettings = run["settings"]
    start = time.perf_counter()
    numbers: list[list[dict[str, float]]] = [[], []]
    documents: list[list[dict[str, Any]]] = [[], []]
    over_draws: list[list[dict[str, Any]]] = [[], []]
    bands = []
    for side, group in enumerate(groups):
        losses = []
        for index, path in enumerate(group):
            doc = measured[side] if index == 0 and measured else None
            if doc is None and s.measure:
                say(f"measure {path}")
                doc = _measure_one(path, run)
            if doc is not None:
                documents[side].append(doc)
            row = document_numbers(doc) if doc is not None else {}
            row.update(_training_numbers(path, run.get("training"), row.get("test accuracy")))
            # The picture's curve is draw 0 of the first checkpoint.
            drawn = _draws(path, run, say, dim=1, first=curves[side] if index == 0 else None)
            summaries = {"1-D": summarize_draws(drawn)}
            losses += [np.asarray(c.loss, dtype=float) for c in drawn]
            if s.draw_points_2d:
                summaries["2-D"] = summarize_draws(_draws(path, run, say, dim=2))
            for dim, summary in summaries.items():
                for name, label in DRAW_SUMMARIES.items():
                    row[f"{dim} {label} ({_draws_text(s.draws)})"] = summary[name]["mean"]
            over_draws[side].append({"checkpoint": path, **summaries})
            numbers[side].append(row)
        stacked = np.stack(losses)
        stderr = stacked.std(axis=0, ddof=1) / math.sqrt(len(stacked)) if len(stacked) > 1 else None
        bands.append(
            {
                "coords": np.asarray(curves[side].coords_a).tolist(),
                "mean": stacked.mean(axis=0).tolist(),
                "stderr": None if stderr is None else stderr.tolist(),
                "curves": len(stacked),
            }
        )
    seconds["statistics"] = time.perf_counter() - start
    return {
        "numbers": {"a": numbers[0], "b": numbers[1]},
        "statistics": group_statistics(numbers[0], numbers[1]),
        "landscape_draws": {"a": over_draws[0], "b": over_draws[1]},
        "bands": bands,
        "documents": documents,
    }


def _draws_text(draws: int) -> str:
    return f"{draws} draw{'s' * (draws > 1)}"


def _draws(path: str, run: dict[str, Any], say, dim: int, first: Surface | None = None):
    """The ``draws`` landscapes of checkpoint ``path``: 1-D curves of ``points`` points, or
    2-D surfaces of ``draw_points_2d`` per axis; ``first`` stands for draw 0 if given."""
    s: CompareSettings = run["settings"]
    points = s.points if dim == 1 else s.draw_points_2d
    surfaces = []
    for draw in range(s.draws):
        if draw == 0 and first is not None:
            surfaces.append(first)
            continue
        say(f"{dim}-D landscape of {path}, direction draw {draw}")
        surfaces.append(_landscape(path, run, dim=dim, points=points, draw=draw))
    return surfaces


def _training_numbers(
    path: str, training: dict[str, Any] | None, measured: float | None = None
) -> dict[str, float]:
    """The final test accuracy a run's training reports (on its whole test set), for the
    checkpoint at ``path`` (the "checkpoint" entry of a :func:`~sharpscope.demo.demo`
    training record); nothing if it is the ``measured`` test accuracy (the measurement
    covered the whole test set: one number, not two rows and two tests)."""
    for record in (training or {}).values():
        if record.get("checkpoint") and _same_file(record["checkpoint"], path):
            accuracy = record.get("metrics", {}).get("test_accuracy")
            if accuracy is None or accuracy == measured:
                return {}
            return {"final test accuracy (whole test set)": accuracy}
    return {}


def _seed_figure_settings(s: CompareSettings) -> dict[str, Any]:
    """What groups of runs are measured with beyond the table's defaults: the radii, the
    eigenvalues and the density the figures over seeds draw."""
    return {"rhos": s.rhos, "eigs": s.eigs, "density": s.density}


def _shared(run: dict[str, Any]) -> dict[str, Any]:
    """What every analysis of a comparison shares: the same examples (``split``,
    ``samples`` drawn with ``seed``, in batches of ``batch_size``; ``seed`` also draws
    the directions), the device, the progress bars and how checkpoints are rebuilt."""
    s: CompareSettings = run["settings"]
    return {
        "split": s.split,
        "samples": s.samples,
        "batch_size": s.batch_size,
        "seed": s.seed,
        "device": run["device"],
        "progress": run["progress"],
        **run["loading"].keywords(),
    }


def _measure_one(path: str, run: dict[str, Any]) -> dict[str, Any]:
    s: CompareSettings = run["settings"]
    return measure_checkpoint(
        path,
        trace_samples=s.trace_samples,
        **(_seed_figure_settings(s) if run["grouped"] else {}),
        **_shared(run),
    )


def _landscape(path: str, run: dict[str, Any], **surface: Any) -> Surface:
    """A landscape of checkpoint ``path`` with the comparison's range, directions and
    examples; ``surface``: dim, points, and a label or a direction draw. Every model gets
    the same raw directions of ``seed`` (and the same examples)."""
    s: CompareSettings = run["settings"]
    return landscape_for_checkpoint(
        path, range=s.range, directions=s.directions, **surface, **_shared(run)
    )


def _interpolation(path_a: str, path_b: str, labels, run: dict[str, Any]) -> Surface:
    """The interpolation A -> B; it checks the architectures match, and names the models
    (two models with one name become "NAME (A)" and "NAME (B)")."""
    s: CompareSettings = run["settings"]
    interp = interpolation_for_checkpoints(
        path_a,
        path_b,
        points=s.points,
        range=s.interpolation_range,
        labels=labels,
        **_shared(run),
    )
    named = interp.settings["labels"]
    if named[0] == named[1]:
        interp.settings["labels"] = [f"{named[0]} (A)", f"{named[1]} (B)"]
    return interp


def _measure_both(paths, labels, run: dict[str, Any], say, seconds) -> list[dict[str, Any]]:
    """The measure documents of both checkpoints (none if ``settings.measure`` is off)."""
    s: CompareSettings = run["settings"]
    if not s.measure:
        return []
    start = time.perf_counter()
    measured = []
    for path, label in zip(paths, labels, strict=True):
        say(f"measure {label}")
        measured.append(_measure_one(path, run))
    seconds["measure"] = time.perf_counter() - start
    return measured


def _surfaces(paths, labels, run: dict[str, Any], say, seconds, stage: str):
    """The 1-D curves and the 2-D planes of both checkpoints, saved into ``stage``."""
    s: CompareSettings = run["settings"]
    curves: list[Surface] = []
    planes: list[Surface] = []
    for dim, store, n in ((1, curves, s.points), (2, planes, s.points_2d)):
        start = time.perf_counter()
        for path, label, key in zip(paths, labels, "ab", strict=True):
            say(f"{dim}-D landscape of {label} ({n} points{' per axis' if dim == 2 else ''})")
            surface = _landscape(path, run, dim=dim, points=n, label=label)
            surface.save(os.path.join(stage, f"{dim}d_{key}.npz"))
            store.append(surface)
        seconds[f"{dim}d"] = time.perf_counter() - start
    return curves, planes


def _document(s, device, path_a, path_b, labels, interp, curves, planes) -> dict[str, Any]:
    """The results document: settings, labels, the surfaces and their numbers."""
    return {
        "command": "compare",
        "checkpoints": [str(path_a), str(path_b)],
        "settings": {
            **{k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(s).items()},
            "device": str(device),
        },
        "labels": list(labels),
        "interpolation": {
            "file": "interpolation.npz",
            **_curve_dict(interp),
            "barrier": interpolation_barrier(interp),
        },
        "1d": [
            {"label": c.settings["label"], "file": f"1d_{k}.npz", **_curve_dict(c)}
            for c, k in zip(curves, "ab", strict=True)
        ],
        "2d": [
            {"label": p.settings["label"], "file": f"2d_{k}.npz", **_plane_dict(p)}
            for p, k in zip(planes, "ab", strict=True)
        ],
        "color_scale": shared_color_scale([p.loss for p in planes]).to_dict(),
    }


def _check_inputs(paths: Sequence[str], out: str, loading: Loading) -> None:
    """The refusals of the checkpoints and the output folder, before any work."""
    if not str(out).strip():
        raise SharpscopeError("the output folder is empty: give one")
    if os.path.exists(out) and not os.path.isdir(out):
        raise SharpscopeError(f"{out} exists and is not a folder")
    specs = []
    for path in paths:
        meta = read_checkpoint(path)  # missing, foreign or unsafe files: one clear line
        if "model" not in meta:
            raise SharpscopeError(
                f"{path}: a plain state_dict; compare needs sharpscope checkpoints"
            )
        check_trusted_model(
            meta["model"]["name"], path, named=loading.model, trust_code=loading.trust_code
        )
        if loading.data is None and isinstance(meta.get("data"), dict):
            # The user's own data a checkpoint names: refused before the folder is made.
            data_spec_from_file(meta["data"], path, trust_code=loading.trust_code)
        specs.append(meta["model"])
        for name in OUTPUTS:
            if _same_file(path, os.path.join(out, name)):
                raise SharpscopeError(
                    f"{path} is where compare writes {name}: move it, or choose another --out"
                )
    for path, spec in zip(paths[1:], specs[1:], strict=True):
        if spec != specs[0]:
            raise SharpscopeError(
                f"{paths[0]} and {path} have different architectures: nothing to compare"
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
