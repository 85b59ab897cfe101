"""The figures and ``report.md`` of a comparison (:mod:`sharpscope.compare`).

Every figure as PDF (for the paper) and PNG (for the report), each shown with the
``sharpscope plot`` command that redraws it from the saved surfaces.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np

from .files import write_text
from .groups import format_statistics, mean_se
from .measure import format_table
from .plots import plot_1d, plot_2d, shared_color_scale
from .surface import DRAW_SUMMARIES, Surface

FIGURE_FORMATS = ("pdf", "png")  # vector for the paper, PNG for report.md
FIGURES = ("interpolation", "1d", "2d_contour", "2d_surface3d")
# Groups of runs: each group's mean 1-D curve with a band of one standard error.
BAND_FIGURE = "1d_band"
# Groups of runs: the figures over seeds (sharpscope.figures), drawn from the measure
# documents of every checkpoint, saved beside them so that `sharpscope plot` redraws them.
SEED_FIGURES = ("rho", "eigenvalues", "density", "training")
MEASURE_FILES = ("measure_a.json", "measure_b.json")


def draw_seed_figures(
    out: str,
    documents: Sequence[Sequence[dict[str, Any]]],
    runs: Sequence[Sequence[str]],
    labels: tuple[str, str],
) -> dict[str, list[str]]:
    """Worst-case sharpness against rho, the top-k eigenvalues, the SLQ density and (when
    every checkpoint's folder is a run tracked with --track-every) the top eigenvalue
    over training, each group's mean ± standard error, as PDF and PNG; the measure
    documents as measure_a.json / measure_b.json. A figure the documents cannot make (one
    rho, no density) is left out. Returns {name: [file, ...]}."""
    from . import figures
    from .errors import SharpscopeError
    from .files import write_json

    for name, docs, paths in zip(MEASURE_FILES, documents, runs, strict=True):
        results = {"command": "measure", "labels": list(paths), "results": list(docs)}
        write_json(os.path.join(out, name), results)
    groups = {labels[0]: list(documents[0]), labels[1]: list(documents[1])}
    plotters = {
        "rho": lambda f: figures.plot_sharpness_rho(groups, f),
        "eigenvalues": lambda f: figures.plot_eigenvalues(groups, f),
        "density": lambda f: figures.plot_density(groups, f),
        "training": lambda f: figures.plot_training(_tracked_runs(runs, labels), f),
    }
    drawn: dict[str, list[str]] = {}
    for name in SEED_FIGURES:
        try:
            for fmt in FIGURE_FORMATS:
                plotters[name](os.path.join(out, f"{name}.{fmt}"))
        except SharpscopeError:
            continue  # the documents (or runs) hold nothing for this figure
        drawn[name] = [f"{name}.{fmt}" for fmt in FIGURE_FORMATS]
    return drawn


def _tracked_runs(runs: Sequence[Sequence[str]], labels: tuple[str, str]) -> dict[str, list]:
    """The run folders of the checkpoints, when every one of them is a run folder."""
    from .training_figure import read_run

    return {
        label: [read_run(os.path.dirname(os.path.abspath(p))) for p in paths]
        for label, paths in zip(labels, runs, strict=True)
    }


def draw_band_figure(
    out: str, bands: Sequence[dict[str, Any]], labels: tuple[str, str]
) -> list[str]:
    """Each group's mean 1-D curve over its checkpoints and direction draws, with a band
    of one standard error, as PDF and PNG; returns the file names."""
    from matplotlib.figure import Figure

    from .plots import figure_width, paper_style, save_figure

    files = []
    for fmt in FIGURE_FORMATS:
        with paper_style():
            fig = Figure(figsize=(figure_width(1), 2.6), layout="constrained")
            ax = fig.subplots()
            for band, label in zip(bands, labels, strict=True):
                x, mean = np.asarray(band["coords"]), np.asarray(band["mean"])
                (line,) = ax.plot(x, mean, label=f"{label} (mean of {band['curves']})")
                if band["stderr"] is not None:
                    se = np.asarray(band["stderr"])
                    ax.fill_between(x, mean - se, mean + se, color=line.get_color(), alpha=0.25)
            ax.set_xlabel("α along random directions (as in the 1-D figure)")
            ax.set_ylabel("loss (mean ± s.e.)")
            ax.legend()
            save_figure(fig, os.path.join(out, f"{BAND_FIGURE}.{fmt}"))
        files.append(f"{BAND_FIGURE}.{fmt}")
    return files


# -- figures and report --------------------------------------------------------------
def draw_figures(
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


def write_report(
    out: str, doc: dict[str, Any], measured: list[dict[str, Any]], labels: tuple[str, str]
) -> None:
    """``out``/report.md: the comparison ``doc`` (and the ``measured`` documents) as a page
    with its figures, numbers, settings and the commands that redraw each figure."""
    lines = _head(doc, labels)
    if "training" in doc:
        lines += _training(doc, labels)
    if measured:
        lines += ["## Measurements", "", "```", format_table(measured, list(labels)), "```", ""]
    if "statistics" in doc:
        lines += _statistics(doc, labels)
    lines += _landscape_numbers(doc, labels) + _figure_sections(doc) + _files(doc)
    write_text(os.path.join(out, "report.md"), "\n".join(lines))


def _statistics(doc: dict[str, Any], labels: tuple[str, str]) -> list[str]:
    groups, s = doc["groups"], doc["settings"]
    planes = (
        f" and {s['draw_points_2d']} x {s['draw_points_2d']} 2-D surfaces"
        if s["draw_points_2d"]
        else ""
    )
    return [
        "## Statistics over seeds and direction draws",
        "",
        f"{labels[0]}: {len(groups['a'])} checkpoint(s), {labels[1]}: {len(groups['b'])}; "
        f"1-D curves{planes} along {s['draws']} direction draw(s) each, their rises "
        "averaged over the draws. Every number is the group's mean ± "
        "standard error over its checkpoints (n); the difference is Welch's two-sample test "
        "(no equal-variance assumption) with its 95% interval. A difference whose interval "
        "contains 0 is not established by these runs.",
        "",
        *format_statistics(doc["statistics"], labels),
        "",
        *_multiple_tests(doc["statistics"]),
        *_draws_table(doc, labels),
        f"![mean 1-D curves]({BAND_FIGURE}.png)",
        "",
        *_seed_figures(doc, labels),
    ]


def _multiple_tests(table: dict[str, dict[str, Any]]) -> list[str]:
    """A reminder of how many tests the table holds: with m of them, about m / 20 show
    p < 0.05 by chance alone; Bonferroni's bound 0.05 / m (Holm's first step) holds the
    chance of any false finding to 5%."""
    tested = [row["difference"]["p"] for row in table.values() if row["difference"]]
    if len(tested) < 2:
        return []
    m, below = len(tested), sum(p < 0.05 for p in tested)
    return [
        f"The table holds {m} tests, {below} with p < 0.05; by chance alone about "
        f"{0.05 * m:.2g} would be, and many rows measure related things. Holding the chance "
        f"of any false finding to 5% (Bonferroni, Holm's first step) needs p < "
        f"{0.05 / m:.3g} (reached by {sum(p < 0.05 / m for p in tested)} of the {m}).",
        "",
    ]


def _draws_table(doc: dict[str, Any], labels: tuple[str, str]) -> list[str]:
    """Each checkpoint's landscape rises as mean ± standard error over its direction
    draws: how much one picture's flatness depends on the directions drawn."""
    if doc["settings"]["draws"] < 2:
        return []
    dims = [d for d in ("1-D", "2-D") if d in doc["landscape_draws"]["a"][0]]
    head = " | ".join(f"{d} {what}" for d in dims for what in DRAW_SUMMARIES.values())
    lines = [
        f"Over the {doc['settings']['draws']} direction draws of each checkpoint "
        "(mean ± standard error over the draws):",
        "",
        f"| checkpoint | {head} |",
        "| --- |" + " ---: |" * (2 * len(dims)),
    ]
    for side, label in zip(("a", "b"), labels, strict=True):
        for entry in doc["landscape_draws"][side]:
            cells = [mean_se(entry[d][name], with_n=False) for d in dims for name in DRAW_SUMMARIES]
            lines.append(f"| {label}: `{entry['checkpoint']}` | " + " | ".join(cells) + " |")
    return [*lines, ""]


_SEED_FIGURE_TEXT = {
    "rho": "Worst-case sharpness against the radius rho (APGD), mean ± s.e. over seeds.",
    "eigenvalues": "The top Hessian eigenvalues, mean ± s.e. over seeds; the legend gives "
    "λ1/λk (Foret et al. 2021, Fig. 3).",
    "density": "The Hessian's eigenvalue density by stochastic Lanczos quadrature, log "
    "axis, mean over seeds (Ghorbani et al. 2019).",
    "training": "The top Hessian eigenvalue over training with the optimizer's stability "
    "edge (Cohen et al. 2021, Fig. 1).",
}


def _seed_figures(doc: dict[str, Any], labels: tuple[str, str]) -> list[str]:
    lines: list[str] = []
    for name in SEED_FIGURES:
        if name not in doc["figures"]:
            continue
        if name == "training":
            paths = [os.path.dirname(p) for p in doc["groups"]["a"] + doc["groups"]["b"]]
            n = len(doc["groups"]["a"])
            a, b = " ".join(paths[:n]), " ".join(paths[n:])
            groups = f"--group {labels[0]} {a} --group {labels[1]} {b}"
        else:
            groups = f"--group {labels[0]} measure_a.json --group {labels[1]} measure_b.json"
        lines += [
            f"![{name}]({name}.png)",
            "",
            _SEED_FIGURE_TEXT[name] + f" Redraw: `sharpscope plot --kind {name} {groups} "
            f"--out {name}.pdf --overwrite`",
            "",
        ]
    return lines


def _head(doc: dict[str, Any], labels: tuple[str, str]) -> list[str]:
    s, (a, b) = doc["settings"], labels
    n_examples = doc["1d"][0]["settings"]["n_examples"]
    return [
        f"# {a} vs {b}: sharpness and loss landscapes",
        "",
        f"- A = {a}: `{doc['checkpoints'][0]}`",
        f"- B = {b}: `{doc['checkpoints'][1]}`",
        f"- every number and surface on the same {n_examples} {s['split']} examples "
        f"(seed {s['seed']}); random directions drawn from seed {s['seed']} for both models, "
        f"each {s['directions']}-normalized against its own model (Li et al. 2018)",
        "",
    ]


def _training(doc: dict[str, Any], labels: tuple[str, str]) -> list[str]:
    lines = ["## Training", ""]
    runs = doc["training"]
    names = list(labels) if len(runs) == 2 else list(runs)  # a pair, or one line per run
    for name, run in zip(names, runs.values(), strict=True):
        m = run["metrics"]
        accuracy = m.get("test_accuracy")
        shown = f"{accuracy:.2%}" if accuracy is not None else "-"
        lines.append(
            f"- {name}: `{run['command']}` ({run['seconds']:.0f} s): train loss "
            f"{m['train_eval_loss']:.4g}, test accuracy {shown}"
        )
    return [*lines, ""]


def _landscape_numbers(doc: dict[str, Any], labels: tuple[str, str]) -> list[str]:
    rows = [
        ("loss at the minimum", "centre_loss", "1d"),
        ("1-D: mean loss rise over the range", "mean_rise", "1d"),
        ("1-D: max loss over the range", "max_loss", "1d"),
        ("2-D: mean loss rise over the plane", "mean_rise", "2d"),
        ("2-D: max loss over the plane", "max_loss", "2d"),
    ]
    lines = [
        "## Landscape numbers",
        "",
        f"| | {labels[0]} | {labels[1]} |",
        "| --- | ---: | ---: |",
    ]
    for name, key, dim in rows:
        values = [f"{entry['summary'][key]:.4g}" for entry in doc[dim]]
        lines.append(f"| {name} | {values[0]} | {values[1]} |")
    barrier = doc["interpolation"]["barrier"]
    return [
        *lines,
        "",
        f"Interpolation barrier A → B (max over t in [0, 1] of L(t) minus the chord; "
        f"Frankle et al. 2020): {barrier['value']:.4g} at t = {barrier['t']:.3g}.",
    ]


def _figure_sections(doc: dict[str, Any]) -> list[str]:
    s, grid = doc["settings"], doc["2d"][0]["settings"]["points"]
    lines = [
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
    return lines


def _files(doc: dict[str, Any]) -> list[str]:
    times = ", ".join(f"{name} {value:.1f} s" for name, value in doc["seconds"].items())
    return [
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
